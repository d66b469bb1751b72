//! `sigil.workload.v1.Tasks` on the workload socket: an attested agent
//! starts, ends and lists its own tasks. A thin adapter: the caller is
//! identified from the connection exactly as for the Workload API, and only
//! its own instance is ever touched. Checks only what protobuf cannot say (a
//! well-formed Duration); the task rules live in `policy::task`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use super::status::{log_refusal, status};
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
    super::peer::caller(req)
        .map(|(peer, _)| peer)
        .map_err(|e| status(&e.into()))
}

/// The Tasks service's status for a refusal, mapped and logged as on the
/// Workload API (a Begin over the entry's rate is ResourceExhausted: slow
/// down, then retry).
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

/// Largest `seconds` of a valid protobuf Duration (10,000 years, as
/// google/protobuf/duration.proto says).
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
/// Largest `nanos` magnitude of a valid protobuf Duration.
const MAX_DURATION_NANOS: i32 = 999_999_999;

/// A protobuf Duration as a positive `std` one. An invalid Duration
/// (duration.proto: `nanos` within ±999,999,999, of the same sign as
/// `seconds`, `seconds` within ±10,000 years) is refused, not normalised:
/// a client that sends one has a bug it should hear about.
pub(crate) fn duration(d: &prost_types::Duration) -> Result<Duration, Status> {
    if !(-MAX_DURATION_NANOS..=MAX_DURATION_NANOS).contains(&d.nanos) {
        return Err(Status::invalid_argument(format!(
            "ttl: nanos {} is out of range: a protobuf Duration's nanos is between -{MAX_DURATION_NANOS} and {MAX_DURATION_NANOS}; carry whole seconds into seconds",
            d.nanos
        )));
    }
    if (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Err(Status::invalid_argument(format!(
            "ttl: seconds {} and nanos {} have different signs; a protobuf Duration's fields share one sign",
            d.seconds, d.nanos
        )));
    }
    if !(-MAX_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&d.seconds) {
        return Err(Status::invalid_argument(format!(
            "ttl: seconds {} is out of range: a protobuf Duration spans at most {MAX_DURATION_SECONDS} seconds",
            d.seconds
        )));
    }
    match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        (Ok(s), Ok(n)) if s > 0 || n > 0 => Ok(Duration::new(s, n)),
        _ => Err(Status::invalid_argument("ttl must be a positive duration")),
    }
}

/// A time as a protobuf Timestamp (before 1970 counts as 1970).
pub(crate) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pb(seconds: i64, nanos: i32) -> prost_types::Duration {
        prost_types::Duration { seconds, nanos }
    }

    #[test]
    fn a_valid_positive_duration_is_converted_exactly() {
        assert_eq!(duration(&pb(60, 0)).unwrap(), Duration::from_secs(60));
        assert_eq!(duration(&pb(0, 1)).unwrap(), Duration::from_nanos(1));
        assert_eq!(
            duration(&pb(1, 999_999_999)).unwrap(),
            Duration::new(1, 999_999_999)
        );
    }

    #[test]
    fn nanos_out_of_range_are_refused_not_carried() {
        for nanos in [1_000_000_000, i32::MAX, -1_000_000_000, i32::MIN] {
            let err = duration(&pb(1, nanos)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("nanos"), "{}", err.message());
        }
    }

    #[test]
    fn mixed_signs_and_huge_seconds_are_refused() {
        for (seconds, nanos) in [
            (5, -1),
            (-5, 1),
            (MAX_DURATION_SECONDS + 1, 0),
            (i64::MAX, 0),
        ] {
            let err = duration(&pb(seconds, nanos)).unwrap_err();
            assert_eq!(
                err.code(),
                tonic::Code::InvalidArgument,
                "{seconds} {nanos}"
            );
        }
    }

    #[test]
    fn zero_and_negative_durations_are_refused_as_not_positive() {
        for (seconds, nanos) in [(0, 0), (-1, 0), (0, -1), (-1, -5)] {
            let err = duration(&pb(seconds, nanos)).unwrap_err();
            assert!(err.message().contains("positive"), "{}", err.message());
        }
    }
}
