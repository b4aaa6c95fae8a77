#!/bin/sh
# One TLS identity for every replica of compose.ha.yaml. The CA lives in
# /ca (the uplink-ca volume): made here at first start, or put there by
# the operator beforehand (ca.pem and its key, ca-key.pem, PKCS#8 PEM).
# Each replica's data dir (/data/<name>, its own volume) gets a copy,
# owner-only for the image's user, so that every replica issues itself a
# certificate that agents trusting ca.pem accept. Runs at every start:
# a CA replaced in /ca reaches every replica.
set -eu
uid=10001
if [ ! -s /ca/ca.pem ] || [ ! -s /ca/ca-key.pem ]; then
  (
    umask 077
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
      -nodes -days 36500 -keyout /ca/ca-key.pem.new -out /ca/ca.pem.new \
      -subj "/O=uplink/CN=uplink backend CA $(openssl rand -hex 8)" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  )
  mv /ca/ca-key.pem.new /ca/ca-key.pem
  mv /ca/ca.pem.new /ca/ca.pem
  echo "created a CA: $(openssl x509 -in /ca/ca.pem -noout -subject)"
fi
chmod 0644 /ca/ca.pem
chmod 0600 /ca/ca-key.pem
for dir in /data/*; do
  chown "$uid:$uid" "$dir"
  chmod 0700 "$dir"
  install -o "$uid" -g "$uid" -m 0600 /ca/ca.pem /ca/ca-key.pem "$dir/"
done
echo "CA given to: $(cd /data && echo *)"
