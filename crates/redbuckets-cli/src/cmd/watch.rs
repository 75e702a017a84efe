//! `redbuckets watch`: reads the group every interval and redraws when something changed — a
//! full-screen view on a terminal, one summary line per change otherwise — until Ctrl-C.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use redbuckets::{redact_url, Store};

use super::{connect, group_key, scrub, Signals};
use crate::analysis::{analyze, digest};
use crate::out::{self, StdoutClosed};
use crate::render::{self, fmt_duration, Palette};
use crate::WatchArgs;

/// Switches to the terminal's alternate screen and back, also when we leave through an error.
struct Screen;

impl Screen {
    fn enter() -> Self {
        let _ = out::print(&format!("\x1b[?1049h{}", render::HIDE_CURSOR));
        Screen
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = out::print(&format!("{}\x1b[?1049l", render::SHOW_CURSOR));
    }
}

pub async fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    if args.interval.is_zero() {
        anyhow::bail!("--interval must be above zero");
    }
    let key = group_key(&args.group)?;
    let url = &args.group.redis;
    let shown = redact_url(url);
    let mut signals = Signals::install()?;
    let store = connect(url, Duration::ZERO).await?;
    let tty = std::io::stdout().is_terminal();
    let _screen = tty.then(Screen::enter);
    let mut palette = Palette::default();
    let mut last_digest = None;
    let mut last_error: Option<String> = None;
    let mut last_size = (0, 0);
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = signals.recv() => return Ok(ExitCode::SUCCESS),
            _ = ticker.tick() => {}
        }
        if out::reader_gone() {
            return Err(StdoutClosed.into());
        }
        let read = store.snapshot(&key).await;
        let size = render::terminal_size();
        match read {
            Ok(Some(snapshot)) => {
                last_error = None;
                let d = digest(&snapshot);
                if last_digest.as_ref() == Some(&d) && size == last_size {
                    continue;
                }
                last_digest = Some(d);
                last_size = size;
                if tty {
                    let a = analyze(&snapshot);
                    let state = if snapshot.stale {
                        "stale: written by another Redis process (restart or failover); \
                         re-created at the next registration"
                            .to_string()
                    } else if !snapshot.quarantine.is_zero() {
                        format!(
                            "warming up: grants start in {}",
                            fmt_duration(snapshot.quarantine)
                        )
                    } else if a.converged() {
                        "balanced".to_string()
                    } else {
                        format!("rebalancing: {}", a.problems.join("; "))
                    };
                    let header = vec![
                        format!(
                            "redbuckets watch — group {:?} at {shown}, {} buckets, {} members",
                            key.name,
                            snapshot.buckets,
                            snapshot.members.len()
                        ),
                        format!("{state}   (Ctrl-C to quit)"),
                    ];
                    let frame = render::frame(&header, &snapshot, &mut palette, size);
                    out::print(&format!("{}{frame}", render::CLEAR))?;
                } else {
                    let stale = if snapshot.stale { "STALE " } else { "" };
                    out::println(&format!(
                        "{} {stale}{}",
                        timestamp(),
                        render::summary_line(&snapshot)
                    ))?;
                }
            }
            Ok(None) => {
                let msg = format!("group {:?} does not exist (yet); waiting", key.name);
                show_problem(tty, &mut last_error, msg)?;
                last_digest = None;
            }
            Err(e) => {
                let msg = format!("cannot read the group: {}", scrub(&e.to_string(), url));
                show_problem(tty, &mut last_error, msg)?;
                last_digest = None;
            }
        }
    }
}

/// Shows a problem once (until it changes), then keeps polling.
fn show_problem(tty: bool, last: &mut Option<String>, msg: String) -> Result<(), StdoutClosed> {
    if last.as_deref() == Some(msg.as_str()) {
        return Ok(());
    }
    if tty {
        out::println(&format!("{}{msg}", render::CLEAR))?;
    } else {
        eprintln!("{} {msg}", timestamp());
    }
    *last = Some(msg);
    Ok(())
}

fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
