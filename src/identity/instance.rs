//! The life of one instance: a task that owns its [`Live`] state, answers
//! task commands, rotates SVIDs before expiry (re-attesting first), ends
//! tasks at their TTL, and ends everything when the process exits.
//!
//! One owner per instance means no locks around SVIDs and tasks: every
//! change happens here, in order, and is published whole.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::context::Context;
use super::entries::Reconciled;
use super::registry::Registry;
use super::state::Live;
use super::{BeginTask, Error, InstanceState, TaskInfo, schedule};
use crate::attest::{self, exit_watch};
use crate::policy::Requester;
use crate::store::{EndReason, TaskEndReason};

/// What the rest of the daemon may ask of an instance.
pub(crate) enum Command {
    /// Start a task.
    Begin {
        req: BeginTask,
        requester: Requester,
        actor: String,
        reply: oneshot::Sender<Result<TaskInfo, Error>>,
    },
    /// End a task.
    End {
        task_id: String,
        actor: String,
        reply: oneshot::Sender<Result<TaskInfo, Error>>,
    },
    /// List live tasks.
    List {
        reply: oneshot::Sender<Result<Vec<TaskInfo>, Error>>,
    },
    /// Re-attest now (a request from the process no longer matched).
    Recheck,
    /// Revoke the whole instance.
    Revoke {
        actor: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// The entries changed: re-attest, and reissue or end to match them.
    Reconcile {
        reply: oneshot::Sender<Result<Reconciled, Error>>,
    },
}

/// Sends a command and waits for its answer.
pub(crate) async fn request<T>(
    commands: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
) -> Result<T, Error> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(make(reply))
        .await
        .map_err(|_| Error::InstanceEnded)?;
    answer.await.map_err(|_| Error::InstanceEnded)?
}

/// First pause before retrying to record an instance's end (e.g. on a
/// full disk); it doubles up to [`END_RETRY_MAX`].
const END_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between attempts to record an instance's end.
const END_RETRY_MAX: Duration = Duration::from_secs(5);

/// Longest wait for a re-attestation before the actor goes back to its
/// commands (and tries again later).
const REATTEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed rotation or task expiry (e.g. a full disk) before
/// trying again; the current SVIDs stay valid meanwhile.
pub(super) const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The background task that owns one instance.
pub(super) struct InstanceTask {
    ctx: Arc<Context>,
    registry: Arc<Registry>,
    live: Live,
    tx: watch::Sender<InstanceState>,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    /// The end (reason, actor) the store has not recorded yet: its SVIDs
    /// are not revoked until it is.
    unrecorded_end: Option<(EndReason, String)>,
    /// A reconcile with changed entries failed (re-attestation or the
    /// store): it is tried again at once after the retry pause, not left
    /// to the next rotation.
    reconcile_pending: bool,
}

enum Step {
    Continue,
    Recheck,
    Stop,
}

