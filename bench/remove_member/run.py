# Takeover after kill -9: waiting out the ttl vs remove-member. Prints ms from the kill to b's
# last acquired line of the dead member's buckets.
import json, os, socket, subprocess, sys, time, threading
B = os.environ.get("REDBUCKETS", "target/debug/redbuckets")
def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def run(mode, ttl="6s"):
    p = port()
    srv = subprocess.Popen(["redis-server", "--port", str(p), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    url = f"redis://127.0.0.1:{p}/"
    args = ["--buckets", "16", "--heartbeat", "200ms", "--ttl", ttl, "--json"]
    a = subprocess.Popen([B, "join", "--redis", url, "--group", "g", "--id", "a"] + args, stdout=subprocess.DEVNULL)
    b = subprocess.Popen([B, "join", "--redis", url, "--group", "g", "--id", "b"] + args, stdout=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: [lines.append(json.loads(l)) for l in b.stdout], daemon=True).start()
    while sum(1 for l in lines if l["event"] == "acquired") < 8 or len(lines) == 0:
        time.sleep(0.05)
    time.sleep(1.0)
    mark = len(lines)
    a.kill(); a.wait()
    t0 = time.time()
    if mode == "remove":
        subprocess.run([B, "remove-member", "--redis", url, "--group", "g", "--id", "a", "--yes"], check=True, capture_output=True)
    while sum(1 for l in lines[mark:] if l["event"] == "acquired") < 8:
        time.sleep(0.005)
    last = max(l["at_us"] for l in lines[mark:] if l["event"] == "acquired") / 1e6
    b.terminate(); b.wait(); srv.terminate(); srv.wait()
    return (last - t0) * 1000
for mode in ["ttl", "remove"] * 3:
    print(mode, round(run(mode)), "ms", flush=True)
