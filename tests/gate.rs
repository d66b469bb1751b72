//! `sigil gate` over real TCP on 127.0.0.1, the real binary with its own
//! SVID from a daemon, in front of an echo service that reports what it
//! received. The agent is this test process with its SVIDs from the same
//! daemon, speaking mTLS with rustls and HTTP/1.1 with hyper:
//! a permitted request reaches the service with the caller's identity (and
//! not the copy the client sent); a request or MCP tool no rule allows gets
//! 403; an ID outside the rules and an SVID of another trust domain are
//! refused at the handshake; a task SVID's open connection is closed within
//! a second of the task's end and a new handshake with it is refused; the
//! gate keeps serving across its own SVID's rotation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TestDaemon, first_x509, raw_client, tasks_client, with_header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use sigil::ids::TrustDomain;
use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest};
use sigil::verify::source::split_certs;
use sigil::verify::tls::SvidServerVerifier;

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

/// The main gate's log, quoted when a request fails.
static GATE_LOG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP service that answers every request with what it received.
async fn echo_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let headers: BTreeMap<String, String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                            .collect();
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let answer = json!({"path": path, "headers": headers, "body": String::from_utf8_lossy(&body)});
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(answer.to_string()),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// Starts `sigil gate` on a port of its own choosing and returns it once
/// the gate listens (it prints `listening on ADDR`, then `metrics on ADDR`
/// when `how` asks for `--metrics`).
async fn gate(
    daemon: &TestDaemon,
    upstream: SocketAddr,
    how: &[&str],
    log: &std::path::Path,
) -> (Killed, SocketAddr, Option<SocketAddr>) {
    use std::io::BufRead;
    let mut child = Command::new(SIGIL)
        .args([
            "gate",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &format!("http://{upstream}"),
            "--socket",
        ])
        .arg(&daemon.socket)
        .args(how)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let lines = if how.contains(&"--metrics") { 2 } else { 1 };
    let read = tokio::task::spawn_blocking(move || {
        let mut reader = std::io::BufReader::new(stdout);
        (0..lines)
            .map(|_| {
                let mut line = String::new();
                reader.read_line(&mut line).map(|_| line)
            })
            .collect::<Result<Vec<_>, _>>()
    });
    let read = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the gate listens within 20 s")
        .unwrap()
        .unwrap();
    let line = read[0].clone();
    let metrics = read.get(1).map(|l| {
        l.trim()
            .strip_prefix("metrics on ")
            .unwrap_or_else(|| panic!("{l:?}"))
            .parse()
            .unwrap()
    });
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "{line:?}; log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
        .parse()
        .unwrap();
    (child, addr, metrics)
}

/// One plain HTTP/1.1 GET of the gate's metrics listener: status and body.
async fn scrape(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out)
}

/// The value of the sample `series` (name and labels, exactly as exported).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .parse()
        .unwrap()
}

/// An SVID with its key, and the bundle to check the gate with.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    bundle: Vec<CertificateDer<'static>>,
}

/// This process's SVID number `index` (0: the instance's, 1: its task's).
async fn my_identity(daemon: &TestDaemon, index: usize) -> Identity {
    let msg = first_x509(&mut raw_client(&daemon.socket).await).await;
    let svid = &msg.svids[index];
    Identity {
        chain: split_certs(&svid.x509_svid).unwrap(),
        key: svid.x509_svid_key.to_vec(),
        bundle: split_certs(&svid.bundle).unwrap(),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An mTLS connection to the gate as `who`, checking the gate's SVID;
/// the task driving it ends when the gate closes the connection.
async fn connect(
    gate: SocketAddr,
    who: &Identity,
) -> Result<(Sender, tokio::task::JoinHandle<()>), String> {
    connect_from(gate, who, None).await
}

/// The agent side of TLS as `who`: its SVID, and the gate's SVID checked.
fn client_tls(who: &Identity) -> rustls::ClientConfig {
    let verifier = SvidServerVerifier::new(
        TrustDomain::new("sigil.test").unwrap(),
        who.bundle.clone(),
        Vec::new(),
        vec!["spiffe://sigil.test/agent/gate/**".parse().unwrap()],
    );
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier))
    .with_client_auth_cert(
        who.chain.clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(who.key.clone())),
    )
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// [`connect`], from the local address `from` when given (another
/// 127.0.0.0/8 address is another client IP to the gate).
async fn connect_from(
    gate: SocketAddr,
    who: &Identity,
    from: Option<std::net::IpAddr>,
) -> Result<(Sender, tokio::task::JoinHandle<()>), String> {
    let config = client_tls(who);
    let tcp = match from {
        None => tokio::net::TcpStream::connect(gate).await,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| e.to_string())?;
            socket.connect(gate).await
        }
    }
    .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("gate.invalid").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    let driving = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, driving))
}

