//! `RedisInfo`: the fields of an `INFO` reply that the benchmarks and tests read, parsed once.
//! One parser, not a copy per example: `INFO` lines are `name:value`, and `INFO commandstats`
//! lines are `cmdstat_<command>:calls=…,usec=…,failed_calls=…`.

/// The commands that run a script: a member's round trip, whichever way the store calls.
pub const SCRIPT_COMMANDS: [&str; 6] = [
    "evalsha",
    "eval",
    "fcall",
    "fcall_ro",
    "evalsha_ro",
    "eval_ro",
];

/// An `INFO` reply (any sections).
#[derive(Debug, Clone)]
pub struct RedisInfo {
    text: String,
}

impl RedisInfo {
    /// Wraps the text of an `INFO` reply.
    #[must_use]
    pub fn parse(text: impl Into<String>) -> Self {
        RedisInfo { text: text.into() }
    }

    /// A numeric `name:value` field, 0 when absent.
    #[must_use]
    pub fn field(&self, name: &str) -> f64 {
        let prefix = format!("{name}:");
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// `key` (`calls`, `usec`, `failed_calls`…) of one command's `commandstats` line, 0 when
    /// the command never ran.
    #[must_use]
    pub fn command(&self, command: &str, key: &str) -> f64 {
        let prefix = format!("cmdstat_{command}:");
        let key = format!("{key}=");
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix(key.as_str())))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// `key` summed over every script command ([`SCRIPT_COMMANDS`]).
    #[must_use]
    pub fn scripts(&self, key: &str) -> f64 {
        SCRIPT_COMMANDS.iter().map(|c| self.command(c, key)).sum()
    }

    /// Redis CPU so far, user + sys, in seconds.
    #[must_use]
    pub fn cpu_s(&self) -> f64 {
        self.field("used_cpu_sys") + self.field("used_cpu_user")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_command_stats() {
        let info = RedisInfo::parse(
            "# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:0.25\r\n# Commandstats\r\n\
             cmdstat_fcall:calls=10,usec=150,usec_per_call=15.00,rejected_calls=0,failed_calls=2\r\n\
             cmdstat_evalsha:calls=3,usec=60,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r\n",
        );
        assert_eq!(info.cpu_s(), 1.75);
        assert_eq!(info.command("fcall", "calls"), 10.0);
        assert_eq!(info.command("fcall", "failed_calls"), 2.0);
        assert_eq!(info.command("publish", "calls"), 0.0);
        assert_eq!(info.scripts("calls"), 13.0);
        assert_eq!(info.scripts("usec"), 210.0);
        assert_eq!(info.field("missing"), 0.0);
    }
}
