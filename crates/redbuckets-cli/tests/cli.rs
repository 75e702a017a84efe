//! The `redbuckets` binary end to end: `join --json` processes on a real `redis-server` handing
//! buckets over on SIGTERM, `status` against known states, bad input, and the demo without a
//! terminal. Every wait is bounded: no test can hang.

#[path = "common/process.rs"]
mod process;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use process::{command, drain, run_cmd, Run};
use redbuckets::check::{Change, Timeline};
use redbuckets_testkit::{RedisCluster, RedisServer};
use serde_json::Value;

fn run(args: &[&str], limit: Duration) -> Run {
    run_cmd(command(args), limit)
}

/// A running `redbuckets join --json`, its stdout parsed line by line as it comes.
struct Joined {
    id: String,
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Joined {
    fn spawn(redis: &RedisServer, group: &str, id: &str, extra: &[&str]) -> Joined {
        Self::spawn_at(&redis.url(), group, id, extra)
    }

    /// `join` against any Redis URL (a cluster's, say).
    fn spawn_at(url: &str, group: &str, id: &str, extra: &[&str]) -> Joined {
        let mut args = vec![
            "join", "--json", "--redis", url, "--group", group, "--id", id,
        ];
        args.extend_from_slice(extra);
        let mut child = command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn join");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let stderr = Some(drain(child.stderr.take().expect("stderr")));
        Joined {
            id: id.to_string(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Takes in whatever lines arrived.
    fn poll(&mut self) {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
    }

    /// Waits up to `limit` for a line with `"event": kind`.
    fn wait_for(&mut self, kind: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = self.seen.iter().find(|v| v["event"] == kind) {
                return v.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!(
                    "{}: no {kind:?} line within {limit:?}; got {:?}",
                    self.id, self.seen
                ),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {}", self.id);
    }

    /// Waits for the process to exit (at most `limit`), then reads the rest of its output.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}",
                self.id
            );
            thread::sleep(Duration::from_millis(10));
        };
        // The reader thread ends at EOF, closing the channel.
        while let Ok(v) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(v);
        }
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status.code(), stderr)
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `status --check` until it passes, at most `limit`.
fn wait_converged(redis: &RedisServer, group: &str, members: usize, limit: Duration) -> Value {
    wait_converged_at(&redis.url(), group, members, limit)
}

/// `status --check` against any Redis URL until it passes, at most `limit`.
fn wait_converged_at(url: &str, group: &str, members: usize, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let r = run(
            &[
                "status", "--redis", url, "--group", group, "--json", "--check",
            ],
            Duration::from_secs(10),
        );
        if r.code == Some(0) {
            let v: Value = serde_json::from_str(&r.stdout).expect("status --json is JSON");
            if v["members"].as_array().map(Vec::len) == Some(members) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "group {group} did not converge on {members} members within {limit:?}: {} {}",
            r.stdout,
            r.stderr
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The library's checker over every member's lines; each stream is read from its start, so an
/// end or a release of a bucket not owned counts as a violation.
fn timeline(streams: &[&[Value]]) -> Timeline<Duration> {
    let mut timeline = Timeline::new().complete_streams();
    for v in streams.iter().flat_map(|lines| lines.iter()) {
        let change = match v["event"].as_str().expect("event") {
            "joined" | "left" | "registered" => continue,
            "acquired" => Change::Acquired,
            "revoked" => Change::Revoked,
            "lost" => Change::Lost,
            "released" => Change::Released,
            other => panic!("unknown event {other:?}: {v}"),
        };
        let field = |name: &str| v[name].as_u64().unwrap_or_else(|| panic!("{name}: {v}"));
        let bucket = u32::try_from(field("bucket")).expect("a bucket id");
        let member = v["member"].as_str().expect("member");
        let at = Duration::from_micros(field("at_us"));
        timeline.record(member, change, bucket, field("token"), at);
    }
    timeline
}

#[test]
fn two_members_hand_over_on_sigterm() {
    let redis = RedisServer::start();
    let buckets = 32u64;
    let opts = ["--buckets", "32", "--heartbeat", "100ms", "--ttl", "1s"];
    let mut a = Joined::spawn(&redis, "orders", "a", &opts);
    let mut b = Joined::spawn(&redis, "orders", "b", &opts);
    a.wait_for("joined", Duration::from_secs(10));
    b.wait_for("joined", Duration::from_secs(10));

    // Balanced: 16 each, nothing free.
    let status = wait_converged(&redis, "orders", 2, Duration::from_secs(15));
    assert_eq!(status["free"], 0, "{status}");
    assert_eq!(status["buckets"], buckets, "{status}");
    assert_eq!(status["ok"], true, "{status}");
    for m in status["members"].as_array().expect("members") {
        assert_eq!(m["held"], 16, "{status}");
        // The store rounds a session's expiry up to the next ms: at most ttl + 1 ms away.
        assert!(
            m["expires_in_ms"].as_u64().expect("expires_in_ms") <= 1001,
            "{m}"
        );
    }

    // a leaves on SIGTERM and exits 0; b ends up with everything.
    a.poll();
    let before_term = a.seen.len();
    a.signal("-TERM");
    let (code, stderr) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "a's stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let status = wait_converged(&redis, "orders", 1, Duration::from_secs(10));
    assert_eq!(status["members"][0]["id"], "b");
    assert_eq!(status["members"][0]["held"], buckets);
    b.signal("-TERM");
    let (code, stderr) = b.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "b's stderr: {stderr}");

    for m in [&a, &b] {
        assert_eq!(m.seen.first().map(|v| &v["event"]), Some(&"joined".into()));
        let last = m.seen.last().expect("lines");
        assert_eq!(last["event"], "left", "{}", m.id);
        assert_eq!(last["clean"], true, "{}", m.id);
    }

    // S1, S2, and streams that make sense. Not checked: that x's `released` line comes before
    // y's `acquired`. The new owner can be granted the bucket before the old one has handled the
    // reply to its release (a's reply races b's notice and rebalance); what matters is that x's
    // ownership ended (`revoked`) before y's began.
    let checked = timeline(&[&a.seen, &b.seen]);
    let violations = checked.violations();
    assert!(violations.is_empty(), "{violations:#?}");
    let (all, _) = checked.intervals();
    assert_eq!(
        all.len() as u64,
        buckets,
        "every bucket was owned at some point"
    );
    for (bucket, list) in &all {
        // Both left gracefully: every ownership ended with a release.
        for o in list {
            assert!(
                o.released.is_some(),
                "bucket {bucket}: {o:?} never released"
            );
        }
    }

    // What a held when it got SIGTERM, it released during its shutdown, and b picked it up.
    let at_term = timeline(&[&a.seen[..before_term]])
        .holdings()
        .remove("a")
        .unwrap_or_default();
    assert_eq!(at_term.len(), 16, "a held its share at SIGTERM");
    let released_at_exit: Vec<u64> = a.seen[before_term..]
        .iter()
        .filter(|v| v["event"] == "released")
        .map(|v| v["bucket"].as_u64().expect("bucket"))
        .collect();
    for bucket in &at_term {
        assert!(
            released_at_exit.contains(&u64::from(*bucket)),
            "a did not release {bucket}"
        );
        let list = &all[bucket];
        let a_last = list
            .iter()
            .rposition(|o| o.member == "a")
            .expect("a owned it");
        assert!(
            list[a_last + 1..].iter().any(|o| o.member == "b"),
            "b did not pick up bucket {bucket}: {list:?}"
        );
    }
}

/// Issue 11: `join`, `status` and `demo` through a `redis+cluster://` URL. The group lives on
/// the primary that owns its slot; two members balance and hand over on SIGTERM without
/// overlap.
#[test]
fn join_and_status_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let opts = ["--buckets", "32", "--heartbeat", "100ms", "--ttl", "1s"];
    let mut a = Joined::spawn_at(&url, "orders", "a", &opts);
    let mut b = Joined::spawn_at(&url, "orders", "b", &opts);
    a.wait_for("joined", Duration::from_secs(10));
    b.wait_for("joined", Duration::from_secs(10));
    let status = wait_converged_at(&url, "orders", 2, Duration::from_secs(15));
    for m in status["members"].as_array().expect("members") {
        assert_eq!(m["held"], 16, "{status}");
    }
    let primary = cluster.primary_of(cluster.keyslot("red-buckets:orders"));
    let node = cluster.node(primary);
    assert_eq!(
        node.cli(&["HGET", "{red-buckets:orders}:meta", "buckets"])
            .trim(),
        "32"
    );

    a.signal("-TERM");
    let (code, stderr) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "a's stderr: {stderr}");
    let status = wait_converged_at(&url, "orders", 1, Duration::from_secs(10));
    assert_eq!(status["members"][0]["held"], 32, "{status}");
    b.signal("-TERM");
    let (code, stderr) = b.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "b's stderr: {stderr}");
    let violations = timeline(&[&a.seen, &b.seen]).violations();
    assert!(violations.is_empty(), "{violations:#?}");

