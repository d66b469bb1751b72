//! `cargo bench`: SVID issuance figures, as ratios to `openssl speed ecdsap256`
//! measured in the same run (machines here are noisy; ratios travel better).
//!
//! - mint: one SVID = a fresh P-256 key + an ECDSA-signed certificate;
//! - attest: attestation of this process from /proc (digest cached);
//! - fetch: a new connection + FetchX509SVID first message over the real
//!   socket, for an instance that already holds its SVID.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::process::Command;
use std::time::{Duration, Instant};

use sigil::app::App;
use sigil::attest::{Attestor, PeerCred, now_in_ticks};
use sigil::ca::{Ca, SvidRequest};
use sigil::config::{Config, Overrides};
use sigil::ids::{SpiffeId, TrustDomain};
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
    };
    report(
        "attest a process (cached digest)",
        rate(|| drop(attestor.attest(&me).unwrap())),
        baseline,
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fetch_rate = runtime.block_on(fetch_rate(dir.path()));
    report(
        "connect + FetchX509SVID first message",
        fetch_rate,
        baseline,
    );
}

async fn fetch_rate(dir: &std::path::Path) -> f64 {
    let socket = dir.join("w.sock");
    let toml = format!(
        "trust_domain = \"bench.test\"\n[[entry]]\nname = \"bench\"\nselectors = [\"unix:uid:{}\"]\n",
        nix::unistd::geteuid()
    );
    let overrides = Overrides {
        socket: Some(socket.clone()),
        state_dir: Some(dir.join("state")),
    };
    let config = Config::parse(&toml, "bench", &overrides).unwrap();
    let shutdown = Shutdown::new();
    let app = App::build(config, &shutdown).await.unwrap();
    let serve = tokio::spawn(app.run(shutdown.clone()));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN_FOR {
        let path = socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut req = tonic::Request::new(X509svidRequest {});
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        let mut stream = client.fetch_x509svid(req).await.unwrap().into_inner();
        stream.next().await.unwrap().unwrap();
        n += 1;
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    shutdown.drain(Duration::from_secs(5)).await;
    serve.await.unwrap().unwrap();
    per_sec
}
