#!/usr/bin/env bash
# Generates the Python code of the contract (messages and Connect services)
# from ../../proto into gen/ (or the directory given), with the plugins
# requirements.txt installs.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-.venv/bin/python}
bin=$(dirname "$py")
out=${1:-gen}
rm -rf "$out" && mkdir -p "$out"
"$py" -m grpc_tools.protoc -I../../proto \
  --plugin=protoc-gen-py="$bin/protoc-gen-py" \
  --plugin=protoc-gen-connectrpc="$bin/protoc-gen-connectrpc" \
  --py_out="$out" --connectrpc_out="$out" \
  ../../proto/uplink/v1/*.proto
