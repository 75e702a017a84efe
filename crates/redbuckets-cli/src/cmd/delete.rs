//! `redbuckets delete`: removes a group's keys (`RedisStore::delete_group`, one atomic script).
//! Refused while sessions are live unless `--force`, and then it says what the live members
//! will do. `--dry-run` only reads (the snapshot) and says what would happen.

use std::process::ExitCode;

use anyhow::anyhow;
use redbuckets::{redact_url, Deletion, GroupSnapshot};

use super::{read_group, scrub};
use crate::render::fmt_duration;
use crate::DeleteArgs;

pub async fn run(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let url = &args.group.redis;
    let (store, key, snapshot) = read_group(&args.group).await?;
    let live = ids(&snapshot);
    if args.dry_run {
        if !live.is_empty() && !args.force {
            println!(
                "dry run: would refuse to delete group {:?}: {} live member{} ({}); --force \
                 deletes it anyway",
                key.name,
                live.len(),
                plural(live.len()),
                live.join(", ")
            );
        } else {
            println!(
                "dry run: would delete group {:?} ({} buckets, {} free)",
                key.name,
                snapshot.buckets,
                snapshot.free()
            );
            if !live.is_empty() {
                println!("{}", consequences(&live, &snapshot));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let outcome = store.delete_group(&key, args.force).await.map_err(|e| {
        anyhow!(
            "cannot delete group {:?}: {}",
            key.name,
            scrub(&e.to_string(), url)
        )
    })?;
    match outcome {
        Deletion::Refused { live: n } => Err(anyhow!(
            "group {:?} has {n} live member{} ({}): not deleted. --force deletes it anyway \
             (--dry-run says what the members would do)",
            key.name,
            plural(n as usize),
            live.join(", ")
        )),
        Deletion::Absent => Err(anyhow!(
            "group {:?} (prefix {:?}) does not exist at {}",
            key.name,
            key.prefix,
            redact_url(url)
        )),
        Deletion::Deleted { live: n } => {
            println!("deleted group {:?}", key.name);
            if n > 0 {
                println!("{}", consequences(&live, &snapshot));
            }
            Ok(ExitCode::SUCCESS)
        }
        other => Err(anyhow!("unexpected outcome: {other:?}")),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The live members' ids.
fn ids(s: &GroupSnapshot) -> Vec<String> {
    s.members.iter().map(|m| m.id.clone()).collect()
}

/// What the live members do after a forced deletion.
fn consequences(live: &[String], s: &GroupSnapshot) -> String {
    let longest = s
        .members
        .iter()
        .map(|m| m.expires_in)
        .max()
        .unwrap_or_default();
    format!(
        "the {} live member{} ({}) learn at their next call (they are woken now) that their \
         session is gone: each reports its buckets lost and registers again, which re-creates \
         the group with that member's configuration. The new group grants nothing for its ttl, \
         and not before the ended sessions would have expired (within {}), so no bucket has two \
         owners; its tokens are larger than every earlier one (they follow the server's clock)",
        live.len(),
        plural(live.len()),
        live.join(", "),
        fmt_duration(longest)
    )
}
