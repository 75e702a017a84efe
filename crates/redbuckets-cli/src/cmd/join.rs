//! `redbuckets join`: one member that reports its ownership changes until SIGTERM/Ctrl-C, then
//! leaves gracefully (revoke, release, deregister) and reports those final events too.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context as _};
use metrics_exporter_prometheus::PrometheusBuilder;
use redbuckets::{Config, Event, Events, Member};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{connect, group_key, scrub, unix_us, Signals};
use crate::render::{fmt_duration, fmt_ranges};
use crate::JoinArgs;

pub async fn run(args: JoinArgs) -> anyhow::Result<ExitCode> {
    let key = group_key(&args.group)?;
    let mut config = Config::new(key.name.clone());
    config.prefix = key.prefix.clone();
    if let Some(id) = args.id {
        config.member_id = id;
    }
    if let Some(buckets) = args.buckets {
        config.buckets = buckets;
    }
    if let Some(heartbeat) = args.heartbeat {
        config.heartbeat = heartbeat;
    }
    if let Some(ttl) = args.ttl {
        config.ttl = ttl;
    }
    if args.renew.is_some() {
        config.renew_interval = args.renew;
    }
    if let Some(weight) = args.weight {
        config.weight = weight;
    }
    if let Some(drain) = args.drain {
        config.drain_timeout = drain;
    }
    if let Some(grace) = args.rejoin_grace {
        config.rejoin_grace = grace;
    }
    if let Some(start) = args.start_timeout {
        config.start_timeout = start;
    }
    // Bad options are reported before anything touches the network.
    config.validate()?;
    if let Some(addr) = args.metrics {
        serve_metrics(addr)?;
    }

    let mut signals = Signals::install()?;
    let url = args.group.redis.clone();
    // One start budget for both: connecting (Redis may not be up yet), then registering.
    let began = Instant::now();
    let budget = config.start_timeout;
    let store = tokio::select! {
        store = connect(&url, budget) => store?,
        name = signals.recv() => return Err(anyhow!("{name} before the member had joined")),
    };
    config.start_timeout = budget
        .saturating_sub(began.elapsed())
        .max(Duration::from_millis(100));
    let builder = Member::builder(store, key.name.clone()).config(config);
    let member = tokio::select! {
        started = builder.start() => started
            .map_err(|e| anyhow!("{}", scrub(&e.to_string(), &url)))
            .with_context(|| format!("cannot join group {:?}", key.name))?,
        name = signals.recv() => return Err(anyhow!("{name} before the member had joined")),
    };
    // Subscribed right after start: a group grants nothing before its first ttl is over, and a
    // running group grants through this member's task, which reports every grant on this channel.
    let mut events = member.events();
    let mut out = Output::new(args.json, member.id().to_string());
    let c = member.config();
    out.joined(&key.name, c.buckets)?;
    // A new session after an outage (the old one lost) is news, and so is a group that grants
    // nothing yet (new, or re-created after Redis lost its data): each said once, when seen.
    let mut session = member.status().session;
    let mut told_quarantine = false;
    let mut sessions = tokio::time::interval(c.heartbeat);
    sessions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let signal = loop {
        tokio::select! {
            name = signals.recv() => break name,
            _ = sessions.tick() => {
                let status = member.status();
                let now = status.session;
                if now.is_some() && now != session {
                    told_quarantine = false;
                    if let Err(e) = out.registered(now.as_deref().unwrap_or("")) {
                        tracing::warn!("stdout closed ({e}); leaving the group");
                        break "stdout closed";
                    }
                }
                session = now;
                match status.quarantine {
                    Some(left) if !told_quarantine => {
                        told_quarantine = true;
                        out.note(&format!(
                            "the group is new (or was re-created after Redis lost its data): \
                             it grants nothing for {}, until its first ttl is over",
                            fmt_duration(left)
                        ));
                    }
                    _ => {}
                }
            }
            received = events.next() => match received {
                Some(Event::Lagged { missed, .. }) => out.lagged(missed, Some(member.buckets())),
                Some(event) => {
                    let mut burst = vec![event];
                    out.settle().await;
                    if let Some(missed) = drain_ready(&mut events, &mut burst) {
                        out.lagged(missed, Some(member.buckets()));
                    }
                    if let Err(e) = out.events(&burst) {
                        // Nobody reads our output any more: still leave properly.
                        tracing::warn!("stdout closed ({e}); leaving the group");
                        break "stdout closed";
                    }
                }
                None => {
                    return Err(anyhow!("the member's task stopped unexpectedly"));
                }
            },
        }
    };

    out.note(&format!("{signal}: leaving the group"));
    let id = member.id().to_string();
    let shutdown = member.shutdown();
    tokio::pin!(shutdown);
    let mut closed = false;
    let result = loop {
        tokio::select! {
            result = &mut shutdown => break result,
            received = events.next(), if !closed => match received {
                Some(Event::Lagged { missed, .. }) => out.lagged(missed, None),
                Some(event) => {
                    let mut burst = vec![event];
                    out.settle().await;
                    if let Some(missed) = drain_ready(&mut events, &mut burst) {
                        out.lagged(missed, None);
                    }
                    let _ = out.events(&burst);
                }
                // The task is gone; `shutdown` completes right after.
                None => closed = true,
            },
            name = signals.recv() => {
                return Err(anyhow!(
                    "{name} again: stopped without releasing; the buckets of {id} are freed \
                     when its session expires"
                ));
            }
        }
    };
    // Everything the task reported before it ended is still buffered.
    let mut rest = Vec::new();
    if let Some(missed) = drain_ready(&mut events, &mut rest) {
        out.lagged(missed, None);
    }
    let _ = out.events(&rest);
    out.left(result.is_ok());
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(anyhow!("{}", scrub(&e.to_string(), &url)))
            .context("leaving the group did not complete; the remaining buckets are freed when the session expires"),
    }
}

