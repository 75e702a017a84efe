//! `redbuckets demo`: the newcomer's first command. Starts a few members in-process (on the
//! in-process `MemoryStore` unless `--redis` is given), then lets one join, one leave gracefully
//! and one crash, showing the grid live, and ends with the numbers: time to balance, buckets
//! moved against the optimum, unowned bucket-time, and an independent safety check over every
//! member's events.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use redbuckets::{redact_url, Config, Event, GroupKey, GroupSnapshot, Member, MemoryStore, Store};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{connect, scrub, Signals};
use crate::analysis::{analyze, digest, holdings, Digest};
use crate::out::{self, StdoutClosed};
use crate::render::{self, fmt_bucket_time, fmt_duration, Palette};
use crate::DemoArgs;
use redbuckets::check::Timeline;

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::new("demo");
    config.buckets = args.buckets;
    config.heartbeat = args.heartbeat;
    config.ttl = args.ttl;
    config.validate()?;
    let signals = Signals::install()?;
    let settings = Settings {
        members: args.members,
        buckets: args.buckets,
        heartbeat: args.heartbeat,
        ttl: args.ttl,
    };
    match &args.redis {
        None => {
            let store = MemoryStore::new();
            let key = GroupKey::new(config.prefix.clone(), "demo");
            Demo::new(store, key, "the in-process store".into(), settings, signals)
                .run()
                .await
        }
        Some(url) => {
            let url = if url.is_empty() {
                &std::env::var("REDBUCKETS_REDIS_URL").map_err(|_| {
                    anyhow!("--redis without a URL takes $REDBUCKETS_REDIS_URL, which is not set")
                })?
            } else {
                url
            };
            let store = connect(url, Duration::ZERO).await?;
            // A fresh group per run: a demo must not join someone's real group, nor an earlier
            // demo's with another bucket count.
            let group = format!("demo-{}", std::process::id());
            let key = GroupKey::new(config.prefix.clone(), group.clone());
            let label = format!("Redis at {} (group {group})", redact_url(url));
            Demo::new(store, key, label, settings, signals)
                .run()
                .await
                .map_err(|e| anyhow!("{}", scrub(&format!("{e:#}"), url)))
        }
    }
}

/// The demo's parameters, from the command line.
#[derive(Debug, Clone, Copy)]
struct Settings {
    members: u32,
    buckets: u32,
    heartbeat: Duration,
    ttl: Duration,
}

/// One phase: from the action until the group was first seen balanced again. Its numbers are
/// computed from the events at the end, when every member's events have arrived.
#[derive(Debug)]
struct Phase {
    name: String,
    members: (usize, usize),
    from: Instant,
    to: Instant,
    optimal: u32,
}

impl Phase {
    fn new(
        name: String,
        members: (usize, usize),
        from: Instant,
        to: Instant,
        optimal: u32,
    ) -> Self {
        Phase {
            name,
            members,
            from,
            to,
            optimal,
        }
    }
}

struct Demo<S> {
    store: S,
    key: GroupKey,
    label: String,
    args: Settings,
    signals: Signals,
    live: Vec<(String, Member)>,
    /// Every member's events, forwarded by one task per member as they happen.
    events_tx: mpsc::UnboundedSender<(String, Result<Event, u64>)>,
    events_rx: mpsc::UnboundedReceiver<(String, Result<Event, u64>)>,
    forwarders: Vec<JoinHandle<()>>,
    timeline: Timeline,
    lagged: u64,
    next_id: u32,
    started: Instant,
    tty: bool,
    palette: Palette,
    /// Progress lines; a terminal shows the last few above the grid.
    log: Vec<String>,
    /// What the terminal shows now: the group and the state line.
    last_drawn: Option<(Digest, String)>,
}

