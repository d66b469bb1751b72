//! The `/metrics` text, fetched from the listener over TCP, parsed by the
//! Prometheus project's own OpenMetrics parser (PyPI `prometheus_client`,
//! `prometheus_client.openmetrics.parser`), which refuses what a Prometheus
//! server would: a missing `# EOF`, a unit that is not the name's suffix,
//! unordered buckets, a counter sample without `_total`.
//!
//! The test creates its own virtualenv under Cargo's target tmp dir on the
//! first run (python3 with venv and access to PyPI needed), as
//! `interop_python.rs` does. The in-process test is the only one in this
//! binary that counts, so the process's metrics hold exactly what it
//! counted; the other runs `sigil run` as a process of its own and checks
//! that the daemon's counters move as agents come, begin and end tasks.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use sigil::metrics::http::{Health, Readiness};
use sigil::metrics::{self, Method, RefusalReason, RevokeReason, SvidKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The parser's release under test.
const PROMETHEUS_CLIENT: &str = "prometheus_client==0.26.0";

/// Reads OpenMetrics text on stdin and prints its families as JSON:
/// `{name: {type, unit, samples: [{name, labels, value}]}}`.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    out[family.name] = {
        "type": family.type,
        "unit": family.unit,
        "samples": [
            {"name": s.name, "labels": s.labels, "value": s.value}
            for s in family.samples
        ],
    }
print(json.dumps(out))
"#;

/// The virtualenv's python, created once per machine (and per release).
fn venv_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("prometheus-client-0.26.0");
        let python = venv.join("bin/python");
        let marker = venv.join(".installed");
        if marker.exists() {
            return python;
        }
        let _ = std::fs::remove_dir_all(&venv);
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            made && python.exists(),
            "cannot create a virtualenv with `python3 -m venv`: install python3 and its venv module (Debian: apt-get install python3-venv)"
        );
        let pip = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                PROMETHEUS_CLIENT,
            ])
            .status()
            .expect("pip runs");
        assert!(
            pip.success(),
            "pip install {PROMETHEUS_CLIENT} failed (is PyPI reachable?)"
        );
        std::fs::write(&marker, PROMETHEUS_CLIENT).unwrap();
        python
    })
}

