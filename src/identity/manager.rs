//! [`IdentityManager`], the module's face to the services: attest a caller,
//! join or start its instance, hand out its state channel, and carry task
//! and revocation requests to the instance's actor.
//!
//! The agent's own calls (over the workload socket) attest the caller first
//! and act on its instance only; the operator's calls name any live
//! instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::context::{Context, Mint};
use super::instance::{self, Command, InstanceTask};
use super::registry::{Handle, Join, Registry, Starting};
use super::state::Live;
use super::{
    BeginTask, Error, InstanceState, InstanceSummary, Parts, TaskInfo, TrustBundle, audit, revoke,
};
use crate::attest::{self, Attestation, PeerCred};
use crate::ids::InstanceId;
use crate::policy::{Entry, Requester};
use crate::store::EndReason;

/// What revoking one SVID did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SvidRevoked {
    /// It was an instance SVID: the instance was revoked.
    Instance(InstanceId),
    /// It was a live task's SVID: the task ended.
    Task {
        /// The instance.
        instance: InstanceId,
        /// The task.
        task: String,
    },
    /// It was no longer served: it alone went on the CRL.
    Serial(String),
}

/// Commands queued per instance before senders wait.
const COMMAND_QUEUE: usize = 16;

/// The identity manager: attests callers, hands out their instance's state,
/// and runs their tasks.
#[derive(Clone)]
pub struct IdentityManager {
    pub(super) ctx: Arc<Context>,
    pub(super) registry: Arc<Registry>,
    /// The entries' sources; its lock orders entry changes.
    pub(super) book: Arc<tokio::sync::Mutex<super::entries::Book>>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl IdentityManager {
    /// Builds the manager and starts the CRL publisher. Instance tasks are
    /// spawned on `tracker` and stop when `shutdown` is cancelled.
    pub fn new(parts: Parts, shutdown: CancellationToken, tracker: TaskTracker) -> Self {
        let mint: Arc<dyn Mint> = parts.ca.clone();
        Self::with_mint(parts, mint, shutdown, tracker)
    }

    /// As [`IdentityManager::new`], with SVIDs signed by `mint` (the CA
    /// still signs CRLs): the seam for tests of slow or failing signing.
    pub fn with_mint(
        parts: Parts,
        mint: Arc<dyn Mint>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let bundle = TrustBundle {
            trust_domain: parts.trust_domain.clone(),
            x509_der: parts.ca.bundle_der().into(),
            crls: Vec::new(),
        };
        let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
        let crl = revoke::spawn_publisher(
            parts.store.clone(),
            parts.ca.clone(),
            bundle_tx,
            shutdown.clone(),
            &tracker,
        );
        let book = super::entries::Book::new(parts.entries, parts.stored_entries);
        let ctx = Arc::new(Context {
            trust_domain: parts.trust_domain,
            attestor: parts.attestor,
            entries: super::entries::Current::new(book.set()),
            mint,
            store: parts.store,
            settings: parts.settings,
            open_bundle: parts.open_bundle,
            crl,
            refusals: audit::RefusalLimiter::default(),
            begins: Mutex::new(HashMap::new()),
            attesting: super::context::UidSlots::default(),
            jitter: super::schedule::Jitter::default(),
        });
        Self {
            ctx,
            registry: Arc::new(Registry::default()),
            book: Arc::new(tokio::sync::Mutex::new(book)),
            bundle: bundle_rx,
            shutdown,
            tracker,
        }
    }

    /// Picks up where a previous run left off: instances whose process still
    /// runs get their identity and unexpired tasks back; the others end, and
    /// their SVIDs are revoked. Call at start-up.
    ///
    /// # Errors
    /// [`Error::Store`] when the store cannot be read.
    pub async fn restore(&self) -> Result<(), Error> {
        let live = self
            .ctx
            .store
            .read_async(|store| store.live_instances())
            .await?;
        for record in live {
            let (pid, start) = (record.pid, record.start_time);
            let same_boot = record.boot_id == self.ctx.attestor.boot_id();
            let reattested = self
                .ctx
                .attest_off_thread(record.uid, move |a| a.reattest(pid, start))
                .await?;
            let outcome = match reattested {
                Ok(a) if same_boot && a.instance_id.as_str() == record.instance_id => {
                    match self.ctx.matching(&a) {
                        Ok(entries) => self.restore_one(a, entries).await,
                        Err(e) => {
                            let why = e.to_string();
                            self.end_stored(&record.instance_id, EndReason::NoLongerMatches { why })
                                .await
                        }
                    }
                }
                // Not readable right now (e.g. out of file descriptors): leave
                // it; it is restored on its next request.
                Err(e @ attest::Error::ProcRead { .. }) if same_boot => Err(e.into()),
                _ => {
                    self.end_stored(&record.instance_id, EndReason::GoneAcrossRestart)
                        .await
                }
            };
            // One instance that cannot be restored must not keep the daemon
            // from serving everyone else; it gets a fresh start on request.
            if let Err(e) = outcome {
                tracing::warn!(instance = %record.instance_id, error = %e, "cannot restore an instance");
            }
        }
        Ok(())
    }

    async fn restore_one(&self, a: Attestation, entries: Vec<Arc<Entry>>) -> Result<(), Error> {
        if let Join::Start(starting) = self.registry.join(&a.instance_id) {
            let generation = self.ctx.entries.generation();
            let started = self.start(a, entries).await?;
            self.go_live(starting, started, generation);
        }
        Ok(())
    }

    async fn end_stored(&self, instance_id: &str, reason: EndReason) -> Result<(), Error> {
        self.ctx
            .end_stored_instance(instance_id, reason, Vec::new(), "daemon")
            .await
    }

    /// Attests the caller and returns its instance's state channel, creating
    /// the instance (and minting its SVIDs) on its first request. Every
    /// stream of one process gets the same channel, so the same SVIDs.
    ///
    /// # Errors
    /// [`Error::Attest`] or [`Error::NoMatchingEntry`] when the caller gets no
    /// identity; [`Error::Ca`], [`Error::Template`], [`Error::Store`] when
    /// issuing fails.
    #[tracing::instrument(skip_all, fields(pid = peer.pid, uid = peer.uid))]
    pub async fn subscribe(&self, peer: PeerCred) -> Result<watch::Receiver<InstanceState>, Error> {
        Ok(self.instance_for(peer).await?.state)
    }

    /// Attests the caller and checks that some entry admits it, without
    /// creating an instance or minting anything: what a caller needs to be
    /// sent the trust bundle (FetchX509Bundles). With
    /// `allow_unauthenticated_verifiers`, a caller that matches no entry is
    /// admitted too (the bundle and CRL are public; it still gets nothing
    /// else).
    ///
    /// # Errors
    /// As [`IdentityManager::subscribe`]'s refusals.
    pub async fn authorize(&self, peer: PeerCred) -> Result<(), Error> {
        let attestation = self.attest(peer).await?;
        let matched = self.ctx.matching(&attestation);
        if self.ctx.open_bundle && matches!(matched, Err(Error::NoMatchingEntry { .. })) {
            tracing::debug!(
                pid = peer.pid,
                "an unauthenticated verifier reads the bundle"
            );
            return Ok(());
        }
        matched.map(drop).inspect_err(|e| {
            self.ctx
                .audit_refusal(&peer, &e.to_string(), Some(&attestation));
        })
    }

    /// Runs `check`, one of `attest::socket`'s checks of `peer`'s
    /// connection made before a message with private keys is written, off
    /// the async workers and within `peer`'s uid's share of them; a refusal
    /// is audited like any other.
    ///
    /// # Errors
    /// [`Error::Attest`] with the check's reason.
    pub async fn check_connection<F>(&self, peer: PeerCred, check: F) -> Result<(), Error>
    where
        F: FnOnce() -> Result<(), attest::Error> + Send + 'static,
    {
        // Within the caller's uid's share: a program check stats the
        // program's file, which can hang on a FUSE mount.
        let checked = self
            .ctx
            .attest_off_thread(peer.uid, move |_| check())
            .await?;
        checked.map_err(|e| {
            self.ctx.audit_refusal(&peer, &e.to_string(), None);
            e.into()
        })
    }

    /// The trust bundle channel: the current bundle and CRL, and every change.
    pub fn bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.clone()
    }

