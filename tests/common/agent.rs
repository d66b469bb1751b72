//! An agent child process for tests that need the daemon to attest
//! *another* process: this test binary run again in agent mode (the ignored
//! test [`AGENT_TEST`], which calls [`child_main`]) with [`AGENT_ENV`]
//! naming the socket. It reads one command a line on stdin (`fetch`,
//! `begin <task> <ttl secs>`, `end <task>`, `list`, `exec <program>
//! <args>...`, `spawn` (a child agent that fetches), `exit`) and prints what
//! happened as JSON lines after [`MARK`] on stdout, which [`Agent`] reads.

use std::collections::VecDeque;
use std::io::{BufRead, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest, ListRequest};
use sigil::proto::workload::X509svidRequest;
use tokio_stream::StreamExt;

use super::{TestDaemon, eventually, raw_client, serial_of, tasks_client, with_header};

/// Set in the agent child's environment: the daemon's socket.
pub const AGENT_ENV: &str = "SIGIL_LIFECYCLE_AGENT_SOCKET";
/// The ignored test that is the agent child.
pub const AGENT_TEST: &str = "agent_child_obeys_commands_on_stdin";
/// Starts each line the agent prints for the test (libtest may print its own
/// words on the same line).
pub const MARK: &str = "@agent ";

// --- The agent child --------------------------------------------------------------------

/// Child agents spawned by `spawn`, kept alive with their stdin.
static CHILDREN: Mutex<Vec<(Child, std::process::ChildStdin)>> = Mutex::new(Vec::new());

/// Prints one event for the parent, tagged with this process's pid.
pub fn report(mut event: Value) {
    event["from"] = json!(std::process::id());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n{MARK}{event}");
    let _ = out.flush();
}

/// A gRPC status code by name (`Ok` for success).
pub fn code_of<T>(result: &Result<T, tonic::Status>) -> String {
    match result {
        Ok(_) => "Ok".to_owned(),
        Err(status) => format!("{:?}", status.code()),
    }
}

/// Reports every message of one FetchX509SVID stream, then how it ended.
pub async fn report_stream(mut stream: tonic::Streaming<sigil::proto::workload::X509svidResponse>) {
    loop {
        match stream.next().await {
            Some(Ok(msg)) => {
                let svids: Vec<Value> = msg
                    .svids
                    .iter()
                    .map(|s| {
                        json!({
                            "spiffe_id": s.spiffe_id,
                            "hint": s.hint,
                            "serial": serial_of(&s.x509_svid),
                            "has_key": !s.x509_svid_key.is_empty(),
                        })
                    })
                    .collect();
                report(json!({"event": "svids", "svids": svids}));
            }
            Some(Err(status)) => {
                report(
                    json!({"event": "stream_end", "code": format!("{:?}", status.code()), "message": status.message()}),
                );
                return;
            }
            None => {
                report(json!({"event": "stream_end", "code": null}));
                return;
            }
        }
    }
}

/// Runs one command of the parent's.
pub async fn obey(socket: &Path, line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["fetch"] => {
            let mut client = raw_client(socket).await;
            match client.fetch_x509svid(with_header(X509svidRequest {})).await {
                Ok(response) => {
                    tokio::spawn(report_stream(response.into_inner()));
                }
                Err(status) => report(
                    json!({"event": "stream_end", "code": format!("{:?}", status.code()), "message": status.message()}),
                ),
            }
        }
        ["begin", task, ttl] => {
            let result = tasks_client(socket)
                .await
                .begin(with_header(BeginRequest {
                    task_id: (*task).to_owned(),
                    ttl: Some(prost_types::Duration {
                        seconds: ttl.parse().expect("a ttl in seconds"),
                        nanos: 0,
                    }),
                    attributes: Default::default(),
                }))
                .await;
            report(json!({"event": "begin", "task": task, "code": code_of(&result)}));
        }
        ["end", task] => {
            let result = tasks_client(socket)
                .await
                .end(with_header(EndRequest {
                    task_id: (*task).to_owned(),
                }))
                .await;
            report(json!({"event": "end", "task": task, "code": code_of(&result)}));
        }
        ["list"] => {
            let result = tasks_client(socket)
                .await
                .list(with_header(ListRequest {}))
                .await;
            let tasks: Vec<String> = result
                .as_ref()
                .map(|r| {
                    r.get_ref()
                        .tasks
                        .iter()
                        .map(|t| t.task_id.clone())
                        .collect()
                })
                .unwrap_or_default();
            report(json!({"event": "list", "code": code_of(&result), "tasks": tasks}));
        }
        ["exec", program, args @ ..] => {
            // Same pid and start time, another program; stdin and stdout
            // stay the parent's pipes. Returns only if the exec failed.
            let error = Command::new(program).args(args).exec();
            report(json!({"event": "exec_failed", "error": error.to_string()}));
        }
        ["spawn"] => {
            // A child agent of this one (for process trees): it shares this
            // agent's stdout, fetches at once, and ends with this agent
            // (its stdin closes).
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", AGENT_TEST, "--ignored", "--nocapture"])
                .env(AGENT_ENV, socket)
                .stdin(Stdio::piped())
                .spawn()
                .expect("the child agent starts");
            let pid = child.id();
            let mut stdin = child.stdin.take().expect("piped stdin");
            writeln!(stdin, "fetch").unwrap();
            stdin.flush().unwrap();
            CHILDREN.lock().unwrap().push((child, stdin));
            report(json!({"event": "spawned", "child": pid}));
        }
        ["exit"] => std::process::exit(0),
        _ => report(json!({"event": "unknown_command", "line": line})),
    }
}

