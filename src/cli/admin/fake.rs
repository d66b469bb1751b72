//! A fake admin server on a temp socket, so the commands' whole path
//! (connect, request, paging, refusals, rendering) runs without a daemon.
//! The real daemon's integration tests live in `tests/`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::proto::sigil::admin::v1::admin_server::{Admin, AdminServer};
use crate::proto::sigil::admin::v1::{
    AuditEvent, GetInstanceRequest, Instance, ListAuditRequest, ListAuditResponse,
    ListInstancesRequest, ListInstancesResponse, RevokeEntryRequest, RevokeResponse,
};

/// What the fake serves, and the audit requests it saw.
#[derive(Default)]
struct Fake {
    events: Vec<AuditEvent>,
    page: usize,
    audit_requests: Arc<Mutex<Vec<ListAuditRequest>>>,
}

#[tonic::async_trait]
impl Admin for Fake {
    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let r = request.into_inner();
        let instances = ["root", "child"]
            .iter()
            .map(|id| Instance {
                instance_id: format!("{id}-{}-{}", r.entry, r.include_ended),
                parent_instance_id: if *id == "child" {
                    format!("root-{}-{}", r.entry, r.include_ended)
                } else {
                    String::new()
                },
                ..Instance::default()
            })
            .collect();
        Ok(Response::new(ListInstancesResponse { instances }))
    }

    async fn get_instance(
        &self,
        _: Request<GetInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        Err(Status::not_found("no instance abc: it may have ended"))
    }

    async fn revoke_entry(
        &self,
        _: Request<RevokeEntryRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        Err(Status::permission_denied(
            "uid 1000 may not use the admin API",
        ))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let r = request.into_inner();
        self.audit_requests
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .push(r.clone());
        let limit = if r.limit == 0 {
            self.page
        } else {
            r.limit as usize
        }
        .min(self.page);
        let matching: Vec<_> = self.events.iter().filter(|e| e.seq > r.after_seq).collect();
        Ok(Response::new(ListAuditResponse {
            truncated: matching.len() > limit,
            events: matching.into_iter().take(limit).cloned().collect(),
        }))
    }
}

/// A fake daemon serving on a temp socket until the test ends.
pub struct FakeDaemon {
    pub socket: PathBuf,
    audit_requests: Arc<Mutex<Vec<ListAuditRequest>>>,
    _dir: tempfile::TempDir,
}

impl FakeDaemon {
    /// Serves `events` in pages of `page`.
    pub fn start(events: usize, page: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let audit_requests = Arc::default();
        let fake = Fake {
            events: (1..=events as i64)
                .map(|seq| AuditEvent {
                    seq,
                    kind: "admin".into(),
                    ..AuditEvent::default()
                })
                .collect(),
            page,
            audit_requests: Arc::clone(&audit_requests),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AdminServer::new(fake))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        Self {
            socket,
            audit_requests,
            _dir: dir,
        }
    }

    /// The `after_seq` and `limit` of each ListAudit call so far.
    pub fn audit_pages(&self) -> Vec<(i64, u32)> {
        self.audit_requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.after_seq, r.limit))
            .collect()
    }

    /// Runs `sigil ARGS --admin-socket SOCKET`; the output, or the error
    /// as the terminal shows it.
    pub async fn run(&self, args: &[&str]) -> Result<(String, std::process::ExitCode), String> {
        use clap::Parser;
        let socket = self.socket.display().to_string();
        let mut argv = vec!["sigil"];
        argv.extend_from_slice(args);
        argv.extend(["--admin-socket", &socket]);
        let cli = crate::cli::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let crate::cli::Command::Admin(cmd) = cli.command else {
            return Err("not an admin command".into());
        };
        let mut out = Vec::new();
        match super::run(cmd, &mut out).await {
            Ok(code) => Ok((String::from_utf8(out).unwrap(), code)),
            Err(e) => Err(crate::cli::report(&e)),
        }
    }
}

mod tests {
    use std::process::ExitCode;

    use super::*;

    #[tokio::test]
    async fn audit_pages_with_after_seq_while_truncated() {
        let daemon = FakeDaemon::start(5, 2);
        let (out, code) = daemon.run(&["audit", "--json"]).await.unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let seqs: Vec<i64> = out
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(daemon.audit_pages(), [(0, 0), (2, 0), (4, 0)]);
    }

    #[tokio::test]
    async fn audit_limit_stops_after_that_many() {
        let daemon = FakeDaemon::start(5, 2);
        let (out, _) = daemon.run(&["audit", "--limit", "3"]).await.unwrap();
        assert_eq!(out.lines().count(), 3, "{out}");
        assert_eq!(daemon.audit_pages(), [(0, 3), (2, 1)]);
    }

    #[tokio::test]
    async fn instances_reach_the_daemon_and_render_as_a_tree() {
        let daemon = FakeDaemon::start(0, 1);
        let (out, _) = daemon
            .run(&["instances", "--entry", "e", "--all", "--tree"])
            .await
            .unwrap();
        let lines: Vec<_> = out.lines().collect();
        assert!(lines[0].starts_with("INSTANCE"), "{out}");
        assert!(lines[1].starts_with("root-e-true"), "{out}");
        assert!(lines[2].starts_with("└─ child-e-tru"), "{out}");
        let (json, _) = daemon.run(&["instances", "--json"]).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json[1]["parent_instance_id"], "root--false");
    }

    #[tokio::test]
    async fn refusals_print_the_daemons_message_once() {
        let daemon = FakeDaemon::start(0, 1);
        let e = daemon.run(&["instances", "show", "abc"]).await.unwrap_err();
        assert_eq!(e, "no instance abc: it may have ended");
        let e = daemon.run(&["revoke", "entry", "bot"]).await.unwrap_err();
        assert_eq!(e, "uid 1000 may not use the admin API");
        let e = daemon.run(&["status"]).await.unwrap_err();
        assert!(e.contains("does not serve this admin call"), "{e}");
    }
}
