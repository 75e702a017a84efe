//! Member processes (`redbuckets join --json`) and the shared timeline their lines go into; the
//! lines turned into ownership changes for the library's checker (`redbuckets::check`, the one
//! S1/S2 checker), and L1/L2 over what they say each process holds.
//!
//! Each process gets a reader thread for stdout (one parsed JSON line at a time, stamped with the
//! time it was read) and one for stderr (kept as text, readable while the process runs). A
//! [`Group`] is the members of one group on one Redis: spawn, SIGKILL (recording when), SIGSTOP
//! and SIGCONT, and bounded waits for coverage and balance. Every wait has a limit, and dropping
//! a group SIGKILLs whatever still runs, so no test can hang or leak processes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use redbuckets::check::{self, Change};

/// One line of one member process, with the wall-clock time the test read it.
#[derive(Debug, Clone)]
pub struct Line {
    /// Which process wrote it (its index in the harness).
    pub proc: usize,
    /// `recv_us`: Unix µs when the reader thread got the line.
    pub recv_us: u64,
    pub value: Value,
}

impl Line {
    /// `acquired`, `revoked`, `released`, `lost`, `joined`, `left`.
    pub fn event(&self) -> &str {
        self.value["event"].as_str().unwrap_or("")
    }

    pub fn bucket(&self) -> Option<u32> {
        self.value["bucket"]
            .as_u64()
            .and_then(|b| u32::try_from(b).ok())
    }

    pub fn token(&self) -> Option<u64> {
        self.value["token"].as_u64()
    }

    pub fn at_us(&self) -> Option<u64> {
        self.value["at_us"].as_u64()
    }
}

/// A process that was SIGKILLed: whatever it owned, it stopped owning at `dead_us` (taken after
/// the process was reaped, so no later instant can still belong to it).
#[derive(Debug, Clone, Copy)]
pub struct Kill {
    pub proc: usize,
    pub dead_us: u64,
}

/// The library's checker over the lines (each process's in the order it wrote them; how
/// processes interleave does not matter) and the kills, as a timeline keyed by process index;
/// and the lines that are not ownership changes with their fields.
fn timeline(lines: &[Line], kills: &[Kill]) -> (check::Timeline<Duration>, Vec<String>) {
    // Every line of a process is read from its start: an end of a bucket it was not seen to
    // acquire is a violation, not a stream joined late.
    let mut timeline = check::Timeline::new().complete_streams();
    let mut bad = Vec::new();
    for line in lines {
        let change = match line.event() {
            "joined" | "left" | "registered" => continue,
            "acquired" => Change::Acquired,
            "revoked" => Change::Revoked,
            "lost" => Change::Lost,
            "released" => Change::Released,
            other => {
                bad.push(format!("unknown event {other:?}: {}", line.value));
                continue;
            }
        };
        let (Some(bucket), Some(token), Some(at)) = (line.bucket(), line.token(), line.at_us())
        else {
            bad.push(format!("line without bucket/token/at_us: {}", line.value));
            continue;
        };
        let at = Duration::from_micros(at);
        timeline.record(&line.proc.to_string(), change, bucket, token, at);
    }
    for kill in kills {
        timeline.crash(&kill.proc.to_string(), Duration::from_micros(kill.dead_us));
    }
    (timeline, bad)
}

/// S1 and S2 over the lines and kills, and every line that makes no sense: empty means safe.
pub fn violations(lines: &[Line], kills: &[Kill]) -> Vec<String> {
    let (timeline, mut bad) = timeline(lines, kills);
    bad.extend(timeline.violations());
    bad
}

/// Bucket-time without an owner over `[from_us, to_us]` (Unix µs), and the longest gap.
pub fn unowned(
    lines: &[Line],
    kills: &[Kill],
    buckets: u32,
    from_us: u64,
    to_us: u64,
) -> (Duration, Duration) {
    let (timeline, _) = timeline(lines, kills);
    timeline.unowned(
        buckets,
        Duration::from_micros(from_us),
        Duration::from_micros(to_us),
    )
}