/// The histogram buckets of every duration the library records, in seconds: store round trips
/// (sub-millisecond on a LAN) up to drains and rebalances (the drain time, a ttl).
const HISTOGRAM_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Serves the library's metrics as Prometheus text at `http://addr/metrics`, on this runtime.
/// Installed before the member starts: a member registers its series when it starts.
fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(HISTOGRAM_BUCKETS)
        .and_then(PrometheusBuilder::install)
        .with_context(|| format!("cannot serve metrics on {addr}"))
}

/// Moves whatever is already buffered into `burst`, so a rebalance prints as one group.
/// Returns how many events were missed, if the channel overflowed.
fn drain_ready(events: &mut Events, burst: &mut Vec<Event>) -> Option<u64> {
    let mut missed = None;
    loop {
        match events.try_next() {
            Some(Event::Lagged { missed: n, .. }) => *missed.get_or_insert(0) += n,
            Some(event) => burst.push(event),
            None => return missed,
        }
    }
}

/// Prints events as JSON lines or as short text lines, and tracks what the member holds.
struct Output {
    json: bool,
    member: String,
    held: BTreeSet<u32>,
    started: Instant,
}

impl Output {
    fn new(json: bool, member: String) -> Self {
        Output {
            json,
            member,
            held: BTreeSet::new(),
            started: Instant::now(),
        }
    }

