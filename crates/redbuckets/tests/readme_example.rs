//! The README's example (`examples/worker.rs`, checked to be the same text): it runs against a
//! Redis of its own and leaves the group gracefully on SIGTERM, which Kubernetes, systemd and
//! Docker send (issue 18, defect 3: it used to wait for Ctrl-C only, and SIGTERM killed it).
//!
//! The example runs in a child process: this test binary again, with only the ignored test
//! `readme_example_child` selected, which calls the example's `main`.

mod worker {
    include!("../examples/worker.rs");

    /// The example's `main`, private in there.
    pub(super) fn run() -> Result<(), redbuckets::Error> {
        main()
    }
}

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redbuckets::{GroupKey, RedisOptions, RedisStore, Store};
use redbuckets_testkit::RedisServer;

const CHILD: &str = "REDBUCKETS_README_EXAMPLE_CHILD";

#[test]
fn readme_and_example_agree() {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("```rust,no_run\n")
        .expect("the README has a rust example")
        + "```rust,no_run\n".len();
    let len = readme[start..].find("```").expect("the block ends");
    let shown = &readme[start..start + len];
    let example = include_str!("../examples/worker.rs");
    let code: String = example
        .lines()
        .skip_while(|l| l.starts_with("//") || l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        shown, code,
        "README.md's example and examples/worker.rs differ"
    );
}

/// Runs the example's `main` when this binary was started as the child of the test below.
#[test]
#[ignore = "the child process of readme_example_leaves_on_sigterm"]
fn readme_example_child() {
    if std::env::var_os(CHILD).is_some() {
        worker::run().expect("the example's main");
    }
}

#[test]
fn readme_example_leaves_on_sigterm() {
    let redis = RedisServer::start();
    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "readme_example_child",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env("REDIS_URL", redis.url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the example");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let group = GroupKey::new("red-buckets", "customer-partitions");
    let members = |store: &RedisStore| {
        runtime.block_on(async {
            store
                .snapshot(&group)
                .await
                .expect("snapshot")
                .map_or(0, |s| s.members.len())
        })
    };
    let store = runtime
        .block_on(RedisStore::connect_with(
            &redis.url(),
            RedisOptions::default().connect_retry(Duration::ZERO),
        ))
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(20);
    while members(&store) == 0 {
        assert!(Instant::now() < deadline, "the example did not join");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the example ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the example did not end after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    // Killed by the signal, it would have no exit code (143 in a shell).
    assert_eq!(status.code(), Some(0), "{stderr}");
    // It left: deregistered (a crash would stay a member until its session expired, 10 s).
    assert_eq!(
        members(&store),
        0,
        "the example is still a member after SIGTERM"
    );
}
