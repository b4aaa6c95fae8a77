#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (idempotently), then runs lint, the proto lint and every test.
#
#   tests/run.sh            # everything
#   tests/run.sh -E 'test(ping)'   # extra arguments go to cargo nextest
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

log "tools"
# Real parts the tests drive: squid with OpenSSL (CONNECT, Basic auth,
# ssl_bump), htpasswd for its password file, curl for Connect requests.
need=()
[ -x /usr/lib/squid/security_file_certgen ] || need+=(squid-openssl)
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The executor's tests: a busybox image built FROM scratch, and a registry
# on loopback to pull it from.
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && ldd /bin/busybox 2>&1 | grep -q "not a dynamic" || need+=(busybox-static)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
# The image's tests: make, and compose.yaml under Debian's docker-compose.
command -v make >/dev/null 2>&1 || need+=(make)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
# compose.ha.yaml's test: images in place of postgres:15 and haproxy:2.6,
# bootstrapped from the Debian mirror.
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
# The load-generator ingest tests: JMeter's Graphite backend listener (it
# needs a JDK to start through the test's launcher) and InfluxDB clients.
[ -f /usr/share/jmeter/bin/ApacheJMeter.jar ] || need+=(jmeter)
[ -f /usr/share/jmeter/lib/ext/ApacheJMeter_http.jar ] || need+=(jmeter-http)
command -v javac >/dev/null 2>&1 || need+=(default-jdk-headless)
/usr/bin/python3 -c 'import influxdb' >/dev/null 2>&1 || need+=(python3-influxdb)
# An ingress in front of the backend (tests/ingress.rs): nginx with its
# http_v2 and grpc modules, and HAProxy; started by the tests themselves.
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
# The PostgreSQL store's tests (the store suite, tests/postgres.rs): the
# server's programs, run by testkit as the `postgres` user the package
# creates, on a cluster of their own in a temporary directory.
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql)
# Prometheus scraping backend replicas as docs/ha/prometheus.yml says
# (tests/failover.rs).
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# Virtual environments for examples/python-backend.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  # Packages start no service (nginx would take port 80, PostgreSQL its
  # packaged cluster on 5432).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -c 'import influxdb_client' >/dev/null 2>&1 ||
  python3 -m pip install --quiet --disable-pip-version-check influxdb-client
# examples/python-backend (tests/python_backend.rs): its own virtual
# environment from its requirements.txt, made again when they change.
py=examples/python-backend
if ! cmp -s "$py/requirements.txt" "$py/.venv/requirements.txt" 2>/dev/null; then
  rm -rf "$py/.venv"
  python3 -m venv "$py/.venv"
  "$py/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$py/requirements.txt"
  cp "$py/requirements.txt" "$py/.venv/requirements.txt"
fi
if ! command -v buf >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check buf-bin
  hash -r
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

log "docker engine"
# The executor, run and chaos tests drive the real engine: say at once when
# it does not answer instead of failing dozens of tests one by one.
if engine=$(docker version --format '{{.Server.Version}}' 2>/dev/null) && [ -n "$engine" ]; then
  echo "engine $engine answers"
else
  echo "the Docker engine does not answer (docker version failed): start it (dockerd or systemctl start docker) and check access to /var/run/docker.sock, then run this again" >&2
  exit 1
fi

log "proto lint (buf)"
buf lint

log "proto compatibility (buf breaking)"
# Against the previous commit and the last released contract
# (proto/RELEASED): uplink.v1 takes additive changes only.
scripts/proto-compat

log "format and clippy"
cargo fmt --all --check
# The workspace: the uplink package and the harness its tests and benches
# share (testkit/).
cargo clippy --workspace --all-targets --locked -- -D warnings
# The agent build (no backend, no JSON bodies) compiles and is as clean.
cargo clippy --no-default-features --lib --bins --locked -- -D warnings

log "image"
# The image from the top-level Dockerfile, as tests/image.rs and the
# container tests run it: built here once (the tests find it current).
make -s image-local
# And the stand-ins tests/compose_ha.rs runs (once per machine).
scripts/stand-in-images

log "tests"
cargo nextest run --locked --no-fail-fast "$@"
