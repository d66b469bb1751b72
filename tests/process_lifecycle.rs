//! Processes that come and go: a process that exits loses its instance at
//! once, and one that execs another binary gets no rotated SVID.
//!
//! The agent here is a child process (python3, standard library only) that
//! connects to the workload socket itself, so SO_PEERCRED names the child,
//! and hands the connected socket to the test over SCM_RIGHTS. The test then
//! speaks gRPC on that socket while the daemon attests the child.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::io::{IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    TestDaemon, channel_over, client_over, config_for_me, crl_serials, eventually, serial_of,
    stream_end, tasks_client, with_header,
};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
use sigil::proto::sigil::workload::v1::tasks_client::TasksClient;
use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest, ListRequest};
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::proto::workload::{X509BundlesRequest, X509svidRequest};
use tokio_stream::StreamExt;

/// Connects to the daemon, hands the socket over, then on a line on stdin
/// either exits or execs /bin/sleep (same pid, same start time, other exe).
const AGENT: &str = r#"
import os, socket, sys
daemon, handoff, then = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(daemon)
h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
h.connect(handoff)
socket.send_fds(h, [b"x"], [s.fileno()])
sys.stdin.readline()
if then == "exec":
    os.execv("/bin/sleep", ["sleep", "30"])
"#;

struct Agent {
    child: Child,
}

impl Agent {
    /// Starts the agent and receives its connection to the daemon.
    fn start(daemon: &TestDaemon, then: &str) -> (Agent, tokio::net::UnixStream) {
        let handoff = daemon.dir.path().join(format!("handoff-{then}.sock"));
        let listener = UnixListener::bind(&handoff).unwrap();
        let child = Command::new("python3")
            .args(["-c", AGENT])
            .arg(&daemon.socket)
            .arg(&handoff)
            .arg(then)
            .stdin(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let (conn, _) = listener.accept().unwrap();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        recvmsg(
            &conn,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::empty(),
        )
        .unwrap();
        let fd = control
            .drain()
            .find_map(|msg| match msg {
                RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
                _ => None,
            })
            .expect("the agent sent its socket");
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true).unwrap();
        let stream = tokio::net::UnixStream::from_std(std_stream).unwrap();
        (Agent { child }, stream)
    }

    /// Lets the agent go on to exit or exec.
    fn proceed(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }
}

/// Waits until the child `pid` runs /bin/sleep (same pid, other binary).
async fn wait_for_exec(pid: u32) {
    let exec_done = eventually(Duration::from_secs(2), || {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|p| p.to_string_lossy().ends_with("/sleep"))
    })
    .await;
    assert!(exec_done, "the child exec'd sleep");
}

