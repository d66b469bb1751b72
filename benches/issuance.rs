//! `cargo bench`: SVID issuance figures, as ratios to `openssl speed ecdsap256`
//! measured in the same run (machines here are noisy; ratios travel better).
//!
//! - mint: one SVID = a fresh P-256 key + an ECDSA-signed certificate;
//! - attest: attestation of this process from /proc (digest cached);
//! - fetch: a new connection + FetchX509SVID first message over the real
//!   socket, for an instance that already holds its SVID;
//! - revocation: from a task's End call to the first stream message whose
//!   CRL lists the task's SVID (the design's budget is one second);
//! - the per-connection checks that bind an SVID to the attested process:
//!   pinning the peer (pidfd, start time, program), finding the client end
//!   (sock_diag), and the /proc scan for other holders of it;
//! - the same scan shared: 200 connections waiting for their holder check at
//!   once, served by shared walks of /proc (per connection);
//! - attestation of a process whose attestation is not cached (a new
//!   instance; the program's digest is cached);
//! - HPACK: the flood block (480 Huffman-coded empty fields) through
//!   the `:authority` adapter, against loona-hpack's decoder on the same
//!   block (the decoder the adapter used before).

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
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::proto::workload::{X509BundlesRequest, X509svidRequest};
use sigil::shutdown::Shutdown;
use tokio_stream::StreamExt;

const RUN_FOR: Duration = Duration::from_secs(2);

/// The checks made once per connection so that an SVID reaches only the
/// process that connected.
fn connection_checks(baseline: Option<f64>) {
    use sigil::attest::socket;
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    report(
        "pin peer (pidfd, start time, program)",
        rate(|| {
            std::hint::black_box(socket::pin_peer(&a));
        }),
        baseline,
    );
    report(
        "find the client end (sock_diag)",
        rate(|| {
            let _ = std::hint::black_box(socket::peer_inode(&a));
        }),
        baseline,
    );
    let client = socket::peer_inode(&a).unwrap();
    let (processes, fds) = proc_census();
    report(
        &format!("sole-holder scan ({processes} procs, {fds} fds)"),
        rate(|| socket::check_sole_holder(std::process::id(), client).unwrap()),
        baseline,
    );
    drop(b);
}

/// The holder checks of many connections waiting at once, served by shared
/// walks of /proc, per connection.
fn batched_holder_checks(baseline: Option<f64>) {
    use sigil::attest::holders::HolderScans;
    use sigil::attest::socket;
    const PENDING: usize = 200;
    let pairs: Vec<_> = (0..PENDING)
        .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
        .collect();
    let inodes: Vec<u64> = pairs
        .iter()
        .map(|(a, _)| socket::peer_inode(a).unwrap())
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let me = std::process::id();
    let batch = || {
        runtime.block_on(async {
            let scans = HolderScans::default();
            let checks: Vec<_> = inodes
                .iter()
                .map(|&inode| {
                    let scans = scans.clone();
                    tokio::spawn(async move { scans.check(me, inode).await })
                })
                .collect();
            for check in checks {
                check.await.unwrap().unwrap();
            }
        });
    };
    report(
        &format!("holder check, {PENDING} at once (shared)"),
        rate(batch) * PENDING as f64,
        baseline,
    );
}

/// Processes and thread fd-table entries on this machine now.
fn proc_census() -> (usize, usize) {
    let mut processes = 0;
    let mut fds = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        processes += 1;
        for task in std::fs::read_dir(entry.path().join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            fds += std::fs::read_dir(task.path().join("fd")).map_or(0, |d| d.count());
        }
    }
    (processes, fds)
}

/// The HPACK flood block through the `:authority` adapter (our decoder and
/// the re-encoding), and through loona-hpack's decoder alone.
fn hpack_flood_block() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let block: Vec<u8> = std::iter::repeat_n([0x00u8, 0x80, 0x80], 480)
        .flatten()
        .collect();
    let kib = block.len() as f64 / 1024.0;
    let mut frame = Vec::new();
    frame.extend_from_slice(&u32::try_from(block.len()).unwrap().to_be_bytes()[1..]);
    frame.extend_from_slice(&[0x1, 0x4 | 0x1, 0, 0, 0, 1]);
    frame.extend_from_slice(&block);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let per_sec = rate(|| {
        runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(64 << 10);
            let mut fix = sigil::workload_api::authority::AuthorityFix::new(server);
            client
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            client.write_all(&frame).await.unwrap();
            drop(client);
            let mut out = Vec::new();
            fix.read_to_end(&mut out).await.unwrap();
        });
    });
    println!(
        "{:<40} {:>10.1} us/KiB   ({per_sec:.0} blocks/s)",
        "HPACK flood block, :authority adapter",
        1e6 / (per_sec * kib)
    );
    let loona = rate(|| {
        let mut decoder = loona_hpack::Decoder::new();
        drop(decoder.decode(&block).unwrap());
    });
    println!(
        "{:<40} {:>10.1} us/KiB   ({loona:.0} blocks/s, {:.0}x slower)",
        "HPACK flood block, loona-hpack decoder",
        1e6 / (loona * kib),
        per_sec / loona
    );
}

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

    report(
        "attest a new process (not cached)",
        rate(|| {
            attestor.forget(me.pid);
            drop(attestor.attest(&me).unwrap());
        }),
        baseline,
    );

    connection_checks(baseline);
    batched_holder_checks(baseline);
    hpack_flood_block();

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
        admin_socket: None,
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
    let mut stream = SpiffeWorkloadApiClient::new(ch.clone())
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    // The CRL goes to verifiers, on the bundle stream.
    let mut bundles = SpiffeWorkloadApiClient::new(ch)
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    bundles.next().await.unwrap().unwrap();
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
            let msg = bundles.next().await.unwrap().unwrap();
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
