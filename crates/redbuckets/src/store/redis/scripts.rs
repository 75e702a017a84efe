//! The Lua texts a store sends, composed from `store/lua/`: one function library (what `FCALL`
//! runs) and, for servers that refuse functions, one EVAL script per call. Pure text: no I/O.
//!
//! Each script is a body (`<name>.lua`) run after `clock.lua` and `common.lua`, whose `bind(keys, argv)` sets the call's keys and tag. Body files are plain
//! chunks that read `KEYS` and `ARGV`, so the same text works in both forms:
//! - **EVAL:** `clock + common + "bind(KEYS, ARGV)" + body`, one script per body, run with
//!   `EVALSHA` (the prelude is compiled again on every call: ~11 µs of server time).
//! - **Function library:** `clock + common` once, then each body as the callback of
//!   `rb_<version>_<name>`, which first stores its `keys` and `argv` in the library's `KEYS` and
//!   `ARGV` locals (a library has no such globals; `clock_frozen.lua` reads them directly) and calls `bind`. The library is named `redbuckets_<version>`, where
//!   `<version>` is the first 12 hex digits of the SHA1 of its text (with the version left out),
//!   so two versions of redbuckets, or the two clock variants, load side by side on one server
//!   during a rolling upgrade.

use redis::Script;

/// One script of the store protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ScriptId {
    Register,
    Heartbeat,
    /// The steady-state heartbeat: it hands over to `Heartbeat` when it must purge.
    HeartbeatFast,
    Rebalance,
    Release,
    /// Release and deregistration in one step: the graceful leave.
    Leave,
    Deregister,
    Snapshot,
    /// A session's own buckets, read-only: the member's resync.
    Holdings,
    /// Deletes a group (an operator's call).
    Delete,
    /// Ends one member's session, whatever its nonce (an operator's call).
    Remove,
}

impl ScriptId {
    /// Every script (for tests).
    #[cfg(test)]
    pub(super) const ALL: [ScriptId; 11] = [
        ScriptId::Register,
        ScriptId::Heartbeat,
        ScriptId::HeartbeatFast,
        ScriptId::Rebalance,
        ScriptId::Release,
        ScriptId::Leave,
        ScriptId::Deregister,
        ScriptId::Snapshot,
        ScriptId::Holdings,
        ScriptId::Delete,
        ScriptId::Remove,
    ];
}

/// A script's body file and how it runs.
struct Body {
    id: ScriptId,
    name: &'static str,
    text: &'static str,
    /// Flagged `no-writes`: Redis itself refuses any write in it, so looking never changes the
    /// group.
    read_only: bool,
}

/// Every script, in `ScriptId` order.
const BODIES: [Body; 11] = [
    Body {
        id: ScriptId::Register,
        name: "register",
        text: include_str!("../lua/register.lua"),
        read_only: false,
    },
    Body {
        id: ScriptId::Heartbeat,
        name: "heartbeat",
        text: include_str!("../lua/heartbeat.lua"),
        read_only: false,
    },
    // With common.lua, as every body, since the renewal reports the sessions the member
    // watches and its counts (issue 10): free as a function, the prelude as an EVAL script.
    Body {
        id: ScriptId::HeartbeatFast,
        name: "heartbeat_fast",
        text: include_str!("../lua/heartbeat_fast.lua"),
        read_only: false,
    },
    Body {
        id: ScriptId::Rebalance,
        name: "rebalance",
        text: include_str!("../lua/rebalance.lua"),
        read_only: false,
    },
    Body {
        id: ScriptId::Release,
        name: "release",
        text: include_str!("../lua/release.lua"),
        read_only: false,
    },
    Body {
        id: ScriptId::Leave,
        name: "leave",
        text: include_str!("../lua/leave.lua"),
        read_only: false,
    },
    Body {
        id: ScriptId::Deregister,
        name: "deregister",
        text: include_str!("../lua/deregister.lua"),
        read_only: false,
    },
    Body {
        id: ScriptId::Snapshot,
        name: "snapshot",
        text: include_str!("../lua/snapshot.lua"),
        read_only: true,
    },
    Body {
        id: ScriptId::Holdings,
        name: "holdings",
        text: include_str!("../lua/holdings.lua"),
        read_only: true,
    },
    Body {
        id: ScriptId::Delete,
        name: "delete",
        text: include_str!("../lua/delete.lua"),
        read_only: false,
    },
    Body {
        id: ScriptId::Remove,
        name: "remove",
        text: include_str!("../lua/remove.lua"),
        read_only: false,
    },
];

pub(super) const COMMON: &str = include_str!("../lua/common.lua");

/// The line of `common.lua` that says whether the scripts run on a Redis Cluster.
const CLUSTER_LINE: &str = "local CLUSTER = false";