    /// For text, lets the rest of a rebalance arrive so it prints as one line. JSON lines go
    /// out at once.
    async fn settle(&self) {
        if !self.json {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn line(&self, line: &str) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()
    }

    fn stamp(&self) -> String {
        format!("[{:>8.3}s]", self.started.elapsed().as_secs_f64())
    }

    fn joined(&mut self, group: &str, buckets: u32) -> anyhow::Result<()> {
        let line = if self.json {
            json!({
                "event": "joined",
                "member": self.member,
                "group": group,
                "buckets": buckets,
                "at_us": unix_us(SystemTime::now()),
            })
            .to_string()
        } else {
            let bucket_s = if buckets == 1 { "bucket" } else { "buckets" };
            format!(
                "{} joined group {group:?} as {} ({buckets} {bucket_s})",
                self.stamp(),
                self.member,
            )
        };
        self.line(&line).context("cannot write to stdout")
    }

    /// The member registered a new session (after it lost the last one).
    fn registered(&self, session: &str) -> std::io::Result<()> {
        let line = if self.json {
            json!({
                "event": "registered",
                "member": self.member,
                "session": session,
                "at_us": unix_us(SystemTime::now()),
            })
            .to_string()
        } else {
            format!(
                "{} registered again (session {session}): buckets follow",
                self.stamp()
            )
        };
        self.line(&line)
    }

    fn left(&self, clean: bool) {
        let line = if self.json {
            json!({
                "event": "left",
                "member": self.member,
                "clean": clean,
                "at_us": unix_us(SystemTime::now()),
            })
            .to_string()
        } else if clean {
            format!("{} left the group", self.stamp())
        } else {
            format!("{} left the group, not cleanly", self.stamp())
        };
        let _ = self.line(&line);
    }

    /// A human note; JSON output carries only events.
    fn note(&self, note: &str) {
        if !self.json {
            let _ = self.line(&format!("{} {note}", self.stamp()));
        }
    }

    /// The channel overflowed: says so on stderr and resynchronises the held set when the
    /// member can still tell (`holding_now`), as `Member::events` advises.
    fn lagged(&mut self, missed: u64, holding_now: Option<Vec<u32>>) {
        match holding_now {
            Some(now) => {
                eprintln!(
                    "error: missed {missed} ownership events (output too slow); holding {} \
                     buckets now: {}",
                    now.len(),
                    fmt_ranges(&now)
                );
                self.held = now.into_iter().collect();
            }
            None => eprintln!("error: missed {missed} ownership events (output too slow)"),
        }
    }

    fn events(&mut self, burst: &[Event]) -> std::io::Result<()> {
        for event in burst {
            match event {
                Event::Acquired { bucket, .. } => {
                    self.held.insert(*bucket);
                }
                Event::Revoked { bucket, .. } | Event::Lost { bucket, .. } => {
                    self.held.remove(bucket);
                }
                _ => {}
            }
        }
        if self.json {
            // One reading of both clocks per burst: events of the same instant get the same
            // `at_us` (converting each on its own would jitter by a microsecond or two).
            let clock = Clock::now();
            // One write for the burst: stdout alone flushes at every line, and a step's burst
            // has a line per bucket, written while buckets are moving.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for event in burst {
                writeln!(out, "{}", event_json(&self.member, event, clock))?;
            }
            out.flush()?;
            return Ok(());
        }
        // Text: one line per kind of change in the burst (a rebalance step comes as a burst).
        let mut kinds: Vec<(&'static str, Option<String>)> = Vec::new();
        for event in burst {
            let (kind, _, reason) = describe(event);
            if !kinds.contains(&(kind, reason.clone())) {
                kinds.push((kind, reason));
            }
        }
        for (kind, reason) in kinds {
            let same: Vec<&Event> = burst
                .iter()
                .filter(|e| {
                    let (k, _, r) = describe(e);
                    k == kind && r == reason
                })
                .collect();
            let buckets: Vec<u32> = same.iter().filter_map(|e| e.bucket()).collect();
            let mut tokens: Vec<u64> = same.iter().filter_map(|e| e.token()).collect();
            tokens.sort_unstable();
            tokens.dedup();
            let mut line = if buckets.len() == 1 {
                format!("{} {kind} bucket {}", self.stamp(), buckets[0])
            } else {
                format!(
                    "{} {kind} {} buckets {}",
                    self.stamp(),
                    buckets.len(),
                    fmt_ranges(&buckets)
                )
            };
            match tokens[..] {
                [] => {}
                [token] => line.push_str(&format!(" (token {token})")),
                // From several grants (givers, or grants made at different times).
                [first, .., last] if tokens.len() > 3 => {
                    line.push_str(&format!(" ({} tokens, {first}…{last})", tokens.len()));
                }
                _ => {
                    let list: Vec<String> = tokens.iter().map(u64::to_string).collect();
                    line.push_str(&format!(" (tokens {})", list.join(", ")));
                }
            }
            if let Some(reason) = reason {
                line.push_str(&format!(": {reason}"));
            }
            line.push_str(&format!(", holding {}", self.held.len()));
            self.line(&line)?;
        }
        Ok(())
    }
}

fn describe(event: &Event) -> (&'static str, u64, Option<String>) {
    match event {
        Event::Acquired { token, .. } => ("acquired", *token, None),
        Event::Revoked { token, .. } => ("revoked", *token, None),
        Event::Released { token, .. } => ("released", *token, None),
        Event::Lost { token, reason, .. } => ("lost", *token, Some(reason.to_string())),
        _ => ("changed", event.token().unwrap_or(0), None),
    }
}

/// Tokio's clock and the wall clock read together, to convert event instants to Unix time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        Clock {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    /// `at` as Unix microseconds.
    pub fn unix_us(&self, at: Instant) -> u64 {
        let system = if at <= self.instant {
            self.system.checked_sub(self.instant - at)
        } else {
            self.system.checked_add(at - self.instant)
        };
        unix_us(system.unwrap_or(self.system))
    }
}

