//! What this machine allows at the least, measured without redbuckets, to set the library's
//! figures against (issue 10: "where a target cannot be met, show the measurement that proves
//! the floor").
//!
//! ```text
//! cargo run --release -p redbuckets --example floor -- handoff [rounds]
//! cargo run --release -p redbuckets --example floor -- handover [buckets] [takers] [rounds]
//! cargo run --release -p redbuckets --example floor -- renewals [members] [calls/s] [slot ms] [call]
//! ```
//!
//! - `handoff` (default 200 rounds): the least a handoff between two processes can take. A
//!   handoff needs the old owner's call to reach Redis, Redis's notice to reach the new owner,
//!   and the new owner's call to come back: two round trips between idle processes. Here one
//!   process `PUBLISH`es (100 ms apart, so both ends are idle as in a real handoff), a second
//!   process, subscribed, answers each notice with a `PING` on its other connection, and the
//!   time from the publisher's send to the subscriber's `PING` reply is the floor. Also prints a
//!   lone `PING` round trip under the same idle conditions.
//! - `handover` (defaults 204 buckets, 4 takers, 100 rounds): the least a graceful leave's
//!   handover can take. One process calls a function that does only what an atomic handover
//!   needs (read the leaver's held set and each bucket's owner record, write each bucket's new
//!   owner record and the takers' held sets) and publishes one notice per taker with its
//!   buckets; the takers are processes of their own, subscribed, and
//!   each bucket's time runs from the call's send to its taker's receipt of the notice.
//! - `renewals` (defaults 1,000 members, 667 calls/s = 1,000 renewals every 1.5 s, the ttl-3 s
//!   setting of the scale benchmark): Redis CPU for that many `PING`s a second from that many
//!   connections (and as many idle ones, each subscribed to a channel of its own, as each
//!   member holds a subscription), each connection calling once per interval with a random
//!   phase and ±5% jitter, as renewals do. `PING` is the least a round trip can cost Redis:
//!   what the renewals cost above it is the script. With a slot (ms), each call waits for the
//!   next multiple of it, so calls that fall in one slot reach Redis together and it wakes once
//!   for all of them. `call` is `ping` (default), or `fcall`: a function that returns at once,
//!   called with a renewal's 8 keys and 4 arguments, the least a script round trip can cost
//!   (what a renewal costs above it is the work in its body).
//!
//! Each run starts a `redis-server` of its own (the testkit's).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use redbuckets_testkit::{RedisInfo, RedisServer};

const CHANNEL: &str = "floor";

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn summary(what: &str, mut us: Vec<u64>) {
    if us.is_empty() {
        println!("{what}: nothing measured");
        return;
    }
    us.sort_unstable();
    let mean = us.iter().sum::<u64>() as f64 / us.len() as f64;
    println!(
        "{what}: {} samples, median {:.2} ms, mean {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        us.len(),
        us[us.len() / 2] as f64 / 1000.0,
        mean / 1000.0,
        us[us.len() * 9 / 10] as f64 / 1000.0,
        us[us.len() - 1] as f64 / 1000.0
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args().nth(1).as_deref() {
        Some("handoff") | None => handoff(arg(2, 200)).await,
        Some("renewals") => {
            let call = std::env::args().nth(5).unwrap_or_else(|| "ping".into());
            renewals(arg(2, 1000), arg(3, 667.0), arg(4, 0), &call).await
        }
        Some("handover") => handover(arg(2, 204), arg(3, 4), arg(4, 100)).await,
        // The second process of `handoff`.
        Some("taker") => {
            let url = std::env::args().nth(2).ok_or("taker needs the URL")?;
            taker(&url).await
        }
        // One taker process of `handover`.
        Some("handover-taker") => {
            let url = std::env::args()
                .nth(2)
                .ok_or("handover-taker needs the URL")?;
            handover_taker(&url, arg(3, 0)).await
        }
        Some(other) => Err(format!("unknown probe {other}: handoff, handover or renewals").into()),
    }
}

type ChildLines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Starts this program again as `args` (a probe's second process) and waits for its `ready`;
/// returns it with the rest of its output, line by line.
fn spawn_ready(args: &[&str]) -> Result<(Child, ChildLines), Box<dyn std::error::Error>> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    if lines.next().transpose()?.as_deref() != Some("ready") {
        return Err(format!("{} did not start", args[0]).into());
    }
    Ok((child, lines))
}

/// A second process's subscription to `channel`, then `ready` on its output for
/// [`spawn_ready`].
async fn subscribe_ready(
    client: &redis::Client,
    channel: &str,
) -> Result<redis::aio::PubSub, Box<dyn std::error::Error>> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    Ok(pubsub)
}

