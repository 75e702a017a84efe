// The README's example, as it is there (`tests/readme_example.rs` checks that both agree, and
// runs it against a Redis of its own, then sends SIGTERM).
//
// ```text
// REDIS_URL=redis://127.0.0.1:6379/ cargo run --example worker
// ```

use redbuckets::{Lease, Member, MemberHandle, RedisStore};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), redbuckets::Error> {
    // Waits for a Redis that is not up yet (30 s by default): workers often start first.
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let store = RedisStore::connect(&url).await?; // or MemoryStore::new()
    let member = Member::builder(store, "customer-partitions")
        .buckets(1024)
        .heartbeat(Duration::from_secs(1))
        .start()
        .await?;
    // Workers get a cheap, cloneable handle; `main` keeps the member and ends it.
    tokio::spawn(worker(member.handle()));
    // On SIGTERM (Kubernetes, systemd, Docker) or Ctrl-C: revoke everything, wait for the
    // leases to be dropped, release, deregister.
    member.run_until(redbuckets::shutdown_signal()).await
}

/// Started any time after `start()`, it still gets every bucket: the stream opens with a lease
/// for each bucket owned now, then yields one per grant, made at the grant itself.
async fn worker(member: MemberHandle) {
    let mut leases = member.leases();
    while let Some(lease) = leases.next().await {
        tokio::spawn(poll_partition(lease));
    }
}

async fn poll_partition(lease: Lease) {
    println!(
        "now polling partition {} (fencing token {})",
        lease.bucket(),
        lease.token()
    );
    loop {
        tokio::select! {
            // Revoked (rebalance, shutdown) or lost (deadline): stop taking new work.
            () = lease.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                // Poll the partition; pass lease.token() to downstream writes (fencing).
            }
        }
    }
    // Dropping the lease ends the drain: the member releases the bucket now instead of
    // waiting out the drain time.
}
