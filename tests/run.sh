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
if ! command -v buf >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check buf-bin
  hash -r
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

log "proto lint (buf)"
buf lint

log "format and clippy"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

log "tests"
cargo nextest run --locked --no-fail-fast "$@"