/// The real path of the python3 binary (pyenv and Debian use symlinks and shims).
fn python_exe() -> String {
    let out = Command::new("python3")
        .args(["-c", "import os; print(os.readlink('/proc/self/exe'))"])
        .output()
        .expect("python3 runs");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_exits_is_gone_from_the_daemon_within_a_second() {
    let daemon = TestDaemon::start().await;
    let (mut agent, connection) = Agent::start(&daemon, "exit");
    let pid = agent.child.id();
    let mut client = client_over(connection).await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let instances = daemon.identity().instances();
    assert!(
        instances.iter().any(|i| i.pid == pid),
        "the child is an instance"
    );

    agent.proceed();
    agent.child.wait().unwrap();
    let exited = std::time::Instant::now();
    let gone = eventually(Duration::from_secs(1), || {
        daemon.identity().instances().iter().all(|i| i.pid != pid)
    })
    .await;
    assert!(
        gone,
        "instance still there {:?} after exit",
        exited.elapsed()
    );
    // Its stream ends too (after any CRL-only update still in flight).
    let end = tokio::time::timeout(Duration::from_secs(1), stream_end(&mut stream)).await;
    assert!(matches!(end, Ok(None)), "stream ended: {end:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_execs_another_binary_gets_no_rotated_svid() {
    let config = format!(
        "trust_domain = \"sigil.test\"\n[svid]\ninstance_ttl = \"3s\"\n[[entry]]\nname = \"py\"\nselectors = [\"unix:path:{}\"]\n",
        python_exe()
    );
    let daemon = TestDaemon::start_with(&config).await;
    let (mut agent, connection) = Agent::start(&daemon, "exec");
    let pid = agent.child.id();
    let mut client = client_over(connection).await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(
        first.svids[0]
            .spiffe_id
            .starts_with("spiffe://sigil.test/agent/py/instance/")
    );

    agent.proceed(); // the child becomes /bin/sleep, same pid
    wait_for_exec(pid).await;

    // At the rotation (half of 3s) the daemon re-attests: no new SVID, and
    // the stream ends with PermissionDenied.
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the daemon acted at rotation time")
        .expect("an item, not a silent end");
    let status = next.expect_err("no rotated SVID");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("no identity issued"),
        "{}",
        status.message()
    );
    assert!(daemon.identity().instances().iter().all(|i| i.pid != pid));
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    daemon.stop().await;
}

fn begin(task_id: &str) -> tonic::Request<BeginRequest> {
    with_header(BeginRequest {
        task_id: task_id.into(),
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        attributes: Default::default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_exit_ends_its_tasks_and_another_agent_cannot_end_them() {
    let daemon = TestDaemon::start_with(&format!(
        "{}[entry.tasks]\nself_declare = true\n",
        config_for_me("")
    ))
    .await;
    // The child agent, on its own connection, starts a task.
    let (mut agent, connection) = Agent::start(&daemon, "exit");
    let child_channel = channel_over(connection).await;
    let mut child_tasks = TasksClient::new(child_channel.clone());
    let mut child_stream = SpiffeWorkloadApiClient::new(child_channel)
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    child_stream.next().await.unwrap().unwrap();
    child_tasks.begin(begin("child-job")).await.unwrap();
    let with_task = loop {
        let msg = child_stream.next().await.unwrap().unwrap();
        if msg.svids.len() == 2 {
            break msg;
        }
    };
    let child_serials: Vec<String> = with_task
        .svids
        .iter()
        .map(|s| serial_of(&s.x509_svid))
        .collect();

    // This process (another instance) cannot see or end the child's task.
    let mut mine = tasks_client(&daemon.socket).await;
    let status = mine
        .end(with_header(EndRequest {
            task_id: "child-job".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(
        mine.list(with_header(ListRequest {}))
            .await
            .unwrap()
            .into_inner()
            .tasks
            .is_empty()
    );
    // ... and the child's task is still there.
    let listed = child_tasks
        .list(with_header(ListRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 1);

    // The child exits: its task ends and every SVID it held is revoked.
    let mut bundles = common::raw_client(&daemon.socket)
        .await
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    agent.proceed();
    agent.child.wait().unwrap();
    let revoked = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let msg = bundles.next().await.unwrap().unwrap();
            let listed = msg.crl.first().map(|c| crl_serials(c)).unwrap_or_default();
            if child_serials.iter().all(|s| listed.contains(s)) {
                return listed;
            }
        }
    })
    .await
    .expect("the child's SVIDs are on the CRL soon after it exits");
    assert!(revoked.len() >= 2);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_exec_the_next_request_is_refused_and_the_instance_ends_at_once() {
    // A long TTL: no rotation comes to the rescue, the request itself must.
    let config = format!(
        "trust_domain = \"sigil.test\"\n[svid]\ninstance_ttl = \"1h\"\n[[entry]]\nname = \"py\"\nselectors = [\"unix:path:{}\"]\n[entry.tasks]\nself_declare = true\n",
        python_exe()
    );
    let daemon = TestDaemon::start_with(&config).await;
    let (mut agent, connection) = Agent::start(&daemon, "exec");
    let pid = agent.child.id();
    let channel = channel_over(connection).await;
    let mut client = SpiffeWorkloadApiClient::new(channel.clone());
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();

    agent.proceed();
    wait_for_exec(pid).await;

    // A task request on the same connection is refused: the caller is
    // attested afresh and no longer matches.
    let refused = TasksClient::new(channel)
        .begin(begin("after-exec"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // ...and the open stream ends with PermissionDenied, long before rotation.
    let end = tokio::time::timeout(Duration::from_secs(2), stream_end(&mut stream))
        .await
        .expect("the stream ended within two seconds");
    let status = end.expect("an error, not a silent end").unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(daemon.identity().instances().iter().all(|i| i.pid != pid));
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    daemon.stop().await;
}
