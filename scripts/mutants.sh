#!/usr/bin/env bash
# Mutation testing: do the tests catch small, plausible mistakes? Not run in CI (minutes per
# mutant); run it after changing the Lua scripts, their tests, or the Rust modules named below,
# and put its table in the change's note (issue 19, item 8).
#
#   scripts/mutants.sh lua [ID...]      the Lua edits below (all, or those IDs), one at a time
#   scripts/mutants.sh list             the Lua edits, without running anything
#   scripts/mutants.sh rust [FILE...]   cargo-mutants on Rust files (default: src/ledger.rs and
#                                       src/share.rs), with the library's unit tests only
#
# Lua part. Each edit is a literal text replacement in one file of crates/redbuckets/src/store/lua/
# that must match exactly once (else it is reported BADEDIT: the list went stale). It is applied to
# a scratch copy of the work tree ($MUTANTS_DIR, default $TMPDIR/redbuckets-mutants, with its own
# target directory so rebuilds stay incremental), never to the tree you work in; the file is put
# back after each edit whatever happens (trap). The scripts are compiled into the library
# (include_str!), so each edit rebuilds it. Then the fast tests that run the Lua, in this order:
# differential, redis_store, redis_functions, lua_share (override with MUTANTS_TESTS="a b").
# KILLED: a test failed (the first failing test binary and test names are printed);
# TIMEOUT: a test binary ran past MUTANTS_TIMEOUT seconds (default 600; counts as killed);
# SURVIVED: every test passed: either add a test that fails on it, or write down why the edit
# changes no behaviour. MUTANTS_ALL=1 runs every test binary even after one failed (slower; tells
# which suites catch each edit). The table goes to stdout and to $MUTANTS_DIR/lua-report.txt.
#
# Rust part. Installs cargo-mutants if missing (`cargo install --locked cargo-mutants`) and runs
# `cargo mutants --file <each> --timeout $MUTANTS_TIMEOUT --cargo-test-arg=--lib` in a copy it
# makes itself (`--lib` for cargo, not `-- --lib`, which goes to the test binaries and builds
# every test target): only the library's unit tests, where the pure modules (ledger, share)
# are tested, so each mutant takes a rebuild of the library and its unit tests (tens of seconds). Its own report
# is in ./mutants.out. MUTANTS_RUST_ARGS adds arguments, e.g. "--shard 0/5" to run a fifth of
# the mutants (about 200 for the two default files) when time is short.
#
# Needs redis-server on the PATH (as the tests do). Uses whatever cores are free: set
# CARGO_BUILD_JOBS on a shared machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LUA=crates/redbuckets/src/store/lua
TIMEOUT=${MUTANTS_TIMEOUT:-600}

# id | file | text | replacement | what the edit gets wrong
MUTANTS=()
m() { MUTANTS+=("$1"$'\x1f'"$2"$'\x1f'"$3"$'\x1f'"$4"$'\x1f'"$5"); }

m expiry-floor common.lua \
  'return idiv(now + ttl_us + 999, 1000)' 'return idiv(now + ttl_us, 1000)' \
  'a session expiry rounded down to the ms, not up'
m fast-renews-at-expiry heartbeat_fast.lua \
  'if not at or at <= now_ms then' 'if not at or at < now_ms then' \
  'the fast heartbeat renews a session at exactly its expiry'
m stale-check-off common.lua \
  "why = 'stale'" 'why = nil' \
  'load_current_meta never sees a foreign run_id (data another Redis process wrote)'
m live-at-expiry common.lua \
  'return e ~= nil and e > now_ms' 'return e ~= nil and e >= now_ms' \
  'a session counts as live at exactly its expiry'
m purge-boundary common.lua \
  "redis.call('ZRANGEBYSCORE', K_EXP, '-inf', fmt(now_ms), 'WITHSCORES'" \
  "redis.call('ZRANGEBYSCORE', K_EXP, '-inf', '(' .. fmt(now_ms), 'WITHSCORES'" \
  'the purge leaves a session that expires exactly now'
m token-not-increased common.lua \
  'local token = math.max(now, meta.token + 1)' 'local token = math.max(now, meta.token)' \
  'a grant within the same µs as the last reuses its token'