impl InstanceTask {
    pub(super) fn new(
        ctx: Arc<Context>,
        registry: Arc<Registry>,
        live: Live,
        tx: watch::Sender<InstanceState>,
        commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            ctx,
            registry,
            live,
            tx,
            commands,
            shutdown,
            unrecorded_end: None,
            reconcile_pending: false,
        }
    }

    /// Runs until the process exits, loses its identity, or shutdown.
    /// On shutdown nothing is revoked: a restarted daemon picks it up again.
    pub(super) async fn run(mut self) {
        let shutdown = self.shutdown.clone();
        let (pid, start) = (
            self.live.attestation.facts.pid,
            self.live.attestation.facts.start_time,
        );
        let exited = exit_watch::process_exit(pid, start);
        tokio::pin!(exited);
        loop {
            let delay = if self.reconcile_pending {
                Duration::ZERO
            } else {
                schedule::delay_until(self.live.next_wake(), SystemTime::now())
            };
            let step = tokio::select! {
                () = shutdown.cancelled() => Step::Stop,
                result = &mut exited => {
                    if let Err(e) = result {
                        tracing::warn!(instance = %self.live.attestation.instance_id, error = %e, "cannot watch the process; ending it");
                    }
                    self.ctx.attestor.forget(pid);
                    self.finish(EndReason::Exited, "daemon").await
                }
                Some(command) = self.commands.recv() => self.handle(command).await,
                () = tokio::time::sleep(delay) => {
                    if std::mem::take(&mut self.reconcile_pending) {
                        Step::Recheck
                    } else {
                        self.tick().await
                    }
                }
            };
            let step = match step {
                Step::Recheck => self.reconcile().await.0,
                other => other,
            };
            if let Step::Stop = step {
                self.record_end().await;
                return;
            }
        }
    }

    async fn handle(&mut self, command: Command) -> Step {
        let ctx = self.ctx.clone();
        match command {
            Command::Begin {
                req,
                requester,
                actor,
                reply,
            } => {
                let now = tokio::time::Instant::now().into_std();
                let result = self.live.begin(&ctx, req, requester, &actor, now).await;
                if result.is_ok() {
                    self.publish();
                }
                let _ = reply.send(result);
            }
            Command::End {
                task_id,
                actor,
                reply,
            } => {
                let reason = TaskEndReason::Requested { by: actor.clone() };
                let result = self.live.end(&ctx, &task_id, reason, &actor).await;
                if result.is_ok() {
                    self.publish();
                }
                let _ = reply.send(result);
            }
            Command::List { reply } => {
                let _ = reply.send(Ok(self.live.list()));
            }
            Command::Recheck => return Step::Recheck,
            Command::Reconcile { reply } => {
                let (step, outcome) = self.reconcile().await;
                let _ = reply.send(Ok(outcome));
                return step;
            }
            Command::Revoke { actor, reply } => {
                let reason = EndReason::Revoked { by: actor.clone() };
                let result = self.end_instance(reason, &actor).await;
                let _ = reply.send(result);
                return Step::Stop;
            }
        }
        Step::Continue
    }

    /// Ends expired tasks, then rotates what is due after re-attesting.
    async fn tick(&mut self) -> Step {
        let ctx = self.ctx.clone();
        let now = SystemTime::now();
        let mut changed = match self.live.expire_tasks(&ctx, now).await {
            Ok(changed) => changed,
            Err(e) => return self.retry_later(&e).await,
        };
        if self.live.rotation_due(now) {
            match self.reattest().await {
                Ok((attestation, entries)) => {
                    let rotated = self.live.rotate_due(&ctx, attestation, entries, now).await;
                    if let Err(e) = rotated {
                        self.publish();
                        return self.retry_later(&e).await;
                    }
                    changed = true;
                }
                Err(step) => return step,
            }
        }
        if changed {
            self.publish();
        }
        Step::Continue
    }

    /// Attests the process again; a process that is gone or no longer
    /// matches its entries ends here.
    async fn reattest(
        &mut self,
    ) -> Result<(attest::Attestation, Vec<Arc<crate::policy::Entry>>), Step> {
        let (pid, start, uid) = (
            self.live.attestation.facts.pid,
            self.live.attestation.facts.start_time,
            self.live.attestation.facts.uid,
        );
        let attesting = self
            .ctx
            .attest_off_thread(uid, move |a| a.reattest(pid, start));
        // An attestation that hangs (a binary on a FUSE mount) must not keep
        // this actor from revocation, the process's exit or shutdown: give
        // up after a while and keep the current SVIDs until the next try.
        let reattested = tokio::select! {
            reattested = attesting => reattested,
            () = self.shutdown.cancelled() => return Err(Step::Stop),
            () = tokio::time::sleep(REATTEST_TIMEOUT) => {
                let e = format!("re-attestation took over {REATTEST_TIMEOUT:?}");
                return Err(self.retry_later(&e).await);
            }
        };
        let attestation = match reattested {
            // The same process running another program is another instance:
            // this one ended with its program (its SVIDs are revoked).
            Ok(Ok(a)) if a.instance_id != self.live.attestation.instance_id => {
                return Err(self
                    .finish(EndReason::ExecutedAnotherProgram, "daemon")
                    .await);
            }
            Ok(Ok(a)) => a,
            Ok(Err(attest::Error::ProcessGone { .. } | attest::Error::ProcessChanged { .. })) => {
                return Err(self.finish(EndReason::Exited, "daemon").await);
            }
            // Not readable right now (e.g. out of file descriptors): keep the
            // current SVIDs and try again shortly; they stay valid meanwhile.
            Ok(Err(e)) => return Err(self.retry_later(&e).await),
            Err(_) => return Err(Step::Stop), // the runtime is shutting down
        };
        match self.ctx.matching(&attestation) {
            Ok(entries) => Ok((attestation, entries)),
            Err(e) => {
                let reason = EndReason::NoLongerMatches { why: e.to_string() };
                Err(self.finish(reason, "daemon").await)
            }
        }
    }

    /// Re-attests the process and brings its SVIDs in line with the
    /// entries in force: unchanged entries keep them; changed ones get new
    /// SVIDs (the old ones revoked in the same write); none at all ends it.
    async fn reconcile(&mut self) -> (Step, Reconciled) {
        let serving = self.live.serials();
        let (attestation, entries) = match self.reattest().await {
            Ok(found) => found,
            Err(Step::Stop) => return (Step::Stop, Reconciled::Ended { revoked: serving }),
            Err(step) => {
                // Not readable now: try again soon, not at the next rotation.
                self.reconcile_pending = true;
                return (step, Reconciled::Failed("re-attestation failed".into()));
            }
        };
        if self.live.holds_entries(&entries) {
            return (Step::Continue, Reconciled::Unchanged);
        }
        let ctx = self.ctx.clone();
        let now = SystemTime::now();
        match self.live.rotate_due(&ctx, attestation, entries, now).await {
            Ok(revoked) => {
                self.publish();
                tracing::info!(instance = %self.live.attestation.instance_id, revoked = revoked.len(), "entries changed: SVIDs reissued");
                (Step::Continue, Reconciled::Reissued { revoked })
            }
            Err(e) => {
                self.reconcile_pending = true;
                let failed = Reconciled::Failed(e.to_string());
                (self.retry_later(&e).await, failed)
            }
        }
    }

    /// Keeps the current SVIDs after a failure (e.g. a full disk) and tries
    /// again after [`RETRY_AFTER_FAILURE`], rather than spinning; a shutdown
    /// meanwhile stops at once.
    async fn retry_later(&self, e: &(dyn std::fmt::Display + Sync)) -> Step {
        tracing::warn!(instance = %self.live.attestation.instance_id, error = %e, retry_in = ?RETRY_AFTER_FAILURE, "rotation failed; retrying");
        tokio::select! {
            () = self.shutdown.cancelled() => Step::Stop,
            () = tokio::time::sleep(RETRY_AFTER_FAILURE) => Step::Continue,
        }
    }

    fn publish(&self) {
        self.tx
            .send_replace(InstanceState::Active(self.live.identity_set()));
    }

    /// Ends the instance: tasks end, SVIDs are revoked, streams are told.
    async fn finish(&mut self, reason: EndReason, actor: &str) -> Step {
        let _ = self.end_instance(reason, actor).await;
        Step::Stop
    }

    /// Ends the instance whatever happens (streams are told at once), and
    /// says whether its end was recorded and its SVIDs revoked. If not, the
    /// instance stays known (and refused) until [`Self::record_end`] has
    /// recorded it.
    async fn end_instance(&mut self, reason: EndReason, actor: &str) -> Result<(), Error> {
        let ctx = self.ctx.clone();
        let id = self.live.attestation.instance_id.clone();
        let recorded = self.live.end_all(&ctx, &reason, actor).await;
        match &recorded {
            Ok(()) => self
                .registry
                .remove(&id, self.live.attestation.facts.start_time),
            Err(e) => {
                tracing::error!(instance = %id, error = %e, "cannot record the end of an instance; its SVIDs are not revoked yet: retrying until it is recorded");
                self.unrecorded_end = Some((reason.clone(), actor.to_owned()));
            }
        }
        if matches!(
            reason,
            EndReason::Revoked { .. } | EndReason::NoLongerMatches { .. }
        ) {
            tracing::warn!(instance = %id, %reason, "instance lost its identity");
        }
        self.tx.send_replace(InstanceState::Ended(reason));
        recorded
    }

    /// Retries recording an end that failed (a full disk, an I/O error),
    /// backing off from 100 ms to 5 s, until the store has it and the SVIDs
    /// are on the CRL; then forgets the instance. Commands meanwhile are
    /// refused. If the daemon stops first, the store still holds the
    /// instance as live, and the next start ends it (if the process is
    /// gone) and revokes its SVIDs.
    async fn record_end(&mut self) {
        let ctx = self.ctx.clone();
        let id = self.live.attestation.instance_id.clone();
        let mut delay = END_RETRY_FIRST;
        while let Some((reason, actor)) = self.unrecorded_end.clone() {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    tracing::error!(instance = %id, "stopping before the end of an instance was recorded; the next start revokes its SVIDs if its process is gone");
                    break;
                }
                Some(command) = self.commands.recv() => {
                    refuse(command);
                    continue;
                }
                () = tokio::time::sleep(delay) => {}
            }
            match self.live.end_all(&ctx, &reason, &actor).await {
                Ok(()) => {
                    tracing::warn!(instance = %id, "recorded the end of an instance after retrying: its SVIDs are revoked");
                    self.unrecorded_end = None;
                }
                Err(e) => {
                    tracing::debug!(instance = %id, error = %e, retry_in = ?delay, "still cannot record the end of an instance");
                    delay = (delay * 2).min(END_RETRY_MAX);
                }
            }
        }
        self.registry
            .remove(&id, self.live.attestation.facts.start_time);
    }
}

impl Drop for InstanceTask {
    /// However the actor ends (even by a panic), its instance leaves the
    /// registry, so no caller joins an instance nobody runs. (Its streams
    /// end when the state sender drops with it.)
    fn drop(&mut self) {
        self.registry.remove(
            &self.live.attestation.instance_id,
            self.live.attestation.facts.start_time,
        );
    }
}

/// Answers a command sent to an instance that has ended.
fn refuse(command: Command) {
    match command {
        Command::Begin { reply, .. } | Command::End { reply, .. } => {
            let _ = reply.send(Err(Error::InstanceEnded));
        }
        Command::List { reply } => {
            let _ = reply.send(Err(Error::InstanceEnded));
        }
        Command::Revoke { reply, .. } => {
            let _ = reply.send(Err(Error::InstanceEnded));
        }
        Command::Reconcile { reply } => {
            let _ = reply.send(Err(Error::InstanceEnded));
        }
        Command::Recheck => {}
    }
}
