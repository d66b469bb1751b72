//! `sigil gate` in front of a real MCP server, over real TCP on 127.0.0.1.
//! The server is the `mcp` Python SDK's MCPServer on streamable HTTP
//! (`tests/interop/mcp_server.py`); the agent is another python process
//! (`tests/interop/mcp_agent.py`) that fetches its own SVIDs from the daemon
//! with py-spiffe, begins and ends its task with Sigil's task extension, and
//! calls tools with the SDK's client, its task SVID as client certificate.
//! Checked: a permitted tool call reaches the server with the identity
//! headers; a forbidden tool gets 403 and never runs; an ID outside the
//! rules, an SVID of another trust domain and one from a CA the gate does
//! not trust are refused at the handshake; when the agent's task ends, its
//! open connection is closed within 1 s and a new handshake with that
//! certificate is refused; identity headers the client sends never reach
//! the server.
//!
//! The test creates its own virtualenv under Cargo's target tmp dir on the
//! first run, from `tests/interop/requirements-mcp.txt` (python3 and PyPI
//! needed; as root on Debian it also installs python3-venv if missing).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::TestDaemon;
use serde_json::{Value, json};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");
const SERVER_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/mcp_server.py");
const AGENT_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/mcp_agent.py");
const PROTO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
/// The pinned python packages; the virtualenv is rebuilt when they change.
const REQUIREMENTS: &str = include_str!("interop/requirements-mcp.txt");

/// Who may do what at the gate: only task SVIDs of the `mcp-agent` entry
/// reach the server, and of the tools only `echo_*`; any other tool is for
/// admins.
const RULES: &str = r#"
[[rule]]
mcp_method = "tools/call"
mcp_tool = "echo_*"
allow = ["spiffe://sigil.test/agent/mcp-agent/instance/*/task/*"]
[[rule]]
mcp_method = "tools/call"
allow = ["spiffe://sigil.test/agent/admin/**"]
[[rule]]
path = "/mcp"
allow = ["spiffe://sigil.test/agent/mcp-agent/instance/*/task/*"]
"#;

// --- The virtualenv ---------------------------------------------------------------------

/// The virtualenv's python, created once per machine (and per requirements).
fn venv_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| common::venv::python("mcp-venv", REQUIREMENTS))
}

// --- Child processes --------------------------------------------------------------------

/// A child process killed on drop, whose stdout lines arrive on a channel
/// (read off the runtime's threads) and whose stderr goes to a file.
struct Proc {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, stderr: PathBuf) -> Self {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name,
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        }
    }

    /// What it wrote on stderr so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next line it prints, within `limit`.
    async fn line(&mut self, limit: Duration) -> String {
        match tokio::time::timeout(limit, self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("{} ended; stderr:\n{}", self.name, self.stderr()),
            Err(_) => panic!(
                "{} printed nothing within {limit:?}; stderr:\n{}",
                self.name,
                self.stderr()
            ),
        }
    }

    /// Sends one JSON command and returns the JSON line that answers it.
    async fn ask(&mut self, command: Value) -> Value {
        use std::io::Write;
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let line = self.line(Duration::from_secs(60)).await;
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: {e}: {line}\n{}", self.name, self.stderr()));
        assert_ne!(
            answer["event"], "error",
            "{} failed on {command}:\n{}",
            self.name, answer["error"]
        );
        answer
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `listening on ADDR` a server prints first.
async fn listening(proc: &mut Proc) -> SocketAddr {
    let line = proc.line(Duration::from_secs(60)).await;
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}; stderr: {}", proc.stderr()))
        .parse()
        .unwrap()
}

/// The MCP server, recording what reaches it to `record`.
async fn mcp_server(work: &Path, record: &Path) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(venv_python());
    cmd.arg(SERVER_SCRIPT).arg(record);
    let mut proc = Proc::spawn("the MCP server", cmd, work.join("server.log"));
    let addr = listening(&mut proc).await;
    (proc, addr)
}