/// The subscriber: answers each notice with a `PING` and prints `<sent µs> <answered µs>`.
async fn taker(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    use futures_util::StreamExt;
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut pubsub = subscribe_ready(&client, CHANNEL).await?;
    let mut out = std::io::stdout().lock();
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let sent: String = msg.get_payload()?;
        if sent == "end" {
            break;
        }
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        let done = unix_us();
        writeln!(out, "{sent} {done}")?;
        out.flush()?;
    }
    Ok(())
}

/// The least work of an atomic handover of `buckets` buckets to `takers` members, as one
/// function: a read of the leaver's held set and of each bucket's owner record (a handover
/// that does not check them could hand over a bucket someone else owns), each bucket's new
/// owner record, each taker's held set, the leaver's set deleted, and one notice per taker
/// naming its buckets. What redbuckets' `leave` does beyond this (it checks each record, frees
/// the buckets, counts the shares and picks the takers) is its own cost.
const HANDOVER_LIBRARY: &str = "#!lua name=floor_handover
redis.register_function('floor_handover', function(keys, args)
  local sent, buckets, takers = args[1], tonumber(args[2]), tonumber(args[3])
  local held = redis.call('SMEMBERS', keys[3])
  local all = {}
  for b = 0, buckets - 1 do
    all[b + 1] = tostring(b)
  end
  local records = redis.call('HMGET', keys[1], unpack(all))
  local pairs_, ids = {}, {}
  for k = 0, takers - 1 do
    pairs_[k], ids[k] = {}, {}
  end
  for b = 0, buckets - 1 do
    local k = b % takers
    local id = tostring(b)
    table.insert(pairs_[k], id)
    table.insert(pairs_[k], sent .. ' t' .. k)
    table.insert(ids[k], id)
  end
  for k = 0, takers - 1 do
    redis.call('HSET', keys[1], unpack(pairs_[k]))
    redis.call('SADD', keys[2] .. k, unpack(ids[k]))
  end
  redis.call('DEL', keys[3])
  for k = 0, takers - 1 do
    redis.call('PUBLISH', 'floor:t' .. k, sent .. ' ' .. table.concat(ids[k], ' '))
  end
  return buckets
end)";

/// A taker of `handover`: prints `<sent µs> <received µs> <buckets>` for each notice.
async fn handover_taker(url: &str, k: usize) -> Result<(), Box<dyn std::error::Error>> {
    use futures_util::StreamExt;
    let client = redis::Client::open(url)?;
    let mut pubsub = subscribe_ready(&client, &format!("floor:t{k}")).await?;
    let mut out = std::io::stdout().lock();
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let payload: String = msg.get_payload()?;
        if payload == "end" {
            break;
        }
        // Read as a member reads a grant: the token, then every bucket id.
        let mut words = payload.split(' ');
        let sent = words.next().unwrap_or("0").to_string();
        let ids: Vec<u32> = words.filter_map(|w| w.parse().ok()).collect();
        let received = unix_us();
        writeln!(out, "{sent} {received} {}", ids.len())?;
        out.flush()?;
    }
    Ok(())
}