/// The agent child's body: each test binary that uses [`Agent`] has the
/// ignored test [`AGENT_TEST`] call this (run on its own, it does nothing).
pub async fn child_main() {
    let Some(socket) = std::env::var_os(AGENT_ENV) else {
        return;
    };
    let socket = PathBuf::from(socket);
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    report(json!({"event": "ready", "pid": std::process::id(), "exe": exe.to_string_lossy()}));
    while let Some(line) = commands.recv().await {
        obey(&socket, &line).await;
    }
}

// --- The parent's side ------------------------------------------------------------------

/// An agent child process; killed when dropped.
pub struct Agent {
    /// The child process.
    pub child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Events read but not yet asked for.
    pending: VecDeque<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts this test binary as an agent of `daemon` and waits until it is ready.
    pub async fn start(daemon: &TestDaemon) -> Agent {
        Self::start_program(daemon, &std::env::current_exe().unwrap()).await
    }

    /// Starts `program` (this test binary, or a link to it) as an agent.
    pub async fn start_program(daemon: &TestDaemon, program: &Path) -> Agent {
        Self::spawn(program, &daemon.socket).await
    }

    /// Starts this test binary as an agent of the daemon serving `socket`
    /// (one started from the binary, say).
    pub async fn start_on(socket: &Path) -> Agent {
        Self::spawn(&std::env::current_exe().unwrap(), socket).await
    }

    async fn spawn(program: &Path, socket: &Path) -> Agent {
        let mut child = Command::new(program)
            .args(["--exact", AGENT_TEST, "--ignored", "--nocapture"])
            .env(AGENT_ENV, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the agent child starts");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut agent = Agent {
            child,
            lines,
            pending: VecDeque::new(),
            stderr,
        };
        let ready = agent.event("ready", Duration::from_secs(10)).await;
        assert_eq!(ready["pid"], agent.pid());
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command line.
    pub fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// The first event (read earlier or to come) that `wanted` accepts,
    /// within `limit`; the others are kept for later.
    pub async fn find(&mut self, limit: Duration, wanted: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.pending.iter().position(&wanted) {
            return self.pending.remove(at).unwrap();
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => line,
                outcome => {
                    // Give the stderr reader a moment to collect the rest.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    panic!(
                        "no wanted event from the agent within {limit:?} ({}); kept: {:?}; stderr:\n{}",
                        if outcome.is_err() {
                            "timed out"
                        } else {
                            "its stdout closed"
                        },
                        self.pending,
                        self.stderr.lock().unwrap()
                    );
                }
            };
            let Some(at) = line.find(MARK) else { continue };
            let event: Value = serde_json::from_str(&line[at + MARK.len()..])
                .unwrap_or_else(|e| panic!("agent line {line:?}: {e}"));
            if wanted(&event) {
                return event;
            }
            self.pending.push_back(event);
        }
    }

    /// Every event read earlier or printed within `quiet` from now on.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut events: Vec<Value> = self.pending.drain(..).collect();
        while let Ok(Some(line)) = tokio::time::timeout(quiet, self.lines.recv()).await {
            if let Some(at) = line.find(MARK) {
                events.push(serde_json::from_str(&line[at + MARK.len()..]).unwrap());
            }
        }
        events
    }

    /// The next event named `name`.
    pub async fn event(&mut self, name: &str, limit: Duration) -> Value {
        self.find(limit, |e| e["event"] == name).await
    }

    /// Runs a task command and returns the gRPC code it got.
    pub async fn task_command(&mut self, line: &str) -> String {
        let name = line.split_whitespace().next().unwrap().to_owned();
        self.say(line);
        let reply = self.event(&name, Duration::from_secs(5)).await;
        reply["code"].as_str().unwrap().to_owned()
    }

    /// Opens a FetchX509SVID stream and returns its first message's SVIDs.
    pub async fn fetch(&mut self) -> Vec<Value> {
        self.say("fetch");
        let first = self.event("svids", Duration::from_secs(10)).await;
        first["svids"].as_array().unwrap().clone()
    }

    /// Waits (bounded) for the child to exit.
    pub async fn wait_exit(&mut self, limit: Duration) {
        let exited = eventually(limit, || self.child.try_wait().unwrap().is_some()).await;
        assert!(exited, "the agent exited within {limit:?}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