/// One request: (status, echoed JSON or the gate's text).
async fn call(
    sender: &mut Sender,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, Value), String> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gate");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    // HTTP/1.1 carries one request at a time: wait until the connection
    // is done with the previous one.
    sender.ready().await.map_err(|e| e.to_string())?;
    let response = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .map_err(|e| {
            // The gate's log says what it saw, for whoever reads the failure.
            let log = GATE_LOG.get().and_then(|p| std::fs::read_to_string(p).ok());
            format!("{e}; gate log:\n{}", log.unwrap_or_default())
        })?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

/// Whether a fresh connection as `who` can make a request.
async fn admitted(gate: SocketAddr, who: &Identity) -> bool {
    match connect(gate, who).await {
        Ok((mut sender, _)) => call(&mut sender, "GET", "/hello", &[], "")
            .await
            .is_ok_and(|(s, _)| s == 200),
        Err(_) => false,
    }
}

const RULES: &str = r#"
[[rule]]
path = "/forbidden"
allow = ["spiffe://sigil.test/agent/nobody-here"]
[[rule]]
mcp_method = "tools/call"
mcp_tool = "safe_*"
allow = ["spiffe://sigil.test/agent/tester/**"]
[[rule]]
mcp_method = "tools/call"
allow = ["spiffe://sigil.test/agent/admin/**"]
[[rule]]
allow = ["spiffe://sigil.test/agent/tester/**"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_enforces_identity_rules_and_revocation_and_survives_its_own_rotation() {
    let sigil = std::fs::canonicalize(SIGIL).unwrap();
    let me = nix::unistd::geteuid();
    let daemon = TestDaemon::start_with(&format!(
        "trust_domain = \"sigil.test\"\n\
         [[entry]]\nname = \"gate\"\nselectors = [\"unix:path:{}\"]\nttl = \"6s\"\n\
         [[entry]]\nname = \"tester\"\nselectors = [\"unix:uid:{me}\"]\n[entry.tasks]\nself_declare = true\n",
        sigil.display()
    ))
    .await;
    let work = tempfile::tempdir().unwrap();
    let rules = work.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let upstream = echo_service().await;
    let log = work.path().join("gate.log");
    GATE_LOG.set(log.clone()).unwrap();
    let (_gate, addr, metrics) = gate(
        &daemon,
        upstream,
        &[
            "--rules",
            rules.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
        ],
        &log,
    )
    .await;
    let metrics = metrics.unwrap();
    let agent = my_identity(&daemon, 0).await;

    // Permitted: the service sees who called, not who the client claimed.
    let (mut sender, _) = connect(addr, &agent).await.unwrap();
    let (status, echo) = call(
        &mut sender,
        "GET",
        "/hello",
        &[
            (
                "x-sigil-spiffe-id",
                "spiffe://sigil.test/agent/admin/forged",
            ),
            ("x-forwarded-client-cert", "By=forged"),
            // What a WSGI server reads as X-Sigil-Spiffe-Id.
            (
                "x_sigil_spiffe_id",
                "spiffe://sigil.test/agent/admin/forged",
            ),
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{echo}");
    let seen = &echo["headers"];
    assert!(
        seen.get("x_sigil_spiffe_id").is_none(),
        "the underscore spelling is stripped too: {echo}"
    );
    let id = seen["x-sigil-spiffe-id"].as_str().unwrap();
    assert!(
        id.starts_with("spiffe://sigil.test/agent/tester/instance/"),
        "{echo}"
    );
    assert_eq!(
        seen["x-sigil-instance"].as_str().unwrap(),
        id.rsplit('/').next().unwrap()
    );
    let xfcc = seen["x-forwarded-client-cert"].as_str().unwrap();
    assert!(
        xfcc.starts_with("By=spiffe://sigil.test/agent/gate/")
            && xfcc.ends_with(&format!(";URI={id}")),
        "{xfcc}"
    );

    // A path read as the service reads it: an encoded letter still hits
    // the rule; a dot segment or a lower-case method is refused.
    let (status, _) = call(&mut sender, "GET", "/%66orbidden", &[], "")
        .await
        .unwrap();
    assert_eq!(status, 403, "/%66orbidden is /forbidden");
    for (method, path) in [
        ("GET", "/x/../forbidden"),
        ("GET", "//forbidden"),
        ("get", "/hello"),
    ] {
        let (status, text) = call(&mut sender, method, path, &[], "").await.unwrap();
        assert_eq!(status, 400, "{method} {path}: {text}");
    }

    // A path no rule allows this caller, and MCP tools by name.
    let (status, _) = call(&mut sender, "GET", "/forbidden", &[], "")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}; gate log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    assert_eq!(status, 403);
    let tool = |name: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}","arguments":{{}}}}}}"#
        )
    };
    let (status, echo) = call(
        &mut sender,
        "POST",
        "/mcp",
        &[("content-type", "application/json")],
        &tool("safe_search"),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; gate log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert_eq!(status, 200);
    assert!(
        echo["body"].as_str().unwrap().contains("safe_search"),
        "the body is forwarded whole"
    );
    let (status, text) = call(
        &mut sender,
        "POST",
        "/mcp",
        &[("content-type", "application/json")],
        &tool("delete_all"),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "{text}");
    let (status, _) = call(
        &mut sender,
        "POST",
        "/mcp",
        &[("mcp-method", "tools/call"), ("mcp-name", "delete_all")],
        &tool("delete_all"),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "headers that agree with the body");
    // Headers that name an allowed tool cannot hide the body's call.
    let (status, text) = call(
        &mut sender,
        "POST",
        "/mcp",
        &[("mcp-method", "tools/call"), ("mcp-name", "safe_search")],
        &tool("delete_all"),
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.to_string().contains("Mcp-Name"), "{text}");
    // Nor can a body the gate cannot read the way the server would.
    for (headers, body) in [
        (vec![], format!("[{}]", tool("delete_all"))),
        (vec![], tool("delete_all").replace("{}}", "{\"a\":NaN}}")),
        // Go's encoding/json reads METHOD as method (and the last wins).
        (
            vec![],
            tool("delete_all").replace(
                "\"method\":\"tools/call\"",
                "\"method\":\"tools/list\",\"METHOD\":\"tools/call\"",
            ),
        ),
        (vec![("content-encoding", "gzip")], tool("delete_all")),
    ] {
        let (status, text) = call(&mut sender, "POST", "/mcp", &headers, &body)
            .await
            .unwrap();
        let expected = if headers.is_empty() { 400 } else { 415 };
        assert_eq!(status, expected, "{text} for {headers:?} {body}");
    }

    // An SVID of another trust domain, and an ID outside the rules, are
    // refused at the handshake.
    let other_dir = tempfile::tempdir().unwrap();
    let other =
        sigil::ca::Ca::load_or_create(other_dir.path(), &TrustDomain::new("other.test").unwrap())
            .unwrap();
    let foreign = other
        .sign_svid(&sigil::ca::SvidRequest {
            spiffe_id: sigil::ids::SpiffeId::new("spiffe://other.test/agent/tester/x").unwrap(),
            dns_names: vec![],
            ttl: Duration::from_secs(600),
            hint: "instance".into(),
        })
        .unwrap();
    let foreign = Identity {
        chain: foreign.cert_chain.clone(),
        key: foreign.key.pkcs8_der().to_vec(),
        bundle: agent.bundle.clone(),
    };
    assert!(
        !admitted(addr, &foreign).await,
        "another trust domain is refused"
    );
    let strict_log = work.path().join("strict.log");
    let (_strict, strict, _) = gate(
        &daemon,
        upstream,
        &["--allow", "spiffe://sigil.test/agent/other/**"],
        &strict_log,
    )
    .await;
    assert!(
        !admitted(strict, &agent).await,
        "an ID outside the rules is refused"
    );
    assert!(
        std::fs::read_to_string(&strict_log)
            .unwrap()
            .contains("handshake"),
        "the refusal is logged"
    );

    // A task's SVID: its open connection is cut within a second of the
    // task's end, and it cannot connect again.
    let mut tasks = tasks_client(&daemon.socket).await;
    tasks
        .begin(with_header(BeginRequest {
            task_id: "job-1".into(),
            ttl: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
            attributes: Default::default(),
        }))
        .await
        .unwrap();
    let task = my_identity(&daemon, 1).await;
    let (mut task_sender, driving) = connect(addr, &task).await.unwrap();
    let (status, echo) = call(&mut task_sender, "GET", "/work", &[], "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(echo["headers"]["x-sigil-task"], "job-1");
    let ended = Instant::now();
    tasks
        .end(with_header(EndRequest {
            task_id: "job-1".into(),
        }))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), driving)
        .await
        .expect("the gate closed the task's connection within 1 s")
        .unwrap();
    assert!(ended.elapsed() < Duration::from_secs(1));
    assert!(
        !admitted(addr, &task).await,
        "the ended task's SVID cannot connect again"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("closed a connection whose certificate was revoked"),
        "{logged}"
    );
    assert!(
        logged.contains("deny") && logged.contains("allow"),
        "each decision is logged: {logged}"
    );
    // And counted.
    let (status, text) = scrape(metrics, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        sample(
            &text,
            "sigil_gate_connections_closed_total{reason=\"revoked\"}"
        ),
        1.0
    );
    assert!(
        sample(&text, "sigil_gate_handshakes_total{outcome=\"accepted\"}") >= 2.0,
        "{text}"
    );
    // At least the ended task's new handshake.
    assert!(sample(&text, "sigil_gate_handshakes_total{outcome=\"refused\"}") >= 1.0);
    let total = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // 403s by path and by tool; 400/415s for what the gate cannot read.
    assert!(
        total("sigil_gate_requests_total{outcome=\"denied\"") >= 2.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "sigil_gate_requests_total{outcome=\"unreadable\",rule=\"none\"}"
        ),
        8.0,
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("sigil_gate_requests_total{outcome=\"forwarded\",rule=\"")),
        "{text}"
    );
    assert!(
        !text.contains("sigil_live_instances"),
        "the gate exports only its own"
    );
    assert_eq!(scrape(metrics, "/readyz").await.0, 200);

    // The gate's own SVID rotates (its entry's 6 s TTL); new connections
    // still work.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let fresh = my_identity(&daemon, 0).await;
    assert!(
        admitted(addr, &fresh).await,
        "the gate serves across its rotation"
    );
    daemon.stop().await;
}