/// What each process holds after all of `lines` (killed processes hold nothing).
pub fn holdings(lines: &[Line], kills: &[Kill]) -> BTreeMap<usize, BTreeSet<u32>> {
    let (timeline, _) = timeline(lines, kills);
    timeline
        .holdings()
        .into_iter()
        .filter_map(|(proc, held)| Some((proc.parse().ok()?, held)))
        .collect()
}

/// L1 and L2 over the processes `live`: every bucket of `0..buckets` is held by exactly one of
/// them, and each holds ⌊B/n⌋ or ⌈B/n⌉. Others are ignored (a stopped process still believes
/// what it last said). `Err` says what is missing.
pub fn converged(
    held: &BTreeMap<usize, BTreeSet<u32>>,
    live: &[usize],
    buckets: u32,
) -> Result<(), String> {
    let n = u32::try_from(live.len()).expect("few members");
    assert!(n > 0, "no live member");
    let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
    let mut counts = Vec::new();
    for &p in live {
        let set = held.get(&p).cloned().unwrap_or_default();
        counts.push((p, set.len()));
        for b in set {
            if let Some(other) = owner.insert(b, p) {
                return Err(format!("bucket {b} held by both {other} and {p}"));
            }
        }
    }
    let unowned = (0..buckets).filter(|b| !owner.contains_key(b)).count();
    if unowned > 0 {
        return Err(format!("{unowned} buckets unowned; counts {counts:?}"));
    }
    let (lo, hi) = (buckets / n, buckets.div_ceil(n));
    let lo = usize::try_from(lo).expect("fits");
    let hi = usize::try_from(hi).expect("fits");
    if counts.iter().any(|(_, c)| *c < lo || *c > hi) {
        return Err(format!("not balanced ({lo}..={hi}): {counts:?}"));
    }
    Ok(())
}

pub const HEARTBEAT: Duration = Duration::from_millis(100);
pub const TTL: Duration = Duration::from_secs(1);

/// Unix time in µs, the clock of the members' `at_us`.
pub fn now_us() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(d.as_micros()).expect("fits")
}

/// Every line of every process of a group, in the order read, and lines that were not JSON.
#[derive(Debug, Default)]
pub struct Timeline {
    state: Mutex<State>,
    grew: Condvar,
}

#[derive(Debug, Default)]
struct State {
    lines: Vec<Line>,
    garbage: Vec<String>,
}

impl Timeline {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: Line) {
        self.lock().lines.push(line);
        self.grew.notify_all();
    }

    pub fn lines(&self) -> Vec<Line> {
        self.lock().lines.clone()
    }

    pub fn len(&self) -> usize {
        self.lock().lines.len()
    }

    fn garbage(&self) -> Vec<String> {
        self.lock().garbage.clone()
    }

    /// Waits until more than `seen` lines are in, or `until`.
    fn wait_past(&self, seen: usize, until: Instant) {
        let state = self.lock();
        let left = until.saturating_duration_since(Instant::now());
        let _ = self
            .grew
            .wait_timeout_while(state, left, |s| s.lines.len() <= seen);
    }
}

/// One `redbuckets join --json` child.
#[derive(Debug)]
pub struct Proc {
    pub id: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
    pub dead: bool,
}

