//! The member's session as a state: `Registering` or `Live`. A live session always has its
//! lease deadline (S3), so "a session without a deadline" cannot be built; the deadline is kept
//! here only, and what the user's handle reads is derived from it (`Driver::publish`).
//!
//! Pure: no clock (time comes in as values), no store, no async.
//!
//! ```text
//!              registered(sent)                   renewed(sent) / retry_at(t)
//!   Registering ───────────────▶ Live { deadline } ◀──────────────┐
//!     ▲   │ retry_at(t)             │  └─────────────────────────────┘
//!     │   └──────┘                  │ end(): deadline passed, the store lost the session,
//!     └─────────────────────────────┘        or a reply came after the deadline
//! ```

use tokio::time::Instant;

use crate::clock::Deadline;
use crate::store::SessionRef;

/// Where the member's session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Session {
    /// Not registered: the next registration, at `retry_at`, uses `nonce`. The nonce is kept
    /// across retries so a registration that timed out but ran is found again instead of
    /// blocking its own id; `previous` is our last session, which it may replace.
    Registering {
        nonce: String,
        previous: Option<String>,
        retry_at: Instant,
    },
    /// Registered: the leases are valid until `deadline`; the next heartbeat is at `renew_at`.
    Live {
        session: SessionRef,
        deadline: Deadline,
        renew_at: Instant,
    },
}

fn new_nonce() -> String {
    #[cfg(test)]
    if let Some(n) = nonces::take() {
        return format!("n{n}");
    }
    uuid::Uuid::new_v4().simple().to_string()
}

/// Unit tests only: nonces from a counter instead of a random UUID, on this thread, for the
/// model checker (`explore.rs`), whose replays must draw the same nonces every time.
#[cfg(test)]
pub(crate) mod nonces {
    use std::cell::Cell;