/// One event as the JSON object `join --json` prints.
pub fn event_json(member: &str, event: &Event, clock: Clock) -> Value {
    let (kind, _, _) = describe(event);
    let mut v = json!({
        "event": kind,
        "bucket": event.bucket(),
        "token": event.token(),
        "member": member,
        "at_us": clock.unix_us(event.at()),
    });
    if let Event::Lost { reason, .. } = event {
        v["reason"] = json!(reason.as_str());
        v["detail"] = json!(reason.to_string());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use redbuckets::LostReason;

    #[test]
    fn events_as_json() {
        let at = Instant::now();
        let clock = Clock::now();
        let v = event_json(
            "w1",
            &Event::Acquired {
                bucket: 17,
                token: 42,
                at,
            },
            clock,
        );
        assert_eq!(v["event"], "acquired");
        assert_eq!(v["bucket"], 17);
        assert_eq!(v["token"], 42);
        assert_eq!(v["member"], "w1");
        let now = unix_us(SystemTime::now());
        let at_us = v["at_us"].as_u64().unwrap();
        assert!(now.abs_diff(at_us) < 1_000_000, "{now} vs {at_us}");
        assert!(v.get("reason").is_none());

        let v = event_json(
            "w1",
            &Event::Lost {
                bucket: 3,
                token: 9,
                reason: LostReason::Deadline,
                at: at + std::time::Duration::from_millis(3),
            },
            clock,
        );
        assert_eq!(v["event"], "lost");
        assert_eq!(v["reason"], "deadline");
        assert_eq!(v["at_us"].as_u64().unwrap(), at_us + 3000);
    }

    /// Regression (issue 8, bug 7): `Disowned` printed as "other".
    #[test]
    fn every_lost_reason_has_its_own_name() {
        let at = Instant::now();
        let clock = Clock::now();
        for (reason, name) in [
            (LostReason::Deadline, "deadline"),
            (LostReason::SessionExpired, "session_expired"),
            (LostReason::Disowned, "disowned"),
            (LostReason::Unreleased, "unreleased"),
        ] {
            let lost = Event::Lost {
                bucket: 1,
                token: 2,
                reason,
                at,
            };
            let v = event_json("w1", &lost, clock);
            assert_eq!(v["reason"], name);
            assert_eq!(v["detail"], reason.to_string());
        }
    }
}