m take-one-more common.lua \
  "return 'take', math.min(allowed - mine, free), base, share_max" \
  "return 'take', math.min(allowed - mine + 1, free), base, share_max" \
  'the share rule takes one bucket more than allowed'
m release-one-more common.lua \
  "return 'release', mine - allowed, base, share_max" \
  "return 'release', mine - allowed + 1, base, share_max" \
  'the share rule releases one bucket more than needed'
m extra-boundary common.lua \
  'if others_with_extra < remainder then' 'if others_with_extra <= remainder then' \
  'one member too many may hold base + 1'
m max-take-ignored rebalance.lua \
  'math.min(count, math.max(max_take, 1))' 'count' \
  "a rebalance step ignores the caller's max_take"
m notice-other-buckets common.lua \
  ".. table.concat(taken, ' '))" \
  ".. table.concat(taken, ' '):gsub('%d+', function(b) return tostring((tonumber(b) + 1) % meta.buckets) end))" \
  'a grant notice names other buckets (the same count)'
m reply-other-buckets rebalance.lua \
  'granted[#granted + 1] = b' 'granted[#granted + 1] = tostring((tonumber(b) + 1) % B)' \
  'a rebalance reply names other buckets (the same count)'
m release-ignores-known release.lua \
  'if not seen[b] and not (t and t > known) then' 'if not seen[b] then' \
  'a release frees buckets granted since the token the member knows'
m release-not-held release.lua \
  'if hit == 1 then' 'if true then' \
  "a release frees named buckets the session does not hold (another member's)"
m release-keeps-count release.lua \
  'if w and committed(member, w) > held then' 'if false then' \
  'a release beyond the committed surplus does not lower the count'
m fast-nonce-off heartbeat_fast.lua \
  "if redis.call('HGET', K_SESS, member) ~= nonce then" 'if false then' \
  "the fast heartbeat renews whichever session holds the member's id"
m inuse-off register.lua \
  'if alive and existing ~= replaces then' 'if false then' \
  'a new session replaces a live one it does not name'
m settle-quarantine-boundary common.lua \
  'if now < meta.grant_after then' 'if now <= meta.grant_after then' \
  'freed buckets are not granted at the exact end of the quarantine'
m rebalance-quarantine-boundary rebalance.lua \
  'if now < meta.grant_after then' 'if now <= meta.grant_after then' \
  'a rebalance step waits at the exact end of the quarantine'
m token-floor common.lua \
  'return math.max(meta.token, now - 1)' 'return math.max(meta.token, now)' \
  "a registration's token floor one µs late"
m unattended-boundary common.lua \
  'return (meta.seen or meta.created or 0) + (meta.ttl or 0) <= now' \
  'return (meta.seen or meta.created or 0) + (meta.ttl or 0) < now' \
  'a group nobody was seen in for exactly a ttl is kept'
m join-commit-off-by-one common.lua \
  "redis.call('ZADD', k, fmt(g.base + 1), m)" "redis.call('ZADD', k, fmt(g.base + 2), m)" \
  'after a join, members above base + 1 come down to base + 2'
m watch-one common.lua \
  "ZRANGEBYLEX', k, '(' .. member, '+', 'LIMIT', 0, 2)" \
  "ZRANGEBYLEX', k, '(' .. member, '+', 'LIMIT', 0, 1)" \
  'a member watches the next one member, not two'
m holdings-of-expired holdings.lua \
  'if not live(member, nonce, now_ms) then' "if redis.call('HGET', K_SESS, member) ~= nonce then" \
  'holdings answers for a session that expired and is not purged yet'
m snapshot-expiry-boundary snapshot.lua \
  'if tonumber(sessions[i + 1]) <= now_ms then' 'if tonumber(sessions[i + 1]) < now_ms then' \
  'a snapshot shows a session that expires exactly now as live'
m deregister-not-seen deregister.lua \
  'seen_leaving(meta, now)' '-- seen_leaving(meta, now)' \
  'a deregistration does not record that a live member left (the group looks unattended)'
