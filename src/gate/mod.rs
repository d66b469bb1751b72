//! `sigil gate`: an mTLS-terminating reverse proxy that puts agent
//! identity and revocation in front of any HTTP/1.1 or HTTP/2 service.
//!
//! Owns the proxy: TLS with SVIDs from a Workload API (`verify::tls` over
//! `verify::source`, so rotation needs no restart), the per-request rule
//! decision (`rules`) on what is read from the request the way the service
//! will read it (`request`, `mcp`), forwarding with the caller's identity in
//! headers (copies the client sent are stripped first), what one client may
//! hold (`limits`), and cutting a live connection whose certificate the CRL
//! revokes or that expires. Each decision is logged as one structured line
//! and counted (`metrics::gate`). HTTP is hyper's, TLS rustls'.

pub mod limits;
pub mod mcp;
pub mod request;
pub mod rules;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ids::SpiffeId;
use crate::metrics::gate::{GateClose, GateOutcome, Handshake, global as metrics};
use crate::verify::source::{Material, WorkloadSource};
use crate::verify::verify_svid;
pub use rules::{Decision, Rules};

/// A body of any origin, boxed.
type Body = BoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Longest a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest an HTTP/1.1 client may take to send a request's head, and to
/// start the next one on a kept-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the gate waits for a body it must read (queueing included).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most concurrent streams on one HTTP/2 connection.
const MAX_STREAMS: u32 = 64;
/// Largest request body read to find the MCP method and tool (JSON-RPC
/// messages are small; a larger body is refused with 413 when a rule needs
/// them).
const MAX_INSPECTED_BODY: usize = 1 << 20; // 1 MiB
/// Most client connections at once; more wait at accept.
const MAX_CONNECTIONS: usize = 1024;

/// The identity headers the gate sets (and strips from clients).
pub const SPIFFE_ID_HEADER: &str = "x-sigil-spiffe-id";
/// The caller's instance id, when its SPIFFE ID names one.
pub const INSTANCE_HEADER: &str = "x-sigil-instance";
/// The caller's task id, when its SPIFFE ID names one.
pub const TASK_HEADER: &str = "x-sigil-task";
/// Envoy's header for the client certificate's facts.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

/// Why the gate stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS configuration could not be built.
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// One verified caller of one connection.
#[derive(Debug, Clone)]
struct Peer {
    id: SpiffeId,
    serial: String,
    not_after: SystemTime,
    leaf_sha256: String,
}

struct Shared {
    rules: Rules,
    upstream: Uri,
    client: Client<HttpConnector, Body>,
    source: WorkloadSource,
    /// Handshakes in progress per remote IP.
    handshakes: Arc<limits::PerKey<std::net::IpAddr>>,
    /// Verified connections per caller.
    callers: Arc<limits::PerKey<String>>,
    /// Bodies buffered for inspection, gate-wide.
    inspections: Arc<tokio::sync::Semaphore>,
}

/// Serves the gate on `listener` until `shutdown`: TLS with the source's
/// SVID, client SVIDs that some rule allows, each request decided by
/// `rules` and forwarded to `upstream` (`http://host:port`).
///
/// # Errors
/// [`Error::Tls`] when rustls refuses the configuration.
pub async fn serve(
    listener: TcpListener,
    source: WorkloadSource,
    rules: Rules,
    upstream: Uri,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let config = crate::verify::tls::server_config(source.clone(), rules.all_patterns())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let shared = Arc::new(Shared {
        rules,
        upstream,
        client: Client::builder(TokioExecutor::new()).build_http(),
        source,
        handshakes: limits::PerKey::new(limits::HANDSHAKES_PER_IP),
        callers: limits::PerKey::new(limits::CONNECTIONS_PER_CALLER),
        inspections: Arc::new(tokio::sync::Semaphore::new(limits::INSPECTIONS)),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { return Ok(()) };
        let (tcp, remote) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, shared, shutdown) = (acceptor.clone(), shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            connection(tcp, remote, acceptor, shared, shutdown).await;
            drop(slot);
        });
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let Some(handshaking) = shared.handshakes.acquire(remote.ip()) else {
        metrics().handshake(Handshake::Refused);
        tracing::info!(%remote, decision = "refused", stage = "handshake", max = limits::HANDSHAKES_PER_IP, "too many handshakes in progress from this address; closed");
        return;
    };
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
    drop(handshaking);
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics().handshake(Handshake::Refused);
            tracing::info!(%remote, decision = "refused", stage = "handshake", error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics().handshake(Handshake::TimedOut);
            tracing::info!(%remote, decision = "refused", stage = "handshake", "the client did not finish the TLS handshake in time");
            return;
        }
    };
    // The handshake's verifier accepted the client a moment ago; a CRL
    // that arrived in between is the usual reason to refuse it here.
    let peer = match peer_of(&tls, &shared.source.current()) {
        Ok(peer) => peer,
        Err(refusal) => {
            metrics().handshake(Handshake::Refused);
            tracing::info!(%remote, decision = "refused", stage = "handshake", reason = %refusal, "refused the client's certificate after the handshake");
            return;
        }
    };
    let Some(_counted) = shared.callers.acquire(limits::caller_key(&peer.id)) else {
        metrics().handshake(Handshake::Refused);
        tracing::info!(%remote, peer = %peer.id, decision = "refused", stage = "handshake", max = limits::CONNECTIONS_PER_CALLER, "this caller holds too many connections already; closed");
        return;
    };
    metrics().handshake(Handshake::Accepted);
    let _open = metrics().connection_opened();
    tracing::debug!(%remote, peer = %peer.id, "connection accepted");
    let service = {
        let (shared, peer) = (shared.clone(), peer.clone());
        let mine = Arc::new(tokio::sync::Semaphore::new(
            limits::INSPECTIONS_PER_CONNECTION,
        ));
        hyper::service::service_fn(move |req| {
            let (shared, peer, mine) = (shared.clone(), peer.clone(), mine.clone());
            async move { Ok::<_, Infallible>(handle(req, &peer, &shared, &mine).await) }
        })
    };
    // The protocol is the one ALPN agreed (h2, else HTTP/1.1).
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let io = TokioIo::new(tls);
    let serving: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), hyper::Error>> + Send>,
    > = if h2 {
        Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(MAX_STREAMS)
                .serve_connection(io, service),
        )
    } else {
        Box::pin(
            hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, service),
        )
    };
    let expiry = peer
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::select! {
        served = serving => {
            tracing::debug!(%remote, peer = %peer.id, outcome = ?served.err(), "connection ended");
        }
        () = revoked(&peer.serial, shared.source.subscribe()) => {
            metrics().closed(GateClose::Revoked);
            tracing::info!(%remote, peer = %peer.id, serial = %peer.serial, decision = "closed", reason = "revoked", "closed a connection whose certificate was revoked");
        }
        () = tokio::time::sleep(expiry) => {
            metrics().closed(GateClose::Expired);
            tracing::info!(%remote, peer = %peer.id, decision = "closed", reason = "expired", "closed a connection whose certificate expired");
        }
        () = shutdown.cancelled() => {}
    }
}

