//! `redbuckets remove-member`: ends one member's session now (`RedisStore::remove_member`),
//! for a member the operator knows is dead (Kafka's remove-members, Akka's "down"): its buckets
//! go to the live members at once, with larger tokens, without waiting out the ttl. A member
//! that is alive after all keeps working until it hears or its own deadline passes, while
//! others own its buckets: the command says so and asks for confirmation (`--yes` when stdin
//! is not a terminal). `--dry-run` only reads.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;

use anyhow::anyhow;
use redbuckets::Removal;

use super::{read_group, scrub};
use crate::render::fmt_duration;
use crate::RemoveArgs;

pub async fn run(args: RemoveArgs) -> anyhow::Result<ExitCode> {
    let url = &args.group.redis;
    let (store, key, snapshot) = read_group(&args.group).await?;
    let Some(target) = snapshot.members.iter().find(|m| m.id == args.id) else {
        return Err(anyhow!(
            "group {:?} has no live member {:?} (its session may have expired already)",
            key.name,
            args.id
        ));
    };
    let others = snapshot.members.len() - 1;
    let warning = format!(
        "if {id:?} is still running, it keeps working on its buckets until it hears (it is woken \
         now) or its own lease deadline passes (within {left}), while other members own them; \
         then it registers again",
        id = args.id,
        left = fmt_duration(target.expires_in)
    );
    if args.dry_run {
        println!(
            "dry run: would end the session of {:?} (holding {} buckets, expiring in {}): its \
             buckets would go to the {others} other live member{} now, with larger tokens",
            args.id,
            target.held,
            fmt_duration(target.expires_in),
            if others == 1 { "" } else { "s" }
        );
        println!("warning: {warning}");
        return Ok(ExitCode::SUCCESS);
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(anyhow!(
                "not a terminal: pass --yes to remove {:?} ({warning})",
                args.id
            ));
        }
        eprint!(
            "warning: {warning}.\nremove {:?} from group {:?}? [y/N] ",
            args.id, key.name
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("not removed");
            return Ok(ExitCode::FAILURE);
        }
    }
    let outcome = store.remove_member(&key, &args.id).await.map_err(|e| {
        anyhow!(
            "cannot remove {:?}: {}",
            args.id,
            scrub(&e.to_string(), url)
        )
    })?;
    match outcome {
        Removal::Removed { held } => {
            println!(
                "removed {:?} from group {:?}: its {held} buckets go to the {others} live \
                 member{} now, with larger tokens",
                args.id,
                key.name,
                if others == 1 { "" } else { "s" }
            );
            if args.yes {
                eprintln!("warning: {warning}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Removal::Absent => Err(anyhow!(
            "group {:?} has no live member {:?} any more (its session expired meanwhile)",
            key.name,
            args.id
        )),
        other => Err(anyhow!("unexpected outcome: {other:?}")),
    }
}