    /// The trust domain's CA certificates (concatenated DER). They are fixed
    /// for the daemon's life: only the CRL beside them changes.
    pub fn anchors(&self) -> bytes::Bytes {
        self.bundle.borrow().x509_der.clone()
    }

    /// The instances currently live.
    pub fn instances(&self) -> Vec<InstanceSummary> {
        self.registry.list()
    }

    /// Starts a task for the calling process (the workload socket's Tasks
    /// service): the entry's `tasks.self_declare` must allow it.
    ///
    /// # Errors
    /// As [`IdentityManager::subscribe`], plus [`Error::Task`].
    pub async fn begin_own_task(&self, peer: PeerCred, req: BeginTask) -> Result<TaskInfo, Error> {
        let handle = self.instance_for(peer).await?;
        let actor = audit::peer_actor(&peer);
        instance::request(&handle.commands, |reply| Command::Begin {
            req,
            requester: Requester::Agent,
            actor,
            reply,
        })
        .await
    }

    /// Ends one of the calling process's tasks.
    ///
    /// # Errors
    /// [`Error::UnknownTask`] when the caller has no such live task.
    pub async fn end_own_task(&self, peer: PeerCred, task_id: String) -> Result<TaskInfo, Error> {
        let handle = self.instance_for(peer).await?;
        let actor = audit::peer_actor(&peer);
        instance::request(&handle.commands, |reply| Command::End {
            task_id,
            actor,
            reply,
        })
        .await
    }