m settle-expired-taker common.lua \
  'if ends and ends <= now_ms then' 'if ends and ends < now_ms then' \
  'settle grants to a taker whose session expires exactly now'
# Parking (a rejoin grace).
m park-frees common.lua \
  'if grace <= 0 then' 'if true then' \
  'a session with a rejoin grace is freed when it ends, not parked'
m grace-end-boundary common.lua \
  "redis.call('ZRANGEBYSCORE', parked_key(), '-inf', fmt(now)" \
  "redis.call('ZRANGEBYSCORE', parked_key(), '-inf', '(' .. fmt(now)" \
  'parked buckets are freed only after the exact end of the grace'
m settle-parked-taker common.lua \
  '    if parked(m) then' '    if false then' \
  'settle treats a parked taker as a live one (it is woken, having no session)'
m settle-parked-giver common.lua \
  'if not parked(m) then' 'if true then' \
  'after a join, a parked id above its share is woken'
m claim-count common.lua \
  'fmt(math.min(count, #claimed))' 'fmt(#claimed)' \
  'a claim commits every parked bucket, not the parked committed count'
m fast-ignores-grace heartbeat_fast.lua \
  'if grace_end and not (tonumber(grace_end) and tonumber(grace_end) > now) then' 'if false then' \
  'the fast heartbeat renews past the end of a grace (the parked buckets stay parked)'
m register-frees-parked register.lua \
  "if redis.call('ZSCORE', parked_key(), member) then" 'if false then' \
  "a registration frees its id's parked buckets (as a leftover) instead of claiming them"
m floor-after-claim register.lua \
  "return { 'registered', fmt(meta.ver), fmt(floor) }" \
  "return { 'registered', fmt(meta.ver), fmt(token_floor(meta, now)) }" \
  "a registration's token floor read after its claim and the grants"
m leave-frees leave.lua \
  'end_session(meta, member, now, held)' 'remove_member(meta, member, held)' \
  'a graceful leave frees the buckets of a session with a grace'
m remove-keeps-parked remove.lua \
  "if redis.call('ZSCORE', parked_key(), member) then" 'if false then' \
  "an operator's removal leaves the id's parked buckets parked"
m snapshot-grace-boundary snapshot.lua \
  'if until_us and until_us <= now then' 'if until_us and until_us < now then' \
  'a snapshot shows an id whose grace ends exactly now as parked'

field() { cut -d$'\x1f' -f"$2" <<<"$1"; }

# Each edit, and whether its text is in its file exactly once (a copy is edited, not the file).
list() {
  local tmp
  tmp=$(mktemp)
  for entry in "${MUTANTS[@]}"; do
    local ok=ok
    cp "$ROOT/$LUA/$(field "$entry" 2)" "$tmp"
    replace_once "$tmp" "$(field "$entry" 3)" "$(field "$entry" 4)" || ok=BADEDIT
    printf '%-30s %-20s %-7s %s\n' "$(field "$entry" 1)" "$(field "$entry" 2)" "$ok" \
      "$(field "$entry" 5)"
  done
  rm -f "$tmp"
}

# Replaces the one occurrence of $2 in file $1 with $3; exit 3 unless there is exactly one.
replace_once() {
  perl -0777 -i -e '
    my ($old, $new) = (shift, shift);
    local $/; my $text = <>;
    my $n = () = $text =~ /\Q$old\E/g;
    if ($n != 1) { print $text; exit 3 }
    $text =~ s/\Q$old\E/$new/;
    print $text;
  ' "$2" "$3" "$1" 2>/dev/null
}

