//! The metrics and health listener: `/metrics`, `/livez` and `/readyz` over
//! plain HTTP/1.1 on one TCP socket.
//!
//! Owns the accept loop and each connection's bounds: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at accept), headers read
//! within [`HEADER_READ_TIMEOUT`], one request per connection (no
//! keep-alive), request bodies never read, and a whole connection cut off
//! after [`CONNECTION_TIMEOUT`]. Every route is GET; anything else is 405.
//!
//! Does not own: what "ready" means. The app implements [`Health`] (socket
//! served, store writable, CA valid); this module runs it under
//! [`READY_TIMEOUT`] and reports each failing check on its own line.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most connections served at once; more are closed as they are accepted.
/// Probes and a scraper or two need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest a client may take to send its request line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection may live, from accept to close (a client that does
/// not read its response is cut off here).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the readiness checks may take; past it, `/readyz` answers 503.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers) read: probes and
/// scrapers send a few hundred bytes.
const MAX_BUF: usize = 16 << 10; // 16 KiB
/// How long, on shutdown, connections in flight get to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (out of file descriptors, say), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The outcome of the readiness checks: `Err` holds one line per failing
/// check, saying what failed.
pub type Readiness = Result<(), Vec<String>>;

/// The daemon's readiness, as `/readyz` asks it.
pub trait Health: Send + Sync {
    /// Runs every readiness check. Runs once per `/readyz` request, under
    /// [`READY_TIMEOUT`].
    fn check(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>>;

    /// The `/metrics` body: the daemon's registry unless the process serves
    /// another (`sigil gate` serves its own).
    ///
    /// # Errors
    /// When a metric cannot be encoded.
    fn encode_metrics(&self) -> Result<String, std::fmt::Error> {
        super::global().encode()
    }
}

/// The bounds on connections; tests shrink them.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    max_connections: usize,
    header_read_timeout: Duration,
    connection_timeout: Duration,
}

impl Bounds {
    const DEFAULT: Self = Self {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: HEADER_READ_TIMEOUT,
        connection_timeout: CONNECTION_TIMEOUT,
    };
}

/// Serves `/metrics` (from [`Health::encode_metrics`]), `/livez` and `/readyz` on
/// `listener` until `shutdown` is cancelled; then stops accepting, gives the
/// connections in flight a second to finish, and returns.
pub async fn serve(listener: TcpListener, health: Arc<dyn Health>, shutdown: CancellationToken) {
    serve_with(listener, health, shutdown, Bounds::DEFAULT).await;
}

async fn serve_with(
    listener: TcpListener,
    health: Arc<dyn Health>,
    shutdown: CancellationToken,
    bounds: Bounds,
) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_read_timeout)
        .keep_alive(false)
        .max_buf_size(MAX_BUF);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, max = bounds.max_connections, "metrics listener: too many connections; closed");
            continue;
        };
        let conn = serve_connection(
            &builder,
            stream,
            health.clone(),
            shutdown.clone(),
            bounds.connection_timeout,
        );
        connections.spawn(async move {
            conn.await;
            drop(slot);
        });
    }
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE * 2, connections.wait())
        .await
        .is_err()
    {
        tracing::debug!("metrics listener: connections still open at shutdown were dropped");
    }
}

/// Serves one connection: its one request, within `timeout` from accept,
/// or a short grace once `shutdown` is cancelled.
fn serve_connection(
    builder: &http1::Builder,
    stream: TcpStream,
    health: Arc<dyn Health>,
    shutdown: CancellationToken,
    timeout: Duration,
) -> impl Future<Output = ()> + Send + 'static {
    let peer = stream.peer_addr().ok();
    let service = service_fn(move |req| {
        let health = health.clone();
        async move { Ok::<_, Infallible>(route(&req, health.as_ref()).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    async move {
        tokio::pin!(conn);
        let served = tokio::select! {
            served = tokio::time::timeout(timeout, conn.as_mut()) => served,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await
            }
        };
        match served {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(?peer, error = %e, "metrics listener: connection failed"),
            Err(_) => tracing::debug!(?peer, "metrics listener: connection timed out; closed"),
        }
    }
}

/// The response to one request. The body, if any, is never read.
async fn route(req: &Request<Incoming>, health: &dyn Health) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/livez" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        "/metrics" => metrics(health),
        "/livez" => text(StatusCode::OK, "ok\n"),
        _ => readyz(health).await,
    }
}

fn metrics(health: &dyn Health) -> Response<Full<Bytes>> {
    match health.encode_metrics() {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(super::CONTENT_TYPE));
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode the metrics");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            )
        }
    }
}