impl<S: Store> Demo<S> {
    fn new(store: S, key: GroupKey, label: String, args: Settings, signals: Signals) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Demo {
            store,
            key,
            label,
            args,
            signals,
            live: Vec::new(),
            events_tx,
            events_rx,
            forwarders: Vec::new(),
            timeline: Timeline::default(),
            lagged: 0,
            next_id: 1,
            started: Instant::now(),
            tty: std::io::stdout().is_terminal(),
            palette: Palette::default(),
            log: Vec::new(),
            last_drawn: None,
        }
    }

    async fn run(mut self) -> anyhow::Result<ExitCode> {
        let _cursor = self.tty.then(HiddenCursor::new);
        let result = self.phases().await;
        if result.is_err() {
            // Interrupted (Ctrl-C, SIGTERM, a closed stdout) or failed: the members still
            // running leave, as a library user's would, instead of being dropped (a crash for
            // the group, which leaves their keys in Redis until their sessions expire).
            let leaving: Vec<_> = self.live.drain(..).map(|(_, m)| m.shutdown()).collect();
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                futures_util::future::join_all(leaving),
            )
            .await;
        }
        result
    }

    /// The demo itself: start, join, leave, crash, then the summary.
    async fn phases(&mut self) -> anyhow::Result<ExitCode> {
        let b = self.args.buckets;
        let n = self.args.members as usize;
        // Long enough to see each state on a terminal; short in pipes.
        let pause = if self.tty {
            self.args.ttl.max(Duration::from_millis(1500))
        } else {
            self.args.ttl
        };
        self.say(format!(
            "starting {n} members on {}: {}, heartbeat {}, ttl {}",
            self.label,
            render::count(b, "bucket"),
            fmt_duration(self.args.heartbeat),
            fmt_duration(self.args.ttl)
        ));
        let mut phases = Vec::new();

        // Start: everything is acquired once the group's first ttl (its quarantine) is over.
        let t = Instant::now();
        for _ in 0..n {
            self.start_member().await?;
        }
        self.say(format!(
            "group warming up: a new group grants nothing during its first ttl ({})",
            fmt_duration(self.args.ttl)
        ));
        let (done, snap) = self.wait_balanced("start").await?;
        phases.push(Phase::new("start".to_string(), (0, n), t, done, b));
        self.report_balanced(&snap, phases.last());
        self.hold(pause).await?;

        // Join: the newcomer takes floor(B/(n+1)) buckets, each from a member above its share.
        let t = Instant::now();
        let id = self.start_member().await?;
        self.say(format!("{id} joins"));
        let (done, snap) = self.wait_balanced(&format!("{id} joins")).await?;
        let optimal = b / (n as u32 + 1);
        phases.push(Phase::new(
            format!("join {id}"),
            (n, n + 1),
            t,
            done,
            optimal,
        ));
        self.report_balanced(&snap, phases.last());
        self.hold(pause).await?;

        // Leave: the first member releases everything and deregisters.
        let (id, member) = self.live.remove(0);
        let held = held_by(&snap, &id);
        let t = Instant::now();
        self.say(format!(
            "{id} leaves gracefully, releasing its {}",
            render::count(held, "bucket")
        ));
        let leaving: JoinHandle<Result<(), redbuckets::Error>> = tokio::spawn(member.shutdown());
        let (done, snap) = self.wait_balanced(&format!("{id} leaves")).await?;
        joined(leaving)
            .await
            .with_context(|| format!("{id} did not leave cleanly"))?;
        phases.push(Phase::new(format!("leave {id}"), (n + 1, n), t, done, held));
        self.report_balanced(&snap, phases.last());
        self.hold(pause).await?;

        // Crash: the next member stops dead; its buckets are freed when its session expires.
        let (id, member) = self.live.remove(0);
        let held = held_by(&snap, &id);
        let t = Instant::now();
        member.abort();
        self.timeline.crash(&id, t);
        self.say(format!(
            "{id} crashes holding {}: they stay owned until its session expires (ttl {})",
            render::count(held, "bucket"),
            fmt_duration(self.args.ttl)
        ));
        let (done, snap) = self.wait_balanced(&format!("{id} crashed")).await?;
        phases.push(Phase::new(format!("crash {id}"), (n, n - 1), t, done, held));
        self.report_balanced(&snap, phases.last());

        // The rest leave gracefully, so every ownership in the timeline ends.
        self.say(format!("the remaining {} members leave", self.live.len()));
        let leaving: Vec<_> = self
            .live
            .drain(..)
            .map(|(id, m)| (id, tokio::spawn(m.shutdown())))
            .collect();
        // Keep collecting while they leave: the last ones pick up what the first ones release,
        // and a receiver left alone would overflow.
        while !leaving.iter().all(|(_, h)| h.is_finished()) {
            tokio::time::sleep(self.poll_interval()).await;
            self.collect();
        }
        for (id, handle) in leaving {
            joined(handle)
                .await
                .with_context(|| format!("{id} did not leave cleanly"))?;
        }
        // Each forwarder ends when its member is gone and its last event is forwarded.
        for forwarder in std::mem::take(&mut self.forwarders) {
            if tokio::time::timeout(Duration::from_secs(5), forwarder)
                .await
                .is_err()
            {
                bail!("a member's events did not end after it left");
            }
        }
        self.collect();

        let violations = self.timeline.violations();
        out::print(&self.summary(&phases, &violations))?;
        if self.lagged > 0 {
            bail!(
                "the checker missed {} events; the safety check is incomplete",
                self.lagged
            );
        }
        if !violations.is_empty() {
            bail!("safety violated: {}", violations[0]);
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn start_member(&mut self) -> anyhow::Result<String> {
        let id = format!("m{}", self.next_id);
        self.next_id += 1;
        let member = Member::builder(self.store.clone(), self.key.name.clone())
            .prefix(self.key.prefix.clone())
            .id(id.clone())
            .buckets(self.args.buckets)
            .heartbeat(self.args.heartbeat)
            .ttl(self.args.ttl)
            .start()
            .await
            .with_context(|| format!("cannot start member {id}"))?;
        // Right after start: nothing is granted before the member's task runs and reports it.
        // A task per member drains its channel as events come: a member that revokes and
        // releases everything at once emits 2 × B events, which is the channel's capacity.
        let mut rx = member.events();
        let tx = self.events_tx.clone();
        let member_id = id.clone();
        let forwarder = tokio::spawn(async move {
            loop {
                let item = match rx.next().await {
                    Some(Event::Lagged { missed, .. }) => Err(missed),
                    Some(event) => Ok(event),
                    None => return,
                };
                if tx.send((member_id.clone(), item)).is_err() {
                    return;
                }
            }
        });
        self.forwarders.push(forwarder);
        self.live.push((id.clone(), member));
        Ok(id)
    }

    /// Moves every buffered event into the timeline.
    fn collect(&mut self) {
        while let Ok((id, item)) = self.events_rx.try_recv() {
            match item {
                Ok(event) => self.timeline.push(&id, &event),
                Err(missed) => self.lagged += missed,
            }
        }
    }

    fn poll_interval(&self) -> Duration {
        (self.args.heartbeat / 4).clamp(Duration::from_millis(5), Duration::from_millis(50))
    }

    /// Waits one poll interval (Ctrl-C ends the demo), collects events, reads the group.
    async fn tick(&mut self) -> anyhow::Result<Option<GroupSnapshot>> {
        let interval = self.poll_interval();
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            name = self.signals.recv() => bail!("{name}: demo interrupted"),
        }
        if out::reader_gone() {
            return Err(StdoutClosed.into());
        }
        self.collect();
        let snapshot = self
            .store
            .snapshot(&self.key)
            .await
            .context("cannot read the group")?;
        Ok(snapshot)
    }

    /// Polls until every bucket is owned, the load is balanced and the group's members are
    /// exactly the live ones. Returns when that was first seen.
    async fn wait_balanced(&mut self, phase: &str) -> anyhow::Result<(Instant, GroupSnapshot)> {
        let limit = self.args.ttl * 4 + self.args.heartbeat * 20 + Duration::from_secs(2);
        let begin = Instant::now();
        let expected: BTreeSet<&str> = self.live.iter().map(|(id, _)| id.as_str()).collect();
        let expected: BTreeSet<String> = expected.into_iter().map(str::to_string).collect();
        loop {
            let snapshot = self.tick().await?;
            let now = Instant::now();
            if let Some(s) = &snapshot {
                let ids: BTreeSet<String> = s.members.iter().map(|m| m.id.clone()).collect();
                if ids == expected && analyze(s).converged() {
                    let s = s.clone();
                    self.show(Some(phase), Some(&s));
                    return Ok((now, s));
                }
            }
            self.show(Some(phase), snapshot.as_ref());
            if now - begin > limit {
                let why = match &snapshot {
                    None => "the group does not exist".to_string(),
                    Some(s) => {
                        let a = analyze(s);
                        if a.problems.is_empty() {
                            format!("members {:?}", holdings(s))
                        } else {
                            a.problems.join("; ")
                        }
                    }
                };
                bail!(
                    "phase {phase:?} did not balance within {}: {why}",
                    fmt_duration(limit)
                );
            }
        }
    }

    /// Keeps the view live for `pause`.
    async fn hold(&mut self, pause: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + pause;
        while Instant::now() < until {
            let snapshot = self.tick().await?;
            self.show(None, snapshot.as_ref());
        }
        Ok(())
    }

    fn report_balanced(&mut self, snapshot: &GroupSnapshot, phase: Option<&Phase>) {
        let counts: Vec<String> = holdings(snapshot)
            .iter()
            .map(|(id, n)| format!("{id}={n}"))
            .collect();
        let after = phase.map_or(String::new(), |p| {
            format!(" after {}", fmt_duration(p.to - p.from))
        });
        self.say(format!("balanced{after}: {}", counts.join(" ")));
    }

    /// A progress line: printed as is without a terminal, shown above the grid with one.
    fn say(&mut self, line: String) {
        let line = format!("[{:>6.2}s] {line}", self.started.elapsed().as_secs_f64());
        if !self.tty {
            // A closed stdout ends the demo at its next tick.
            let _ = out::println(&line);
        }
        self.log.push(line);
    }

    /// Redraws the terminal view when the group or the phase changed. `phase`: what is under
    /// way (`None` while the demo holds a balanced state for the eye).
    fn show(&mut self, phase: Option<&str>, snapshot: Option<&GroupSnapshot>) {
        if !self.tty {
            return;
        }
        let Some(s) = snapshot else { return };
        // A crashed member stays in the group, with its buckets, until its session expires.
        let gone: Vec<(&str, u32)> = s
            .members
            .iter()
            .filter(|m| !self.live.iter().any(|(id, _)| *id == m.id))
            .map(|m| (m.id.as_str(), m.held))
            .collect();
        let doing = phase.map_or(String::new(), |p| format!("{p}: "));
        let state = if !s.quarantine.is_zero() {
            format!(
                "{doing}group warming up, grants start in {}",
                fmt_duration(s.quarantine)
            )
        } else if let [(id, held), ..] = gone[..] {
            format!(
                "{doing}{id} still holds {} until its session expires",
                render::count(held, "bucket")
            )
        } else if analyze(s).converged() {
            format!(
                "balanced: {}",
                render::count(s.members.len() as u64, "member")
            )
        } else {
            format!("{doing}rebalancing, {} free", s.free())
        };
        let key = (digest(s), state.clone());
        if self.last_drawn.as_ref() == Some(&key) {
            return;
        }
        self.last_drawn = Some(key);
        let mut header = vec![format!(
            "redbuckets demo — {} on {}   (Ctrl-C to stop)",
            render::count(self.args.buckets, "bucket"),
            self.label
        )];
        let shown = self.log.len().saturating_sub(6);
        header.extend(self.log[shown..].iter().cloned());
        header.push(state);
        let frame = render::frame(&header, s, &mut self.palette, render::terminal_size());
        let _ = out::print(&format!("{}{frame}", render::CLEAR));
    }

    fn summary(&self, phases: &[Phase], violations: &[String]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nSummary — {} on {}, heartbeat {}, ttl {}",
            render::count(self.args.buckets, "bucket"),
            self.label,
            fmt_duration(self.args.heartbeat),
            fmt_duration(self.args.ttl)
        );
        let _ = writeln!(
            out,
            "  {:<10} {:>7}  {:>14}  {:>13}  {:>16}  {:>8}  {:>11}",
            "phase",
            "members",
            "balanced after",
            "moved/optimal",
            "unowned",
            "mean gap",
            "longest gap"
        );
        for p in phases {
            let moved = self.timeline.acquisitions(p.from, p.to);
            let (unowned, longest_gap) = self.timeline.unowned(self.args.buckets, p.from, p.to);
            let mean = u32::try_from(moved)
                .ok()
                .filter(|m| *m > 0)
                .map_or(Duration::ZERO, |m| unowned / m);
            let _ = writeln!(
                out,
                "  {:<10} {:>7}  {:>14}  {:>13}  {:>16}  {:>8}  {:>11}",
                p.name,
                format!("{} → {}", p.members.0, p.members.1),
                fmt_duration(p.to - p.from),
                format!("{moved}/{}", p.optimal),
                fmt_bucket_time(unowned),
                fmt_duration(mean),
                fmt_duration(longest_gap)
            );
        }
        let _ = writeln!(
            out,
            "  unowned: the time each bucket spent without an owner, summed over buckets; mean gap: \
             that per moved bucket.\n  start includes the group's first ttl, during which a new \
             group grants nothing; a crashed member's buckets wait for its session to expire."
        );
        let members = self.next_id - 1;
        if violations.is_empty() && self.lagged == 0 {
            let _ = writeln!(
                out,
                "safety: checked {} events of {members} members: no bucket ever had two owners \
                 at once, and every grant of a bucket carried a larger token than the one before.",
                self.timeline.len()
            );
        } else {
            let _ = writeln!(
                out,
                "safety: VIOLATED or unverified ({} problems, {} events missed):",
                violations.len(),
                self.lagged
            );
            for v in violations.iter().take(10) {
                let _ = writeln!(out, "  {v}");
            }
        }
        out
    }
}

/// The outcome of a spawned `Member::shutdown`.
async fn joined(handle: JoinHandle<Result<(), redbuckets::Error>>) -> anyhow::Result<()> {
    match handle.await {
        Ok(result) => Ok(result?),
        Err(e) => Err(anyhow!("its task failed: {e}")),
    }
}

fn held_by(snapshot: &GroupSnapshot, id: &str) -> u32 {
    snapshot
        .members
        .iter()
        .find(|m| m.id == id)
        .map_or(0, |m| m.held)
}

/// Hides the cursor while the view redraws; shows it again however the demo ends.
struct HiddenCursor;

impl HiddenCursor {
    fn new() -> Self {
        let _ = out::print(render::HIDE_CURSOR);
        HiddenCursor
    }
}

impl Drop for HiddenCursor {
    fn drop(&mut self) {
        let _ = out::print(render::SHOW_CURSOR);
    }
}
