//! `sigil.admin.v1.Admin`: a thin adapter. Each call admits its caller
//! (`admit`: peer credentials, then one audit row), converts the request,
//! calls `identity` or `store`, and converts the answer; errors map to
//! status in [`status`], the one place.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::convert::{self, timestamp};
use super::{AdminContext, Caller};
use crate::identity::{self, BeginTask, IdentitySet, SvidRevoked};
use crate::ids::InstanceId;
use crate::proto::sigil::admin::v1 as pb;
use crate::proto::sigil::admin::v1::admin_server::Admin;
use crate::store::{self, AuditKind, AuditQuery};

/// Events per ListAudit answer when the caller sets no limit.
const DEFAULT_AUDIT_LIMIT: u32 = 1000;
/// Most events one ListAudit answers.
const MAX_AUDIT_LIMIT: u32 = 10_000;
/// Most ended instances a listing includes.
const MAX_ENDED_LISTED: usize = 1000;
/// How often a WatchAudit follower looks for new events.
const AUDIT_POLL: Duration = Duration::from_millis(200);
/// Events a follower may have unsent before it waits for the caller.
const AUDIT_FOLLOW_QUEUE: usize = 256;
/// How far up the process tree a parent instance is looked for.
const MAX_ANCESTORS: usize = 64;

pub(super) struct AdminService {
    ctx: AdminContext,
    /// A refused caller is audited at most once a minute per pid: one that
    /// reaches the socket (a mode changed by hand) cannot fill the log.
    refusals: identity::RefusalLimiter,
}

impl AdminService {
    pub(super) fn new(ctx: AdminContext) -> Self {
        Self {
            ctx,
            refusals: identity::RefusalLimiter::default(),
        }
    }

    /// Admits the caller or refuses it; either way one audit row records
    /// who called what. The row of an admitted call is written before the
    /// call runs.
    async fn admit<T>(&self, req: &Request<T>, method: &'static str) -> Result<Caller, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let Some(cred) = cred else {
            return Err(Status::permission_denied(
                "the caller's credentials are unknown; the admin API admits only callers it can identify",
            ));
        };
        let caller = Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        };
        // Supplementary groups come from /proc, read only when the group
        // decides, and only believed while that pid still runs as the
        // caller's uid (a pid reused by another user's process is not).
        let admitted = self.ctx.access.admit(&caller, |pid| {
            crate::attest::process::groups(pid)
                .ok()
                .filter(|g| g.uid == caller.uid)
                .map(|g| g.groups)
        });
        #[derive(serde::Serialize)]
        struct CallDetail<'a> {
            call: &'a str,
            admitted: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            refused: Option<&'a str>,
        }
        let detail = CallDetail {
            call: method,
            admitted: admitted.is_ok(),
            refused: admitted.as_ref().err().map(String::as_str),
        };
        let ev = identity::admin_event(&caller.to_string(), &detail);
        let written = if admitted.is_ok() || self.refusals.should_audit(caller.pid) {
            self.ctx
                .store
                .write_async(move |tx| tx.append_audit(&ev).map(drop))
                .await
        } else {
            Ok(())
        };
        match admitted {
            Err(why) => {
                tracing::warn!(
                    uid = caller.uid,
                    pid = caller.pid,
                    call = method,
                    "admin call refused"
                );
                Err(Status::permission_denied(why))
            }
            Ok(()) => {
                // An admin action that cannot be audited does not happen.
                written.map_err(|e| store_status(&e))?;
                tracing::debug!(
                    uid = caller.uid,
                    pid = caller.pid,
                    call = method,
                    "admin call"
                );
                Ok(caller)
            }
        }
    }

    async fn read<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&store::Store) -> Result<T, store::Error> + Send + 'static,
    {
        self.ctx
            .store
            .read_async(f)
            .await
            .map_err(|e| store_status(&e))
    }

    fn instance_id(text: &str) -> Result<InstanceId, Status> {
        InstanceId::parse(text).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{text:?} is not an instance id; `sigil instances` lists them"
            ))
        })
    }

    fn instance_of_pid(&self, pid: u32) -> Result<InstanceId, Status> {
        self.ctx.identity.instance_of_pid(pid).ok_or_else(|| {
            Status::not_found(format!(
                "process {pid} has no live instance: it has not asked for an identity, or it exited"
            ))
        })
    }

    /// The instances of the store, joined with the live ones' current
    /// SVIDs, entries and tasks and their parents.
    async fn instances(&self, include_ended: bool) -> Result<Vec<pb::Instance>, Status> {
        let (records, tasks) = self
            .read(move |s| {
                Ok((
                    s.instances(include_ended, MAX_ENDED_LISTED)?,
                    s.all_live_tasks()?,
                ))
            })
            .await?;
        let live: HashMap<String, Arc<IdentitySet>> = self
            .ctx
            .identity
            .live_sets()
            .into_iter()
            .map(|set| (set.instance_id.to_string(), set))
            .collect();
        let mut tasks_of: HashMap<String, Vec<pb::Task>> = HashMap::new();
        for t in tasks {
            tasks_of
                .entry(t.instance_id.clone())
                .or_default()
                .push(convert::task_record(&t));
        }
        let parents = tokio::task::spawn_blocking({
            let live: Vec<(u32, u64, String)> = records
                .iter()
                .filter(|r| r.ended_at.is_none())
                .map(|r| (r.pid, r.start_time, r.instance_id.clone()))
                .collect();
            move || parents(&live)
        })
        .await
        .unwrap_or_default();
        Ok(records
            .iter()
            .map(|r| {
                let mut inst = convert::instance(r, live.get(&r.instance_id).map(|s| &**s));
                inst.tasks = tasks_of.remove(&r.instance_id).unwrap_or_default();
                inst.parent_instance_id = parents.get(&r.instance_id).cloned().unwrap_or_default();
                inst
            })
            .collect())
    }

    fn revoke_reason(caller: &Caller, reason: &str) -> String {
        if reason.trim().is_empty() {
            caller.to_string()
        } else {
            format!("{caller}: {}", reason.trim())
        }
    }

    fn serials_of(&self, id: &InstanceId) -> Vec<String> {
        self.ctx
            .identity
            .live_sets()
            .into_iter()
            .find(|s| &s.instance_id == id)
            .map(|s| s.svids.iter().map(|v| v.serial.clone()).collect())
            .unwrap_or_default()
    }
}