/// Where the scripts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deployment {
    /// One server (or Sentinel): `PUBLISH`.
    Server,
    /// A Redis Cluster (Redis ≥ 7.0): `SPUBLISH` on the group's slot, and a read of a missing
    /// key first, which Redis refuses while the slot migrates (see `common.lua`). A variant of
    /// its own (another library version), so the standalone scripts are unchanged by it.
    Cluster,
}

/// Stands for the version in the library's text while its hash is computed.
const VERSION_SLOT: &str = "@VERSION@";

/// The scripts of one clock variant, in both forms; composed once per process.
pub(super) struct Scripts {
    /// EVAL form, in `ScriptId` order.
    eval: Vec<Script>,
    /// EVAL form without the `#!lua flags=` line, for Redis < 7.0, in `ScriptId` order (the
    /// same script as in `eval` where a body has no flags).
    eval_unflagged: Vec<Script>,
    /// `FUNCTION LOAD` text.
    library: String,
    /// `redbuckets_<version>`.
    library_name: String,
    /// Function names, in `ScriptId` order.
    functions: Vec<String>,
}

impl Scripts {
    /// Every script with `clock` (the Lua text that defines `server_now_us`) first, for
    /// `deployment`.
    pub(super) fn new(clock: &str, deployment: Deployment) -> Self {
        debug_assert!(BODIES.iter().enumerate().all(|(i, b)| b.id as usize == i));
        debug_assert_eq!(COMMON.matches(CLUSTER_LINE).count(), 1);
        let common = match deployment {
            Deployment::Server => COMMON.to_string(),
            Deployment::Cluster => COMMON.replace(CLUSTER_LINE, "local CLUSTER = true"),
        };
        let eval_form = |body: &Body, flags: bool| {
            // The flag must be the script's first line.
            let flags = if flags && body.read_only {
                "#!lua flags=no-writes\n"
            } else {
                ""
            };
            Script::new(&format!(
                "{flags}{clock}\n{common}\nbind(KEYS, ARGV)\n{}",
                body.text
            ))
        };
        let eval = BODIES.iter().map(|b| eval_form(b, true)).collect();
        let eval_unflagged = BODIES.iter().map(|b| eval_form(b, false)).collect();

        let mut text = format!(
            "#!lua name=redbuckets_{VERSION_SLOT}\n\
             -- redbuckets' store scripts (src/store/redis/scripts.rs). The call's keys and\n\
             -- arguments, set by each function: a library has no KEYS and ARGV globals.\n\
             local KEYS, ARGV\n\
             {clock}\n{common}\n"
        );
        for body in &BODIES {
            let flags = if body.read_only {
                "{ 'no-writes' }"
            } else {
                "{}"
            };
            text.push_str(&format!(
                "redis.register_function{{ function_name = 'rb_{VERSION_SLOT}_{name}', \
                 flags = {flags}, callback = function(keys, argv)\n\
                 KEYS, ARGV = keys, argv\nbind(keys, argv)\n{body}\nend }}\n",
                name = body.name,
                body = body.text,
            ));
        }
        // The SHA1 of the text, as Redis computes a script's.
        let version = Script::new(&text).get_hash()[..12].to_string();
        Scripts {
            eval,
            eval_unflagged,
            library: text.replace(VERSION_SLOT, &version),
            library_name: format!("redbuckets_{version}"),
            functions: BODIES
                .iter()
                .map(|b| format!("rb_{version}_{}", b.name))
                .collect(),
        }
    }

    /// The EVAL form of a script, with its `#!lua flags=` line (Redis ≥ 7.0) or without.
    pub(super) fn eval(&self, id: ScriptId, flagged: bool) -> &Script {
        if flagged {
            &self.eval[id as usize]
        } else {
            &self.eval_unflagged[id as usize]
        }
    }

    /// The function that runs a script.
    pub(super) fn function(&self, id: ScriptId) -> &str {
        &self.functions[id as usize]
    }

    /// The library's text, for `FUNCTION LOAD`.
    pub(super) fn library(&self) -> &str {
        &self.library
    }

    /// `redbuckets_<version>`.
    pub(super) fn library_name(&self) -> &str {
        &self.library_name
    }

    /// Every script's name and EVAL form (for tests).
    #[cfg(test)]
    pub(super) fn all_eval(&self) -> impl Iterator<Item = (&'static str, &Script)> {
        BODIES.iter().map(|b| b.name).zip(&self.eval)
    }

    /// Every body's text (for tests).
    #[cfg(test)]
    pub(super) fn bodies() -> impl Iterator<Item = &'static str> {
        BODIES.iter().map(|b| b.text)
    }
}