impl Proc {
    fn spawn(
        timeline: &Arc<Timeline>,
        index: usize,
        id: &str,
        url: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Proc {
        let mut all: Vec<&str> = vec!["join", "--json", "--redis", url, "--id", id];
        all.extend(args.iter().map(String::as_str));
        let mut cmd = command(&all);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redbuckets join");
        let stdout = child.stdout.take().expect("stdout");
        let stderr_pipe = child.stderr.take().expect("stderr");
        let tl = Arc::clone(timeline);
        let out = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let recv_us = now_us();
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => tl.push(Line {
                        proc: index,
                        recv_us,
                        value,
                    }),
                    Err(e) => tl.lock().garbage.push(format!("{index}: {e}: {line:?}")),
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let err = thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { return };
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc {
            id: id.to_string(),
            child,
            stderr,
            readers: vec![out, err],
            dead: false,
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends `sig` (`-STOP`, `-CONT`, `-TERM`) with kill(1); returns once it was sent.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {}", self.id);
    }

    /// Still running (not exited)?
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the exit, at most `limit`, and for the readers to reach EOF.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {limit:?}; stderr:\n{}",
                    self.id,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.dead = true;
        status.code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The member processes of one group on one Redis.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub buckets: u32,
    pub url: String,
    pub timeline: Arc<Timeline>,
    pub procs: Vec<Proc>,
    pub kills: Vec<Kill>,
    /// The members' options after the group and the bucket count: heartbeat 100 ms and ttl 1 s
    /// unless a test sets others.
    pub options: Vec<String>,
}

/// What [`Group::wait_converged`] saw.
#[derive(Debug, Clone, Copy)]
pub struct Converged {
    /// `at_us` of the last ownership change before convergence.
    pub last_change_us: u64,
}

impl Group {
    pub fn new(url: &str, name: &str, buckets: u32) -> Group {
        Group {
            name: name.to_string(),
            buckets,
            url: url.to_string(),
            timeline: Arc::default(),
            procs: Vec::new(),
            kills: Vec::new(),
            options: ["--heartbeat", "100ms", "--ttl", "1s"]
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
        }
    }

    fn args(&self) -> Vec<String> {
        let group = [
            "--group",
            &self.name,
            "--buckets",
            &self.buckets.to_string(),
        ]
        .map(str::to_string);
        group.into_iter().chain(self.options.clone()).collect()
    }

    /// Starts member `id` on the group's URL.
    pub fn spawn(&mut self, id: &str) -> usize {
        let url = self.url.clone();
        self.spawn_with(id, &url, &[])
    }

    /// Starts member `id` on `url` (e.g. through a proxy) with extra environment variables.
    pub fn spawn_with(&mut self, id: &str, url: &str, env: &[(&str, &str)]) -> usize {
        let index = self.procs.len();
        let args = self.args();
        self.procs
            .push(Proc::spawn(&self.timeline, index, id, url, &args, env));
        index
    }

    /// Waits until every process printed its `joined` line.
    pub fn wait_joined(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let lines = self.timeline.lines();
            let joined: BTreeSet<usize> = lines
                .iter()
                .filter(|l| l.event() == "joined")
                .map(|l| l.proc)
                .collect();
            if joined.len() == self.procs.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: only {joined:?} joined within {limit:?}; stderr: {}",
                self.name,
                self.stderrs()
            );
            self.timeline.wait_past(lines.len(), deadline);
        }
    }

    /// SIGTERM to process `p`, and waits for its graceful exit (code 0); returns the time just
    /// before the signal.
    pub fn terminate(&mut self, p: usize) -> u64 {
        let sent = now_us();
        self.procs[p].signal("-TERM");
        let code = self.procs[p].wait_exit(Duration::from_secs(20));
        assert_eq!(
            code,
            Some(0),
            "{}:\n{}",
            self.procs[p].id,
            self.procs[p].stderr()
        );
        sent
    }