/// For each live instance (pid, start time, id), the nearest ancestor
/// process that is itself one of them.
fn parents(live: &[(u32, u64, String)]) -> HashMap<String, String> {
    let by_process: HashMap<(u32, u64), &str> = live
        .iter()
        .map(|(pid, start, id)| ((*pid, *start), id.as_str()))
        .collect();
    let mut out = HashMap::new();
    for (pid, _, id) in live {
        let found = crate::attest::process::ancestors(*pid, MAX_ANCESTORS)
            .into_iter()
            .find_map(|p| by_process.get(&p).copied());
        if let Some(parent) = found {
            out.insert(id.clone(), parent.to_owned());
        }
    }
    out
}

/// The one mapping from identity errors to gRPC status on the admin
/// socket.
fn status(e: &identity::Error) -> Status {
    use identity::Error as E;
    let text = e.to_string();
    match e {
        E::UnknownTask(_) | E::UnknownInstance(_) | E::UnknownEntry(_) | E::UnknownSvid(_) => {
            Status::not_found(text)
        }
        E::EntryExists(_) => Status::already_exists(text),
        E::ConfigEntry(_) | E::SvidNotLive { .. } | E::InstanceEnded | E::Revoked(_) => {
            Status::failed_precondition(text)
        }
        E::Task(refusal) if refusal.is_rate_limited() => Status::resource_exhausted(text),
        E::Task(refusal) if refusal.is_invalid_request() => Status::invalid_argument(text),
        E::Task(_) => Status::failed_precondition(text),
        E::ShuttingDown => Status::unavailable(text),
        E::Attest(_) | E::NoMatchingEntry { .. } => Status::failed_precondition(text),
        E::Store(e) => store_status(e),
        E::Template { .. } | E::Ca(_) => Status::internal(text),
    }
}