/// One client cannot take the gate from the others: connections that never
/// start a handshake are capped per remote address (so a client from
/// another address still gets in at once), and one caller's verified
/// connections are capped (the next is closed, others are unaffected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_every_connection_of_the_gate() {
    let sigil = std::fs::canonicalize(SIGIL).unwrap();
    let me = nix::unistd::geteuid();
    let daemon = TestDaemon::start_with(&format!(
        "trust_domain = \"sigil.test\"\n\
         [[entry]]\nname = \"gate\"\nselectors = [\"unix:path:{}\"]\n\
         [[entry]]\nname = \"tester\"\nselectors = [\"unix:uid:{me}\"]\n",
        sigil.display()
    ))
    .await;
    let work = tempfile::tempdir().unwrap();
    let upstream = echo_service().await;
    let log = work.path().join("gate.log");
    let (_gate, addr, _) = gate(
        &daemon,
        upstream,
        &["--allow", "spiffe://sigil.test/agent/tester/**"],
        &log,
    )
    .await;
    let agent = my_identity(&daemon, 0).await;

    // 40 connections from 127.0.0.1 that never say hello.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (mut sender, _) = connect_from(addr, &agent, Some("127.0.0.2".parse().unwrap()))
        .await
        .expect("another address gets a handshake at once");
    let (status, _) = call(&mut sender, "GET", "/hello", &[], "").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("too many handshakes in progress from this address"),
        "{logged}"
    );
    drop(idle);
    drop(sender);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One caller's 64 verified connections, then one more.
    let mut held = Vec::new();
    for i in 0..64 {
        let (mut sender, driving) = connect(addr, &agent).await.unwrap();
        let (status, _) = call(&mut sender, "GET", "/hello", &[], "")
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(status, 200, "connection {i}");
        held.push((sender, driving));
    }
    assert!(!admitted(addr, &agent).await, "the 65th is closed");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("this caller holds too many connections already"),
        "{logged}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        admitted(addr, &agent).await,
        "connections given back are usable again"
    );
    daemon.stop().await;
}

