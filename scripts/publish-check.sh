#!/usr/bin/env bash
# The library and the CLI package and build as they would be published: `cargo publish
# --dry-run` packs both and builds the CLI against the packed library (a local registry under
# target/package). Cargo unpacks that library into $CARGO_HOME/registry/src/<local registry>/
# and reuses an unpacked copy of the same version from an earlier run, which would build the
# CLI against stale library sources; those copies are removed first.
set -euo pipefail
cd "$(dirname "$0")/.."
registry_src="${CARGO_HOME:-$HOME/.cargo}/registry/src"
if [ -d "$registry_src" ]; then
  # Only the local registry's directories (their names do not start with a host name).
  find "$registry_src" -mindepth 2 -maxdepth 2 -name 'redbuckets*' -path "$registry_src/-*" \
    -exec rm -rf {} +
fi
cargo publish --dry-run --locked --workspace --exclude redbuckets-testkit "$@"