fn store_status(e: &store::Error) -> Status {
    match e {
        store::Error::UnknownAuditKind { .. } => Status::invalid_argument(e.to_string()),
        store::Error::StoreFull { .. } | store::Error::WriterStopped => {
            Status::unavailable(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        self.admit(&request, "ListInstances").await?;
        let msg = request.into_inner();
        let mut instances = self.instances(msg.include_ended).await?;
        instances.retain(|i| {
            (msg.entry.is_empty() || i.entries.contains(&msg.entry))
                && msg.uid.is_none_or(|uid| i.uid == uid)
        });
        Ok(Response::new(pb::ListInstancesResponse { instances }))
    }

    async fn get_instance(
        &self,
        request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        self.admit(&request, "GetInstance").await?;
        use pb::get_instance_request::Selector;
        let id = match request.into_inner().selector {
            Some(Selector::InstanceId(id)) => Self::instance_id(&id)?,
            Some(Selector::Pid(pid)) => self.instance_of_pid(pid)?,
            None => return Err(Status::invalid_argument("give an instance id or a pid")),
        };
        let key = id.to_string();
        let (record, svids) = self
            .read(move |s| Ok((s.instance(&key)?, s.svids_of(&key)?)))
            .await?;
        let Some(record) = record else {
            return Err(Status::not_found(format!("no instance {id}")));
        };
        // A live one with its current SVIDs, tasks and parent (found among
        // the live ones); an ended one as the store keeps it, however old.
        let live = match record.ended_at {
            None => self
                .instances(false)
                .await?
                .into_iter()
                .find(|i| i.instance_id == id.as_str()),
            Some(_) => None,
        };
        let mut inst = live.unwrap_or_else(|| convert::instance(&record, None));
        // Every SVID it was ever issued (newest last), not only the current.
        inst.svids = svids.iter().map(convert::svid_record).collect();
        Ok(Response::new(inst))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.admit(&request, "ListTasks").await?;
        let instance = request.into_inner().instance_id;
        let tasks = self.read(|s| s.all_live_tasks()).await?;
        let tasks = tasks
            .iter()
            .filter(|t| instance.is_empty() || t.instance_id == instance)
            .map(convert::task_record)
            .collect();
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn begin_task(
        &self,
        request: Request<pb::BeginTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let caller = self.admit(&request, "BeginTask").await?;
        let msg = request.into_inner();
        use pb::begin_task_request::Instance;
        let id = match msg.instance {
            Some(Instance::InstanceId(id)) => Self::instance_id(&id)?,
            Some(Instance::Pid(pid)) => self.instance_of_pid(pid)?,
            None => return Err(Status::invalid_argument("give an instance id or a pid")),
        };
        let ttl = msg
            .ttl
            .as_ref()
            .map(crate::workload_api::task::duration)
            .transpose()?;
        let req = BeginTask {
            task_id: Some(msg.task_id).filter(|t| !t.is_empty()),
            ttl,
            attributes: msg.attributes.into_iter().collect::<BTreeMap<_, _>>(),
        };
        let actor = caller.to_string();
        let info = self
            .ctx
            .identity
            .begin_task(&id, req, actor.clone())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(convert::task_info(&id, &info, &actor)))
    }

    async fn end_task(
        &self,
        request: Request<pb::EndTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let caller = self.admit(&request, "EndTask").await?;
        let msg = request.into_inner();
        let id = Self::instance_id(&msg.instance_id)?;
        let info = self
            .ctx
            .identity
            .end_task(&id, msg.task_id, caller.to_string())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(convert::task_info(&id, &info, "")))
    }

    async fn revoke_instance(
        &self,
        request: Request<pb::RevokeInstanceRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let caller = self.admit(&request, "RevokeInstance").await?;
        let msg = request.into_inner();
        use pb::revoke_instance_request::Instance;
        let id = match msg.instance {
            Some(Instance::InstanceId(id)) => Self::instance_id(&id)?,
            Some(Instance::Pid(pid)) => self.instance_of_pid(pid)?,
            None => return Err(Status::invalid_argument("give an instance id or a pid")),
        };
        let serials = self.serials_of(&id);
        self.ctx
            .identity
            .revoke_instance(&id, Self::revoke_reason(&caller, &msg.reason))
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::RevokeResponse {
            instance_ids: vec![id.to_string()],
            task_ids: Vec::new(),
            serials,
        }))
    }

    async fn revoke_svid(
        &self,
        request: Request<pb::RevokeSvidRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let caller = self.admit(&request, "RevokeSvid").await?;
        let msg = request.into_inner();
        let serial = msg.serial.trim().to_ascii_lowercase();
        let actor = Self::revoke_reason(&caller, &msg.reason);
        let reason = if msg.reason.trim().is_empty() {
            format!("revoked by {caller}")
        } else {
            format!("revoked by {caller}: {}", msg.reason.trim())
        };
        let outcome = self
            .ctx
            .identity
            .revoke_svid(&serial, &reason, &actor)
            .await
            .map_err(|e| status(&e))?;
        let mut out = pb::RevokeResponse::default();
        match outcome {
            SvidRevoked::Instance(id) => out.instance_ids.push(id.to_string()),
            SvidRevoked::Task { instance, task } => {
                out.instance_ids.push(instance.to_string());
                out.task_ids.push(task);
            }
            SvidRevoked::Serial(_) => {}
        }
        out.serials.push(serial);
        Ok(Response::new(out))
    }

    async fn revoke_entry(
        &self,
        request: Request<pb::RevokeEntryRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let caller = self.admit(&request, "RevokeEntry").await?;
        let msg = request.into_inner();
        let before: HashMap<InstanceId, Vec<String>> = self
            .ctx
            .identity
            .live_sets()
            .into_iter()
            .map(|s| {
                (
                    s.instance_id.clone(),
                    s.svids.iter().map(|v| v.serial.clone()).collect(),
                )
            })
            .collect();
        let revoked = self
            .ctx
            .identity
            .revoke_entry(&msg.name, &Self::revoke_reason(&caller, &msg.reason))
            .await
            .map_err(|e| status(&e))?;
        let serials = revoked
            .iter()
            .flat_map(|id| before.get(id).cloned().unwrap_or_default())
            .collect();
        Ok(Response::new(pb::RevokeResponse {
            instance_ids: revoked.iter().map(ToString::to_string).collect(),
            task_ids: Vec::new(),
            serials,
        }))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.admit(&request, "ListEntries").await?;
        let live = self.ctx.identity.live_sets();
        let entries = self
            .ctx
            .identity
            .entry_defs()
            .await
            .iter()
            .map(|d| convert::entry(d, &live))
            .collect();
        Ok(Response::new(pb::ListEntriesResponse { entries }))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        self.admit(&request, "GetEntry").await?;
        let name = request.into_inner().name;
        let def = self
            .ctx
            .identity
            .entry_def(&name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(convert::entry(
            &def,
            &self.ctx.identity.live_sets(),
        )))
    }

    async fn create_entry(
        &self,
        request: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let caller = self.admit(&request, "CreateEntry").await?;
        let Some(msg) = request.into_inner().entry else {
            return Err(Status::invalid_argument("give the entry to create"));
        };
        let spec = convert::entry_spec(&msg)?;
        let entry = crate::config::validate_entry(&spec, &self.ctx.config.trust_domain)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let spec_json = serde_json::to_string(&spec)
            .map_err(|e| Status::internal(format!("cannot encode the entry: {e}")))?;
        let (def, _) = self
            .ctx
            .identity
            .create_entry(entry, spec_json, &caller.to_string())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(convert::entry(
            &def,
            &self.ctx.identity.live_sets(),
        )))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let caller = self.admit(&request, "DeleteEntry").await?;
        let name = request.into_inner().name;
        let reconciled = self
            .ctx
            .identity
            .delete_entry(&name, &caller.to_string())
            .await
            .map_err(|e| status(&e))?;
        let mut revoked = pb::RevokeResponse::default();
        for r in reconciled {
            if let identity::Reconciled::Reissued { revoked: s }
            | identity::Reconciled::Ended { revoked: s } = r.outcome
            {
                revoked.instance_ids.push(r.instance_id.to_string());
                revoked.serials.extend(s);
            }
        }
        Ok(Response::new(pb::DeleteEntryResponse {
            revoked: Some(revoked),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.admit(&request, "ListAudit").await?;
        let msg = request.into_inner();
        let limit = match msg.limit {
            0 => DEFAULT_AUDIT_LIMIT,
            n => n.min(MAX_AUDIT_LIMIT),
        } as usize;
        let mut query = audit_query(&msg)?;
        query.limit = Some(limit + 1);
        let mut events = self.read(move |s| s.audit(&query)).await?;
        let truncated = events.len() > limit;
        events.truncate(limit);
        Ok(Response::new(pb::ListAuditResponse {
            events: events.iter().map(convert::audit_event).collect(),
            truncated,
        }))
    }

    async fn watch_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<BoxStream<pb::AuditEvent>>, Status> {
        self.admit(&request, "WatchAudit").await?;
        let msg = request.into_inner();
        let mut query = audit_query(&msg)?;
        let (tx, rx) = mpsc::channel(AUDIT_FOLLOW_QUEUE);
        let store = self.ctx.store.clone();
        let shutdown = self.ctx.shutdown.clone();
        tokio::spawn(async move {
            loop {
                query.limit = Some(AUDIT_FOLLOW_QUEUE);
                let q = query.clone();
                let events = match store.read_async(move |s| s.audit(&q)).await {
                    Ok(events) => events,
                    Err(e) => {
                        let _ = tx.send(Err(store_status(&e))).await;
                        return;
                    }
                };
                let full = events.len() >= AUDIT_FOLLOW_QUEUE;
                for ev in &events {
                    query.after_seq = Some(ev.seq);
                    // A reader that stops reading (a stalled log shipper)
                    // must not hold up shutdown.
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        sent = tx.send(Ok(convert::audit_event(ev))) => {
                            if sent.is_err() {
                                return; // the caller hung up
                            }
                        }
                    }
                }
                if full {
                    continue; // more are waiting
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    () = tokio::time::sleep(AUDIT_POLL) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        self.admit(&request, "VerifyAudit").await?;
        let verdict = self.read(|s| s.verify_audit()).await?;
        let (first_bad_seq, problem) = verdict
            .first_bad
            .map(|b| (b.seq, b.problem))
            .unwrap_or_default();
        Ok(Response::new(pb::VerifyAuditResponse {
            rows: verdict.rows,
            intact: first_bad_seq == 0 && problem.is_empty(),
            first_bad_seq,
            problem,
            head: verdict.head.unwrap_or_default(),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.admit(&request, "Status").await?;
        let stats = self.read(|s| s.stats()).await?;
        let bundle = self.ctx.identity.bundle().borrow().clone();
        let config = &self.ctx.config;
        let entries = self.ctx.identity.entry_defs().await.len();
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Some(timestamp(self.ctx.started_at)),
            trust_domain: config.trust_domain.to_string(),
            ca_not_after: Some(timestamp(self.ctx.ca.not_after())),
            live_instances: stats.live_instances,
            live_tasks: stats.live_tasks,
            live_svids: stats.live_svids,
            crl_number: stats.crl_number,
            crl_entries: stats.revoked_unexpired,
            crl_bytes: bundle.crls.iter().map(|c| c.len() as u64).sum(),
            last_rotation: stats.last_rotation.map(timestamp),
            store_bytes: stats.file_bytes,
            workload_socket: config.workload_socket.display().to_string(),
            admin_socket: config.admin.socket.display().to_string(),
            config_source: config.source.clone(),
            entries: entries as u64,
        }))
    }
}

/// The store query for an audit request.
fn audit_query(msg: &pb::ListAuditRequest) -> Result<AuditQuery, Status> {
    let kind = if msg.kind.is_empty() {
        None
    } else {
        Some(
            msg.kind
                .parse::<AuditKind>()
                .map_err(|e| store_status(&e))?,
        )
    };
    let since = msg.since.as_ref().map(convert::system_time);
    Ok(AuditQuery {
        instance_id: Some(msg.instance_id.clone()).filter(|s| !s.is_empty()),
        task_id: Some(msg.task_id.clone()).filter(|s| !s.is_empty()),
        kind,
        since,
        after_seq: (msg.after_seq > 0).then_some(msg.after_seq),
        limit: None,
    })
}
