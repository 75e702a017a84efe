#!/usr/bin/env bash
# Checks the workspace against the newest dependency versions its manifests allow, which is
# what a user who adds redbuckets gets, with warnings as errors: the committed Cargo.lock pins
# older ones and would hide, say, a deprecation in a new rustls. The committed lock file is
# never touched: the sources are copied to target/latest-deps/src, which gets a lock file of
# its own (`cargo update`), and build in target/latest-deps (kept between runs, so only what
# changed is checked again).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work="$root/target/latest-deps"
src="$work/src"
rm -rf "$src"
mkdir -p "$src"
# The tracked files as they are in the working tree (uncommitted changes included).
git ls-files -z --cached --others --exclude-standard | grep -zv '^target/' \
  | xargs -0 -I{} cp --parents {} "$src" 2>/dev/null || true
cd "$src"
cargo update --quiet
echo "newest compatible versions: $(grep -A1 '^name = "rustls"$' Cargo.lock | tail -1), $(grep -A1 '^name = "redis"$' Cargo.lock | tail -1), $(grep -A1 '^name = "tokio"$' Cargo.lock | tail -1)"
RUSTFLAGS="-D warnings" CARGO_TARGET_DIR="$work/target" cargo check --workspace --all-targets --quiet