/// `sigil gate` with `rules`, its own SVID from `daemon`, in front of `upstream`.
async fn gate(
    daemon: &TestDaemon,
    upstream: SocketAddr,
    rules: &Path,
    log: PathBuf,
) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(SIGIL);
    cmd.args(["gate", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(format!("http://{upstream}"))
        .arg("--rules")
        .arg(rules)
        .arg("--socket")
        .arg(&daemon.socket);
    let mut proc = Proc::spawn("sigil gate", cmd, log);
    let addr = listening(&mut proc).await;
    (proc, addr)
}

/// The agent, with its SVIDs from `daemon`, calling tools through `gate`.
async fn agent(daemon: &TestDaemon, gate: SocketAddr, work: &Path) -> Proc {
    let mut cmd = Command::new(venv_python());
    cmd.arg(AGENT_SCRIPT)
        .args(["--socket", &daemon.endpoint()])
        .args(["--gate", &gate.to_string()])
        .args(["--proto-dir", PROTO_DIR])
        .args(["--gate-id-prefix", "spiffe://sigil.test/agent/gate/"])
        // Its keys go where this test's temporary directory removes them,
        // even though the agent is killed rather than left to clean up.
        .arg("--tmp")
        .arg(work);
    let mut proc = Proc::spawn("the agent", cmd, work.join("agent.log"));
    let ready = proc.line(Duration::from_secs(60)).await;
    assert!(ready.contains("\"ready\""), "{ready}; {}", proc.stderr());
    proc
}

/// Every JSON line of the server's record.
fn record_of(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The gate's log lines that refused a client SVID at the handshake.
fn refusals(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("client SVID refused"))
        .map(str::to_owned)
        .collect()
}

/// The daemon, the MCP server, the gate in front of it and the agent.
struct Scene {
    // Dropped in this order: the agent first, the daemon last.
    agent: Proc,
    _gate: Proc,
    _server: Proc,
    /// What reached the server (`mcp_server.py`'s record).
    record: PathBuf,
    /// The gate's log.
    log: PathBuf,
    daemon: TestDaemon,
    _work: tempfile::TempDir,
}

impl Scene {
    async fn start() -> Self {
        // Install (first run) off the runtime's threads.
        tokio::task::spawn_blocking(venv_python).await.unwrap();
        let sigil = std::fs::canonicalize(SIGIL).unwrap();
        let me = nix::unistd::geteuid();
        let daemon = TestDaemon::start_with(&format!(
            "trust_domain = \"sigil.test\"\n\
             [[entry]]\nname = \"gate\"\nselectors = [\"unix:path:{}\"]\n\
             [[entry]]\nname = \"mcp-agent\"\nselectors = [\"unix:uid:{me}\"]\n[entry.tasks]\nself_declare = true\n",
            sigil.display()
        ))
        .await;
        let work = tempfile::tempdir().unwrap();
        let record = work.path().join("record.jsonl");
        let (server, upstream) = mcp_server(work.path(), &record).await;
        let rules = work.path().join("rules.toml");
        std::fs::write(&rules, RULES).unwrap();
        let log = work.path().join("gate.log");
        let (gate, addr) = gate(&daemon, upstream, &rules, log.clone()).await;
        let agent = agent(&daemon, addr, work.path()).await;
        Self {
            agent,
            _gate: gate,
            _server: server,
            record,
            log,
            daemon,
            _work: work,
        }
    }

    /// Stops the daemon once the processes using it are gone.
    async fn stop(self) {
        let Self {
            agent,
            _gate,
            _server,
            daemon,
            ..
        } = self;
        drop((agent, _gate, _server));
        daemon.stop().await;
    }
}

// --- The tests --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_agent_calls_tools_through_the_gate_with_its_task_identity_until_the_task_ends() {
    let mut scene = Scene::start().await;
    let (agent, log, record) = (&mut scene.agent, scene.log.clone(), scene.record.clone());
    // Two other Sigils the agent also gets an SVID from: another trust
    // domain, and a stranger calling itself sigil.test with its own CA
    // (its ID is one the rules allow: only the chain can refuse it).
    let me = nix::unistd::geteuid();
    let other = TestDaemon::start_with(&format!(
        "trust_domain = \"other.test\"\n[[entry]]\nname = \"mcp-agent\"\nselectors = [\"unix:uid:{me}\"]\n"
    ))
    .await;
    let stranger = TestDaemon::start_with(&format!(
        "trust_domain = \"sigil.test\"\n[[entry]]\nname = \"admin\"\nselectors = [\"unix:uid:{me}\"]\n\
         spiffe_id = \"spiffe://{{trust_domain}}/agent/admin/instance/{{instance}}\"\n"
    ))
    .await;

    // The agent's own SVIDs, from the daemon that attested it.
    let svids = agent.ask(json!({"cmd": "fetch"})).await;
    let instance_id = svids["instance"].as_str().unwrap().to_owned();
    assert!(
        instance_id.starts_with("spiffe://sigil.test/agent/mcp-agent/instance/"),
        "{svids}"
    );
    let instance = instance_id.rsplit('/').next().unwrap().to_owned();

    // An ID outside the rules (the agent's instance SVID: only task SVIDs
    // may call tools) is refused at the handshake.
    let refused = agent
        .ask(json!({"cmd": "handshake", "as": "instance"}))
        .await;
    assert_eq!(refused["refused"], true, "{refused}");
    let logged = refusals(&log);
    assert!(
        logged
            .iter()
            .any(|l| l.contains(&format!("{instance_id} is not allowed"))),
        "the gate refused it for its ID: {logged:?}"
    );

    // An SVID of another trust domain, and one of a CA the gate does not
    // trust, are refused at the handshake.
    let foreign = agent
        .ask(json!({"cmd": "fetch_from", "socket": other.endpoint(), "as": "foreign"}))
        .await;
    let foreign_id = foreign["spiffe_id"].as_str().unwrap().to_owned();
    assert!(foreign_id.starts_with("spiffe://other.test/"), "{foreign}");
    let refused = agent
        .ask(json!({"cmd": "handshake", "as": "foreign"}))
        .await;
    assert_eq!(refused["refused"], true, "{refused}");
    let logged = refusals(&log);
    assert!(
        logged
            .iter()
            .any(|l| l.contains(&format!("{foreign_id} is not in trust domain sigil.test"))),
        "{logged:?}"
    );
    let strange = agent
        .ask(json!({"cmd": "fetch_from", "socket": stranger.endpoint(), "as": "stranger"}))
        .await;
    let strange_id = strange["spiffe_id"].as_str().unwrap().to_owned();
    assert!(
        strange_id.starts_with("spiffe://sigil.test/agent/admin/"),
        "{strange}"
    );
    let refused = agent
        .ask(json!({"cmd": "handshake", "as": "stranger"}))
        .await;
    assert_eq!(refused["refused"], true, "{refused}");
    let logged = refusals(&log);
    assert!(
        logged
            .iter()
            .any(|l| l.contains("does not verify against the trust bundle")),
        "{logged:?}"
    );

    // The agent begins its task; the task SVID is on its stream.
    let begun = agent
        .ask(json!({"cmd": "begin", "task": "job-1", "ttl": 300}))
        .await;
    let task_id = format!("{instance_id}/task/job-1");
    assert_eq!(begun["spiffe_id"], task_id.as_str(), "{begun}");
    assert_eq!(begun["task_spiffe_id"], task_id.as_str());
    let admitted = agent.ask(json!({"cmd": "handshake", "as": "task"})).await;
    assert_eq!(
        admitted["refused"], false,
        "the task SVID is admitted: {admitted}"
    );

    // A permitted tool call (the SDK's client, protocol version negotiated:
    // the Mcp-Method/Mcp-Name headers name the tool) reaches the server
    // with the caller's identity.
    let called = agent
        .ask(json!({"cmd": "call", "as": "task", "tool": "echo_identity", "mode": "auto"}))
        .await;
    assert_eq!(called["ok"], true, "{called}");
    let exchanges = called["exchanges"].as_array().unwrap();
    assert!(
        exchanges.iter().any(|e| e["rpc"] == "tools/call"
            && e["mcp_method_header"] == "tools/call"
            && e["status"] == 200),
        "{called}"
    );
    let gate_ids = called["gate_ids"].as_array().unwrap();
    assert!(
        !gate_ids.is_empty(),
        "the agent checked the gate's SPIFFE ID"
    );
    let seen: Value = serde_json::from_str(called["text"].as_str().unwrap()).unwrap();
    assert_eq!(seen["x-sigil-spiffe-id"], task_id.as_str(), "{seen}");
    assert_eq!(seen["x-sigil-instance"], instance.as_str());
    assert_eq!(seen["x-sigil-task"], "job-1");
    let xfcc = seen["x-forwarded-client-cert"].as_str().unwrap();
    assert!(
        xfcc.starts_with("By=spiffe://sigil.test/agent/gate/")
            && xfcc.contains(";Hash=")
            && xfcc.ends_with(&format!(";URI={task_id}")),
        "{xfcc}"
    );

    // A forbidden tool gets 403 from the gate, named by the headers (auto)
    // or only by the JSON-RPC body (legacy), and never runs; the legacy
    // client also claims to be an admin in the identity headers.
    let forged_admin = "spiffe://sigil.test/agent/admin/forged";
    let forged = json!({
        "x-sigil-spiffe-id": forged_admin,
        "x-sigil-instance": "forged",
        "x-sigil-task": "forged",
        "x-forwarded-client-cert": "By=spiffe://sigil.test/forged;URI=spiffe://sigil.test/forged",
    });
    for (mode, headers) in [("auto", json!({})), ("legacy", forged.clone())] {
        let called = agent
            .ask(json!({"cmd": "call", "as": "task", "tool": "delete_everything", "mode": mode, "headers": headers}))
            .await;
        assert_eq!(called["ok"], false, "{called}");
        let exchanges = called["exchanges"].as_array().unwrap();
        assert!(
            exchanges
                .iter()
                .any(|e| e["tool"] == "delete_everything" && e["status"] == 403),
            "{mode}: {called}"
        );
        assert!(
            exchanges
                .iter()
                .all(|e| e["tool"] != "delete_everything" || e["status"] == 403),
            "{mode}: {called}"
        );
    }
    let gate_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        gate_log
            .lines()
            .any(|l| l.contains("deny") && l.contains("delete_everything")),
        "{gate_log}"
    );

    // Identity headers the client sends never reach the server: on every
    // request of a whole legacy session (initialize, the GET stream, the
    // tool call, DELETE) the gate replaces them with the real ones.
    let called = agent
        .ask(json!({"cmd": "call", "as": "task", "tool": "echo_identity", "mode": "legacy", "headers": forged}))
        .await;
    assert_eq!(called["ok"], true, "{called}");
    let seen: Value = serde_json::from_str(called["text"].as_str().unwrap()).unwrap();
    assert_eq!(seen["x-sigil-spiffe-id"], task_id.as_str(), "{seen}");
    assert_eq!(seen["x-sigil-task"], "job-1");
    let methods: Vec<&str> = called["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["http"].as_str().unwrap())
        .collect();
    assert!(
        methods.contains(&"GET") && methods.contains(&"DELETE"),
        "a whole session: {methods:?}"
    );
    let recorded = record_of(&record);
    let requests: Vec<&Value> = recorded
        .iter()
        .filter(|r| r["headers"].is_array())
        .collect();
    // The task's handshake check and three SDK sessions so far.
    assert!(requests.len() >= 10, "{recorded:?}");
    for request in &requests {
        let headers = request["headers"].as_array().unwrap();
        let values = |name: &str| -> Vec<&str> {
            headers
                .iter()
                .filter(|h| h[0] == name)
                .map(|h| h[1].as_str().unwrap())
                .collect()
        };
        assert_eq!(values("x-sigil-spiffe-id"), [task_id.as_str()], "{request}");
        assert_eq!(values("x-sigil-task"), ["job-1"], "{request}");
        assert_eq!(values("x-sigil-instance"), [instance.as_str()], "{request}");
        assert!(
            !request.to_string().contains("forged"),
            "a forged header reached the server: {request}"
        );
        assert!(
            !request.to_string().contains("delete_everything"),
            "the forbidden call (named in Mcp-Name) reached the server: {request}"
        );
    }
    assert!(
        recorded
            .iter()
            .all(|r| r["tool_ran"] != "delete_everything"),
        "the forbidden tool never ran: {recorded:?}"
    );

    // The agent keeps an MCP session's connection open; when its task ends
    // the gate closes it within a second, and the task's SVID cannot
    // connect again.
    let opened = agent.ask(json!({"cmd": "open", "as": "task"})).await;
    assert_eq!(opened["status"], 200, "{opened}");
    assert_eq!(opened["seen"]["x-sigil-task"], "job-1", "{opened}");
    let open = agent
        .ask(json!({"cmd": "wait_closed", "timeout": 0.3}))
        .await;
    assert_eq!(open["event"], "still_open", "{open}");
    agent.ask(json!({"cmd": "end", "task": "job-1"})).await;
    let closed = agent.ask(json!({"cmd": "wait_closed", "timeout": 5})).await;
    assert_eq!(closed["event"], "closed", "{closed}");
    let after = closed["after_end_ms"].as_f64().unwrap();
    assert!(after < 1000.0, "closed {after} ms after End returned");
    let refused = agent.ask(json!({"cmd": "handshake", "as": "task"})).await;
    assert_eq!(refused["refused"], true, "{refused}");
    let gate_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        gate_log.contains("closed a connection whose certificate was revoked"),
        "{gate_log}"
    );
    let serial = begun["serial"].as_str().unwrap();
    assert!(
        refusals(&log)
            .iter()
            .any(|l| l.contains("revoked") && l.contains(serial.trim_start_matches('0'))),
        "{gate_log}"
    );

    scene.stop().await;
    other.stop().await;
    stranger.stop().await;
}

