//! `sigil.workload.v1.Tasks` on the workload socket: an attested agent
//! starts, ends and lists its own tasks. A thin adapter: the caller is
//! identified from the connection exactly as for the Workload API, and only
//! its own instance is ever touched.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use super::peer::PeerInfo;
use super::service::{log_refusal, status};
use crate::attest::PeerCred;
use crate::identity::{self, BeginTask, IdentityManager, TaskInfo};
use crate::proto::sigil::workload::v1 as pb;
use crate::proto::sigil::workload::v1::tasks_server::Tasks;

/// The task service, as served on the workload socket.
pub struct TaskService {
    identity: IdentityManager,
}

impl TaskService {
    /// Serves tasks through `identity`.
    pub fn new(identity: IdentityManager) -> Self {
        Self { identity }
    }
}

fn caller<T>(req: &Request<T>) -> Result<PeerCred, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(PeerInfo::peer_cred)
        .ok_or_else(|| {
            status(&identity::Error::Attest(
                crate::attest::Error::NoPeerCredentials,
            ))
        })
}

fn refused(e: identity::Error, peer: &PeerCred) -> Status {
    log_refusal(&e, peer.pid);
    status(&e)
}

#[tonic::async_trait]
impl Tasks for TaskService {
    async fn begin(
        &self,
        request: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let peer = caller(&request)?;
        let msg = request.into_inner();
        let ttl = match msg.ttl {
            None => None,
            Some(d) => Some(duration(&d)?),
        };
        let req = BeginTask {
            task_id: Some(msg.task_id).filter(|id| !id.is_empty()),
            ttl,
            attributes: msg.attributes.into_iter().collect::<BTreeMap<_, _>>(),
        };
        let info = self
            .identity
            .begin_own_task(peer, req)
            .await
            .map_err(|e| refused(e, &peer))?;
        Ok(Response::new(pb::BeginResponse {
            task: Some(task(&info)),
        }))
    }

    async fn end(
        &self,
        request: Request<pb::EndRequest>,
    ) -> Result<Response<pb::EndResponse>, Status> {
        let peer = caller(&request)?;
        let task_id = request.into_inner().task_id;
        let info = self
            .identity
            .end_own_task(peer, task_id)
            .await
            .map_err(|e| refused(e, &peer))?;
        Ok(Response::new(pb::EndResponse {
            task: Some(task(&info)),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let peer = caller(&request)?;
        let tasks = self
            .identity
            .list_own_tasks(peer)
            .await
            .map_err(|e| refused(e, &peer))?;
        Ok(Response::new(pb::ListResponse {
            tasks: tasks.iter().map(task).collect(),
        }))
    }
}

/// A protobuf Duration as a positive `std` one.
fn duration(d: &prost_types::Duration) -> Result<Duration, Status> {
    let secs = u64::try_from(d.seconds).ok();
    let nanos = u32::try_from(d.nanos).ok();
    match (secs, nanos) {
        (Some(s), Some(n)) if s > 0 || n > 0 => Ok(Duration::new(s, n)),
        _ => Err(Status::invalid_argument("ttl must be a positive duration")),
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

fn task(info: &TaskInfo) -> pb::Task {
    pb::Task {
        task_id: info.task_id.clone(),
        spiffe_id: info.spiffe_id.to_string(),
        started_at: Some(timestamp(info.started_at)),
        expires_at: Some(timestamp(info.expires_at)),
        attributes: info.attributes.clone().into_iter().collect(),
    }
}
