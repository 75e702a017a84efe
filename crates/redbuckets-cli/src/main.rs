//! `redbuckets`, the command-line tool: join a group, inspect or watch one, or run the demo.
//!
//! A thin layer over the library's public API. Every failure ends as one `error: ...` line on
//! stderr and exit code 1 (clap's usage errors exit with 2); passwords in Redis URLs are never
//! printed.
//!
//! # Layout
//! - `main` — the command line (clap), logging, exit codes.
//! - `cmd/` — one file per subcommand: `join`, `status`, `groups`, `delete`, `remove`
//!   (`remove-member`), `watch`, `demo`;
//!   `cmd/mod.rs` holds what they share (connecting, signals, the clock).
//! - `analysis` — what a [`redbuckets::GroupSnapshot`] says about balance and coverage. Pure.
//! - `render` — the bucket grid, colors, and duration formatting for terminals.
//! - `out` — stdout that never panics: a closed stdout (`| head`) ends a command with exit 0.

mod analysis;
mod cmd;
mod out;
mod render;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  redbuckets demo                                    # no Redis needed
  redbuckets join --redis redis://127.0.0.1/ --group orders --buckets 256 --json
  redbuckets status --redis redis://127.0.0.1/ --group orders --check
  redbuckets groups --redis redis://127.0.0.1/
  redbuckets watch --redis redis://127.0.0.1/ --group orders

--redis defaults to $REDBUCKETS_REDIS_URL. Logs go to stderr; set RUST_LOG (default: warn).";

/// Spread buckets over the live members of a group, through Redis.
#[derive(Debug, Parser)]
#[command(name = "redbuckets", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a group and report every ownership change until SIGTERM, SIGHUP or Ctrl-C, then
    /// leave gracefully.
    #[command(after_help = "\
Examples:
  redbuckets join --redis redis://127.0.0.1/ --group orders
  redbuckets join --redis redis://:secret@10.0.0.5:6379/0 --group orders --id worker-1 \\
      --buckets 256 --heartbeat 500ms --ttl 5s --json
  redbuckets join --redis redis://127.0.0.1/ --group orders --metrics 0.0.0.0:9464
      # then: curl http://127.0.0.1:9464/metrics
  redbuckets join --redis redis://127.0.0.1/ --group orders --id \"$HOSTNAME\" --rejoin-grace 30s
      # a pod of a StatefulSet: restarted within 30 s, it gets its buckets back

