//! Tells each connection which of its requests are still in flight.
//!
//! A tower layer around every service on the workload socket: a request is
//! in flight from the moment it reaches the router until its response body
//! ends (for a Workload API stream: until the stream closes). The watchdog in
//! `peer` closes connections that have nothing in flight for too long; this
//! is what it counts.
//!
//! The same layer feeds the request metrics: each request is counted once
//! by method and gRPC status code, with its duration, when its status is
//! known (a unary call: at its trailers; a stream: at its first message or
//! the status that ends it before one; a request the client abandons:
//! `Canceled` when its response is dropped).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tonic::codegen::BoxFuture;
use tower::{Layer, Service};

use super::peer::{PeerInfo, RequestGuard};
use crate::metrics::{self, Method};

/// Wraps a service so its requests count as in flight on their connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackLayer;

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track { inner }
    }
}

/// See [`TrackLayer`].
#[derive(Clone, Debug)]
pub struct Track<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Track<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let guard = request
            .extensions()
            .get::<PeerInfo>()
            .map(|peer| peer.conn.begin_request());
        let rpc = RpcTimer::start(Method::from_path(request.uri().path()));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // A refusal before any message is a trailers-only response: its
            // status is in the headers.
            let rpc = match grpc_status(response.headers()) {
                Some(code) => {
                    rpc.finish(code);
                    None
                }
                None => Some(rpc),
            };
            Ok(response.map(|body| {
                tonic::body::Body::new(Tracked {
                    body,
                    _guard: guard,
                    rpc,
                })
            }))
        })
    }
}

/// The `grpc-status` of a header or trailer map, if it has one.
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// One request, until it is counted in the metrics: counted `Canceled` if
/// it is dropped first (the client went away before the status was known).
struct RpcTimer {
    method: Method,
    started: Instant,
    counted: bool,
}

impl RpcTimer {
    fn start(method: Method) -> Self {
        Self {
            method,
            started: Instant::now(),
            counted: false,
        }
    }

    fn finish(mut self, code: tonic::Code) {
        self.count(code);
    }

    fn count(&mut self, code: tonic::Code) {
        if !self.counted {
            self.counted = true;
            metrics::global().rpc(self.method, code, self.started.elapsed());
        }
    }

    /// Counts the request if `frame` settles its status: trailers always;
    /// for a stream, its first message.
    fn on_frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(trailers) = frame.trailers_ref() {
            self.count(grpc_status(trailers).unwrap_or(tonic::Code::Unknown));
        } else if frame.is_data() && self.method.streaming() {
            self.count(tonic::Code::Ok);
        }
    }
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        self.count(tonic::Code::Cancelled);
    }
}

/// A response body that keeps its request in flight until it is dropped,
/// and counts the request once its status is known.
struct Tracked {
    body: tonic::body::Body,
    _guard: Option<RequestGuard>,
    rpc: Option<RpcTimer>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let (Some(rpc), Poll::Ready(ready)) = (this.rpc.as_mut(), &polled) {
            match ready {
                Some(Ok(frame)) => rpc.on_frame(frame),
                Some(Err(status)) => rpc.count(status.code()),
                // Ended without trailers: no status was sent.
                None => rpc.count(tonic::Code::Unknown),
            }
            if rpc.counted {
                this.rpc = None;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::{BodyExt as _, StreamBody};

    use super::*;

    /// Each test uses its own method and code pairs: the counters are the
    /// process's, shared with every other test.
    fn count(method: Method, code: tonic::Code) -> u64 {
        metrics::global().request_count(method, code)
    }

    fn data() -> Frame<Bytes> {
        Frame::data(Bytes::from_static(b"message"))
    }

    fn trailers(code: &'static str) -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", http::HeaderValue::from_static(code));
        Frame::trailers(map)
    }

    /// The response the layer gives for a request to `method`, when the
    /// service answers with `status` in its headers (if any) and `frames`.
    async fn respond(
        method: Method,
        status: Option<&'static str>,
        frames: Vec<Frame<Bytes>>,
    ) -> http::Response<tonic::body::Body> {
        let mut builder = http::Response::builder();
        if let Some(code) = status {
            builder = builder.header("grpc-status", code);
        }
        let body = StreamBody::new(tokio_stream::iter(
            frames.into_iter().map(Ok::<_, Infallible>),
        ));
        let response = Mutex::new(Some(builder.body(tonic::body::Body::new(body)).unwrap()));
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            let response = response.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(response) }
        });
        let request = http::Request::builder()
            .uri(format!("/{}", method.as_str()))
            .body(())
            .unwrap();
        TrackLayer.layer(inner).call(request).await.unwrap()
    }

    #[tokio::test]
    async fn a_unary_call_is_counted_once_at_its_trailers() {
        let (method, code) = (Method::TaskList, tonic::Code::Ok);
        let before = count(method, code);
        let mut body = respond(method, None, vec![data(), trailers("0")])
            .await
            .into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert_eq!(count(method, code), before, "not before its status");
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        assert_eq!(count(method, code), before + 1);
        drop(body);
        assert_eq!(count(method, code), before + 1, "and not again");
    }

    #[tokio::test]
    async fn a_refusal_in_the_headers_is_counted_with_its_code_at_once() {
        let (method, code) = (Method::FetchX509Bundles, tonic::Code::PermissionDenied);
        let before = count(method, code);
        let response = respond(method, Some("7"), Vec::new()).await;
        assert_eq!(count(method, code), before + 1);
        drop(response);
        assert_eq!(count(method, code), before + 1);
    }

    #[tokio::test]
    async fn a_stream_is_counted_ok_at_its_first_message_and_only_then() {
        let method = Method::FetchWitBundles;
        let (ok, later) = (tonic::Code::Ok, tonic::Code::Unavailable);
        let (before_ok, before_later) = (count(method, ok), count(method, later));
        let mut body = respond(method, None, vec![data(), data(), trailers("14")])
            .await
            .into_body();
        assert_eq!(count(method, ok), before_ok);
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        assert_eq!(count(method, ok), before_ok + 1);
        assert_eq!(
            count(method, later),
            before_later,
            "the stream's end is not counted"
        );
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_status_is_counted_canceled() {
        let (method, code) = (Method::ValidateJwtSvid, tonic::Code::Cancelled);
        let before = count(method, code);
        let response = respond(method, None, vec![data(), trailers("0")]).await;
        drop(response);
        assert_eq!(count(method, code), before + 1);
    }
}