    /// The calling process's live tasks.
    ///
    /// # Errors
    /// As [`IdentityManager::subscribe`].
    pub async fn list_own_tasks(&self, peer: PeerCred) -> Result<Vec<TaskInfo>, Error> {
        let handle = self.instance_for(peer).await?;
        instance::request(&handle.commands, |reply| Command::List { reply }).await
    }

    /// Starts a task for any live instance: the orchestrator path (admin API).
    ///
    /// # Errors
    /// [`Error::UnknownInstance`], [`Error::Task`], or issuing errors.
    pub async fn begin_task(
        &self,
        instance: &InstanceId,
        req: BeginTask,
        actor: String,
    ) -> Result<TaskInfo, Error> {
        let commands = self.commands_of(instance)?;
        instance::request(&commands, |reply| Command::Begin {
            req,
            requester: Requester::Operator,
            actor,
            reply,
        })
        .await
    }

    /// Ends a task of any live instance: the orchestrator path.
    ///
    /// # Errors
    /// [`Error::UnknownInstance`] or [`Error::UnknownTask`].
    pub async fn end_task(
        &self,
        instance: &InstanceId,
        task_id: String,
        actor: String,
    ) -> Result<TaskInfo, Error> {
        let commands = self.commands_of(instance)?;
        instance::request(&commands, |reply| Command::End {
            task_id,
            actor,
            reply,
        })
        .await
    }

    /// Revokes an instance: its tasks end, its SVIDs are revoked, and its
    /// streams end with PermissionDenied. The revocation sticks for the life
    /// of its process. An instance the store holds as live but no actor runs
    /// (one being started, or one not restorable at start-up) is revoked in
    /// the store; a start in progress then refuses it in the write that
    /// would record its SVIDs.
    ///
    /// # Errors
    /// [`Error::UnknownInstance`] when neither the daemon nor the store
    /// knows it as live; [`Error::Store`].
    pub async fn revoke_instance(&self, instance: &InstanceId, actor: String) -> Result<(), Error> {
        let id = instance.clone();
        self.detached(move |m| async move { m.revoke_instance_now(&id, actor).await })
            .await
    }

    async fn revoke_instance_now(&self, instance: &InstanceId, actor: String) -> Result<(), Error> {
        if let Ok(commands) = self.commands_of(instance) {
            let request = instance::request(&commands, |reply| Command::Revoke {
                actor: actor.clone(),
                reply,
            });
            match request.await {
                // Ended meanwhile: what the store says decides below.
                Err(Error::InstanceEnded) => {}
                done => return done,
            }
        }
        let id = instance.to_string();
        let live = self
            .ctx
            .store
            .read_async(move |store| store.instance(&id))
            .await?
            .is_some_and(|r| r.ended_at.is_none());
        if !live {
            return Err(Error::UnknownInstance(instance.to_string()));
        }
        let reason = EndReason::Revoked { by: actor.clone() };
        self.ctx
            .end_stored_instance(instance.as_str(), reason, Vec::new(), &actor)
            .await
    }

    /// Every live instance's current SVIDs, entries and tasks (operators'
    /// listings); instances that are ending are left out.
    pub fn live_sets(&self) -> Vec<Arc<super::IdentitySet>> {
        self.registry
            .live()
            .into_iter()
            .filter_map(|(_, h)| match &*h.state.borrow() {
                InstanceState::Active(set) => Some(set.clone()),
                InstanceState::Ended(_) => None,
            })
            .collect()
    }

    /// The live instance of process `pid`, if it has one.
    pub fn instance_of_pid(&self, pid: u32) -> Option<InstanceId> {
        self.live_sets()
            .into_iter()
            .find(|set| set.pid == pid)
            .map(|set| set.instance_id.clone())
    }