/// `handover`: one process calls the handover function (100 ms apart, so every process is idle
/// as in a real leave), `takers` subscribed processes receive their notices; per bucket, the
/// time from the call's send to its taker's receipt, as the handoff bench counts a bucket's
/// time unowned from the old owner's `revoked`.
async fn handover(
    buckets: usize,
    takers: usize,
    rounds: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let server = RedisServer::start();
    let url = server.url();
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(HANDOVER_LIBRARY)
        .query_async(&mut conn)
        .await?;
    let mut children = Vec::with_capacity(takers);
    for k in 0..takers {
        children.push(spawn_ready(&["handover-taker", &url, &k.to_string()])?);
    }
    let tag = "{floor:handover}";
    let mut server_us = Vec::with_capacity(rounds);
    let ids: Vec<String> = (0..buckets).map(|b| b.to_string()).collect();
    for _ in 0..rounds {
        // The leaver's held set, as it is before a leave (not timed).
        let _: i64 = redis::cmd("SADD")
            .arg(format!("{tag}:held:leaver"))
            .arg(&ids)
            .query_async(&mut conn)
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = unix_us();
        let _: i64 = redis::cmd("FCALL")
            .arg("floor_handover")
            .arg(3)
            .arg(format!("{tag}:owner"))
            .arg(format!("{tag}:held:t"))
            .arg(format!("{tag}:held:leaver"))
            .arg(sent.to_string())
            .arg(buckets)
            .arg(takers)
            .query_async(&mut conn)
            .await?;
        server_us.push(unix_us() - sent);
    }
    let mut gaps = Vec::with_capacity(rounds * buckets);
    for (k, (mut child, lines)) in children.into_iter().enumerate() {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("floor:t{k}"))
            .arg("end")
            .query_async(&mut conn)
            .await?;
        for line in lines {
            let line = line?;
            let mut parts = line.split(' ').map(str::parse::<u64>);
            if let (Some(Ok(sent)), Some(Ok(received)), Some(Ok(n))) =
                (parts.next(), parts.next(), parts.next())
            {
                // Every bucket of the notice waited as long.
                gaps.extend(std::iter::repeat_n(
                    received.saturating_sub(sent),
                    n as usize,
                ));
            }
        }
        child.wait()?;
    }
    println!(
        "a handover of {buckets} buckets to {takers} takers, idle processes 100 ms apart, \
         loopback, Redis of its own:"
    );
    summary("  the caller's round trip (send to reply)", server_us);
    summary("  per bucket, send to its taker's receipt", gaps);
    Ok(())
}

async fn handoff(rounds: usize) -> Result<(), Box<dyn std::error::Error>> {
    let server = RedisServer::start();
    let url = server.url();
    let (mut child, lines) = spawn_ready(&["taker", &url])?;
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut ping = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = unix_us();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(sent.to_string())
            .query_async(&mut conn)
            .await?;
        // A lone round trip, idle at both ends too: after the taker's answer has come and gone.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let at = unix_us();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        ping.push(unix_us() - at);
    }
    let _: i64 = redis::cmd("PUBLISH")
        .arg(CHANNEL)
        .arg("end")
        .query_async(&mut conn)
        .await?;
    let mut two = Vec::with_capacity(rounds);
    for line in lines {
        let line = line?;
        let mut parts = line.split(' ').map(str::parse::<u64>);
        if let (Some(Ok(sent)), Some(Ok(done))) = (parts.next(), parts.next()) {
            two.push(done.saturating_sub(sent));
        }
    }
    child.wait()?;
    println!("idle processes, 100 ms apart, loopback, Redis of its own:");
    summary("  one round trip (PING)", ping);
    summary(
        "  publish -> other process -> its PING answered (a handoff's two round trips)",
        two,
    );
    Ok(())
}