/// Resolves when the CRL lists `serial`.
async fn revoked(serial: &str, mut material: tokio::sync::watch::Receiver<Arc<Material>>) {
    loop {
        if material.borrow_and_update().revoked.contains(serial) {
            return;
        }
        if material.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The verified caller of a TLS connection (the handshake verified it;
/// this reads its identity back).
fn peer_of(
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    material: &Material,
) -> Result<Peer, String> {
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no client certificate")?;
    let trust = material.trust();
    let verified = verify_svid(chain, &trust, &[], SystemTime::now()).map_err(|r| r.to_string())?;
    let leaf = chain.first().ok_or("an empty certificate chain")?;
    Ok(Peer {
        id: verified.spiffe_id,
        serial: verified.serial,
        not_after: verified.not_after,
        leaf_sha256: hex::encode(Sha256::digest(leaf.as_ref())),
    })
}

fn text(status: StatusCode, message: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(message + "\n"))
            .map_err(|e: Infallible| -> BoxError { Box::new(e) })
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

async fn handle(
    req: Request<Incoming>,
    peer: &Peer,
    shared: &Shared,
    mine: &tokio::sync::Semaphore,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let (request, body) = match inspect(&parts, body, shared, mine).await {
        Ok(inspected) => inspected,
        Err((refused, request)) => return unreadable(refused, peer, &request),
    };
    let decision = shared.rules.decide(&peer.id, &request);
    let (allowed, denied) = match &decision {
        Decision::Allow(rule) => (Some(*rule), None),
        Decision::Deny(rule, reason) => (None, Some((*rule, reason.as_str()))),
    };
    tracing::info!(
        decision = if allowed.is_some() { "allow" } else { "deny" },
        peer = %peer.id,
        method = %request.method,
        path = %request.path,
        mcp_method = request.mcp_method.as_deref().unwrap_or(""),
        mcp_tool = request.mcp_tool.as_deref().unwrap_or(""),
        rule = allowed.or(denied.and_then(|d| d.0)).map_or(-1, |r| r as i64),
        reason = denied.map_or("", |d| d.1),
        "request"
    );
    if let Some((rule, reason)) = denied {
        metrics().request(GateOutcome::Denied, rule);
        return text(StatusCode::FORBIDDEN, format!("forbidden: {reason}"));
    }
    strip_hop_by_hop(&mut parts.headers);
    let own = shared.source.current().spiffe_id.to_string();
    set_identity(&mut parts.headers, peer, &own);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut uri = shared.upstream.clone().into_parts();
    uri.path_and_query = path_and_query.parse().ok();
    let Ok(uri) = Uri::from_parts(uri) else {
        metrics().request(GateOutcome::BadRequest, allowed);
        return text(
            StatusCode::BAD_REQUEST,
            "a request path the gate cannot forward".into(),
        );
    };
    parts.uri = uri;
    // The upstream speaks HTTP/1.1 (most local services do).
    parts.version = http::Version::HTTP_11;
    parts.headers.remove(http::header::HOST);
    match shared
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(mut response) => {
            metrics().request(GateOutcome::Forwarded, allowed);
            // The upstream's connection headers are about its connection to
            // the gate, not the client's (a `connection: close` passed on
            // would close the client's connection too).
            strip_hop_by_hop(response.headers_mut());
            response.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed())
        }
        Err(e) => {
            metrics().request(GateOutcome::UpstreamFailed, allowed);
            tracing::warn!(error = %e, upstream = %shared.upstream, "the upstream failed");
            text(StatusCode::BAD_GATEWAY, format!("the upstream failed: {e}"))
        }
    }
}

/// What the rules decide on, read from the request (`request`, `mcp`), and
/// the body to forward. When an MCP rule could apply, the body is read
/// (bounded) to find the JSON-RPC call, the client's `Mcp-Method`/`Mcp-Name`
/// headers are checked against it, and the bytes read are forwarded;
/// otherwise those headers only label the log and the body streams through.
async fn inspect(
    parts: &http::request::Parts,
    body: Incoming,
    shared: &Shared,
    mine: &tokio::sync::Semaphore,
) -> Result<(rules::Request, Body), (mcp::Unreadable, rules::Request)> {
    let rules = &shared.rules;
    let mut request = rules::Request {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        mcp_method: None,
        mcp_tool: None,
    };
    let checked =
        request::method(&parts.method).and_then(|m| Ok((m, request::path(parts.uri.path())?)));
    match checked {
        Ok((method, path)) => (request.method, request.path) = (method, path),
        Err(refused) => return Err((refused, request)),
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if !rules.need_mcp_for(&request.method, &request.path) {
        request.mcp_method = header("mcp-method");
        request.mcp_tool = header("mcp-name");
        return Ok((
            request,
            body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
        ));
    }
    if let Err(refused) = mcp::check_encoding(&parts.headers) {
        return Err((refused, request));
    }
    // Bounded in memory (a connection's share, the gate's share) and in
    // time: a client that sends its body slowly holds a share only so long.
    let read = async {
        let _mine = mine.acquire().await;
        let _ours = shared.inspections.acquire().await;
        Limited::new(body, MAX_INSPECTED_BODY).collect().await
    };
    let Ok(read) = tokio::time::timeout(BODY_READ_TIMEOUT, read).await else {
        let refused = mcp::Unreadable {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {}",
                humantime::format_duration(BODY_READ_TIMEOUT)
            ),
        };
        return Err((refused, request));
    };
    let bytes = match read {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let refused = if e.is::<http_body_util::LengthLimitError>() {
                mcp::Unreadable {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!("request body over {MAX_INSPECTED_BODY} bytes"),
                }
            } else {
                mcp::Unreadable {
                    status: StatusCode::BAD_REQUEST,
                    message: format!("the request body could not be read: {e}"),
                }
            };
            return Err((refused, request));
        }
    };
    match mcp::of_request(&parts.headers, &bytes) {
        Ok(call) => {
            request.mcp_method = call.method;
            request.mcp_tool = call.tool;
        }
        Err(refused) => return Err((refused, request)),
    }
    let body = Full::new(bytes)
        .map_err(|e: Infallible| -> BoxError { Box::new(e) })
        .boxed();
    Ok((request, body))
}

