//! `cargo bench`: SVID issuance figures, as ratios to `openssl speed ecdsap256`
//! measured in the same run (machines here are noisy; ratios travel better).
//!
//! - mint: one SVID = a fresh P-256 key + an ECDSA-signed certificate;
//! - attest: attestation of this process from /proc (digest cached);
//! - fetch: a new connection + FetchX509SVID first message over the real
//!   socket, for an instance that already holds its SVID;
//! - revocation: from a task's End call to the first stream message whose
//!   CRL lists the task's SVID (the design's budget is one second).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sigil::app::App;
use sigil::attest::{Attestor, PeerCred, now_in_ticks};
use sigil::ca::{Ca, SvidRequest};
use sigil::config::{Config, Overrides};
use sigil::ids::{SpiffeId, TrustDomain};
use sigil::proto::sigil::workload::v1::tasks_client::TasksClient;
use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest};
use sigil::proto::workload::X509svidRequest;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::shutdown::Shutdown;
use tokio_stream::StreamExt;

const RUN_FOR: Duration = Duration::from_secs(2);

/// Operations per second of `op`, run repeatedly for `RUN_FOR`.
fn rate(mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN_FOR {
        op();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// ECDSA P-256 signs per second according to `openssl speed`, single core.
fn openssl_sign_rate() -> Option<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "2", "ecdsap256"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "256 bits ecdsa (nistp256)   0.0000s   0.0001s  40000.0  13000.0"
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    fields.get(fields.len().checked_sub(2)?)?.parse().ok()
}

fn report(name: &str, per_sec: f64, baseline: Option<f64>) {
    match baseline {
        Some(b) => println!(
            "{name:<40} {per_sec:>10.0}/s   {:.3} x openssl sign",
            per_sec / b
        ),
        None => println!("{name:<40} {per_sec:>10.0}/s   (no openssl baseline)"),
    }
}

fn main() {
    // `cargo bench -- --list` style probes from cargo: nothing to list.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let baseline = openssl_sign_rate();
    match baseline {
        Some(b) => println!(
            "{:<40} {b:>10.0}/s   baseline",
            "openssl speed ecdsap256 (sign)"
        ),
        None => println!("openssl not found: figures are absolute only"),
    }

    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("bench.test").unwrap();
    let ca = Ca::load_or_create(dir.path(), &td).unwrap();
    let req = SvidRequest {
        spiffe_id: SpiffeId::new("spiffe://bench.test/agent/bench/instance/0").unwrap(),
        dns_names: vec![],
        ttl: Duration::from_secs(300),
        hint: "instance".into(),
    };
    report(
        "mint X509-SVID (keygen + sign)",
        rate(|| drop(ca.sign_svid(&req).unwrap())),
        baseline,
    );

    let attestor = Attestor::new().unwrap();
    let me = PeerCred {
        pid: std::process::id(),
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        accepted_at_ticks: Some(now_in_ticks()),
        start_time: None,
        exe: None,
        foreign_writer: None,
    };
    report(
        "attest a process (cached digest)",
        rate(|| drop(attestor.attest(&me).unwrap())),
        baseline,
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fetch_rate = runtime.block_on(fetch_rate(&dir.path().join("fetch")));
    report(
        "connect + FetchX509SVID first message",
        fetch_rate,
        baseline,
    );
    let latencies = runtime.block_on(revocation_latencies(&dir.path().join("rev")));
    let median = latencies[latencies.len() / 2];
    let worst = latencies[latencies.len() - 1];
    println!(
        "{:<40} {:>8.0} ms   median, {:.2} of the 1 s budget (worst {:.0} ms, {} runs)",
        "task End -> CRL on the stream",
        median.as_secs_f64() * 1e3,
        median.as_secs_f64(),
        worst.as_secs_f64() * 1e3,
        latencies.len()
    );
}

type Daemon = (PathBuf, Shutdown, tokio::task::JoinHandle<()>);

async fn start_daemon(dir: &Path, extra: &str) -> Daemon {
    let socket = dir.join("w.sock");
    let toml = format!(
        "trust_domain = \"bench.test\"\n[[entry]]\nname = \"bench\"\nselectors = [\"unix:uid:{}\"]\n{extra}",
        nix::unistd::geteuid()
    );
    let overrides = Overrides {
        socket: Some(socket.clone()),
        state_dir: Some(dir.join("state")),
    };
    let config = Config::parse(&toml, "bench", &overrides).unwrap();
    let shutdown = Shutdown::new();
    let app = App::build(config, &shutdown).await.unwrap();
    let run = shutdown.clone();
    let serve = tokio::spawn(async move { app.run(run).await.unwrap() });
    (socket, shutdown, serve)
}

async fn channel(socket: &Path) -> tonic::transport::Channel {
    let path = socket.to_owned();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

async fn fetch_rate(dir: &Path) -> f64 {
    let (socket, shutdown, serve) = start_daemon(dir, "").await;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN_FOR {
        let mut client = SpiffeWorkloadApiClient::new(channel(&socket).await);
        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        stream.next().await.unwrap().unwrap();
        n += 1;
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    shutdown.drain(Duration::from_secs(5)).await;
    serve.await.unwrap();
    per_sec
}

fn serial_of(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial().to_vec()
}

fn crl_lists(crl: &[u8], serial: &[u8]) -> bool {
    let (_, parsed) = x509_parser::parse_x509_crl(crl).unwrap();
    parsed
        .iter_revoked_certificates()
        .any(|r| r.raw_serial() == serial)
}

async fn revocation_latencies(dir: &Path) -> Vec<Duration> {
    let extra = "[entry.tasks]\nself_declare = true\nmax_concurrent = 1024\n";
    let (socket, shutdown, serve) = start_daemon(dir, extra).await;
    let ch = channel(&socket).await;
    let mut tasks = TasksClient::new(ch.clone());
    let mut stream = SpiffeWorkloadApiClient::new(ch)
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let mut latencies = Vec::new();
    for i in 0..20 {
        let id = format!("job-{i}");
        let hint = format!("task:{id}");
        let begin = BeginRequest {
            task_id: id.clone(),
            ttl: None,
            attributes: Default::default(),
        };
        tasks.begin(with_header(begin)).await.unwrap();
        let serial = loop {
            let msg = stream.next().await.unwrap().unwrap();
            if let Some(svid) = msg.svids.iter().find(|s| s.hint == hint) {
                break serial_of(&svid.x509_svid);
            }
        };
        let ended = Instant::now();
        tasks
            .end(with_header(EndRequest { task_id: id }))
            .await
            .unwrap();
        loop {
            let msg = stream.next().await.unwrap().unwrap();
            if msg.crl.first().is_some_and(|crl| crl_lists(crl, &serial)) {
                latencies.push(ended.elapsed());
                break;
            }
        }
    }
    shutdown.drain(Duration::from_secs(5)).await;
    serve.await.unwrap();
    latencies.sort();
    latencies
}
