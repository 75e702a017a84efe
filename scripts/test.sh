#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs redis-server when it is missing (the
# real-Redis tests start their own servers on free ports), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found; installing it (apt-get install -y redis-server)" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null
  fi
fi
redis-server --version

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi
# nextest does not run doc-tests.
cargo test --workspace --locked --doc
