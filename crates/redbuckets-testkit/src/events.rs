//! The members' events as the tests see them: every event in arrival order (for assertions
//! about what happened) and the library's one S1/S2 checker ([`redbuckets::check`]) over them.

use redbuckets::check::Timeline;
use redbuckets::{Event, Events};
use tokio::time::Instant;

/// Every event of every member, in arrival order, checked for S1 and S2 on demand.
#[derive(Debug, Default)]
pub struct EventLog {
    /// The events, each with its member's id.
    pub events: Vec<(String, Event)>,
    timeline: Timeline,
}

impl EventLog {
    /// Drains whatever the receivers have buffered. Panics if one lagged: the check would be
    /// incomplete.
    pub fn collect(&mut self, receivers: &mut [(String, Events)]) {
        for (member, rx) in receivers.iter_mut() {
            while let Some(event) = rx.try_next() {
                if let Event::Lagged { missed, .. } = event {
                    panic!("the event log lagged {missed} events of {member}")
                }
                self.push(member, event);
            }
        }
    }

    /// Records one event of `member`.
    pub fn push(&mut self, member: &str, event: Event) {
        self.timeline.push(member, &event);
        self.events.push((member.to_string(), event));
    }

    /// `member` crashed at `at`: whatever it owned, it stopped owning then.
    pub fn crashed(&mut self, member: &str, at: Instant) {
        self.timeline.crash(member, at);
    }

    /// Every S1/S2 violation so far, as text (empty: safe).
    pub fn violations(&self) -> Vec<String> {
        self.timeline.violations()
    }

    /// Panics listing every S1/S2 violation so far.
    pub fn check_safety(&self) {
        let bad = self.violations();
        assert!(
            bad.is_empty(),
            "{} safety violations:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    /// Number of grants since event `from`.
    pub fn acquisitions_since(&self, from: usize) -> usize {
        self.events[from..]
            .iter()
            .filter(|(_, e)| matches!(e, Event::Acquired { .. }))
            .count()
    }

    /// The tokens of the grants since event `from`, in arrival order.
    pub fn grant_tokens_since(&self, from: usize) -> Vec<u64> {
        self.events[from..]
            .iter()
            .filter(|(_, e)| matches!(e, Event::Acquired { .. }))
            .filter_map(|(_, e)| e.token())
            .collect()
    }
}