/// The probe's call: `PING`, or `FCALL` of a function that does nothing with a renewal's keys
/// and arguments (the group tag, a member id, a session nonce, a ttl).
fn probe_call(call: &str) -> Result<redis::Cmd, String> {
    match call {
        "ping" => Ok(redis::cmd("PING")),
        _ if call == "fcall" || call.starts_with("fcall:") => {
            let tag = "{red-buckets:floor-probe}";
            let mut cmd = redis::cmd("FCALL");
            // `fcall:N`: the function runs N small reads first (a renewal runs about 12).
            let reads: u32 = match call.strip_prefix("fcall:") {
                Some(n) => n.parse().map_err(|e| format!("{call}: {e}"))?,
                None => 0,
            };
            cmd.arg("floor_noop").arg(8);
            for key in [
                "meta", "exp", "sess", "since", "weight", "wcount", "owner", "free",
            ] {
                cmd.arg(format!("{tag}:{key}"));
            }
            cmd.arg(tag)
                .arg("m0001")
                .arg("f3538086e5d54404b336486d6e7eb7f1")
                .arg(3_000_000)
                .arg(reads);
            Ok(cmd)
        }
        other => Err(format!("unknown call {other}: ping or fcall")),
    }
}

async fn renewals(
    members: usize,
    rate: f64,
    slot_ms: u64,
    call: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let cmd = probe_call(call)?;
    let command = if call == "ping" { "ping" } else { "fcall" };
    let call = call.to_string();
    let server = RedisServer::start();
    let client = redis::Client::open(server.url())?;
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("#!lua name=floor\nredis.register_function('floor_noop', function(keys, args) for _ = 1, tonumber(args[5]) do redis.call('HGET', keys[1], 'ver') end return 1 end)")
        .query_async(&mut client.get_multiplexed_async_connection().await?)
        .await?;
    let mut conns = Vec::with_capacity(members);
    // Each member's second connection: subscribed to a channel of its own, as a member's
    // wake-up subscription is (Redis accounts a subscriber's memory in its cron, every client
    // each second).
    let mut idle = Vec::with_capacity(members);
    for i in 0..members {
        conns.push(client.get_multiplexed_async_connection().await?);
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(format!("floor:wake:m{i}")).await?;
        idle.push(pubsub);
    }
    let info = || RedisInfo::parse(server.cli(&["INFO", "all"]));
    let window = Duration::from_secs(10);
    let measure = |from: RedisInfo, to: RedisInfo| {
        let secs = window.as_secs_f64();
        (
            (to.command(command, "calls") - from.command(command, "calls")) / secs,
            (to.cpu_s() - from.cpu_s()) * 1000.0 / secs,
        )
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = info();
    tokio::time::sleep(window).await;
    let (_, idle_cpu) = measure(a, info());

    let interval = Duration::from_secs_f64(members as f64 / rate);
    let epoch = Instant::now();
    let slot = Duration::from_millis(slot_ms);
    let mut callers = Vec::with_capacity(members);
    for mut conn in conns {
        let cmd = cmd.clone();
        callers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut at = epoch + interval.mul_f64(rng.gen::<f64>());
            loop {
                let mut send = at;
                if !slot.is_zero() {
                    let into = (send - epoch).as_nanos() % slot.as_nanos();
                    if into > 0 {
                        send += slot - Duration::from_nanos(into as u64);
                    }
                }
                tokio::time::sleep_until(send.into()).await;
                if let Err(e) = cmd.query_async::<redis::Value>(&mut conn).await {
                    eprintln!("{e}");
                    return;
                }
                at += interval.mul_f64(1.0 + 0.1 * (rng.gen::<f64>() - 0.5));
            }
        }));
    }
    tokio::time::sleep(interval * 2).await;
    let a = info();
    tokio::time::sleep(window).await;
    let (calls, cpu) = measure(a, info());
    // Stopped before the server is: their calls would fail (and say so) as it goes.
    for caller in callers {
        caller.abort();
    }
    drop(idle);
    let slot = if slot_ms == 0 {
        "spread (no slot)".to_string()
    } else {
        format!("{slot_ms} ms slots")
    };
    println!(
        "{members} connections (+{members} idle), {} once per {:.2} s each, {slot}: \
         {calls:.0} calls/s, Redis CPU {cpu:.1} ms/s ({:.1} above idle {idle_cpu:.1}; {:.1} µs per call)",
        call.to_uppercase(),
        interval.as_secs_f64(),
        cpu - idle_cpu,
        (cpu - idle_cpu) * 1000.0 / calls.max(1.0),
    );
    Ok(())
}