    /// SIGKILL; returns the time just before the signal. Ownership ends when the process is
    /// reaped (later), which is what the checker uses.
    pub fn kill9(&mut self, p: usize) -> u64 {
        let sent = now_us();
        let proc = &mut self.procs[p];
        proc.child.kill().expect("SIGKILL");
        proc.child.wait().expect("reap");
        let dead_us = now_us();
        proc.dead = true;
        self.kills.push(Kill { proc: p, dead_us });
        sent
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&p| !self.procs[p].dead)
            .collect()
    }

    pub fn holdings(&self) -> BTreeMap<usize, BTreeSet<u32>> {
        holdings(&self.timeline.lines(), &self.kills)
    }

    /// Waits until the live processes hold every bucket, balanced within one (L1, L2), and
    /// checks S1/S2 on the way.
    pub fn wait_converged(&self, limit: Duration) -> Converged {
        let c = self.wait_converged_over(&self.live(), limit);
        self.check_safety();
        c
    }

    /// Waits until `pred` holds for the timeline, at most `limit`; panics naming `what`.
    pub fn wait_until(&self, what: &str, limit: Duration, pred: impl Fn(&[Line]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let lines = self.timeline.lines();
            if pred(&lines) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what}: not within {limit:?}; holdings {:?}\nstderr:\n{}",
                self.name,
                self.holdings()
                    .iter()
                    .map(|(p, s)| (*p, s.len()))
                    .collect::<Vec<_>>(),
                self.stderrs()
            );
            self.timeline
                .wait_past(lines.len(), deadline.min(Instant::now() + HEARTBEAT));
        }
    }

    /// [`Group::wait_converged`] over the processes `live` only, without the S1/S2 check (a
    /// stopped process cannot have reported yet what it lost).
    pub fn wait_converged_over(&self, live: &[usize], limit: Duration) -> Converged {
        let live = live.to_vec();
        let deadline = Instant::now() + limit;
        loop {
            let lines = self.timeline.lines();
            let held = holdings(&lines, &self.kills);
            let state = converged(&held, &live, self.buckets);
            if state.is_ok() {
                let last_change_us = lines
                    .iter()
                    .filter(|l| l.bucket().is_some() && l.event() != "released")
                    .filter_map(Line::at_us)
                    .max()
                    .unwrap_or(0);
                return Converged { last_change_us };
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: not converged over {live:?} within {limit:?}: {}\nstderr:\n{}",
                    self.name,
                    state.unwrap_err(),
                    self.stderrs()
                );
            }
            // New lines, or a poll now and then in case none come.
            self.timeline
                .wait_past(lines.len(), deadline.min(Instant::now() + HEARTBEAT));
        }
    }

    /// S1 and S2 over everything seen so far; panics with the violations.
    pub fn check_safety(&self) {
        let garbage = self.timeline.garbage();
        assert!(garbage.is_empty(), "lines that are not JSON: {garbage:?}");
        let bad = violations(&self.timeline.lines(), &self.kills);
        assert!(
            bad.is_empty(),
            "{}: {} violations:\n{}",
            self.name,
            bad.len(),
            bad.join("\n")
        );
    }

    /// Lines of process `p` from index `from` of the timeline on.
    pub fn lines_of(&self, p: usize, from: usize) -> Vec<Line> {
        self.timeline.lines()[from..]
            .iter()
            .filter(|l| l.proc == p)
            .cloned()
            .collect()
    }

    /// Everything the processes wrote to stderr, labelled.
    pub fn stderrs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {}:\n{}", p.id, p.stderr()))
            .collect()
    }

    /// Checks that no process panicked or died, and none reported a stream it could not keep up
    /// with.
    pub fn assert_healthy(&mut self) {
        for p in &mut self.procs {
            if p.dead {
                continue;
            }
            let err = p.stderr();
            assert!(!err.contains("panicked"), "{} panicked:\n{err}", p.id);
            assert!(
                !err.contains("missed"),
                "{} missed ownership events:\n{err}",
                p.id
            );
            assert!(p.running(), "{} exited:\n{err}", p.id);
        }
    }

    /// SIGTERM to every live process: each leaves gracefully (exit 0, a clean `left` line);
    /// then the final S1/S2 check.
    pub fn shutdown(&mut self) {
        self.assert_healthy();
        let live = self.live();
        for &p in &live {
            self.procs[p].signal("-TERM");
        }
        for &p in &live {
            let code = self.procs[p].wait_exit(Duration::from_secs(10));
            let err = self.procs[p].stderr();
            assert_eq!(
                code,
                Some(0),
                "{} exited with {code:?}:\n{err}",
                self.procs[p].id
            );
            assert!(!err.contains("panicked"), "{}:\n{err}", self.procs[p].id);
        }
        let lines = self.timeline.lines();
        for &p in &live {
            let last = lines.iter().rfind(|l| l.proc == p).expect("lines");
            assert_eq!(last.event(), "left", "{}: {}", self.procs[p].id, last.value);
            assert_eq!(last.value["clean"], true, "{}", self.procs[p].id);
        }
        // Everything was handed back.
        let held = holdings(&lines, &self.kills);
        assert!(held.values().all(BTreeSet::is_empty), "{held:?}");
        self.check_safety()
    }
}