    thread_local! {
        static NEXT: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// From now on, nonces are `n{first}`, `n{first + 1}`, ... on this thread.
    pub(crate) fn count_from(first: u64) {
        NEXT.with(|n| n.set(Some(first)));
    }

    /// The next counted nonce, if counting.
    pub(super) fn take() -> Option<u64> {
        NEXT.with(|n| {
            let next = n.get()?;
            n.set(Some(next + 1));
            Some(next)
        })
    }

    /// The next nonce the counter would give, if counting.
    pub(crate) fn peek() -> Option<u64> {
        NEXT.with(Cell::get)
    }
}

impl Session {
    /// Not yet registered; the first registration is due at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Session::Registering {
            nonce: new_nonce(),
            previous: None,
            retry_at: now,
        }
    }

    /// The session reference while live.
    pub(crate) fn live(&self) -> Option<&SessionRef> {
        match self {
            Session::Live { session, .. } => Some(session),
            Session::Registering { .. } => None,
        }
    }

    /// The lease deadline while live.
    pub(crate) fn deadline(&self) -> Option<Deadline> {
        match self {
            Session::Live { deadline, .. } => Some(*deadline),
            Session::Registering { .. } => None,
        }
    }

    /// When the next store call of the session is due: the heartbeat, or the registration.
    pub(crate) fn due(&self) -> Instant {
        match self {
            Session::Live { renew_at, .. } => *renew_at,
            Session::Registering { retry_at, .. } => *retry_at,
        }
    }

    /// Moves the next heartbeat (or registration) to `at`.
    pub(crate) fn retry_at(&mut self, at: Instant) {
        match self {
            Session::Live { renew_at, .. } => *renew_at = at,
            Session::Registering { retry_at, .. } => *retry_at = at,
        }
    }

    /// Brings the next heartbeat (or registration) forward to `at` if it is due later.
    pub(crate) fn due_by(&mut self, at: Instant) {
        let due = self.due().min(at);
        self.retry_at(due);
    }

    /// What the next registration sends: our id with the pending nonce, and the session it may
    /// replace. `None` while live.
    pub(crate) fn request(&self, member: &str) -> Option<(SessionRef, Option<String>)> {
        match self {
            Session::Registering {
                nonce, previous, ..
            } => Some((
                SessionRef {
                    member: member.to_string(),
                    session: nonce.clone(),
                },
                previous.clone(),
            )),
            Session::Live { .. } => None,
        }
    }

    /// A registration succeeded: live until `deadline`, first heartbeat at `renew_at`.
    /// Returns the new session. Only from `Registering` (a live session is kept as it is).
    pub(crate) fn registered(
        &mut self,
        member: &str,
        deadline: Deadline,
        renew_at: Instant,
    ) -> Option<SessionRef> {
        let (session, _) = self.request(member)?;
        *self = Session::Live {
            session: session.clone(),
            deadline,
            renew_at,
        };
        Some(session)
    }

    /// A heartbeat renewed the session: the deadline moves to `deadline` if that is later (a
    /// reply to an older heartbeat never shortens it), the next heartbeat to `renew_at`.
    pub(crate) fn renewed(&mut self, until: Deadline, next: Instant) {
        if let Session::Live {
            deadline, renew_at, ..
        } = self
        {
            *deadline = (*deadline).max(until);
            *renew_at = next;
        }
    }

    /// The session ended (deadline passed, or the store no longer knows it): register again
    /// with a fresh nonce, replacing this session, at the time already due. Returns the session
    /// that ended, `None` if none was live.
    pub(crate) fn end(&mut self) -> Option<SessionRef> {
        let Session::Live {
            session, renew_at, ..
        } = self
        else {
            return None;
        };
        let ended = session.clone();
        *self = Session::Registering {
            nonce: new_nonce(),
            previous: Some(ended.session.clone()),
            retry_at: *renew_at,
        };
        Some(ended)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::Now;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn deadline(sent: Instant, validity: Duration) -> Deadline {
        let sent = Now::from_parts(
            sent,
            std::time::Instant::now(),
            std::time::SystemTime::now(),
        );
        Deadline::after(sent, validity)
    }

    #[test]
    fn a_new_session_registers_at_once_without_a_deadline() {
        let t0 = Instant::now();
        let s = Session::new(t0);
        assert_eq!(s.due(), t0);
        assert!(s.live().is_none());
        assert!(s.deadline().is_none());
        let (req, previous) = s.request("a").expect("registering");
        assert_eq!(req.member, "a");
        assert!(previous.is_none());
    }

    #[test]
    fn retries_keep_the_nonce() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        let (first, _) = s.request("a").expect("registering");
        s.retry_at(t0 + ms(25));
        assert_eq!(s.due(), t0 + ms(25));
        let (second, _) = s.request("a").expect("registering");
        assert_eq!(
            first, second,
            "a timed-out registration is retried with its nonce"
        );
    }

    #[test]
    fn registered_is_live_with_its_deadline() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        let (req, _) = s.request("a").expect("registering");
        let until = deadline(t0, ms(900));
        let session = s
            .registered("a", until, t0 + ms(100))
            .expect("was registering");
        assert_eq!(session, req);
        assert_eq!(s.live(), Some(&req));
        assert_eq!(s.deadline(), Some(until));
        assert_eq!(s.due(), t0 + ms(100));
        assert!(s.request("a").is_none(), "a live session does not register");
        assert!(
            s.registered("a", until, t0).is_none(),
            "registering twice keeps the live session"
        );
    }

    #[test]
    fn renewals_only_move_the_deadline_forward() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.registered("a", deadline(t0, ms(900)), t0 + ms(100));
        s.renewed(deadline(t0 + ms(500), ms(900)), t0 + ms(600));
        assert_eq!(s.deadline().map(|d| d.at), Some(t0 + ms(1400)));
        assert_eq!(s.due(), t0 + ms(600));
        // A reply to an older heartbeat, handled late, does not shorten it.
        s.renewed(deadline(t0 + ms(100), ms(900)), t0 + ms(700));
        assert_eq!(s.deadline().map(|d| d.at), Some(t0 + ms(1400)));
        assert_eq!(s.due(), t0 + ms(700));
        s.due_by(t0 + ms(650));
        assert_eq!(s.due(), t0 + ms(650));
        s.due_by(t0 + ms(800));
        assert_eq!(s.due(), t0 + ms(650), "due_by never postpones");
    }

    #[test]
    fn an_ended_session_registers_again_replacing_itself_with_a_new_nonce() {
        let t0 = Instant::now();
        let mut s = Session::new(t0);
        s.registered("a", deadline(t0, ms(900)), t0 + ms(100));
        let old = s.live().cloned().expect("live");
        let ended = s.end().expect("was live");
        assert_eq!(ended, old);
        assert!(s.deadline().is_none(), "no deadline without a live session");
        assert_eq!(s.due(), t0 + ms(100));
        let (next, previous) = s.request("a").expect("registering");
        assert_ne!(next.session, old.session, "a fresh nonce");
        assert_eq!(previous, Some(old.session));
        assert!(s.end().is_none(), "ending twice ends nothing");
        // Renewing a session that is not live does nothing.
        s.renewed(deadline(t0, ms(900)), t0);
        assert!(s.deadline().is_none());
    }
}
