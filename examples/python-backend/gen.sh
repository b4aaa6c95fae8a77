#!/usr/bin/env bash
# Generates the Python code of the contract (messages and Connect services)
# from ../../proto into gen/, with the plugins requirements.txt installs.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-.venv/bin/python}
bin=$(dirname "$py")
rm -rf gen && mkdir gen
"$py" -m grpc_tools.protoc -I../../proto \
  --plugin=protoc-gen-py="$bin/protoc-gen-py" \
  --plugin=protoc-gen-connectrpc="$bin/protoc-gen-connectrpc" \
  --py_out=gen --connectrpc_out=gen \
  ../../proto/uplink/v1/*.proto