    /// Revokes every live instance that holds an SVID of entry `name`, as
    /// [`IdentityManager::revoke_instance`] does one. The entry stays: a
    /// process that starts later is admitted again.
    ///
    /// # Errors
    /// [`Error::UnknownEntry`]; the first revocation that failed.
    pub async fn revoke_entry(&self, name: &str, actor: &str) -> Result<Vec<InstanceId>, Error> {
        if self.book.lock().await.find(name).is_none() {
            return Err(Error::UnknownEntry(name.to_owned()));
        }
        let holders: Vec<InstanceId> = self
            .live_sets()
            .into_iter()
            .filter(|set| set.entries.iter().any(|e| e.name == name))
            .map(|set| set.instance_id.clone())
            .collect();
        let mut revoked = Vec::with_capacity(holders.len());
        for id in holders {
            match self.revoke_instance(&id, actor.to_owned()).await {
                Ok(()) => revoked.push(id),
                // It ended on its own meanwhile: nothing left to revoke.
                Err(Error::UnknownInstance(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(revoked)
    }

    /// Revokes one SVID: an instance SVID revokes its instance (it must not
    /// get another); a task SVID ends its task; one no longer served (a
    /// rotated-away SVID, or one of an instance no actor runs) goes on the
    /// CRL alone.
    ///
    /// # Errors
    /// [`Error::UnknownSvid`]; [`Error::SvidNotLive`] when it is already
    /// revoked or expired; revocation errors.
    pub async fn revoke_svid(
        &self,
        serial: &str,
        reason: &str,
        actor: &str,
    ) -> Result<SvidRevoked, Error> {
        let (serial, reason, actor) = (serial.to_owned(), reason.to_owned(), actor.to_owned());
        self.detached(move |m| async move { m.revoke_svid_now(&serial, &reason, &actor).await })
            .await
    }

    async fn revoke_svid_now(
        &self,
        serial: &str,
        reason: &str,
        actor: &str,
    ) -> Result<SvidRevoked, Error> {
        let key = serial.to_owned();
        let record = self
            .ctx
            .store
            .read_async(move |store| store.svid(&key))
            .await?
            .ok_or_else(|| Error::UnknownSvid(serial.to_owned()))?;
        if record.revoked_at.is_some() {
            return Err(Error::SvidNotLive {
                serial: record.serial,
                state: "revoked",
            });
        }
        if record.not_after <= std::time::SystemTime::now() {
            return Err(Error::SvidNotLive {
                serial: record.serial,
                state: "expired",
            });
        }
        let instance = InstanceId::parse(&record.instance_id);
        let live = instance.as_ref().and_then(|id| self.registry.get(id));
        if let (Some(id), Some(_)) = (&instance, &live) {
            match &record.task_id {
                None => {
                    self.revoke_instance_now(id, actor.to_owned()).await?;
                    return Ok(SvidRevoked::Instance(id.clone()));
                }
                Some(task) => match self.end_task(id, task.clone(), actor.to_owned()).await {
                    Ok(_) => {
                        return Ok(SvidRevoked::Task {
                            instance: id.clone(),
                            task: task.clone(),
                        });
                    }
                    // Not live any more: the serial alone, below.
                    Err(Error::UnknownTask(_) | Error::InstanceEnded) => {}
                    Err(e) => return Err(e),
                },
            }
        }
        let (serial_in, reason_in, actor_in) =
            (record.serial.clone(), reason.to_owned(), actor.to_owned());
        let (instance_id, task_id) = (record.instance_id.clone(), record.task_id.clone());
        let revoked = self
            .ctx
            .store
            .write_async(move |tx| {
                let now = std::time::SystemTime::now();
                if !tx.revoke_serial(&serial_in, now, &reason_in)? {
                    return Ok(false);
                }
                let ev = audit::events::revocation(
                    &instance_id,
                    task_id.as_deref(),
                    std::slice::from_ref(&serial_in),
                    &reason_in,
                    &actor_in,
                );
                tx.append_audit(&ev)?;
                Ok(true)
            })
            .await?;
        if !revoked {
            return Err(Error::SvidNotLive {
                serial: record.serial,
                state: "revoked",
            });
        }
        self.ctx.revoked(crate::metrics::RevokeReason::Revoked, 1);
        Ok(SvidRevoked::Serial(record.serial))
    }

    /// Runs `f` on a task of its own and waits for it: a caller that goes
    /// away mid-call (an admin client hanging up drops its handler) cannot
    /// cut a change in half. What is recorded is also put in force, and
    /// the CRL is asked for, whether or not anyone waits for the answer.
    pub(super) async fn detached<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(IdentityManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>> + Send + 'static,
    {
        self.tracker
            .spawn(f(self.clone()))
            .await
            .map_err(|_| Error::ShuttingDown)?
    }

    fn commands_of(&self, instance: &InstanceId) -> Result<mpsc::Sender<Command>, Error> {
        self.registry
            .get(instance)
            .map(|h| h.commands)
            .ok_or_else(|| Error::UnknownInstance(instance.to_string()))
    }

    /// Attests `peer` off the async workers; a refusal is audited.
    async fn attest(&self, peer: PeerCred) -> Result<Attestation, Error> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let attested = self
            .ctx
            .attest_off_thread(peer.uid, move |a| a.attest(&peer))
            .await?;
        attested.map_err(|e| {
            self.ctx.audit_refusal(&peer, &e.to_string(), None);
            e.into()
        })
    }

    /// Attests `peer` and returns its live instance, joining the start in
    /// progress or starting it.
    async fn instance_for(&self, peer: PeerCred) -> Result<Handle, Error> {
        let attestation = self.attest(peer).await?;
        let generation = self.ctx.entries.generation();
        // Match first, even for a live instance: a process that exec'd
        // another binary or changed uid is refused now, not at its next
        // rotation, and its instance is told to re-attest at once.
        let entries = match self.ctx.matching(&attestation) {
            Ok(entries) => entries,
            Err(e) => {
                if let Some(handle) = self.registry.get(&attestation.instance_id) {
                    let _ = handle.commands.try_send(Command::Recheck);
                }
                self.ctx
                    .audit_refusal(&peer, &e.to_string(), Some(&attestation));
                return Err(e);
            }
        };
        let refused = |reason: String| {
            self.ctx.audit_refusal(
                &peer,
                &format!("revoked instance: {reason}"),
                Some(&attestation),
            );
            Error::Revoked(reason)
        };
        loop {
            match self.registry.join(&attestation.instance_id) {
                Join::Live(handle) => {
                    let state = handle.state.borrow().clone();
                    return match state {
                        InstanceState::Active(_) => Ok(handle),
                        InstanceState::Ended(reason) if reason.is_sticky() => {
                            Err(refused(reason.to_string()))
                        }
                        InstanceState::Ended(_) => Err(Error::InstanceEnded),
                    };
                }
                Join::Wait(mut done) => {
                    // Woken when the start in progress succeeds or fails;
                    // then join again.
                    let _ = done.changed().await;
                }
                Join::Start(starting) => {
                    for earlier in self
                        .registry
                        .earlier_programs(attestation.facts.pid, &attestation.instance_id)
                    {
                        // The program this process ran before an exec: it
                        // re-attests now and ends (its SVIDs revoked).
                        let _ = earlier.try_send(Command::Recheck);
                    }
                    // Started on a task of its own: a caller that goes away
                    // mid-start (a client hanging up) must not leave SVIDs
                    // recorded for an instance that no actor watches.
                    let manager = self.clone();
                    let (a, e) = (attestation.clone(), entries.clone());
                    let start = self.tracker.spawn(async move {
                        let started = manager.start(a, e).await?;
                        Ok::<_, Error>(manager.go_live(starting, started, generation))
                    });
                    return match start.await.map_err(|_| Error::ShuttingDown)? {
                        Err(Error::Revoked(reason)) => Err(refused(reason)),
                        other => other,
                    };
                }
            }
        }
    }

    /// Makes a started instance live in the registry, then starts its actor
    /// (in that order: an actor that ends at once finds its slot to remove).
    /// `generation` is the entry set's when the instance was matched: if
    /// the entries changed since, it reconciles at once (see
    /// `entries::Current`).
    fn go_live(
        &self,
        starting: Starting,
        (handle, task): (Handle, InstanceTask),
        generation: u64,
    ) -> Handle {
        self.registry.complete(starting, handle.clone());
        self.tracker.spawn(task.run());
        if self.ctx.entries.generation() != generation {
            let _ = handle.commands.try_send(Command::Recheck);
        }
        handle
    }

    /// Mints and records a new instance's SVIDs and builds its actor. The
    /// caller holds the registry's right to start it.
    async fn start(
        &self,
        attestation: Attestation,
        entries: Vec<Arc<Entry>>,
    ) -> Result<(Handle, InstanceTask), Error> {
        let live = Live::start(&self.ctx, attestation, entries).await?;
        let (pid, start_time) = (
            live.attestation.facts.pid,
            live.attestation.facts.start_time,
        );
        let (state_tx, state_rx) = watch::channel(InstanceState::Active(live.identity_set()));
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let handle = Handle {
            state: state_rx,
            commands: commands_tx,
            pid,
            start_time,
        };
        let task = InstanceTask::new(
            self.ctx.clone(),
            self.registry.clone(),
            live,
            state_tx,
            commands_rx,
            self.shutdown.clone(),
        );
        Ok((handle, task))
    }
}
