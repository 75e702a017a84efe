//! What the member's task logs about store errors: one line when a trouble begins, a summary
//! while it lasts, one when it ends; never a line per failed call. A Redis that is down for 9 s
//! used to give 27 WARN lines per member (a timeout and a refusal for each retry).
//!
//! Pure: the driver passes the time in and writes the line this returns.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;

/// How often a trouble that lasts is summarized.
pub(crate) const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The open trouble, if any, and how much of it was not logged yet.
#[derive(Debug, Default)]
pub(crate) struct ErrorLog {
    trouble: Option<Trouble>,
}

#[derive(Debug)]
struct Trouble {
    /// Transient errors (the store unreachable or slow) are one trouble whatever their text;
    /// any other error is its own, by its message.
    key: String,
    began: Instant,
    /// Failed calls since it began.
    failures: u64,
    /// Failed calls since the last line.
    unlogged: u64,
    last_line: Instant,
}

/// A line to log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A new trouble: WARN.
    Began(String),
    /// A trouble that lasts: WARN, at most once per [`SUMMARY_EVERY`].
    Lasts(String),
    /// The trouble is over: INFO.
    Ended(String),
}

impl ErrorLog {
    /// A store call failed with `error` at `now`: the lines to log (a trouble that ended
    /// because another began, then the new one; or a summary; or none).
    pub(crate) fn failed(&mut self, error: &Error, now: Instant) -> Vec<Line> {
        let key = if error.is_transient() {
            "unreachable".to_string()
        } else {
            error.to_string()
        };
        let mut lines = Vec::new();
        if let Some(t) = &mut self.trouble {
            if t.key == key {
                t.failures += 1;
                t.unlogged += 1;
                if now.saturating_duration_since(t.last_line) >= SUMMARY_EVERY {
                    lines.push(Line::Lasts(format!(
                        "still failing after {:.0?}: {} failed store calls in all, {} since \
                         the last line; the last: {error}",
                        now.saturating_duration_since(t.began),
                        t.failures,
                        t.unlogged
                    )));
                    t.unlogged = 0;
                    t.last_line = now;
                }
                return lines;
            }
            lines.extend(self.succeeded(now));
        }
        let what = if error.is_transient() {
            "the store is unreachable or slow"
        } else {
            "a store call failed"
        };
        lines.push(Line::Began(format!(
            "{what}: {error}; retrying with backoff (a summary every {SUMMARY_EVERY:?} while \
             it lasts)"
        )));
        self.trouble = Some(Trouble {
            key,
            began: now,
            failures: 1,
            unlogged: 0,
            last_line: now,
        });
        lines
    }

    /// A store call succeeded at `now`: the line that ends the open trouble, if any.
    pub(crate) fn succeeded(&mut self, now: Instant) -> Option<Line> {
        let t = self.trouble.take()?;
        Some(Line::Ended(format!(
            "the store answers again, after {:.1?} and {} failed calls",
            now.saturating_duration_since(t.began),
            t.failures
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Error {
        Error::Unavailable {
            detail: "Connection refused".into(),
        }
    }

    fn timeout() -> Error {
        Error::Timeout {
            call: "register",
            after: Duration::from_millis(666),
        }
    }

    #[test]
    fn an_outage_is_one_line_a_summary_per_period_and_one_at_its_end() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        let mut lines = Vec::new();
        // 9 s of a timeout and a refusal per retry, every 0.66 s: what a Redis down gave.
        for i in 0..27u32 {
            let at = t0 + Duration::from_millis(333) * i;
            let e = if i % 2 == 0 { timeout() } else { refused() };
            lines.extend(log.failed(&e, at));
        }
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            matches!(&lines[0], Line::Began(l) if l.contains("666")),
            "{lines:?}"
        );
        // Still down after 10 s: one summary.
        let lines = log.failed(&refused(), t0 + Duration::from_secs(11));
        assert!(
            matches!(&lines[..], [Line::Lasts(l)] if l.contains("28 failed")),
            "{lines:?}"
        );
        assert!(log
            .failed(&refused(), t0 + Duration::from_secs(12))
            .is_empty());
        let end = log.succeeded(t0 + Duration::from_secs(13));
        assert!(
            matches!(&end, Some(Line::Ended(l)) if l.contains("29 failed")),
            "{end:?}"
        );
        assert_eq!(log.succeeded(t0 + Duration::from_secs(14)), None);
    }

    #[test]
    fn another_kind_of_error_is_a_change() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        assert_eq!(log.failed(&refused(), t0).len(), 1);
        let corrupt = Error::CorruptState {
            group: "g".into(),
            detail: "x".into(),
        };
        let lines = log.failed(&corrupt, t0 + Duration::from_secs(1));
        assert!(
            matches!(&lines[..], [Line::Ended(_), Line::Began(l)] if l.contains("corrupt")),
            "{lines:?}"
        );
        assert!(log.failed(&corrupt, t0 + Duration::from_secs(2)).is_empty());
    }
}
