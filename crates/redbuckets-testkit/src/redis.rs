//! A `redis-server` per test: started on a free port of 127.0.0.1 without persistence, with
//! plain verbs for faults (`stop`, `restart` — which loses the data —, `pause`, `resume`), and
//! killed on drop. Tests never skip: without `redis-server` on the PATH they panic.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NOT_FOUND: &str = "redis-server not found: install it (apt-get install -y redis-server) or \
                         run ./scripts/test.sh which installs it";

/// The server binary: `redis-server`, or the one `REDBUCKETS_REDIS_SERVER` names (a Valkey or
/// an older Redis for the compatibility job, `scripts/compat.sh`).
fn server_bin() -> String {
    std::env::var("REDBUCKETS_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// The command-line client: `redis-cli`, or the one `REDBUCKETS_REDIS_CLI` names.
fn cli_bin() -> String {
    std::env::var("REDBUCKETS_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into())
}

/// How long a fresh server may take to answer PING.
const START_BUDGET: Duration = Duration::from_secs(5);

/// One `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
    paused: bool,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra arguments, e.g. `["--requirepass", "pw"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_string()).collect();
        // Another process may grab the port between probing and binding it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                port,
                extra: extra.clone(),
                child: None,
                paused: false,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL: no shutdown, no save).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Kills the server and starts a new one on the same port: every key is gone.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_BUDGET;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("redis-server restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    /// Runs one command through `redis-cli` against this server and returns its output
    /// (for setting up foreign data, killing clients, reading INFO). Panics if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(cli_bin());
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(pw) = self
            .extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| self.extra.get(i + 1))
        {
            cmd.args(["--no-auth-warning", "-a", pw]);
        }
        let out = match cmd.args(args).stdin(Stdio::null()).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-cli not found: it comes with redis-server. {NOT_FOUND}")
            }
            Err(e) => panic!("cannot run redis-cli: {e}"),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "redis-cli {args:?} failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn signal(&self, sig: &str) {
        let Some(child) = &self.child else {
            panic!("redis-server on port {} is not running", self.port);
        };
        let status = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(server_bin());
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--dir", &std::env::temp_dir().display().to_string()])
            .args(&self.extra);
        self.child = Some(spawn_answering(cmd, self.port)?);
        Ok(())
    }
}

/// Runs `cmd` (a `redis-server`) and waits until it answers PING on `port`.
fn spawn_answering(mut cmd: Command, port: u16) -> Result<Child, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{NOT_FOUND}"),
        Err(e) => panic!("cannot run redis-server: {e}"),
    };
    let deadline = Instant::now() + START_BUDGET;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited at start ({status}) on port {port}"));
        }
        if answers_ping(port) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no PING answer on port {port} within 5s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis Sentinel (`redis-server --sentinel`) on a free port, watching one primary under the
/// name `mymaster` with a quorum of one, so a test can force a failover with
/// `SENTINEL FAILOVER mymaster`. Killed on drop.
#[derive(Debug)]
pub struct Sentinel {
    port: u16,
    child: Option<Child>,
    conf: std::path::PathBuf,
}

impl Sentinel {
    /// Starts a sentinel watching `primary`.
    pub fn start(primary: &RedisServer) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let conf = std::env::temp_dir().join(format!(
                "redbuckets-sentinel-{}-{port}.conf",
                std::process::id()
            ));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\n\
                     sentinel monitor mymaster 127.0.0.1 {} 1\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 10000\n",
                    primary.port()
                ),
            )
            .expect("write the sentinel's config");
            let mut cmd = Command::new(server_bin());
            cmd.arg(&conf).arg("--sentinel");
            match spawn_answering(cmd, port) {
                Ok(child) => {
                    return Sentinel {
                        port,
                        child: Some(child),
                        conf,
                    }
                }
                Err(e) => last = e,
            }
            let _ = std::fs::remove_file(&conf);
        }
        panic!("redis-server --sentinel did not start: {last}");
    }

    /// `redis+sentinel://127.0.0.1:<port>/mymaster`.
    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/mymaster", self.port)
    }

    /// Runs one command through `redis-cli` against the sentinel and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(cli_bin())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}. {NOT_FOUND}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.conf);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.paused {
            self.signal("-CONT");
        }
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// True once the server answers PING (`+PONG`, or `-NOAUTH` when it wants a password).
fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => buf.starts_with(b"+PONG") || buf.starts_with(b"-NOAUTH"),
        _ => false,
    }
}

/// A Redis Cluster of 3 primaries and 3 replicas (`redis-server --cluster-enabled yes`), each
/// on a free port of 127.0.0.1, joined with `redis-cli --cluster create --cluster-replicas 1`.
/// [`RedisCluster::start`] returns once every node reports `cluster_state:ok` and agrees on
/// the slot owners. `cluster-require-full-coverage no`: the primaries that are up serve their
/// slots while another one fails over. Every node is killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    dir: std::path::PathBuf,
}

/// How long the cluster may take to form, or to recover after a fault.
const CLUSTER_BUDGET: Duration = Duration::from_secs(30);

