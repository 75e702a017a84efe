#!/usr/bin/env bash
# Mutants the exhaustive checker (crates/redbuckets/src/explore) must kill: each is a small
# edit applied alone, then the checker's CI tests run; the edit is undone whatever happens.
# Prints, per mutant, KILLED with the first broken property, or SURVIVED. Exit 1 if any survived.
# Needs a clean checkout of the files it edits.
set -uo pipefail
cd "$(dirname "$0")/.."

# file @@ sed expression @@ what the mistake is
mutants=(
  "crates/redbuckets/src/machine.rs@@s/if !ours || self.deadline_passed(now) || /if !ours || /@@a grant notice applied after the lease deadline"
  "crates/redbuckets/src/store/model.rs@@s/self.last_token = now.max(self.last_token + 1);/self.last_token += 1;/@@tokens from a counter, not the server's clock (restart from 1 after a data loss)"
  "crates/redbuckets/src/store/model.rs@@s/self.last_token = now.max(self.last_token + 1);/self.last_token = now.max(self.last_token);/@@the same token twice within one µs"
  "crates/redbuckets/src/config.rs@@s/.mul_f64(1.0 - self.max_clock_drift.clamp(0.0, 0.99));/.mul_f64(1.0);/@@the lease validity not shortened by the clock drift"
  "crates/redbuckets/src/ledger.rs@@s/Hold::Draining { until, .. } => !h.has_handles() || now >= until,/Hold::Draining { .. } => true,/@@a release before the drain ends"
  "crates/redbuckets/src/store/model.rs@@s/if m.grace == 0 {/if m.grace < u64::MAX {/@@a session with a grace frees its buckets (others are granted them) instead of parking them"
  "crates/redbuckets/src/store/model.rs@@/fn claim(/,/^    }$/s/let token = self.next_token(now);/let token = parked.held.first().and_then(|b| self.owners[*b as usize].as_ref()).map_or(0, |o| o.1);/@@the claim reuses the old token"
  "crates/redbuckets/src/store/model.rs@@s/.filter(|(_, p)| p.until <= now)/.filter(|(_, p)| p.until <= now + 5_000)/@@parked buckets freed 5 ms before the grace ends"
  "crates/redbuckets/src/store/model.rs@@s/self.end_session(id, \*expires);/self.end_session(id, now);/@@an expired session's grace counted from its purge, not its expiry"
)

survived=0
for m in "${mutants[@]}"; do
  file=${m%%@@*}
  rest=${m#*@@}
  expr=${rest%%@@*}
  what=${rest#*@@}
  if ! git diff --quiet -- "$file"; then
    echo "$file has local changes: refusing to mutate it" >&2
    exit 2
  fi
  sed -i "$expr" "$file"
  if git diff --quiet -- "$file"; then
    echo "NOT APPLIED  $what ($file): the code changed, update this script" >&2
    survived=1
    continue
  fi
  out=$(cargo test -q -p redbuckets --lib explore 2>&1)
  git checkout -q -- "$file"
  first=$(grep -m1 -E '^[0-9a-z ]+: (S[123]|Model::check|parking|no convergence|after the faults|the warm start)' <<<"$out")
  if [ -n "$first" ]; then
    echo "KILLED    $what"
    echo "          $first"
  else
    echo "SURVIVED  $what"
    survived=1
  fi
done
exit $survived