With --json every line of stdout is one JSON object:
  {\"event\":\"joined\",\"member\":\"worker-1\",\"group\":\"orders\",\"buckets\":256,\"at_us\":...}
  {\"event\":\"acquired\",\"bucket\":17,\"token\":42,\"member\":\"worker-1\",\"at_us\":...}
  ... \"revoked\", \"released\", \"lost\" (with \"reason\"), \"registered\" (a new session) ...
  {\"event\":\"left\",\"member\":\"worker-1\",\"clean\":true,\"at_us\":...}
at_us is Unix time in microseconds: when ownership began (acquired) or ended (the others).
A new group grants nothing during its first ttl; the text output says so when it applies.")]
    Join(JoinArgs),

    /// Print a group's members, holdings, free buckets and balance.
    #[command(after_help = "\
Examples:
  redbuckets status --redis redis://127.0.0.1/ --group orders
  redbuckets status --group orders --json            # with REDBUCKETS_REDIS_URL set
  redbuckets status --group orders --check || alert  # exit 1 unless every bucket is owned and balanced")]
    Status(StatusArgs),

    /// List the groups under a prefix (found with SCAN): buckets, live members, free buckets,
    /// age, and the time since a session last renewed, so abandoned groups stand out. Reads only.
    #[command(after_help = "\
Examples:
  redbuckets groups --redis redis://127.0.0.1/
  redbuckets groups --redis redis://127.0.0.1/ --prefix my-service --json
STATE is live (some session is live), abandoned (none: every member left or stopped), stale
(data another Redis process wrote), or unreadable (foreign data under the group's keys).")]
    Groups(GroupsArgs),
    /// Delete a group's keys. Refused while members are live unless --force; then they find
    /// their session gone, report their buckets lost, and re-create the group by registering.
    #[command(after_help = "\
Examples:
  redbuckets delete --redis redis://127.0.0.1/ --group old-orders --dry-run
  redbuckets delete --redis redis://127.0.0.1/ --group old-orders
  redbuckets delete --redis redis://127.0.0.1/ --group orders --force   # under live members
A re-created group grants nothing for a ttl (and not before the ended sessions would have
expired), and its tokens are larger than every earlier one.")]
    Delete(DeleteArgs),
    /// End a member's session now, for a member you know is dead: its buckets go to the live
    /// members at once, with larger tokens, instead of after its ttl.
    #[command(after_help = "\
Examples:
  redbuckets remove-member --redis redis://127.0.0.1/ --group orders --id worker-3 --dry-run
  redbuckets remove-member --redis redis://127.0.0.1/ --group orders --id worker-3 --yes
A member that is still running keeps working on its buckets until it hears (it is woken) or
its own lease deadline passes, while others own them. It asks for confirmation on a terminal;
elsewhere pass --yes.")]
    RemoveMember(RemoveArgs),
    /// Live view of a group: members and a grid of all buckets colored by owner, until Ctrl-C.
    #[command(after_help = "\
Examples:
  redbuckets watch --redis redis://127.0.0.1/ --group orders
  redbuckets watch --group orders --interval 1s | tee log   # not a terminal: one line per change")]
    Watch(WatchArgs),

    /// Start a few members in-process and show a join, a graceful leave and a crash, with
    /// timings and a safety check. Needs no Redis.
    #[command(after_help = "\
Examples:
  redbuckets demo
  redbuckets demo --members 8 --buckets 4096
  redbuckets demo --redis redis://127.0.0.1/         # the same on Redis, in group demo-<pid>
  redbuckets demo --redis                            # on $REDBUCKETS_REDIS_URL")]
    Demo(DemoArgs),
}

/// Where the group lives.
#[derive(Debug, Args)]
struct GroupArgs {
    /// Redis URL, e.g. redis://:password@host:6379/0 or rediss://... for TLS,
    /// redis+sentinel://host:26379/mymaster, or redis+cluster://host:7000,host:7001.
    #[arg(
        long,
        value_name = "URL",
        env = "REDBUCKETS_REDIS_URL",
        hide_env_values = true
    )]
    redis: String,
    /// Group name.
    #[arg(long, value_name = "NAME")]
    group: String,
    /// Key prefix in Redis [default: red-buckets].
    #[arg(long, value_name = "P")]
    prefix: Option<String>,
}

#[derive(Debug, Args)]
struct JoinArgs {
    #[command(flatten)]
    group: GroupArgs,
    /// Member id, stable across restarts [default: a random UUID].
    #[arg(long)]
    id: Option<String>,
    /// Bucket count of the group; must match the group's if it exists [default: 1024].
    #[arg(long, value_name = "N")]
    buckets: Option<u32>,
    /// Heartbeat period: retries, and polling while notifications are down [default: 1s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    heartbeat: Option<Duration>,
    /// Session ttl: how long the leases outlive the last renewal [default: 10s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// How often the session is renewed, between the heartbeat and half the ttl
    /// [default: half the ttl].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    renew: Option<Duration>,
    /// Relative weight of this member [default: 1].
    #[arg(long, value_name = "W")]
    weight: Option<u32>,
    /// How long a revoked bucket waits for its lease handles [default: 1s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    drain: Option<Duration>,
    /// Keep this member's buckets for its --id for DUR after it stops (a graceful exit or a
    /// crash): a restart under the same id within DUR gets them back and nothing else moves.
    /// Meanwhile they are owned by nobody; after DUR they are spread [default: off].
    #[arg(long, value_name = "DUR", value_parser = parse_duration, requires = "id")]
    rejoin_grace: Option<Duration>,
    /// How long joining (connecting, then registering) retries while Redis is not up yet, times
    /// out or is unavailable [default: 30s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    start_timeout: Option<Duration>,
    /// One JSON object per line on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Serve the member's metrics as Prometheus text at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9464 (the names are in the README).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    group: GroupArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Exit 1, saying why, unless every bucket is owned and the holdings are balanced.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Args)]
struct GroupsArgs {
    /// Redis URL, as for the other commands.
    #[arg(
        long,
        value_name = "URL",
        env = "REDBUCKETS_REDIS_URL",
        hide_env_values = true
    )]
    redis: String,
    /// Key prefix in Redis [default: red-buckets].
    #[arg(long, value_name = "P")]
    prefix: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DeleteArgs {
    #[command(flatten)]
    group: GroupArgs,
    /// Delete even while members are live.
    #[arg(long)]
    force: bool,
    /// Print what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct RemoveArgs {
    #[command(flatten)]
    group: GroupArgs,
    /// The member id to remove.
    #[arg(long)]
    id: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Print what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct WatchArgs {
    #[command(flatten)]
    group: GroupArgs,
    /// How often to read the group.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "200ms")]
    interval: Duration,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Members to start with.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=64))]
    members: u32,
    /// Bucket count.
    #[arg(long, value_name = "N", default_value_t = 256)]
    buckets: u32,
    /// Run on Redis instead of the in-process store; `--redis` alone takes
    /// $REDBUCKETS_REDIS_URL.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    redis: Option<String>,
    /// Heartbeat period.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "200ms")]
    heartbeat: Duration,
    /// Session ttl.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1s")]
    ttl: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Join(args) => cmd::join::run(args).await,
            Command::Status(args) => cmd::status::run(args).await,
            Command::Groups(args) => cmd::groups::run(args).await,
            Command::Delete(args) => cmd::delete::run(args).await,
            Command::RemoveMember(args) => cmd::remove::run(args).await,
            Command::Watch(args) => cmd::watch::run(args).await,
            Command::Demo(args) => cmd::demo::run(args).await,
        }
    });
    // Member tasks may still be winding down after an error; don't wait for them.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => code,
        // `| head` has read enough: not an error.
        Err(e) if e.is::<out::StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` puts the whole context chain on one line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A duration as the docs write them (`500ms`, `2s`, `1m30s`), with a hint in that style: the
/// parser's own suggests `2sec` for a bare `2`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("a unit is needed, for example {value}s or {value}ms")
        }
        other => format!("{other} (write durations like 500ms, 2s or 1m30s)"),
    })
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`), so stdout stays for the output.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !render::no_color())
        .init();
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_has_an_example() {
        for sub in Cli::command().get_subcommands() {
            let help = sub.get_after_help().map(ToString::to_string);
            assert!(
                help.is_some_and(|h| h.contains("Examples:") && h.contains("redbuckets ")),
                "{} has no example",
                sub.get_name()
            );
        }
    }
}