impl RedisCluster {
    /// Starts 6 nodes and joins them: 3 primaries, one replica each. Node timeout 1 s, so a
    /// killed primary's replica takes over within ~2 s.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`RedisCluster::start`] with extra arguments for every node, e.g.
    /// `["--requirepass", "pw", "--masterauth", "pw"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "redbuckets-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let dir_arg = dir.display().to_string();
        let mut nodes = Vec::new();
        for i in 0..6 {
            let conf = dir.join(format!("nodes-{i}.conf")).display().to_string();
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
                "--cluster-config-file",
                &conf,
                // Replicas sync at once instead of 5 s later: one without data cannot fail over.
                "--repl-diskless-sync-delay",
                "0",
                // While a primary is down, the others keep serving their slots (the default
                // refuses every query until the failover ends: all groups would stall).
                "--cluster-require-full-coverage",
                "no",
                "--dir",
                &dir_arg,
            ];
            args.extend_from_slice(extra);
            nodes.push(RedisServer::start_with(&args));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(addrs);
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nodes[0].cli(&args);
        let cluster = RedisCluster { nodes, dir };
        cluster.wait_ok();
        // A replica that never synced cannot be promoted.
        let deadline = Instant::now() + CLUSTER_BUDGET;
        for node in &cluster.nodes {
            while node.cli(&["ROLE"]).starts_with("slave")
                && !node
                    .cli(&["INFO", "replication"])
                    .contains("master_link_status:up")
            {
                assert!(Instant::now() < deadline, "a replica did not sync");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// `redis+cluster://127.0.0.1:<port>,...` with every node (no credentials).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Every node, primaries and replicas, stopped ones included.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The running nodes that answer (not killed, not paused).
    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.child.is_some() && !n.paused)
    }

    fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// Freezes the node on `port` (SIGSTOP), as a hung VM or a long stall: its connections stay
    /// open and nothing answers. If it was a primary, its replica takes over once the others
    /// mark it failed; resumed, it still believes it is the primary until the cluster tells it
    /// otherwise. Queries of the cluster's state skip it meanwhile.
    pub fn pause(&mut self, port: u16) {
        self.node_mut(port).pause();
    }

    /// Thaws a node frozen with [`RedisCluster::pause`] (SIGCONT).
    pub fn resume(&mut self, port: u16) {
        self.node_mut(port).resume();
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let node = self.running().next().expect("a running node");
        node.cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }

    /// The port of the primary that owns `slot`, as the running nodes see it.
    pub fn primary_of(&self, slot: u16) -> u16 {
        self.try_primary_of(slot)
            .unwrap_or_else(|| panic!("no primary owns slot {slot}"))
    }

    /// [`RedisCluster::primary_of`], or `None` while no primary serves `slot` (its primary
    /// failed and no replica was promoted yet).
    pub fn try_primary_of(&self, slot: u16) -> Option<u16> {
        let node = self.running().next().expect("a running node");
        primary_in(&node.cli(&["CLUSTER", "NODES"]), slot)
    }