/// The SDK's server acts on the JSON-RPC body alone in a 2025-11-25
/// session, so the gate decides on the body too: a `tools/call` of the
/// forbidden tool whose `Mcp-Method`/`Mcp-Name` headers claim `tools/list`
/// or an allowed tool is refused, and the tool never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_tool_cannot_hide_behind_mcp_headers_naming_another_method_or_tool() {
    let mut scene = Scene::start().await;
    scene.agent.ask(json!({"cmd": "fetch"})).await;
    scene
        .agent
        .ask(json!({"cmd": "begin", "task": "job-1", "ttl": 300}))
        .await;
    // The same request without the headers: refused, as it should be.
    let plain = scene
        .agent
        .ask(json!({"cmd": "raw_call", "as": "task", "tool": "delete_everything"}))
        .await;
    assert_eq!(plain["status"], 403, "{plain}");
    for headers in [
        json!({"Mcp-Method": "tools/list"}),
        json!({"Mcp-Method": "tools/call", "Mcp-Name": "echo_identity"}),
    ] {
        let called = scene
            .agent
            .ask(json!({"cmd": "raw_call", "as": "task", "tool": "delete_everything", "headers": headers}))
            .await;
        let status = called["status"].as_u64().unwrap();
        assert!(
            (400..500).contains(&status),
            "with {headers}: the gate let the call through: {called}"
        );
    }
    assert!(
        record_of(&scene.record)
            .iter()
            .all(|r| r["tool_ran"] != "delete_everything"),
        "the forbidden tool ran"
    );
    scene.stop().await;
}