/// Sets the caller's identity headers, after removing every copy the
/// client sent, including names a WSGI server would read as the same
/// (`x_sigil_spiffe_id`).
fn set_identity(headers: &mut http::HeaderMap, peer: &Peer, own: &str) {
    let identity = [SPIFFE_ID_HEADER, INSTANCE_HEADER, TASK_HEADER, XFCC_HEADER];
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            identity
                .iter()
                .any(|i| request::same_header(name.as_str(), i))
        })
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
    let id = peer.id.to_string();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    set(
        XFCC_HEADER,
        format!("By={own};Hash={};URI={id}", peer.leaf_sha256),
    );
    set(SPIFFE_ID_HEADER, id);
    let path: Vec<&str> = peer.id.path().split('/').collect();
    let after = |key: &str| {
        path.windows(2)
            .find(|w| w[0] == key)
            .map(|w| w[1].to_owned())
    };
    if let Some(instance) = after("instance") {
        set(INSTANCE_HEADER, instance);
    }
    if let Some(task) = after("task") {
        set(TASK_HEADER, task);
    }
}

/// Refuses a request whose method, path or MCP call cannot be read the way
/// the service would read it (logged, and counted as `unreadable`: no rule
/// was asked).
fn unreadable(refused: mcp::Unreadable, peer: &Peer, request: &rules::Request) -> Response<Body> {
    let outcome = if refused.status == StatusCode::PAYLOAD_TOO_LARGE {
        GateOutcome::TooLarge
    } else {
        GateOutcome::Unreadable
    };
    metrics().request(outcome, None);
    tracing::info!(
        decision = "deny",
        peer = %peer.id,
        method = %request.method,
        path = %request.path,
        reason = %refused.message,
        "request"
    );
    text(refused.status, format!("refused: {}", refused.message))
}

/// Removes the headers that belong to one connection, not the request.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // The headers the Connection header names are this hop's too.
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}
