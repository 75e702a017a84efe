//! The benchmark at scale: n members × B buckets started together (one connection each, every
//! `start()` spawned at once, failed starts retried), then one join and one graceful leave.
//!
//! ```text
//! cargo run --release --example scale -- --members 10,100,300 --buckets 65536 --ttl 3 --heartbeat 1
//! cargo run --release --example scale -- --members 1000 --buckets 65536 --ttl 3 --heartbeat 1 --cap 600
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --release --example scale -- --members 10
//! ```
//! Options (defaults): `--members 10` (a comma list: one run each; `none` only rebuilds the
//! table and the chart from the run files), `--buckets 65536`, `--ttl 3`
//! and `--heartbeat 1` (seconds), `--window 10` (steady-state seconds), `--retry-ms 500` (between
//! failed starts), `--start-limit 120` (s a member may take to start), `--balance-limit 240` (s
//! to wait for a balance), `--cap 900` (s for a whole run), `--out target/scale` (or
//! `SCALE_OUT`), `--label before` (the series name in the chart), `--recorder none` (or
//! `prometheus`: a Prometheus recorder is installed before the members start and rendered every
//! 5 s, as a scrape would; the steady member CPU against a run without is the metrics' cost).
//!
//! Without `REDIS_URL` each run gets a fresh `redis-server` of its own (the testkit's).
//!
//! It prints, per run: time for the `start()` calls to return and failed starts; balance after
//! the quarantine (the first grant); script calls, server µs per call, PUBLISHes and Redis CPU
//! (`INFO commandstats` and `INFO cpu` deltas) from the first `start()` to balance, per join and
//! per graceful leave; steady-state calls/s and Redis CPU ms/s; this process's CPU and RSS (all
//! members live in it). The split by script comes from the SLOWLOG, switched to log every command
//! during the join, the leave and a 3 s steady sample (`INFO` has no per-script counters;
//! EVALSHA's hash names the script; logging adds ~1 µs per command to Redis).
//!
//! Each run writes `<out>/runs/<label>-n<n>-b<B>.json`; then `<out>/scale.md`, `scale.json` and
//! `scale.svg` (calls per change and time to balance against n, one line per label) are rebuilt
//! from every run file in the directory, so runs made separately (before/after a change) end up
//! in one table and one chart. Exits 1 on any S1/S2 violation, unowned bucket after convergence
//! or failure to converge.

mod bench;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bench::{ByScript, Change, Config, Report};
use redbuckets_testkit::RedisServer;

struct Args {
    members: Vec<usize>,
    buckets: u32,
    ttl: f64,
    heartbeat: f64,
    window: u64,
    retry_ms: u64,
    start_limit: u64,
    balance_limit: u64,
    cap: u64,
    out: PathBuf,
    label: String,
    /// Install a Prometheus recorder (and render it every 5 s, as a scrape would) before the
    /// members start: the metrics overhead, against the same run without.
    recorder: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        members: vec![10],
        buckets: 65_536,
        ttl: 3.0,
        heartbeat: 1.0,
        window: 10,
        retry_ms: 500,
        start_limit: 120,
        balance_limit: 240,
        cap: 900,
        out: std::env::var_os("SCALE_OUT")
            .map_or_else(|| PathBuf::from("target/scale"), PathBuf::from),
        label: "before".into(),
        recorder: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--members" if value == "none" => a.members = Vec::new(),
            "--members" => {
                a.members = value
                    .split(',')
                    .map(|v| v.trim().parse::<usize>().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?;
            }
            "--buckets" => a.buckets = value.parse().map_err(|e| bad(&e))?,
            "--ttl" => a.ttl = value.parse().map_err(|e| bad(&e))?,
            "--heartbeat" => a.heartbeat = value.parse().map_err(|e| bad(&e))?,
            "--window" => a.window = value.parse().map_err(|e| bad(&e))?,
            "--retry-ms" => a.retry_ms = value.parse().map_err(|e| bad(&e))?,
            "--start-limit" => a.start_limit = value.parse().map_err(|e| bad(&e))?,
            "--balance-limit" => a.balance_limit = value.parse().map_err(|e| bad(&e))?,
            "--cap" => a.cap = value.parse().map_err(|e| bad(&e))?,
            "--out" => a.out = PathBuf::from(value),
            "--label" => a.label = value,
            "--recorder" => {
                a.recorder = match value.as_str() {
                    "prometheus" => true,
                    "none" => false,
                    _ => return Err(bad(&"prometheus or none")),
                }
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "never".into(),
        |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0),
    )
}

