#!/usr/bin/env bash
# Every figure issue 10 aims at, in one run (about 15 minutes on a 2-core VM; run it on a quiet
# machine: other load shows in every figure). Each part starts its own redis-server on a free
# port and ends by itself:
#   1. server time per call, each kind of call alone (script_cost: 4 x 1,024 and 1,000 x 65,536);
#   2. the time a moved bucket spends unowned, with real `redbuckets join` processes, and the
#      server time of the scripts that moved them (bench/handoff/run.py, 3 rounds);
#   3. the floors: two idle round trips between processes, and 1,000 connections calling PING
#      or a do-nothing FCALL at the renewal rates of ttl 3 s and of the defaults;
#   4. members started together at 10, 100, 300 and 1,000 x 65,536 (ttl 3 s): start, balance,
#      calls and Redis CPU per join and leave, steady calls/s and Redis CPU, safety; then
#      1,000 x 65,536 at the defaults (ttl 10 s) for the steady Redis CPU there.
# Usage: scripts/bench.sh [label]   (default label: the current commit). The scale runs go to
# target/scale (table scale.md, scale.json, chart scale.svg); `--out bench/scale` is what the
# committed results used.
set -euo pipefail
cd "$(dirname "$0")/.."
label="${1:-$(git rev-parse --short HEAD)}"
out="${SCALE_OUT:-target/scale}"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: install it (apt-get install -y redis-server)" >&2
  exit 1
fi
cargo build --release -p redbuckets-cli
cargo build --release -p redbuckets --examples

echo "== 1. server time per call (script_cost)"
target/release/examples/script_cost
target/release/examples/script_cost 1000 65536

echo "== 2. handoff gap, 4 x 1,024, real join processes"
python3 bench/handoff/run.py target/release/redbuckets 3

echo "== 3. floors"
target/release/examples/floor handoff
target/release/examples/floor handover 204 4
for rate in 667 200; do
  for call in ping fcall; do
    target/release/examples/floor renewals 1000 "$rate" 0 "$call"
  done
done

echo "== 4. members started together (label $label, results in $out)"
scale=(target/release/examples/scale --buckets 65536 --heartbeat 1)
large=(--members 1000 --start-limit 90 --balance-limit 150 --cap 600)
"${scale[@]}" --members 10,100,300 --ttl 3 --window 10 --label "$label" --out "$out"
"${scale[@]}" "${large[@]}" --ttl 3 --window 10 --label "$label" --out "$out"
# Apart: the table and chart compare runs at ttl 3 s.
"${scale[@]}" "${large[@]}" --ttl 10 --window 20 --label "$label-defaults" --out "$out-defaults"
