//! One shutdown mechanism for the whole daemon.
//!
//! A `CancellationToken` says "stop"; a `TaskTracker` knows what is still
//! running. Every long-lived task, and every open Workload API stream,
//! selects on the token, so a graceful shutdown never waits forever on a
//! stream that would otherwise never end.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for tasks to finish before giving up on them.
pub const GRACE_PERIOD: Duration = Duration::from_secs(5);

/// The daemon's stop signal and the tasks that must end before it exits.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the daemon should stop.
    pub token: CancellationToken,
    /// Every long-lived task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Notified on each SIGHUP (once [`Shutdown::cancel_on_signals`] has
    /// run): the daemon reloads its config entries.
    pub hangups: std::sync::Arc<tokio::sync::Notify>,
}

impl Shutdown {
    /// A fresh, un-cancelled shutdown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the token on SIGINT or SIGTERM. A second signal exits at once.
    /// SIGHUP, whose default action would kill the daemon and leave its
    /// socket behind, notifies [`Shutdown::hangups`] instead.
    pub fn cancel_on_signals(&self) {
        forward_hangups(self.hangups.clone());
        let token = self.token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down (signal again to exit at once)");
            token.cancel();
            wait_for_signal().await;
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
    }

    /// Stops, then waits up to `grace` for tracked tasks to end.
    /// Returns false when some were still running.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        let done = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                remaining = self.tracker.len(),
                "tasks still running after the grace period were cut off"
            );
        }
        done
    }
}

/// Installs a SIGHUP handler at once (before returning, so no SIGHUP can
/// slip through with its default action) that passes each one on to
/// `notify` (several before a reload starts make one reload).
fn forward_hangups(notify: std::sync::Arc<tokio::sync::Notify>) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::info!("SIGHUP received: reloading the config file's entries");
                    notify.notify_one();
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot install a SIGHUP handler; SIGHUP will stop the daemon")
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the daemon can still be stopped by
            // SIGKILL; log it instead of exiting now.
            tracing::warn!("cannot install signal handlers");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tasks_that_watch_the_token() {
        let shutdown = Shutdown::new();
        let token = shutdown.token.clone();
        shutdown
            .tracker
            .spawn(async move { token.cancelled().await });
        assert!(shutdown.drain(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn drain_gives_up_on_a_task_that_ignores_the_token() {
        let shutdown = Shutdown::new();
        shutdown.tracker.spawn(std::future::pending::<()>());
        assert!(!shutdown.drain(Duration::from_millis(50)).await);
    }
}