    /// The node on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
    }

    /// A running primary other than the one on `port` (to move a slot to).
    pub fn another_primary(&self, port: u16) -> u16 {
        self.primaries()
            .into_iter()
            .find(|&p| p != port)
            .expect("another primary")
    }

    /// The ports of the running primaries.
    pub fn primaries(&self) -> Vec<u16> {
        self.running()
            .filter(|n| n.cli(&["ROLE"]).starts_with("master"))
            .map(RedisServer::port)
            .collect()
    }

    /// Kills the node on `port` (SIGKILL), as a crash. Its replica (if it was a primary) takes
    /// over once the others mark it failed; see [`RedisCluster::wait_ok`].
    pub fn kill(&mut self, port: u16) {
        self.node_mut(port).stop();
    }

    /// Kills every node (SIGKILL): the whole cluster is down, as before it was started.
    pub fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// Starts every node again on its port, from its cluster configuration file (the same
    /// topology, no data), and returns once the cluster is ok again ([`RedisCluster::wait_ok`]).
    pub fn restart_all(&mut self) {
        for node in &mut self.nodes {
            node.restart();
        }
        self.wait_ok();
    }

    /// Moves `slot` to the primary on `to`, keys included, with `CLUSTER SETSLOT` and one
    /// `MIGRATE` of all its keys (atomic on the source: a script sees them all on one side).
    pub fn migrate_slot(&self, slot: u16, to: u16) {
        self.migrate_slot_in_batches(slot, to, usize::MAX, Duration::ZERO);
    }

    /// Moves `slot` to the primary on `to` as `redis-cli --cluster reshard` does: its keys in
    /// `MIGRATE` batches of `batch` keys, here with `pause` between batches, so calls meet the
    /// slot half moved (`ASK`, `TRYAGAIN`).
    pub fn migrate_slot_in_batches(&self, slot: u16, to: u16, batch: usize, pause: Duration) {
        let from = self.primary_of(slot);
        assert_ne!(from, to, "slot {slot} is on {to} already");
        let node = |port: u16| {
            self.nodes
                .iter()
                .find(|n| n.port() == port)
                .expect("a node on that port")
        };
        let (src, dst) = (node(from), node(to));
        let id = |n: &RedisServer| n.cli(&["CLUSTER", "MYID"]).trim().to_string();
        let (src_id, dst_id) = (id(src), id(dst));
        let slot_arg = slot.to_string();
        dst.cli(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &src_id]);
        src.cli(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &dst_id]);
        let keys: Vec<String> = src
            .cli(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100000"])
            .lines()
            .map(str::to_string)
            .filter(|k| !k.is_empty())
            .collect();
        let port = to.to_string();
        for chunk in keys.chunks(batch.max(1)) {
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(chunk.iter().map(String::as_str));
            let out = src.cli(&args);
            // NOKEY: a member's call deleted the keys of this batch meanwhile.
            assert!(
                out.contains("OK") || out.contains("NOKEY"),
                "MIGRATE: {out}"
            );
            std::thread::sleep(pause);
        }
        // Keys created on the source meanwhile (a call that ran there) follow too.
        loop {
            let left: Vec<String> = src
                .cli(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100000"])
                .lines()
                .map(str::to_string)
                .filter(|k| !k.is_empty())
                .collect();
            if left.is_empty() {
                break;
            }
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                &port,
                "",
                "0",
                "5000",
                "REPLACE",
                "KEYS",
            ];
            args.extend(left.iter().map(String::as_str));
            let out = src.cli(&args);
            assert!(
                out.contains("OK") || out.contains("NOKEY"),
                "MIGRATE: {out}"
            );
        }
        for n in [dst, src] {
            n.cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &dst_id]);
        }
        // Tell the others at once rather than through gossip.
        for n in self
            .running()
            .filter(|n| n.port() != from && n.port() != to)
        {
            if n.cli(&["ROLE"]).starts_with("master") {
                n.cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &dst_id]);
            }
        }
        let deadline = Instant::now() + CLUSTER_BUDGET;
        while self
            .running()
            .any(|n| primary_in(&n.cli(&["CLUSTER", "NODES"]), slot) != Some(to))
        {
            assert!(
                Instant::now() < deadline,
                "slot {slot} did not move to {to}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Marks `slot` as moving to the primary on `to` (`CLUSTER SETSLOT ... IMPORTING` there,
    /// `MIGRATING` on its owner) without moving any key, until [`RedisCluster::cancel_migration`].
    pub fn begin_migration(&self, slot: u16, to: u16) {
        let from = self.primary_of(slot);
        let node = |port: u16| {
            self.nodes
                .iter()
                .find(|n| n.port() == port)
                .expect("a node on that port")
        };
        let id = |n: &RedisServer| n.cli(&["CLUSTER", "MYID"]).trim().to_string();
        let slot_arg = slot.to_string();
        node(to).cli(&[
            "CLUSTER",
            "SETSLOT",
            &slot_arg,
            "IMPORTING",
            &id(node(from)),
        ]);
        node(from).cli(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &id(node(to))]);
    }

    /// Ends a migration that [`RedisCluster::begin_migration`] began: `slot` stays where it is.
    pub fn cancel_migration(&self, slot: u16) {
        let slot_arg = slot.to_string();
        for n in self.running() {
            if n.cli(&["ROLE"]).starts_with("master") {
                n.cli(&["CLUSTER", "SETSLOT", &slot_arg, "STABLE"]);
            }
        }
    }

    /// Waits until every running node reports `cluster_state:ok`, every slot has a running
    /// primary, and the nodes agree on the owners. Panics after 30 s.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_BUDGET;
        let running: Vec<u16> = self.running().map(RedisServer::port).collect();
        loop {
            let views: Vec<String> = self
                .running()
                .map(|n| n.cli(&["CLUSTER", "NODES"]))
                .collect();
            let ok = self
                .running()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let owners: Vec<Vec<Option<u16>>> = views
                .iter()
                .map(|v| {
                    [0, 5461, 5462, 10922, 10923, 16383]
                        .map(|s| primary_in(v, s))
                        .to_vec()
                })
                .collect();
            let agreed = owners.windows(2).all(|w| w[0] == w[1])
                && owners
                    .first()
                    .is_some_and(|o| o.iter().all(|p| p.is_some_and(|p| running.contains(&p))));
            if ok && agreed {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster is not ok after {CLUSTER_BUDGET:?}: {views:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The port of the primary owning `slot` in a `CLUSTER NODES` listing (`<id> <ip:port@bus>
/// <flags> <primary> ... <slot ranges>`), skipping failed nodes.
fn primary_in(nodes: &str, slot: u16) -> Option<u16> {
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
            continue;
        }
        let owns = fields[8..].iter().any(|range| {
            if range.starts_with('[') {
                return false; // a migrating or importing marker
            }
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
        });
        if owns {
            let addr = fields[1].split('@').next()?;
            return addr.rsplit_once(':')?.1.parse().ok();
        }
    }
    None
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
