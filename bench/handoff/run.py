#!/usr/bin/env python3
"""Handoff gap with real `redbuckets join` processes (issue 10): 4 members × 1,024 buckets at the
defaults (heartbeat 1 s, ttl 10 s) on a redis-server of its own, then a fifth joins and, once
balanced, leaves gracefully (SIGTERM). From every process's `--json` events it computes, per moved
bucket, the time it spent unowned: from the end of the old owner's ownership (`revoked`, or
`lost`) to the new owner's `acquired`. Prints the mean and the largest gap of the join and of
the leave, and the bucket-seconds. Redis's slow log (threshold 0) records every call's server
time during each change, so it also prints the server µs of the scripts that moved the buckets
(renewals left out), per change: where the gap's milliseconds go on the Redis side.

    cargo build --release -p redbuckets-cli
    python3 bench/handoff/run.py [path/to/redbuckets] [rounds]
"""
import json, os, signal, socket, subprocess, sys, tempfile, time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/redbuckets"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
BUCKETS = 1024


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_join(url, group, member, out_dir):
    """A `join --json` process writing to a file: nothing reads its output during the run, so
    the measurement's own parsing takes no CPU from the members while buckets move."""
    path = os.path.join(out_dir, f"{group}-{member}.jsonl")
    p = subprocess.Popen(
        [BIN, "join", "--redis", url, "--group", group, "--id", member,
         "--buckets", str(BUCKETS), "--json"],
        stdout=open(path, "w"), stderr=subprocess.DEVNULL)
    return p, path


def read_events(paths):
    events = []
    for path in paths:
        with open(path) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
    return events


def owners(events):
    held = {}
    for e in events:
        if e.get("event") == "acquired":
            held[e["bucket"]] = e["member"]
        elif e.get("event") in ("revoked", "lost"):
            held.pop(e["bucket"], None)
    return held


def balanced(events, n):
    held = owners(sorted(events, key=lambda e: e.get("at_us", 0)))
    counts = {}
    for m in held.values():
        counts[m] = counts.get(m, 0) + 1
    return len(held) == BUCKETS and len(counts) == n and max(counts.values()) - min(counts.values()) <= 1


def settle(paths, n, quiet):
    """Sleeps `quiet` s (the members run undisturbed), then checks the balance from the files."""
    time.sleep(quiet)
    events = read_events(paths)
    if not balanced(events, n):
        sys.exit(f"not balanced with {n} members after {quiet} s")
    return events


def gaps(events, since_us):
    """Per bucket handed over after since_us: acquired.at - previous end.at (µs)."""
    ended = {}
    out = []
    for e in sorted(events, key=lambda e: e.get("at_us", 0)):
        kind = e.get("event")
        if kind in ("revoked", "lost") and e["at_us"] >= since_us:
            ended[e["bucket"]] = e["at_us"]
        elif kind == "acquired" and e["bucket"] in ended:
            out.append(e["at_us"] - ended.pop(e["bucket"]))
    return out


def redis_cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                         check=True)
    return out.stdout


def script_calls(port):
    """The slow log's scripts since the last reset but renewals: [(name, µs)], oldest first.
    Each entry is [id, time, µs, [command words], client, name]."""
    entries = json.loads(redis_cli(port, "--json", "slowlog", "get", "1024"))
    calls = [(e[3][1], e[2]) for e in entries
             if e[3][0].lower() in ("fcall", "evalsha") and "heartbeat" not in e[3][1]]
    return list(reversed(calls))


def main():
    port = free_port()
    d = tempfile.mkdtemp()
    out_dir = tempfile.mkdtemp()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", d],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    url = f"redis://127.0.0.1:{port}/"
    results = {"join": [], "leave": []}
    server = {"join": [], "leave": []}
    redis_cli(port, "config", "set", "slowlog-log-slower-than", "0")
    redis_cli(port, "config", "set", "slowlog-max-len", "1024")
    try:
        for r in range(ROUNDS):
            group = f"handoff-{os.getpid()}-{r}"
            procs = [start_join(url, group, f"m{i}", out_dir) for i in range(1, 5)]
            paths = [p for _, p in procs]
            # The group's quarantine (ttl, 10 s) first.
            settle(paths, 4, 12)
            redis_cli(port, "slowlog", "reset")
            t_join = int(time.time() * 1e6)
            fifth = start_join(url, group, "m5", out_dir)
            paths.append(fifth[1])
            events = settle(paths, 5, 3)
            results["join"].extend(gaps(events, t_join))
            server["join"].append(script_calls(port))
            redis_cli(port, "slowlog", "reset")
            t_leave = int(time.time() * 1e6)
            fifth[0].send_signal(signal.SIGTERM)
            fifth[0].wait(timeout=20)
            events = settle(paths, 4, 3)
            results["leave"].extend(gaps(events, t_leave))
            server["leave"].append(script_calls(port))
            for p, _ in procs:
                p.send_signal(signal.SIGTERM)
            for p, _ in procs:
                p.wait(timeout=20)
    finally:
        redis.kill()
    for phase, g in results.items():
        if not g:
            print(f"{phase}: no handoff seen")
            continue
        g.sort()
        mean = sum(g) / len(g)
        print(f"{phase}: {len(g)} buckets over {ROUNDS} rounds, unowned mean {mean / 1000:.2f} ms, "
              f"median {g[len(g) // 2] / 1000:.2f} ms, max {g[-1] / 1000:.2f} ms, "
              f"{sum(g) / 1e6:.3f} bucket-s")
        for calls in server[phase]:
            total = sum(us for _, us in calls)
            listed = ", ".join(f"{name} {us}" for name, us in calls[:12])
            print(f"  server µs: {total} in {len(calls)} calls: {listed}")


main()