async fn readyz(health: &dyn Health) -> Response<Full<Bytes>> {
    let failing = match tokio::time::timeout(READY_TIMEOUT, health.check()).await {
        Ok(Ok(())) => return text(StatusCode::OK, "ready\n"),
        Ok(Err(failing)) => failing,
        Err(_) => vec![format!(
            "the readiness checks did not finish within {}",
            humantime::format_duration(READY_TIMEOUT)
        )],
    };
    tracing::debug!(failing = %failing.join("; "), "not ready");
    let mut body = String::new();
    for line in &failing {
        // One line per check, whatever the check wrote.
        body.push_str(&line.replace(['\r', '\n'], " "));
        body.push('\n');
    }
    if body.is_empty() {
        body.push_str("not ready\n");
    }
    text(StatusCode::SERVICE_UNAVAILABLE, body)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// A [`Health`] whose answer the test sets.
    struct FakeHealth(Mutex<Readiness>);

    impl Health for FakeHealth {
        fn check(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>> {
            let answer = self.0.lock().unwrap().clone();
            Box::pin(async move { answer })
        }
    }

    struct Server {
        addr: std::net::SocketAddr,
        health: Arc<FakeHealth>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    /// Small bounds, so the tests of the bounds run fast.
    const TEST_BOUNDS: Bounds = Bounds {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(1),
        connection_timeout: Duration::from_secs(2),
    };

    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(FakeHealth(Mutex::new(Ok(()))));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_with(
            listener,
            health.clone(),
            shutdown.clone(),
            TEST_BOUNDS,
        ));
        Server {
            addr,
            health,
            shutdown,
            task,
        }
    }

    /// Sends `raw` and reads the whole response (the server closes after it).
    async fn exchange(addr: std::net::SocketAddr, raw: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let response = exchange(addr, &raw).await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    fn status_line(head: &str) -> &str {
        head.lines().next().unwrap()
    }

    #[tokio::test]
    async fn livez_and_readyz_answer_ok_when_healthy() {
        let server = start().await;
        let (head, body) = get(server.addr, "/livez").await;
        assert_eq!(status_line(&head), "HTTP/1.1 200 OK");
        assert_eq!(body, "ok\n");
        let (head, body) = get(server.addr, "/readyz").await;
        assert_eq!(status_line(&head), "HTTP/1.1 200 OK");
        assert_eq!(body, "ready\n");
        server.shutdown.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn readyz_is_503_with_one_line_per_failing_check() {
        let server = start().await;
        *server.health.0.lock().unwrap() = Err(vec![
            "store: not writable: disk full".to_owned(),
            "ca: expired\nat noon".to_owned(),
        ]);
        let (head, body) = get(server.addr, "/readyz").await;
        assert_eq!(status_line(&head), "HTTP/1.1 503 Service Unavailable");
        assert_eq!(
            body,
            "store: not writable: disk full\nca: expired at noon\n"
        );
        // Liveness does not depend on readiness.
        let (head, _) = get(server.addr, "/livez").await;
        assert_eq!(status_line(&head), "HTTP/1.1 200 OK");
        server.shutdown.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text_with_its_content_type() {
        let server = start().await;
        let (head, body) = get(server.addr, "/metrics").await;
        assert_eq!(status_line(&head), "HTTP/1.1 200 OK");
        assert!(
            head.to_ascii_lowercase().contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        assert!(body.contains("# TYPE sigil_open_streams gauge"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        server.shutdown.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_other_methods_405() {
        let server = start().await;
        let (head, _) = get(server.addr, "/").await;
        assert_eq!(status_line(&head), "HTTP/1.1 404 Not Found");
        let (head, _) = get(server.addr, "/metrics/../etc").await;
        assert_eq!(status_line(&head), "HTTP/1.1 404 Not Found");
        let response = exchange(
            server.addr,
            "POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert!(
            response.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{response}"
        );
        assert!(response.to_ascii_lowercase().contains("allow: get\r\n"));
        server.shutdown.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let server = start().await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"GET /livez HTTP/1.1\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the server closed the connection")
            .ok();
        assert!(started.elapsed() < Duration::from_secs(5));
        // hyper answers a header timeout with 408 or just closes.
        let out = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
        server.shutdown.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_accept() {
        let server = start().await;
        // Hold every slot with a connection that sent nothing yet.
        let mut held = Vec::new();
        for _ in 0..TEST_BOUNDS.max_connections {
            held.push(TcpStream::connect(server.addr).await.unwrap());
        }
        // Let the server accept them all (well within their header timeout),
        // then check one more is closed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(server.addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut out))
            .await
            .unwrap();
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        // Slots free up as held connections close.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (head, _) = get(server.addr, "/livez").await;
        assert_eq!(status_line(&head), "HTTP/1.1 200 OK");
        server.shutdown.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn serve_returns_on_shutdown_even_with_an_idle_connection_open() {
        let server = start().await;
        let _idle = TcpStream::connect(server.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .expect("serve returned")
            .unwrap();
    }
}