/// Parses `text` with the Prometheus project's OpenMetrics parser.
fn parse(text: String) -> Value {
    let mut child = Command::new(venv_python())
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        stdin.write_all(text.as_bytes()).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the text:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Always ready.
struct Ready;

impl Health for Ready {
    fn check(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
}

/// `GET path` over a plain TCP connection: (head, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8(out).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// The value of the sample `name` with exactly `labels` in `family`.
fn sample(families: &Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    let samples = families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family} in {families}"));
    samples
        .iter()
        .find(|s| s["name"] == name && s["labels"].as_object() == Some(&want))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {family}: {samples:?}"))["value"]
        .as_f64()
        .unwrap()
}

/// Counts what the daemon would, through the public API.
fn bump() -> metrics::OpenStream {
    let m = metrics::global();
    for _ in 0..3 {
        m.svid_issued(SvidKind::Instance);
    }
    m.svid_issued(SvidKind::Task);
    m.svid_rotated(SvidKind::Instance);
    m.svids_revoked(RevokeReason::TaskEnded, 2);
    m.refusal(RefusalReason::NoMatchingEntry);
    m.set_live(2, 5);
    m.set_crl(3, 512);
    m.set_ca_expiry(SystemTime::now() + Duration::from_secs(3600));
    m.rpc(
        Method::FetchX509Svid,
        tonic::Code::Ok,
        Duration::from_millis(5),
    );
    m.rpc(
        Method::TaskBegin,
        tonic::Code::ResourceExhausted,
        Duration::from_millis(1),
    );
    m.commit(Duration::from_micros(700));
    m.stream_opened()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_text_parses_with_the_prometheus_projects_own_parser() {
    let _stream = bump();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(metrics::http::serve(
        listener,
        Arc::new(Ready),
        shutdown.clone(),
    ));

    let (head, body) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-type: {}", metrics::CONTENT_TYPE)),
        "{head}"
    );
    let families = tokio::task::spawn_blocking(move || parse(body))
        .await
        .unwrap();

    for (family, kind) in [
        ("sigil_live_instances", "gauge"),
        ("sigil_live_tasks", "gauge"),
        ("sigil_open_streams", "gauge"),
        ("sigil_crl_entries", "gauge"),
        ("sigil_crl_bytes", "gauge"),
        ("sigil_ca_expiry_seconds", "gauge"),
        ("sigil_svids_issued", "counter"),
        ("sigil_svids_rotated", "counter"),
        ("sigil_svids_revoked", "counter"),
        ("sigil_attestation_refusals", "counter"),
        ("sigil_workload_api_requests", "counter"),
        ("sigil_workload_api_request_duration_seconds", "histogram"),
        ("sigil_store_commit_duration_seconds", "histogram"),
    ] {
        assert_eq!(families[family]["type"], kind, "{family} in {families}");
    }
    assert_eq!(families["sigil_ca_expiry_seconds"]["unit"], "seconds");
    assert_eq!(families["sigil_crl_bytes"]["unit"], "bytes");

    let issued = |kind| {
        sample(
            &families,
            "sigil_svids_issued",
            "sigil_svids_issued_total",
            &[("kind", kind)],
        )
    };
    assert_eq!(issued("instance"), 3.0);
    assert_eq!(issued("task"), 1.0);
    let rotated = sample(
        &families,
        "sigil_svids_rotated",
        "sigil_svids_rotated_total",
        &[("kind", "instance")],
    );
    assert_eq!(rotated, 1.0);
    let revoked = |reason| {
        sample(
            &families,
            "sigil_svids_revoked",
            "sigil_svids_revoked_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(revoked("task_ended"), 2.0);
    assert_eq!(revoked("instance_ended"), 0.0);
    let refused = |reason| {
        sample(
            &families,
            "sigil_attestation_refusals",
            "sigil_attestation_refusals_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(refused("no_matching_entry"), 1.0);
    assert_eq!(refused("connection_check"), 0.0);
    let requests = |method, code| {
        sample(
            &families,
            "sigil_workload_api_requests",
            "sigil_workload_api_requests_total",
            &[("method", method), ("code", code)],
        )
    };
    assert_eq!(requests("SpiffeWorkloadAPI/FetchX509SVID", "OK"), 1.0);
    assert_eq!(
        requests("sigil.workload.v1.Tasks/Begin", "ResourceExhausted"),
        1.0
    );

    let gauge = |name| sample(&families, name, name, &[]);
    assert_eq!(gauge("sigil_live_instances"), 2.0);
    assert_eq!(gauge("sigil_live_tasks"), 5.0);
    assert_eq!(gauge("sigil_open_streams"), 1.0);
    assert_eq!(gauge("sigil_crl_entries"), 3.0);
    assert_eq!(gauge("sigil_crl_bytes"), 512.0);
    let left = gauge("sigil_ca_expiry_seconds");
    assert!((3500.0..=3600.0).contains(&left), "{left}");

    let durations = "sigil_workload_api_request_duration_seconds";
    let method = [("method", "SpiffeWorkloadAPI/FetchX509SVID")];
    assert_eq!(
        sample(&families, durations, &format!("{durations}_count"), &method),
        1.0
    );
    let le = [
        ("method", "SpiffeWorkloadAPI/FetchX509SVID"),
        ("le", "0.008"),
    ];
    assert_eq!(
        sample(&families, durations, &format!("{durations}_bucket"), &le),
        1.0
    );
    let commits = "sigil_store_commit_duration_seconds";
    assert_eq!(
        sample(&families, commits, &format!("{commits}_count"), &[]),
        1.0
    );

    shutdown.cancel();
    server.await.unwrap();
}

/// The agent child (see `common::agent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the agent child the other tests run; does nothing on its own"]
async fn agent_child_obeys_commands_on_stdin() {
    common::agent::child_main().await;
}

/// A `sigil run` process; killed on drop.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Scrapes and parses the daemon's metrics.
async fn scrape(addr: std::net::SocketAddr) -> Value {
    let (head, body) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    parse(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigil_run_serves_metrics_whose_counters_move_with_agents_and_tasks_and_probes() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (file, socket) = (
        dir.path().join("sigil.toml"),
        dir.path().join("workload.sock"),
    );
    let me = nix::unistd::geteuid();
    std::fs::write(
        &file,
        format!(
            "trust_domain = \"sigil.test\"\n[metrics]\nlisten = \"{addr}\"\n[[entry]]\nname = \"agents\"\nselectors = [\"unix:uid:{me}\"]\n[entry.tasks]\nself_declare = true\n"
        ),
    )
    .unwrap();
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(["run", "--config"])
            .arg(&file)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The listener is bound at start-up; wait until it answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon listens on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (head, body) = get(addr, "/livez").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head} {body}");
    let (head, body) = get(addr, "/readyz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head} {body}");

    let before = scrape(addr).await;
    let issued = |f: &Value, kind: &str| {
        sample(
            f,
            "sigil_svids_issued",
            "sigil_svids_issued_total",
            &[("kind", kind)],
        )
    };
    assert_eq!(issued(&before, "instance"), 0.0);

    let mut agent = common::agent::Agent::start_on(&socket).await;
    agent.fetch().await;
    assert_eq!(agent.task_command("begin job-1 60").await, "Ok");
    assert_eq!(agent.task_command("end job-1").await, "Ok");

    // The gauges refresh every second; the CRL after its coalescing.
    let mut after = scrape(addr).await;
    for _ in 0..40 {
        let live = sample(&after, "sigil_live_instances", "sigil_live_instances", &[]);
        let crl = sample(&after, "sigil_crl_entries", "sigil_crl_entries", &[]);
        if live == 1.0 && crl >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scrape(addr).await;
    }
    assert_eq!(issued(&after, "instance"), 1.0);
    assert_eq!(issued(&after, "task"), 1.0);
    assert_eq!(
        sample(
            &after,
            "sigil_svids_revoked",
            "sigil_svids_revoked_total",
            &[("reason", "task_ended")]
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "sigil_live_instances", "sigil_live_instances", &[]),
        1.0
    );
    assert_eq!(
        sample(&after, "sigil_live_tasks", "sigil_live_tasks", &[]),
        0.0
    );
    assert!(sample(&after, "sigil_open_streams", "sigil_open_streams", &[]) >= 1.0);
    assert!(sample(&after, "sigil_crl_entries", "sigil_crl_entries", &[]) >= 1.0);
    assert!(sample(&after, "sigil_crl_bytes", "sigil_crl_bytes", &[]) > 0.0);
    assert!(
        sample(
            &after,
            "sigil_ca_expiry_seconds",
            "sigil_ca_expiry_seconds",
            &[]
        ) > 3600.0
    );
    let begins = sample(
        &after,
        "sigil_workload_api_requests",
        "sigil_workload_api_requests_total",
        &[("method", "sigil.workload.v1.Tasks/Begin"), ("code", "OK")],
    );
    assert_eq!(begins, 1.0);
    let commits = sample(
        &after,
        "sigil_store_commit_duration_seconds",
        "sigil_store_commit_duration_seconds_count",
        &[],
    );
    assert!(commits >= 1.0, "{commits}");
}