pub use super::process::{command, run_cmd as run};

/// The adapter from lines to the checker: a test that it cannot pass what it should catch.
#[test]
fn the_checker_catches_overlaps_stale_tokens_and_imbalance() {
    fn line(proc: usize, event: &str, bucket: u32, token: u64, at: u64) -> Line {
        let value =
            serde_json::json!({"event": event, "bucket": bucket, "token": token, "at_us": at});
        Line {
            proc,
            recv_us: at,
            value,
        }
    }
    // Handed over cleanly: no violation.
    let ok = [
        line(0, "acquired", 0, 5, 100),
        line(0, "revoked", 0, 5, 200),
        line(0, "released", 0, 5, 201),
        line(1, "acquired", 0, 6, 200),
    ];
    assert!(
        violations(&ok, &[]).is_empty(),
        "{:?}",
        violations(&ok, &[])
    );
    // Acquired before the other lost it.
    let overlap = [
        line(0, "acquired", 0, 5, 100),
        line(1, "acquired", 0, 6, 150),
        line(0, "lost", 0, 5, 160),
    ];
    let v = violations(&overlap, &[]);
    assert!(v.len() == 1 && v[0].starts_with("S1"), "{v:?}");
    // Never ended, and a smaller token.
    let stale = [
        line(0, "acquired", 0, 5, 100),
        line(1, "acquired", 0, 4, 150),
    ];
    assert_eq!(violations(&stale, &[]).len(), 2);
    // A kill ends ownership at the reap time.
    let killed = [
        line(0, "acquired", 0, 5, 100),
        line(1, "acquired", 0, 6, 150),
    ];
    let kill = Kill {
        proc: 0,
        dead_us: 140,
    };
    assert!(violations(&killed, &[kill]).is_empty());
    assert!(!violations(
        &killed,
        &[Kill {
            dead_us: 151,
            ..kill
        }]
    )
    .is_empty());
    // Nonsense streams.
    assert_eq!(violations(&[line(0, "lost", 1, 1, 1)], &[]).len(), 1);
    let mut no_token = line(0, "acquired", 1, 1, 1);
    no_token.value["token"] = serde_json::Value::Null;
    assert_eq!(violations(&[no_token], &[]).len(), 1);
    // Balance: 3 buckets over 2 processes; a killed process holds nothing.
    let lines = [
        line(0, "acquired", 0, 1, 1),
        line(0, "acquired", 1, 1, 1),
        line(1, "acquired", 2, 1, 1),
    ];
    let held = holdings(&lines, &[]);
    assert!(converged(&held, &[0, 1], 3).is_ok());
    assert!(converged(&held, &[0, 1, 2], 3).is_err());
    assert!(converged(&held, &[0, 1], 4).is_err());
    assert!(!holdings(&lines, &[kill]).contains_key(&0));
}

/// `status --json` for a group: what Redis says, to cross-check the streams.
pub fn status(url: &str, group: &str) -> Value {
    let r = run(
        command(&["status", "--redis", url, "--group", group, "--json"]),
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "status failed: {r:?}");
    serde_json::from_str(&r.stdout).expect("status --json is JSON")
}

/// Checks that Redis agrees with the streams: what each member holds, nothing free.
pub fn assert_status_matches(group: &Group) {
    let v = status(&group.url, &group.name);
    assert_eq!(v["free"], 0, "{v}");
    let held = group.holdings();
    for m in v["members"].as_array().expect("members") {
        let id = m["id"].as_str().expect("id");
        let p = group
            .procs
            .iter()
            .position(|p| p.id == id && !p.dead)
            .unwrap_or_else(|| panic!("status lists {id}, not a live member: {v}"));
        let count = held.get(&p).map_or(0, BTreeSet::len);
        assert_eq!(m["held"], count, "{id}: status {v} vs stream {count}");
    }
}