/// The bodies the gate reads for its MCP rules are bounded: one over 1 MiB
/// gets 413 without reaching the service, and one that stops arriving
/// gets 408 after 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_bounds_the_bodies_it_reads() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sigil = std::fs::canonicalize(SIGIL).unwrap();
    let me = nix::unistd::geteuid();
    let daemon = TestDaemon::start_with(&format!(
        "trust_domain = \"sigil.test\"\n\
         [[entry]]\nname = \"gate\"\nselectors = [\"unix:path:{}\"]\n\
         [[entry]]\nname = \"tester\"\nselectors = [\"unix:uid:{me}\"]\n",
        sigil.display()
    ))
    .await;
    let work = tempfile::tempdir().unwrap();
    let rules = work.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let upstream = echo_service().await;
    let log = work.path().join("gate.log");
    let (_gate, addr, _) = gate(
        &daemon,
        upstream,
        &["--rules", rules.to_str().unwrap()],
        &log,
    )
    .await;
    let agent = my_identity(&daemon, 0).await;

    let (mut sender, _) = connect(addr, &agent).await.unwrap();
    let json = [("content-type", "application/json")];
    let (status, _) = call(
        &mut sender,
        "POST",
        "/mcp",
        &json,
        &" ".repeat((1 << 20) + 1),
    )
    .await
    .unwrap();
    assert_eq!(status, 413, "a body over 1 MiB");
    let (status, _) = call(
        &mut sender,
        "POST",
        "/mcp",
        &json,
        &format!("{}{{}}", " ".repeat(1000)),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "a small body still passes");

    // A body that stops after 10 of its 100 bytes.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&agent)))
        .connect(ServerName::try_from("gate.invalid").unwrap(), tcp)
        .await
        .unwrap();
    let started = Instant::now();
    tls.write_all(
        b"POST /mcp HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"jsonrpc\"",
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut answer))
        .await
        .expect("the gate answers within 20 s")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "408 only after the read timeout: {:?}",
        started.elapsed()
    );
}