    // The demo runs there too (its members and its checker through the cluster URL).
    short_demo_on(&url);

    // A plain URL at a cluster node says which form to use.
    let r = run(
        &[
            "status",
            "--redis",
            &cluster.nodes()[0].url(),
            "--group",
            "orders",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("redis+cluster://"), "{r:?}");
}

#[test]
fn status_reports_warm_up_free_buckets_and_missing_groups() {
    let redis = RedisServer::start();
    let url = redis.url();

    let r = run(
        &["status", "--redis", &url, "--group", "nobody"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.starts_with("error: group \"nobody\""), "{r:?}");
    assert!(r.stderr.contains("does not exist"), "{r:?}");

    // A new group grants nothing during its first ttl: all buckets are free for 5 s.
    let mut a = Joined::spawn(
        &redis,
        "fresh",
        "a",
        &["--buckets", "8", "--heartbeat", "500ms", "--ttl", "5s"],
    );
    a.wait_for("joined", Duration::from_secs(10));
    // Through the environment this time.
    let mut cmd = command(&["status", "--group", "fresh", "--check"]);
    cmd.env("REDBUCKETS_REDIS_URL", &url);
    let r = run_cmd(cmd, Duration::from_secs(10));
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("8 of 8 buckets are unowned"), "{r:?}");
    assert!(r.stderr.contains("warming up"), "{r:?}");
    assert!(r.stdout.contains("MEMBER"), "{r:?}");

    let r = run(
        &["status", "--redis", &url, "--group", "fresh", "--json"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "without --check, status succeeds: {r:?}");
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v["free"], 8);
    assert_eq!(v["ok"], false);
    assert!(v["quarantine_ms"].as_u64().expect("quarantine_ms") > 0);
    assert_eq!(v["members"][0]["id"], "a");
    assert_eq!(v["members"][0]["held"], 0);

    a.signal("-TERM");
    let (code, stderr) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
}

/// Issue 18, defect 1: a `join` started 2 s before its Redis waits for it (as workers do in
/// Docker Compose and Kubernetes) and joins; the start timeout bounds connecting too.
#[test]
fn join_started_before_redis_joins_when_it_comes_up() {
    let mut redis = RedisServer::start();
    redis.stop();
    let began = Instant::now();
    let mut a = Joined::spawn(
        &redis,
        "early",
        "a",
        &[
            "--buckets",
            "8",
            "--ttl",
            "600ms",
            "--heartbeat",
            "200ms",
            "--start-timeout",
            "10s",
        ],
    );
    thread::sleep(Duration::from_secs(2));
    assert!(
        a.child.try_wait().expect("try_wait").is_none(),
        "join gave up"
    );
    redis.restart();
    a.wait_for("joined", Duration::from_secs(8));
    a.wait_for("acquired", Duration::from_secs(5));
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    a.signal("-TERM");
    let (code, stderr) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
    // One WARN when it starts waiting, not one per attempt.
    let warns = stderr.lines().filter(|l| l.contains("WARN")).count();
    assert_eq!(warns, 1, "{stderr}");

    // Nothing comes up: it gives up after the start timeout, with one error line.
    let r = run(
        &[
            "join",
            "--redis",
            &redis
                .url()
                .replace(&redis.port().to_string(), &closed_port().to_string()),
            "--group",
            "g",
            "--start-timeout",
            "2s",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.took >= Duration::from_millis(1500) && r.took < Duration::from_secs(4),
        "{r:?}"
    );
    assert!(r.stderr.contains("attempts"), "{r:?}");
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    listener.local_addr().expect("addr").port()
}

#[test]
fn bad_input_gets_one_clear_line() {
    let closed = format!("redis://127.0.0.1:{}", closed_port());
    let secret = format!("redis://user:hunter2@127.0.0.1:{}/0", closed_port());
    let join = |url: &str, extra: &[&str]| {
        let mut args = vec!["join", "--redis", url, "--group", "g"];
        args.extend_from_slice(extra);
        args.iter().map(|s| (*s).to_string()).collect::<Vec<_>>()
    };
    // `join` waits for a Redis that is not up yet, for its start timeout (30 s by default).
    let cases: Vec<(Vec<String>, &str)> = vec![
        (join(&closed, &["--start-timeout", "1s"]), "cannot connect"),
        (
            vec![
                "status".into(),
                "--redis".into(),
                closed.clone(),
                "--group".into(),
                "g".into(),
            ],
            "cannot connect",
        ),
        (
            join(&secret, &["--start-timeout", "1s"]),
            "redis://user:***@127.0.0.1",
        ),
        (join("not a url", &[]), "invalid Redis URL"),
        (join("http://127.0.0.1:6379", &[]), "invalid Redis URL"),
        (
            join(&closed, &["--buckets", "0"]),
            "buckets: must be in 1..=65536",
        ),
        (
            join(&closed, &["--ttl", "100ms", "--heartbeat", "1s"]),
            "ttl: must be at least 3 × heartbeat",
        ),
        (
            join(&closed, &["--renew", "9s"]),
            "renew_interval: must be between the heartbeat (1s) and half the ttl (5s)",
        ),
        (
            vec![
                "join".into(),
                "--redis".into(),
                closed.clone(),
                "--group".into(),
                "a{b}".into(),
            ],
            "group: must not contain '{'",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run(&args, Duration::from_secs(10));
        assert_eq!(r.code, Some(1), "{args:?}: {r:?}");
        assert!(
            r.took < Duration::from_secs(5),
            "{args:?} took {:?}",
            r.took
        );
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
        assert!(
            !r.stderr.contains("hunter2"),
            "{args:?} printed the password"
        );
        // A `join` that waits for Redis says so once, in a log line (RUST_LOG) before the error.
        let lines: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| !l.contains(" WARN redbuckets"))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {:?}", r.stderr);
        assert!(lines[0].starts_with("error: "), "{args:?}: {}", r.stderr);
        assert!(
            lines[0].contains(needle),
            "{args:?}: {} lacks {needle:?}",
            r.stderr
        );
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
    }

    // Usage errors are clap's: exit code 2.
    for args in [
        vec!["join", "--group", "g"],
        vec![
            "join",
            "--redis",
            "redis://x",
            "--group",
            "g",
            "--ttl",
            "5 parsecs",
        ],
        vec!["status", "--redis", "redis://x"],
        vec!["frobnicate"],
    ] {
        let r = run(&args, Duration::from_secs(5));
        assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
        assert!(r.stderr.starts_with("error: "), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn help_shows_an_example_for_every_subcommand() {
    for sub in ["join", "status", "watch", "demo"] {
        let r = run(&[sub, "--help"], Duration::from_secs(5));
        assert_eq!(r.code, Some(0), "{r:?}");
        assert!(r.stdout.contains("Examples:"), "{sub}: {}", r.stdout);
        assert!(
            r.stdout.contains(&format!("redbuckets {sub}")),
            "{sub}: {}",
            r.stdout
        );
    }
    // A password in the environment never shows in --help.
    let mut cmd = command(&["join", "--help"]);
    cmd.env("REDBUCKETS_REDIS_URL", "redis://:hunter2@h/");
    let r = run_cmd(cmd, Duration::from_secs(5));
    assert!(!r.stdout.contains("hunter2"), "{}", r.stdout);
}

#[test]
fn demo_runs_to_the_end_without_a_terminal() {
    let r = run(
        &[
            "demo",
            "--members",
            "3",
            "--buckets",
            "64",
            "--heartbeat",
            "50ms",
            "--ttl",
            "500ms",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        !r.stdout.contains('\x1b'),
        "no escape codes in a pipe: {}",
        r.stdout
    );
    assert!(
        r.stdout.contains("no bucket ever had two owners"),
        "{}",
        r.stdout
    );
    for phase in ["start", "join m4", "leave m1", "crash m2"] {
        assert!(r.stdout.contains(phase), "{phase}: {}", r.stdout);
    }
    // Each phase moves what it must, within the design's bound (L3: optimal + n); the
    // optimum is ⌊64/4⌋ = 16 for the join and the departed member's holdings otherwise.
    for (phase, optimal) in [
        ("start", Some(64)),
        ("join m4", Some(16)),
        ("leave m1", Some(16)),
        ("crash m2", None),
    ] {
        let row = r
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(phase) && l.contains('/'))
            .unwrap_or_else(|| panic!("no summary row for {phase}: {}", r.stdout));
        let (moved, best) = row
            .split_whitespace()
            .find_map(|w| {
                let (a, b) = w.split_once('/')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            })
            .unwrap_or_else(|| panic!("no moved/optimal in {row:?}"));
        if let Some(optimal) = optimal {
            assert_eq!(best, optimal, "{row}");
        }
        assert!(moved >= best && moved <= best + 4, "{row}");
    }
    assert!(r.took < Duration::from_secs(30), "demo took {:?}", r.took);
}

/// A short `demo` (2 members, 32 buckets) through `--redis url`: it ends with success and its
/// checker saw no bucket with two owners.
fn short_demo_on(url: &str) -> Run {
    let r = run(
        &[
            "demo",
            "--redis",
            url,
            "--members",
            "2",
            "--buckets",
            "32",
            "--heartbeat",
            "50ms",
            "--ttl",
            "500ms",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains("no bucket ever had two owners"),
        "{}",
        r.stdout
    );
    r
}

#[test]
fn demo_runs_on_redis_too() {
    let redis = RedisServer::start();
    let url = redis.url();
    let r = short_demo_on(&url);
    assert!(r.stdout.contains("group demo-"), "{}", r.stdout);
    // Issue 21: the demo's members have left; nothing of the group stays for good.
    let keys = redis.cli(&["KEYS", "*"]);
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let pttl: i64 = redis.cli(&["PTTL", key]).trim().parse().expect("PTTL");
        assert!(pttl > 0, "{key} does not expire ({pttl}); keys: {keys}");
    }
}

#[test]
fn the_next_member_of_a_group_nobody_is_in_sets_its_configuration() {
    let redis = RedisServer::start();
    let mut a = Joined::spawn(
        &redis,
        "newg",
        "a",
        &["--ttl", "2s", "--heartbeat", "200ms", "--buckets", "8"],
    );
    a.wait_for("joined", Duration::from_secs(10));
    a.signal("-TERM");
    let (code, stderr) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
    // The defaults (ttl 10 s, 1,024 buckets) were refused while the group kept a's.
    let mut b = Joined::spawn(&redis, "newg", "b", &[]);
    let joined = b.wait_for("joined", Duration::from_secs(10));
    assert_eq!(joined["buckets"], 1024, "{joined}");
    b.signal("-TERM");
    let (code, stderr) = b.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn passwords_never_show() {
    let mut redis = RedisServer::start_with(&["--requirepass", "hunter2pw"]);
    let url = format!("redis://:hunter2pw@127.0.0.1:{}/0", redis.port());

    let r = run(
        &["status", "--redis", &url, "--group", "nobody"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("redis://:***@127.0.0.1"), "{r:?}");

    let wrong = format!("redis://:nope-pw@127.0.0.1:{}/0", redis.port());
    let r = run(
        &["status", "--redis", &wrong, "--group", "g"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(!r.stderr.contains("nope-pw"), "{r:?}");

    // A member that loses its Redis logs errors, with the URL in them, at every level.
    let mut cmd = command(&[
        "join",
        "--redis",
        &url,
        "--group",
        "g",
        "--buckets",
        "4",
        "--heartbeat",
        "100ms",
        "--ttl",
        "1s",
    ]);
    cmd.env("RUST_LOG", "trace");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn join");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    thread::sleep(Duration::from_millis(1500));
    redis.stop();
    thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("join did not exit after SIGTERM");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(stderr.contains("redis://:***@127.0.0.1"), "{stderr}");
    assert!(!stdout.contains("hunter2pw"), "{stdout}");
    assert!(!stderr.contains("hunter2pw"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn watch_prints_a_line_per_change_without_a_terminal() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut watch = command(&[
        "watch",
        "--redis",
        &url,
        "--group",
        "seen",
        "--interval",
        "50ms",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn watch");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let stderr = drain(watch.stderr.take().expect("stderr"));

    let mut a = Joined::spawn(
        &redis,
        "seen",
        "a",
        &["--buckets", "8", "--heartbeat", "100ms", "--ttl", "1s"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("members=1 free=0") && l.contains(" a=8"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = watch.kill();
                panic!("watch never showed a holding all 8: {seen:?}");
            }
        }
    }
    // Warming up first, then the grant.
    assert!(seen.iter().any(|l| l.contains("warming_up=")), "{seen:?}");
    assert!(seen.iter().all(|l| !l.contains('\x1b')), "{seen:?}");

    let _ = Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = watch.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("watch did not stop on SIGINT");
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    let stderr = stderr.join().unwrap_or_default();
    assert!(
        stderr.contains("does not exist (yet)") || stderr.is_empty(),
        "{stderr}"
    );
    a.signal("-TERM");
    let (code, _) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
}

/// Issue 8, bug 2: `status` and `watch` only look. A member that crashed (its session expired
/// but not purged yet) stays as it is, a stale group is named but not wiped, and no key of the
/// group changes.
#[test]
fn status_and_watch_change_no_key() {
    let redis = RedisServer::start();
    let url = redis.url();
    let group = "look";
    let tag = "{red-buckets:look}";
    let mut a = Joined::spawn(
        &redis,
        group,
        "a",
        &["--buckets", "8", "--heartbeat", "100ms", "--ttl", "1s"],
    );
    a.wait_for("acquired", Duration::from_secs(10));
    // A crash: the session stays until its expiry, which is set into the past by hand so
    // nothing (the member's own heartbeat) can purge it first.
    a.signal("-KILL");
    let _ = a.wait_exit(Duration::from_secs(10));
    redis.cli(&["ZADD", &format!("{tag}:exp"), "1", "a"]);
    // Every key with its DUMP: any write would show.
    let state = || {
        let mut keys: Vec<String> = redis
            .cli(&["KEYS", "*"])
            .lines()
            .map(str::to_string)
            .collect();
        keys.sort();
        assert!(keys.len() >= 8, "the group's keys are gone: {keys:?}");
        keys.iter()
            .map(|k| format!("{k} {:?}\n", redis.cli(&["DUMP", k])))
            .collect::<String>()
    };
    let before = state();

    let r = run(
        &["status", "--redis", &url, "--group", group],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains("0 members"),
        "the expired member is left out: {r:?}"
    );
    assert!(r.stdout.contains("free buckets: 8"), "{r:?}");
    assert_eq!(state(), before, "status changed a key");

    let mut watch = command(&[
        "watch",
        "--redis",
        &url,
        "--group",
        group,
        "--interval",
        "50ms",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn watch");
    thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while watch.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("watch did not stop on SIGINT");
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(state(), before, "watch changed a key");

    // Data of another Redis process: said, and left alone.
    redis.cli(&["HSET", &format!("{tag}:meta"), "run_id", "0123abcd"]);
    let before = state();
    let r = run(
        &["status", "--redis", &url, "--group", group, "--check"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stdout
            .contains("stale: the group's data was written by another Redis process"),
        "{r:?}"
    );
    assert!(r.stderr.contains("check failed: stale"), "{r:?}");
    assert_eq!(state(), before, "status of a stale group changed a key");
}

/// `sh -c "<redbuckets> <args> | head -<lines>"` with bash's pipefail, so the exit code is the
/// binary's: 0 when it stopped quietly because `head` was done.
fn piped_into_head(args: &[&str], lines: usize, limit: Duration) -> Run {
    let script = format!(
        "set -o pipefail; \"$0\" {} | head -{lines}",
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script, process::BIN])
        .env_remove("REDBUCKETS_REDIS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    run_cmd(cmd, limit)
}

/// Issue 18, defect 2: a closed stdout ends the demo and watch quietly, with exit 0.
#[test]
fn demo_and_watch_stop_quietly_when_head_is_done() {
    let r = piped_into_head(&["demo"], 2, Duration::from_secs(20));
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.stdout.lines().count(), 2, "{r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
    // Its members left: no "dropped without shutdown()" WARN.
    assert!(r.stderr.is_empty(), "{r:?}");

    let redis = RedisServer::start();
    let mut a = Joined::spawn(&redis, "piped", "a", &["--buckets", "4"]);
    a.wait_for("joined", Duration::from_secs(10));
    let url = redis.url();
    let r = piped_into_head(
        &[
            "watch",
            "--redis",
            &url,
            "--group",
            "piped",
            "--interval",
            "50ms",
        ],
        1,
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.stdout.lines().count(), 1, "{r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
    let r = piped_into_head(
        &["status", "--redis", &url, "--group", "piped"],
        1,
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
}

/// Issue 18, defect 3: SIGHUP (a closed terminal) makes `join` leave too, instead of killing it
/// (exit 129) with its buckets still owned.
#[test]
fn join_leaves_on_sighup() {
    let redis = RedisServer::start();
    let mut a = Joined::spawn(&redis, "hup", "a", &["--buckets", "4"]);
    a.wait_for("joined", Duration::from_secs(10));
    a.signal("-HUP");
    let (code, stderr) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
    let left = a.wait_for("left", Duration::from_secs(1));
    assert_eq!(left["clean"], true, "{left}");
}

/// Issue 18, defect 7: while Redis is down, `join` logs the trouble once and then a summary
/// per 10 s, not a WARN (or two) per retry; it says when the store answers again, and stdout
/// says when the member registered again.
#[test]
fn an_outage_logs_a_line_per_change_not_per_retry() {
    let mut redis = RedisServer::start();
    let mut a = Joined::spawn(
        &redis,
        "outage",
        "a",
        &["--buckets", "4", "--ttl", "1s", "--heartbeat", "100ms"],
    );
    a.wait_for("acquired", Duration::from_secs(10));
    redis.stop();
    a.wait_for("lost", Duration::from_secs(5));
    thread::sleep(Duration::from_secs(3));
    redis.restart();
    a.wait_for("registered", Duration::from_secs(10));
    a.signal("-TERM");
    let (code, stderr) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
    let warns: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        (1..=3).contains(&warns.len()),
        "{} WARN lines in a 4 s outage:\n{stderr}",
        warns.len()
    );
}

/// Issue 18, CLI texts: only a joiner of a new group hears that it grants nothing yet, and a
/// line about buckets from several grants names their tokens.
#[test]
fn join_text_says_what_applies() {
    let redis = RedisServer::start();
    let url = redis.url();
    let spawn = |id: &str| {
        let mut child = command(&[
            "join",
            "--redis",
            &url,
            "--group",
            "texts",
            "--id",
            id,
            "--buckets",
            "8",
            "--ttl",
            "1s",
            "--heartbeat",
            "100ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn join");
        let out = drain(child.stdout.take().expect("stdout"));
        let err = drain(child.stderr.take().expect("stderr"));
        (child, out, err)
    };
    let stop = |(mut child, out, err): (Child, thread::JoinHandle<String>, _)| {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().expect("wait");
        let err: String = thread::JoinHandle::join(err).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "{err}");
        out.join().unwrap_or_default()
    };
    let a = spawn("a");
    thread::sleep(Duration::from_millis(1500));
    let b = spawn("b");
    thread::sleep(Duration::from_millis(1500));
    let b = stop(b);
    let a = stop(a);
    assert!(a.contains("the group is new"), "{a}");
    assert!(a.contains("(8 buckets)"), "{a}");
    assert!(!b.contains("grants nothing"), "{b}");
    // b took its 4 buckets in more than one grant or not: either way each line names tokens.
    for line in b
        .lines()
        .filter(|l| l.contains("revoked") || l.contains("acquired"))
    {
        assert!(line.contains("token"), "{line}");
    }
}

/// Issue 18, defect 6: Ctrl-C on the demo makes its members leave; none logs the WARN meant for
/// library users who drop a `Member`.
#[test]
fn an_interrupted_demo_leaves_without_warnings() {
    let mut child = command(&["demo"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn demo");
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(!err.contains("WARN"), "{err}");
    assert_eq!(err.trim(), "error: SIGINT: demo interrupted", "{err}");
}

/// Issue 18, CLI texts: each mistake gets its whole answer in one try, in the docs' words.
#[test]
fn mistakes_get_the_whole_answer_in_the_docs_words() {
    let closed = format!("redis://127.0.0.1:{}", closed_port());
    let one_line = |args: &[&str], needle: &str| {
        let r = run(args, Duration::from_secs(10));
        assert_eq!(r.code, Some(1), "{args:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains(needle),
            "{args:?}: {} lacks {needle:?}",
            r.stderr
        );
    };
    one_line(
        &["status", "--redis", &closed, "--group", ""],
        "group: must not be empty",
    );
    one_line(
        &["watch", "--redis", &closed, "--group", ""],
        "group: must not be empty",
    );
    one_line(
        &[
            "join",
            "--redis",
            &closed,
            "--group",
            "g",
            "--heartbeat",
            "0s",
        ],
        "heartbeat: must be at least 10ms, got 0s",
    );
    one_line(
        &[
            "join",
            "--redis",
            "redis://u:a/b?c#d@127.0.0.1:1",
            "--group",
            "g",
        ],
        "contain '#', '/' and '?': percent-encode them as %23, %2F and %3F",
    );
    // Usage errors: clap's exit code 2, the hint in the docs' style.
    let r = run(
        &["join", "--redis", &closed, "--group", "g", "--ttl", "2"],
        Duration::from_secs(5),
    );
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("for example 2s or 2ms"), "{r:?}");
    // One bucket is a bucket.
    let r = run(
        &[
            "demo",
            "--buckets",
            "1",
            "--members",
            "2",
            "--ttl",
            "300ms",
            "--heartbeat",
            "50ms",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains(": 1 bucket,"), "{}", r.stdout);
    assert!(!r.stdout.contains("1 buckets"), "{}", r.stdout);
}

/// Issue 18, CLI texts: `demo --redis` alone runs on $REDBUCKETS_REDIS_URL.
#[test]
fn demo_redis_alone_takes_the_environment() {
    let redis = RedisServer::start();
    let mut cmd = command(&["demo", "--redis", "--ttl", "300ms", "--heartbeat", "50ms"]);
    cmd.env("REDBUCKETS_REDIS_URL", redis.url());
    let r = run_cmd(cmd, Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains(&format!("Redis at {}", redis.url())),
        "{}",
        r.stdout
    );
    let r = run(&["demo", "--redis"], Duration::from_secs(5));
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("REDBUCKETS_REDIS_URL"), "{r:?}");
}

/// `GET /metrics` from a `join --metrics` process: the Prometheus text, or `None` while it
/// does not answer.
fn scrape(port: u16) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.contains(" 200 ").then(|| body.to_string())
}

/// The value of the series `series` (name and labels as printed) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Scrapes `a`'s metrics and reads `status --json` until the gauges say what the status says
/// of `a` and of the group, and the group has `members` members with `a` holding `held`; at
/// most `limit`. Returns the last scrape.
fn wait_metrics_agree(
    redis: &RedisServer,
    port: u16,
    members: usize,
    held: u64,
    limit: Duration,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let r = run(
            &["status", "--redis", &redis.url(), "--group", "mg", "--json"],
            Duration::from_secs(10),
        );
        let status: Value = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
        let text = scrape(port).unwrap_or_default();
        let a_held = status["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["id"] == "a"))
            .and_then(|m| m["held"].as_u64());
        let n = status["members"].as_array().map(Vec::len);
        let owned = sample(&text, r#"redbuckets_buckets_owned{group="mg"}"#);
        let gauge_members = sample(&text, r#"redbuckets_members{group="mg"}"#);
        if n == Some(members)
            && a_held == Some(held)
            && status["free"] == 0
            && owned == Some(held as f64)
            && gauge_members == Some(members as f64)
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the metrics did not agree with status ({members} members, a holding {held}) \
             within {limit:?}:\n{text}\nstatus: {status}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn join_serves_metrics_that_agree_with_status_through_a_join_a_leave_and_a_crash() {
    let redis = RedisServer::start();
    let port = closed_port();
    let addr = format!("127.0.0.1:{port}");
    let timing = ["--buckets", "8", "--heartbeat", "100ms", "--ttl", "1s"];
    let mut a_args = timing.to_vec();
    a_args.extend(["--metrics", &addr]);
    let mut a = Joined::spawn(&redis, "mg", "a", &a_args);
    let text = wait_metrics_agree(&redis, port, 1, 8, Duration::from_secs(10));
    assert_eq!(
        sample(&text, r#"redbuckets_buckets_share{group="mg"}"#),
        Some(8.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"redbuckets_bucket_events_total{group="mg",event="acquired"}"#
        ),
        Some(8.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"redbuckets_quarantine_remaining_seconds{group="mg"}"#
        ),
        Some(0.0)
    );
    let lease =
        sample(&text, r#"redbuckets_lease_remaining_seconds{group="mg"}"#).expect("lease gauge");
    assert!(lease > 0.0 && lease <= 1.0, "{lease}");
    // Histograms with the explicit buckets, in seconds.
    assert!(
        text.contains(
            r#"redbuckets_store_call_duration_seconds_bucket{group="mg",call="heartbeat",le="0.0005"}"#
        ),
        "{text}"
    );
    assert!(text.contains("# TYPE redbuckets_store_call_duration_seconds histogram"));

    // A join: a gives half to b.
    let mut b = Joined::spawn(&redis, "mg", "b", &timing);
    let text = wait_metrics_agree(&redis, port, 2, 4, Duration::from_secs(10));
    assert_eq!(
        sample(&text, r#"redbuckets_buckets_share{group="mg"}"#),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"redbuckets_bucket_events_total{group="mg",event="released"}"#
        ),
        Some(4.0)
    );
    assert!(
        text.contains(r#"redbuckets_drain_duration_seconds_count{group="mg",result="dropped"} 4"#)
    );

    // A leave: b's four come back.
    b.signal("-TERM");
    let (code, stderr) = b.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
    wait_metrics_agree(&redis, port, 1, 8, Duration::from_secs(10));

    // A crash: c takes half, is killed, and a owns everything again once c's session expired.
    let mut c = Joined::spawn(&redis, "mg", "c", &timing);
    wait_metrics_agree(&redis, port, 2, 4, Duration::from_secs(10));
    c.signal("-KILL");
    let _ = c.wait_exit(Duration::from_secs(10));
    let text = wait_metrics_agree(&redis, port, 1, 8, Duration::from_secs(10));
    assert_eq!(
        sample(
            &text,
            r#"redbuckets_bucket_events_total{group="mg",event="acquired"}"#
        ),
        Some(16.0),
        "8 at the start, 4 after b left, 4 after c crashed"
    );

    a.signal("-TERM");
    let (code, stderr) = a.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn join_with_metrics_on_a_taken_address_fails_clearly() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let redis = RedisServer::start();
    let r = run(
        &[
            "join",
            "--redis",
            &redis.url(),
            "--group",
            "g",
            "--metrics",
            &addr,
        ],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("cannot serve metrics on {addr}")),
        "{}",
        r.stderr
    );
}

/// Every key of `redis` with its DUMP, sorted: any write shows. (The test may use KEYS; the
/// tool never does.)
fn dump_all(redis: &RedisServer) -> String {
    let mut keys: Vec<String> = redis
        .cli(&["KEYS", "*"])
        .lines()
        .map(str::to_string)
        .collect();
    keys.sort();
    keys.iter()
        .map(|k| format!("{k} {:?}\n", redis.cli(&["DUMP", k])))
        .collect()
}

#[test]
fn groups_lists_every_group_under_a_prefix_and_changes_no_key() {
    let redis = RedisServer::start();
    let url = redis.url();
    let timing = ["--buckets", "8", "--heartbeat", "100ms", "--ttl", "1s"];
    let mut live = Joined::spawn(&redis, "live", "a", &timing);
    let mut crashed = Joined::spawn(&redis, "crashed", "b", &timing);
    let mut left = Joined::spawn(&redis, "left", "c", &timing);
    let mut elsewhere = Joined::spawn(
        &redis,
        "x",
        "d",
        &[&timing[..], &["--prefix", "other"]].concat(),
    );
    for j in [&mut live, &mut crashed, &mut left, &mut elsewhere] {
        j.wait_for("acquired", Duration::from_secs(10));
    }
    crashed.signal("-KILL");
    let _ = crashed.wait_exit(Duration::from_secs(10));
    left.signal("-TERM");
    let _ = left.wait_exit(Duration::from_secs(10));
    // The crashed member's session expires (ttl 1 s).
    thread::sleep(Duration::from_millis(1200));
    // Foreign keys under the prefix: one where a group's meta would be, others beside.
    redis.cli(&["SET", "{red-buckets:foreign}:meta", "not a hash"]);
    redis.cli(&["SET", "{red-buckets:foo}:other", "x"]);
    redis.cli(&["SET", "red-buckets:plain", "x"]);
    redis.cli(&["SET", "{red-buckets}:meta", "x"]);
    redis.cli(&["HSET", "{red-buckets-not:y}:meta", "buckets", "4"]);

    let list = |extra: &[&str]| -> Value {
        let mut args = vec!["groups", "--redis", &url, "--json"];
        args.extend_from_slice(extra);
        let r = run(&args, Duration::from_secs(10));
        assert_eq!(r.code, Some(0), "{r:?}");
        serde_json::from_str(&r.stdout).expect("groups --json is JSON")
    };
    let v = list(&[]);
    let groups = v["groups"].as_array().expect("groups");
    let names: Vec<&str> = groups.iter().filter_map(|g| g["group"].as_str()).collect();
    let by = |name: &str| {
        groups
            .iter()
            .find(|g| g["group"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {v}"))
    };
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted: {names:?}");
    assert!(
        !names.contains(&"x") && !names.contains(&"foo"),
        "{names:?}"
    );
    assert!(!names.contains(&"y"), "another prefix: {names:?}");
    assert_eq!(by("live")["state"], "live");
    assert_eq!(by("live")["members"], 1);
    assert_eq!(by("live")["buckets"], 8);
    assert_eq!(by("live")["free"], 0);
    assert_eq!(by("live")["ttl_ms"], 1000);
    assert!(by("live")["renewed_ago_ms"].as_u64().expect("renewed") < 1000);
    assert_eq!(by("crashed")["state"], "abandoned");
    assert_eq!(by("crashed")["members"], 0);
    assert_eq!(by("crashed")["free"], 8, "as the next purge leaves it");
    assert_eq!(by("foreign")["state"], "unreadable");
    if names.contains(&"left") {
        assert_eq!(by("left")["state"], "abandoned");
        assert_eq!(by("left")["renewed_ago_ms"], Value::Null, "no session left");
    }
    let other = list(&["--prefix", "other"]);
    assert_eq!(other["groups"][0]["group"], "x", "{other}");
    assert_eq!(other["groups"].as_array().map(Vec::len), Some(1), "{other}");

    // Looking never writes: with no member running, every key stays as it was.
    for j in [&mut live, &mut elsewhere] {
        j.signal("-KILL");
        let _ = j.wait_exit(Duration::from_secs(10));
    }
    let before = dump_all(&redis);
    let v = list(&[]);
    let r = run(&["groups", "--redis", &url], Duration::from_secs(10));
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains("GROUP") && r.stdout.contains("RENEWED_AGO"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("crashed") && r.stdout.contains("abandoned"),
        "{r:?}"
    );
    assert_eq!(dump_all(&redis), before, "groups changed a key");
    let crashed = v["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group"] == "crashed"))
        .expect("crashed listed");
    assert!(
        crashed["renewed_ago_ms"].as_u64().expect("renewed") >= 1000,
        "{crashed}"
    );
}

/// The largest token any `acquired` line of `lines` carries.
fn max_token(lines: &[Value]) -> u64 {
    lines
        .iter()
        .filter(|v| v["event"] == "acquired")
        .filter_map(|v| v["token"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn delete_is_refused_under_live_members_and_forced_without_overlap() {
    let redis = RedisServer::start();
    let url = redis.url();
    let timing = ["--buckets", "16", "--heartbeat", "100ms", "--ttl", "1s"];
    let mut a = Joined::spawn(&redis, "del", "a", &timing);
    let mut b = Joined::spawn(&redis, "del", "b", &timing);
    wait_converged(&redis, "del", 2, Duration::from_secs(15));
    let delete = |extra: &[&str]| {
        let mut args = vec!["delete", "--redis", &url, "--group", "del"];
        args.extend_from_slice(extra);
        run(&args, Duration::from_secs(10))
    };

    // Refused, and a dry run, change nothing (the members still run: compare the groups).
    let r = delete(&[]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("has 2 live members (a, b): not deleted") && r.stderr.contains("--force"),
        "{r:?}"
    );
    let r = delete(&["--force", "--dry-run"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains("dry run: would delete group \"del\""),
        "{r:?}"
    );
    assert!(r.stdout.contains("the 2 live members (a, b)"), "{r:?}");
    let status = wait_converged(&redis, "del", 2, Duration::from_secs(5));
    assert_eq!(status["free"], 0, "{status}");

    // Forced under the running members: they lose their buckets, register again, and own
    // everything again after the new group's quarantine, with larger tokens and no overlap.
    a.poll();
    b.poll();
    let before = max_token(&a.seen).max(max_token(&b.seen));
    let marks = (a.seen.len(), b.seen.len());
    let r = delete(&["--force"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("deleted group \"del\""), "{r:?}");
    assert!(r.stdout.contains("re-creates the group"), "{r:?}");
    wait_converged(&redis, "del", 2, Duration::from_secs(15));
    thread::sleep(Duration::from_millis(300));
    a.poll();
    b.poll();
    let after = max_token(&a.seen[marks.0..]).max(max_token(&b.seen[marks.1..]));
    assert!(after > before, "tokens grew: {before} -> {after}");
    let lost: usize = [(&a, marks.0), (&b, marks.1)]
        .iter()
        .map(|(m, mark)| {
            m.seen[*mark..]
                .iter()
                .filter(|v| v["event"] == "lost" && v["reason"] == "session_expired")
                .count()
        })
        .sum();
    assert_eq!(lost, 16, "every bucket ended with the session");
    for m in [&mut a, &mut b] {
        m.signal("-TERM");
        let (code, stderr) = m.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(0), "{stderr}");
    }
    let checked = timeline(&[&a.seen, &b.seen]);
    let violations = checked.violations();
    assert!(violations.is_empty(), "{violations:#?}");

    // A group that does not exist.
    let r = run(
        &["delete", "--redis", &url, "--group", "nope"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("does not exist"), "{r:?}");
}

/// The `acquired` lines of `lines` from `from` on, as (bucket, token, at).
fn acquired_since(lines: &[Value], from: usize) -> Vec<(u64, u64, Duration)> {
    lines[from..]
        .iter()
        .filter(|v| v["event"] == "acquired")
        .filter_map(|v| {
            Some((
                v["bucket"].as_u64()?,
                v["token"].as_u64()?,
                Duration::from_micros(v["at_us"].as_u64()?),
            ))
        })
        .collect()
}

#[test]
fn remove_member_gives_a_killed_members_buckets_away_within_a_renewal_not_a_ttl() {
    let redis = RedisServer::start();
    let url = redis.url();
    // A long ttl (renewal every 3 s) so that waiting it out would show.
    let timing = ["--buckets", "16", "--heartbeat", "200ms", "--ttl", "6s"];
    let mut a = Joined::spawn(&redis, "rm", "a", &timing);
    let mut b = Joined::spawn(&redis, "rm", "b", &timing);
    wait_converged(&redis, "rm", 2, Duration::from_secs(20));
    thread::sleep(Duration::from_millis(300));
    a.poll();
    let held = timeline(&[&a.seen])
        .holdings()
        .remove("a")
        .unwrap_or_default();
    // The token of each bucket a holds: its last grant's.
    let a_tokens: std::collections::BTreeMap<u64, u64> = acquired_since(&a.seen, 0)
        .into_iter()
        .filter(|(bucket, _, _)| held.contains(&(*bucket as u32)))
        .map(|(bucket, token, _)| (bucket, token))
        .collect();
    assert_eq!(a_tokens.len(), 8, "a holds its share");
    a.signal("-KILL");
    let _ = a.wait_exit(Duration::from_secs(10));

    let remove = |extra: &[&str]| {
        let mut args = vec![
            "remove-member",
            "--redis",
            &url,
            "--group",
            "rm",
            "--id",
            "a",
        ];
        args.extend_from_slice(extra);
        run(&args, Duration::from_secs(10))
    };
    // Not a terminal and no --yes: refused, with the warning.
    let r = remove(&[]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("pass --yes") && r.stderr.contains("keeps working on its buckets"),
        "{r:?}"
    );
    let r = remove(&["--dry-run"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout
            .contains("dry run: would end the session of \"a\" (holding 8 buckets"),
        "{r:?}"
    );
    let status = wait_converged(&redis, "rm", 2, Duration::from_secs(1));
    assert_eq!(
        status["members"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );

    b.poll();
    let mark = b.seen.len();
    let removed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let r = remove(&["--yes"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout
            .contains("removed \"a\" from group \"rm\": its 8 buckets"),
        "{r:?}"
    );
    assert!(r.stderr.contains("warning:"), "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(3);
    let taken = loop {
        b.poll();
        let taken = acquired_since(&b.seen, mark);
        if taken.len() >= 8 {
            break taken;
        }
        assert!(
            Instant::now() < deadline,
            "b did not take a's buckets within one renewal: {taken:?}"
        );
        thread::sleep(Duration::from_millis(10));
    };
    let last = taken.iter().map(|(_, _, at)| *at).max().expect("taken");
    let took = last.saturating_sub(removed_at);
    eprintln!("remove-member takeover: {took:?} after the command started (ttl 6s)");
    assert!(took < Duration::from_secs(3), "{took:?}");
    for (bucket, token, _) in &taken {
        let old = a_tokens.get(bucket).expect("one of a's buckets");
        assert!(token > old, "bucket {bucket}: token {token} after {old}");
    }
    let status = wait_converged(&redis, "rm", 1, Duration::from_secs(2));
    assert_eq!(status["members"][0]["held"], 16, "{status}");
    let r = remove(&["--yes"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("no live member \"a\""), "{r:?}");
    b.signal("-TERM");
    let (code, stderr) = b.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
}