fn by_script(by: &ByScript) -> String {
    by.iter()
        .map(|(name, (calls, usec))| {
            format!(
                "{name} {calls} × {:.0} µs",
                *usec as f64 / (*calls).max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_change(what: &str, c: &Change) {
    println!(
        "{what}: balanced in {}, {:.0} script calls ({:.0} above the steady rate), {:.1} µs/call, \
         {:.0} PUBLISH, Redis CPU {:.0} ms, member CPU {:.0} ms, moved {} (optimal {})",
        ms(c.balanced_after),
        c.calls,
        c.calls_net,
        c.usec_per_call,
        c.publish,
        c.redis_cpu_s * 1000.0,
        c.member_cpu_s * 1000.0,
        c.moved,
        c.optimal
    );
    if !c.by_script.is_empty() {
        println!("  by script: {}", by_script(&c.by_script));
    }
}

fn print_report(r: &Report) {
    println!(
        "starts: all returned after {:.2} s, {} failed starts (retried), {} gave up{}",
        r.starts_returned.as_secs_f64(),
        r.start_failures,
        r.start_gave_up,
        if r.start_errors.is_empty() {
            String::new()
        } else {
            format!("; errors: {:?}", r.start_errors)
        }
    );
    println!(
        "first grant (quarantine end) at {}; balanced {} after it",
        ms(r.first_grant),
        ms(r.cold_after_quarantine)
    );
    print_change("cold start → balanced", &r.cold);
    println!(
        "steady: {:.1} script calls/s, Redis CPU {:.1} ms/s, {:.1} µs/call, member CPU {:.1} ms/s",
        r.steady_calls_per_s,
        r.steady_cpu_ms_per_s,
        r.steady_usec_per_call,
        r.steady_member_cpu_ms_per_s
    );
    if !r.steady_by_script.is_empty() {
        println!(
            "  by script (3 s sample): {}",
            by_script(&r.steady_by_script)
        );
    }
    if let Some(j) = &r.join {
        print_change("join", j);
    }
    if let Some(l) = &r.leave {
        print_change("graceful leave", l);
    }
    println!(
        "member side: {:.1} s CPU over the run, RSS {:.0} MiB (peak {:.0} MiB)",
        r.member_cpu_s, r.rss_mib.0, r.rss_mib.1
    );
    if r.violations.is_empty() {
        println!("safety: no violation (S1/S2 over every event; coverage after each balance)");
    } else {
        for v in &r.violations {
            println!("VIOLATION: {v}");
        }
    }
}

fn opt_ms(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| {
        serde_json::json!((d.as_secs_f64() * 1e4).round() / 10.0)
    })
}

fn change_json(c: &Change) -> serde_json::Value {
    let scripts: serde_json::Map<String, serde_json::Value> = c
        .by_script
        .iter()
        .map(|(k, (calls, usec))| (k.clone(), serde_json::json!({"calls": calls, "usec": usec})))
        .collect();
    serde_json::json!({
        "balanced_ms": opt_ms(c.balanced_after),
        "calls": c.calls,
        "calls_above_steady": c.calls_net.round(),
        "usec_per_call": (c.usec_per_call * 10.0).round() / 10.0,
        "publish": c.publish,
        "redis_cpu_ms": (c.redis_cpu_s * 1000.0).round(),
        "member_cpu_ms": (c.member_cpu_s * 1000.0).round(),
        "moved": c.moved,
        "optimal": c.optimal,
        "by_script": scripts,
    })
}

fn report_json(label: &str, r: &Report, timed_out: bool) -> serde_json::Value {
    let scripts: serde_json::Map<String, serde_json::Value> = r
        .steady_by_script
        .iter()
        .map(|(k, (calls, usec))| (k.clone(), serde_json::json!({"calls": calls, "usec": usec})))
        .collect();
    serde_json::json!({
        "label": label,
        "members": r.members,
        "buckets": r.buckets,
        "ttl_s": r.ttl_s,
        "heartbeat_s": r.heartbeat_s,
        "timed_out": timed_out,
        "starts_returned_ms": opt_ms(Some(r.starts_returned)),
        "start_failures": r.start_failures,
        "start_gave_up": r.start_gave_up,
        "start_errors": r.start_errors,
        "first_grant_ms": opt_ms(r.first_grant),
        "balanced_after_quarantine_ms": opt_ms(r.cold_after_quarantine),
        "cold": change_json(&r.cold),
        "steady": {
            "calls_per_s": (r.steady_calls_per_s * 10.0).round() / 10.0,
            "redis_cpu_ms_per_s": (r.steady_cpu_ms_per_s * 10.0).round() / 10.0,
            "usec_per_call": (r.steady_usec_per_call * 10.0).round() / 10.0,
            "member_cpu_ms_per_s": (r.steady_member_cpu_ms_per_s * 10.0).round() / 10.0,
            "by_script": scripts,
        },
        "join": r.join.as_ref().map(change_json),
        "leave": r.leave.as_ref().map(change_json),
        "member_cpu_s": (r.member_cpu_s * 10.0).round() / 10.0,
        "rss_mib": r.rss_mib.0.round(),
        "rss_peak_mib": r.rss_mib.1.round(),
        "violations": r.violations,
    })
}

/// Every run file in `<out>/runs`, sorted by label then n.
fn load_runs(out: &Path) -> Vec<serde_json::Value> {
    let mut runs: Vec<serde_json::Value> = std::fs::read_dir(out.join("runs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| serde_json::from_str(&s).ok())
        .collect();
    runs.sort_by_key(|r| {
        (
            r["label"].as_str().unwrap_or("").to_string(),
            r["members"].as_u64().unwrap_or(0),
            r["buckets"].as_u64().unwrap_or(0),
        )
    });
    runs
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "—".into(),
        serde_json::Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 || f.abs() >= 100.0 {
                format!("{f:.0}")
            } else {
                format!("{f:.2}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            }
        }
        other => other.to_string(),
    }
}

/// A change's calls other than renewals (`heartbeat_fast`, `heartbeat`), from its SLOWLOG sample
/// when that sample holds every call (it is capped: runs with many calls, and runs from before
/// the scripts were named, show "—"). Renewals run at the steady rate whatever happens, and a
/// window of a second holds one or two bursts of them, so they blur what the change cost.
fn change_calls(c: &serde_json::Value) -> String {
    let Some(scripts) = c["by_script"].as_object() else {
        return "—".into();
    };
    let calls = |v: &serde_json::Value| v["calls"].as_f64().unwrap_or(0.0);
    let sampled: f64 = scripts.values().map(calls).sum();
    let total = c["calls"].as_f64().unwrap_or(f64::NAN);
    if !scripts.contains_key("register") && !scripts.contains_key("deregister")
        || (sampled - total).abs() > 0.5
    {
        return "—".into();
    }
    let renewals: f64 = ["heartbeat_fast", "heartbeat"]
        .iter()
        .filter_map(|k| scripts.get(*k))
        .map(calls)
        .sum();
    format!("{}", (sampled - renewals).round())
}

fn markdown(runs: &[serde_json::Value]) -> String {
    let mut md = String::from(
        "| label | n × B | ttl/hb s | start() returned ms | failed starts | first grant ms | balanced after quarantine ms | cold calls | cold Redis CPU ms | join ms | join calls (not renewals) | join moved/optimal | leave ms | leave calls (not renewals) | leave moved/optimal | steady calls/s | steady Redis CPU ms/s | µs/call steady | member CPU s | RSS MiB | violations |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let change = |c: &serde_json::Value| -> (String, String, String) {
            if c.is_null() {
                return ("—".into(), "—".into(), "—".into());
            }
            (
                cell(&c["balanced_ms"]),
                format!("{} ({})", cell(&c["calls"]), change_calls(c)),
                format!("{}/{}", cell(&c["moved"]), cell(&c["optimal"])),
            )
        };
        let (jm, jc, jmv) = change(&r["join"]);
        let (lm, lc, lmv) = change(&r["leave"]);
        let violations = r["violations"].as_array().map_or(0, Vec::len);
        md.push_str(&format!(
            "| {} | {} × {} | {}/{} | {} | {} | {} | {} | {} | {} | {jm} | {jc} | {jmv} | {lm} | {lc} | {lmv} | {} | {} | {} | {} | {} | {}{} |\n",
            r["label"].as_str().unwrap_or(""),
            cell(&r["members"]),
            cell(&r["buckets"]),
            cell(&r["ttl_s"]),
            cell(&r["heartbeat_s"]),
            cell(&r["starts_returned_ms"]),
            cell(&r["start_failures"]),
            cell(&r["first_grant_ms"]),
            cell(&r["balanced_after_quarantine_ms"]),
            cell(&r["cold"]["calls"]),
            cell(&r["cold"]["redis_cpu_ms"]),
            cell(&r["steady"]["calls_per_s"]),
            cell(&r["steady"]["redis_cpu_ms_per_s"]),
            cell(&r["steady"]["usec_per_call"]),
            cell(&r["member_cpu_s"]),
            cell(&r["rss_mib"]),
            violations,
            if r["timed_out"].as_bool() == Some(true) {
                " (run cap hit)"
            } else {
                ""
            }
        ));
    }
    md
}

/// One chart panel: where, its title, and the (phase, field) pairs it plots.
type Panel<'r, 'b> = (
    &'r plotters::drawing::DrawingArea<plotters::backend::SVGBackend<'b>, plotters::coord::Shift>,
    &'static str,
    [(&'static str, &'static str); 2],
);

/// Two panels against n (log scale): script calls per join and per leave; time to balance after
/// the quarantine, per join and per leave. One line per label and measure.
fn chart(runs: &[serde_json::Value], path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(500);
    let mut labels: Vec<&str> = runs.iter().filter_map(|r| r["label"].as_str()).collect();
    labels.dedup();
    let series = |label: &str, f: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<(f64, f64)> {
        runs.iter()
            .filter(|r| r["label"].as_str() == Some(label))
            .filter_map(|r| Some((r["members"].as_f64()?, f(r)?)))
            .filter(|(_, y)| *y > 0.0)
            .collect()
    };
    let max_n = runs
        .iter()
        .filter_map(|r| r["members"].as_f64())
        .fold(10.0, f64::max)
        * 1.5;
    let palette = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    let panels: [Panel<'_, '_>; 2] = [
        (
            &left,
            "Redis script calls per change",
            [("join", "calls"), ("leave", "calls")],
        ),
        (
            &right,
            "time to balance, ms",
            [("join", "balanced_ms"), ("leave", "balanced_ms")],
        ),
    ];
    for (area, title, measures) in panels {
        let mut max_y: f64 = 10.0;
        for label in &labels {
            for (phase, key) in measures {
                for (_, y) in series(label, &|r| r[phase][key].as_f64()) {
                    max_y = max_y.max(y);
                }
            }
        }
        let mut ctx = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d((1.0..max_n).log_scale(), (1.0..max_y * 2.0).log_scale())
            .map_err(|e| e.to_string())?;
        ctx.configure_mesh()
            .x_desc("members (n)")
            .draw()
            .map_err(|e| e.to_string())?;
        let mut colour = 0;
        for label in &labels {
            for (phase, key) in measures {
                let points = series(label, &|r| r[phase][key].as_f64());
                let style = palette[colour % palette.len()];
                colour += 1;
                ctx.draw_series(LineSeries::new(points.clone(), style.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(format!("{label} {phase}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                ctx.draw_series(points.iter().map(|&p| Circle::new(p, 3, style.filled())))
                    .map_err(|e| e.to_string())?;
            }
        }
        ctx.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

fn write_outputs(out: &Path) -> Result<(), String> {
    let runs = load_runs(out);
    let md = markdown(&runs);
    std::fs::write(out.join("scale.md"), &md).map_err(|e| format!("scale.md: {e}"))?;
    let json = serde_json::to_string_pretty(&runs).map_err(|e| e.to_string())?;
    std::fs::write(out.join("scale.json"), json).map_err(|e| format!("scale.json: {e}"))?;
    chart(&runs, &out.join("scale.svg"))?;
    println!("{md}");
    println!("wrote {}/scale.md, scale.json, scale.svg", out.display());
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scale: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(args.out.join("runs")) {
        eprintln!("scale: {}: {e}", args.out.display());
        std::process::exit(2);
    }
    if args.recorder {
        let handle = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()
        {
            Ok(handle) => handle,
            Err(e) => {
                eprintln!("scale: recorder: {e}");
                std::process::exit(2);
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let text = handle.render();
                let series = text.lines().filter(|l| !l.starts_with('#')).count();
                println!("  [recorder] scrape: {series} series, {} bytes", text.len());
            }
        });
    }
    let mut failed = false;
    for &n in &args.members {
        // A fresh server per run unless REDIS_URL names one: no leftovers from the run before.
        let (server, url) = match std::env::var("REDIS_URL") {
            Ok(url) => (None, url),
            Err(_) => {
                let server = RedisServer::start();
                let url = format!("{}/", server.url());
                (Some(server), url)
            }
        };
        let cfg = Config {
            url,
            members: n,
            buckets: args.buckets,
            ttl: Duration::from_secs_f64(args.ttl),
            heartbeat: Duration::from_secs_f64(args.heartbeat),
            start_retry: Duration::from_millis(args.retry_ms),
            start_limit: Duration::from_secs(args.start_limit),
            balance_limit: Duration::from_secs(args.balance_limit),
            window: Duration::from_secs(args.window),
        };
        println!(
            "== {n} members × {} buckets, ttl {} s, heartbeat {} s, started together ==",
            args.buckets, args.ttl, args.heartbeat
        );
        let (report, timed_out) =
            match tokio::time::timeout(Duration::from_secs(args.cap), bench::run(cfg)).await {
                Ok(Ok(report)) => (report, false),
                Ok(Err(e)) => {
                    eprintln!("scale: harness error: {e}");
                    std::process::exit(2);
                }
                Err(_) => {
                    println!("run cap of {} s hit: no report beyond this line", args.cap);
                    let report = Report {
                        members: n,
                        buckets: args.buckets,
                        ttl_s: args.ttl,
                        heartbeat_s: args.heartbeat,
                        violations: vec![format!("did not finish within {} s", args.cap)],
                        ..Report::default()
                    };
                    (report, true)
                }
            };
        print_report(&report);
        failed |= !report.violations.is_empty();
        let file = args
            .out
            .join("runs")
            .join(format!("{}-n{n}-b{}.json", args.label, args.buckets));
        let json = serde_json::to_string_pretty(&report_json(&args.label, &report, timed_out))
            .unwrap_or_default();
        if let Err(e) = std::fs::write(&file, json) {
            eprintln!("scale: {}: {e}", file.display());
        }
        drop(server);
        println!();
    }
    if let Err(e) = write_outputs(&args.out) {
        eprintln!("scale: outputs: {e}");
        failed = true;
    }
    if failed {
        std::process::exit(1);
    }
}
