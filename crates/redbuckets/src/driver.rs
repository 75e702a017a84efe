//! The member's task: the thin tokio shell around [`MemberCore`] (`machine.rs`), which decides
//! everything. The shell reads the clocks ([`Now::read`]) once per input, makes the one store
//! call the core asks for, cut at its deadline, and otherwise sleeps until the core's next
//! timer, a notice, a dropped lease handle, the shutdown or the abort, and hands each to the
//! core as an [`Input`].
//!
//! Interruptions: the abort (the `Member` dropped or aborted) stops everything at once; the
//! shutdown drops a call in flight (it answers `Error::Shutdown`) and starts the graceful leave,
//! whose own calls only the abort interrupts.

use std::sync::Arc;

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Now;
use crate::config::Config;
use crate::error::Error;
use crate::machine::{Input, MemberCore, Next};
use crate::shared::{ErrorHook, Shared};
use crate::store::{Call, Notice, Notifications, Store};

/// Test builds only (`testing` feature): freezes the task as a stopped process would be.
#[cfg(feature = "testing")]
pub(crate) type Freeze = tokio::sync::mpsc::UnboundedReceiver<std::time::Duration>;
/// Without the `testing` feature there is nothing to freeze.
#[cfg(not(feature = "testing"))]
pub(crate) type Freeze = ();

pub(crate) struct Driver<S> {
    store: S,
    core: MemberCore,
    shared: Arc<Shared>,
    /// Cancelled by `shutdown()` (and by an abort: it is the abort's child). Until the leave
    /// begins, it drops the call in flight, so a shutdown never waits for one.
    graceful: CancellationToken,
    /// Cancelled by an abort (the handle dropped). The leave's calls stop only on this one.
    abort: CancellationToken,
    /// The core was told of the shutdown.
    shutdown_told: bool,
    freeze: Freeze,
}

impl<S: Store> Driver<S> {
    pub(crate) fn new(
        store: S,
        config: Arc<Config>,
        shared: Arc<Shared>,
        on_error: Option<ErrorHook>,
        graceful: CancellationToken,
        abort: CancellationToken,
        freeze: Freeze,
    ) -> Self {
        let core = MemberCore::new(config, Arc::clone(&shared), on_error, &Now::read());
        Driver {
            store,
            core,
            shared,
            graceful,
            abort,
            shutdown_told: false,
            freeze,
        }
    }

    /// The first registration, done before `start` returns so configuration and connection
    /// errors reach the caller (see `MemberCore`'s join).
    pub(crate) async fn join(&mut self) -> Result<(), Error> {
        while self.core.joining() {
            if let Some(result) = self.turn().await {
                return result;
            }
        }
        Ok(())
    }

    /// Runs the member until it stops: after its graceful leave, or at once on the abort.
    pub(crate) async fn run(mut self) -> Result<(), Error> {
        loop {
            if let Some(result) = self.turn().await {
                return result;
            }
        }
    }

    /// Does what the core asks next; `Some` once it has stopped.
    async fn turn(&mut self) -> Option<Result<(), Error>> {
        // A freeze order is served between any two steps, also while every step is a call.
        #[cfg(feature = "testing")]
        if let Ok(frozen) = self.freeze.try_recv() {
            let input = stay_frozen(&self.abort, frozen).await;
            self.core.step(input, &Now::read());
        }
        match self.core.next(&Now::read()) {
            Next::Done(result) => return Some(result),
            Next::Call { call, deadline } => self.call(call, deadline).await,
            Next::Wait { wake } => self.wait(wake).await,
        }
        None
    }

    /// Makes one store call until `deadline`, and hands its reply to the core (after the
    /// notices that came meanwhile, when the core wants them first).
    async fn call(&mut self, call: Call, deadline: Instant) {
        let name = call.name();
        // Every clock is read as the request goes out (S3 under host suspend, `Now`).
        let sent = Now::read();
        let interruptible = !self.core.leaving();
        let result = tokio::select! {
            biased;
            () = self.abort.cancelled() => Err(Error::Shutdown),
            () = self.graceful.cancelled(), if interruptible => Err(Error::Shutdown),
            result = tokio::time::timeout_at(deadline, call.run(self.store.clone())) => {
                result.unwrap_or_else(|_| Err(Error::Timeout {
                    call: name,
                    after: deadline.saturating_duration_since(sent.at),
                }))
            }
        };
        self.shared
            .metrics
            .call(name, sent.at.elapsed(), result.as_ref().err());
        let now = Now::read();
        while self.core.notices_before_reply() {
            let Some(notice) = self
                .core
                .notifications()
                .and_then(|n| n.next().now_or_never())
            else {
                break;
            };
            self.core.step(Input::Notice(notice), &now);
        }
        self.core.step(Input::Reply { sent, result }, &now);
        self.interrupted();
    }

    /// Waits for an input until `wake`.
    async fn wait(&mut self, wake: Instant) {
        let dropped = Arc::clone(&self.shared.dropped);
        let input = tokio::select! {
            biased;
            () = self.abort.cancelled() => Input::Abort,
            () = self.graceful.cancelled(), if !self.shutdown_told => {
                self.shutdown_told = true;
                Input::Shutdown
            }
            // Before the timers, which may always be due: a freeze is never starved.
            frozen = freeze_order(&mut self.freeze) => stay_frozen(&self.abort, frozen).await,
            notice = next_notice(self.core.notifications()) => Input::Notice(notice),
            () = dropped.notified() => Input::Tick,
            () = tokio::time::sleep_until(wake) => Input::Tick,
        };
        self.core.step(input, &Now::read());
    }

    /// Tells the core of an abort or a shutdown that came during a call.
    fn interrupted(&mut self) {
        if self.abort.is_cancelled() {
            self.core.step(Input::Abort, &Now::read());
        } else if self.graceful.is_cancelled() && !self.shutdown_told {
            self.shutdown_told = true;
            self.core.step(Input::Shutdown, &Now::read());
        }
    }
}

async fn next_notice(notifications: Option<&mut Notifications>) -> Option<Notice> {
    match notifications {
        Some(n) => n.next().await,
        None => std::future::pending().await,
    }
}

/// A frozen task: nothing runs for `frozen`, not even the deadline check, as in a stopped
/// process (the user's side still checks the deadline itself); only the abort ends it early.
async fn stay_frozen(abort: &CancellationToken, frozen: std::time::Duration) -> Input {
    tokio::select! {
        () = abort.cancelled() => Input::Abort,
        () = tokio::time::sleep(frozen) => Input::Tick,
    }
}

/// The next freeze order (`Member::freeze`); never comes without the `testing` feature.
#[cfg(feature = "testing")]
async fn freeze_order(freeze: &mut Freeze) -> std::time::Duration {
    match freeze.recv().await {
        Some(duration) => duration,
        None => std::future::pending().await,
    }
}

#[cfg(not(feature = "testing"))]
async fn freeze_order(_: &mut Freeze) -> std::time::Duration {
    std::future::pending().await
}
