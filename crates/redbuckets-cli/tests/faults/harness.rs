//! Member processes (`redbuckets join --json`) and the shared timeline their lines go into.
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

use super::checker::{self, Interval, Kill, Line};

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
        }
    }

    fn args(&self) -> Vec<String> {
        [
            "--group",
            &self.name,
            "--buckets",
            &self.buckets.to_string(),
            "--heartbeat",
            "100ms",
            "--ttl",
            "1s",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
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
        checker::holdings(&self.timeline.lines(), &self.kills)
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
            let held = checker::holdings(&lines, &self.kills);
            let state = checker::converged(&held, &live, self.buckets);
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

    /// S1 and S2 over everything seen so far; panics with the violations. Returns the intervals.
    pub fn check_safety(&self) -> BTreeMap<u32, Vec<Interval>> {
        let garbage = self.timeline.garbage();
        assert!(garbage.is_empty(), "lines that are not JSON: {garbage:?}");
        let all = checker::intervals(&self.timeline.lines(), &self.kills)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let bad = checker::violations(&all);
        assert!(
            bad.is_empty(),
            "{}: {} violations:\n{}",
            self.name,
            bad.len(),
            bad.join("\n")
        );
        all
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
    /// then the final S1/S2 check. Returns the intervals.
    pub fn shutdown(&mut self) -> BTreeMap<u32, Vec<Interval>> {
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
        let held = checker::holdings(&lines, &self.kills);
        assert!(held.values().all(BTreeSet::is_empty), "{held:?}");
        self.check_safety()
    }
}

pub use super::process::{command, run_cmd as run};

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