/// `/readyz` tells a load balancer when the gate cannot follow revocations:
/// 503 while its Workload API streams are down (the daemon stopped), 200
/// again once a daemon serves the socket anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_is_not_ready_while_its_workload_api_streams_are_down() {
    let sigil = std::fs::canonicalize(SIGIL).unwrap();
    let config = format!(
        "trust_domain = \"sigil.test\"\n\
         [[entry]]\nname = \"gate\"\nselectors = [\"unix:path:{}\"]\n",
        sigil.display()
    );
    let daemon = TestDaemon::start_with(&config).await;
    let work = tempfile::tempdir().unwrap();
    let upstream = echo_service().await;
    let log = work.path().join("gate.log");
    let (_gate, _addr, metrics) = gate(
        &daemon,
        upstream,
        &[
            "--allow",
            "spiffe://sigil.test/agent/tester/**",
            "--metrics",
            "127.0.0.1:0",
        ],
        &log,
    )
    .await;
    let metrics = metrics.unwrap();
    assert_eq!(scrape(metrics, "/readyz").await.0, 200);

    let dir = daemon.stop().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body) = scrape(metrics, "/readyz").await;
        if status == 503 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        scrape(metrics, "/livez").await.0,
        200,
        "alive, only not ready"
    );

    // The same socket served again (same state: the same CA).
    let _daemon = TestDaemon::start_in(dir, &config).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = scrape(metrics, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready again within 20 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
