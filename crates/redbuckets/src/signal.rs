//! [`shutdown_signal`]: the signals a service is stopped with, as one future for
//! [`crate::Member::run_until`].

/// Completes when the process is asked to stop: on the first SIGTERM or SIGINT (Ctrl-C) on
/// unix, on Ctrl-C elsewhere. SIGTERM is what Kubernetes, systemd and Docker send; a member
/// that only waits for Ctrl-C is killed by it without leaving, and its buckets stay owned, and
/// unworked, until its session expires.
///
/// ```no_run
/// # async fn demo(member: redbuckets::Member) -> Result<(), redbuckets::Error> {
/// // Revoke everything, wait for the leases to be dropped, release, deregister.
/// member.run_until(redbuckets::shutdown_signal()).await
/// # }
/// ```
///
/// The handlers are installed when the future is first polled ([`crate::Member::run_until`]
/// polls it at once); from then on these signals no longer end the process by themselves.
/// Should a handler fail to install (no signal support on the platform), it logs a WARN and
/// waits for the other; with none at all it never completes. It needs tokio's `signal`
/// feature, which this crate enables.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let wait = |kind: SignalKind, name: &'static str| async move {
            match signal(kind) {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen to {name}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = wait(SignalKind::terminate(), "SIGTERM") => {}
            () = wait(SignalKind::interrupt(), "SIGINT") => {}
        }
    }
    #[cfg(not(unix))]
    {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen to Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}