lua() {
  local scratch=${MUTANTS_DIR:-${TMPDIR:-/tmp}/redbuckets-mutants}
  local tests=${MUTANTS_TESTS:-differential redis_store redis_functions lua_share}
  mkdir -p "$scratch/tree"
  # A copy of the work tree as it is (uncommitted changes included), without build output.
  (cd "$ROOT" && tar --exclude=./target --exclude=./.git --exclude=./mutants.out -cf - .) |
    (cd "$scratch/tree" && tar -xf -)
  # tar keeps the work tree's times, which may be older than a mutant a previous run built
  # into $scratch/target from the same paths: cargo would take that build as fresh.
  find "$scratch/tree/$LUA" -name '*.lua' -exec touch {} +
  export CARGO_TARGET_DIR="$scratch/target"
  local test_args=()
  for t in $tests; do test_args+=(--test "$t"); done
  local pick=("$@")
  local report="$scratch/lua-report.txt"
  : >"$report"
  local killed=0 survived=0 bad=0 total=0
  local current=""
  restore() { if [ -n "$current" ]; then cp "$scratch/original" "$current"; current=""; fi; }
  trap restore EXIT INT TERM

  echo "baseline: building and running $tests unmutated" >&2
  (cd "$scratch/tree" && cargo test -q -p redbuckets "${test_args[@]}" --no-run) >&2
  if ! (cd "$scratch/tree" && cargo test -q -p redbuckets "${test_args[@]}") >"$scratch/baseline.log" 2>&1; then
    echo "the unmutated tests fail: see $scratch/baseline.log" >&2
    exit 1
  fi

  for entry in "${MUTANTS[@]}"; do
    local id file old new what
    id=$(field "$entry" 1); file=$(field "$entry" 2); old=$(field "$entry" 3)
    new=$(field "$entry" 4); what=$(field "$entry" 5)
    if [ ${#pick[@]} -gt 0 ] && [[ ! " ${pick[*]} " == *" $id "* ]]; then continue; fi
    total=$((total + 1))
    local path="$scratch/tree/$LUA/$file"
    cp "$path" "$scratch/original"
    current=$path
    if ! replace_once "$path" "$old" "$new"; then
      restore
      bad=$((bad + 1))
      printf '%-30s %-9s %s\n' "$id" BADEDIT "the text is not in $file exactly once" | tee -a "$report"
      continue
    fi
    local started=$SECONDS verdict=SURVIVED by="" log="$scratch/$id.log"
    : >"$log"
    (cd "$scratch/tree" && cargo test -q -p redbuckets "${test_args[@]}" --no-run) >>"$log" 2>&1
    for t in $tests; do
      local rc=0
      (cd "$scratch/tree" && timeout "$TIMEOUT" cargo test -q -p redbuckets --test "$t") >>"$log" 2>&1 || rc=$?
      if [ "$rc" -ne 0 ]; then
        local names
        names=$(grep -E '^test .* FAILED$|^    [a-z_0-9:]+$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/; s/^ +//' |
          sort -u | tr '\n' ' ' | sed 's/ $//')
        if [ "$rc" -eq 124 ]; then
          [ "$verdict" = SURVIVED ] && verdict=TIMEOUT
          by+="$t(timeout) "
        else
          [ "$verdict" = SURVIVED ] && verdict=KILLED
          by+="$t: ${names:-?} "
        fi
        [ -z "${MUTANTS_ALL:-}" ] && break
      fi
    done
    restore
    if [ "$verdict" = SURVIVED ]; then survived=$((survived + 1)); else killed=$((killed + 1)); fi
    printf '%-30s %-9s %4ss  %s%s\n' "$id" "$verdict" "$((SECONDS - started))" "$what" \
      "${by:+ — by $by}" | tee -a "$report"
  done
  trap - EXIT INT TERM
  echo "lua mutants: $total, killed $killed, survived $survived, bad edits $bad" | tee -a "$report"
}

rust() {
  local files=("$@")
  [ ${#files[@]} -gt 0 ] || files=(crates/redbuckets/src/ledger.rs crates/redbuckets/src/share.rs)
  if ! cargo mutants --version >/dev/null 2>&1; then
    cargo install --locked cargo-mutants
  fi
  local args=()
  for f in "${files[@]}"; do args+=(--file "$f"); done
  cd "$ROOT"
  # shellcheck disable=SC2086 # MUTANTS_RUST_ARGS is a list of arguments, e.g. "--shard 0/5".
  cargo mutants -p redbuckets "${args[@]}" --timeout "$TIMEOUT" ${MUTANTS_RUST_ARGS:-} \
    --cargo-test-arg=--lib
}

case "${1:-}" in
  lua) shift; lua "$@" ;;
  list) list ;;
  rust) shift; rust "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
