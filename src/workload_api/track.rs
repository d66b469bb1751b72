//! Tells each connection which of its requests are still in flight.
//!
//! A tower layer around every service on the workload socket: a request is
//! in flight from the moment it reaches the router until its response body
//! ends (for a Workload API stream: until the stream closes). The watchdog in
//! `peer` closes connections that have nothing in flight for too long; this
//! is what it counts.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tonic::codegen::BoxFuture;
use tower::{Layer, Service};

use super::peer::{PeerInfo, RequestGuard};

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
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Tracked {
                    body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct Tracked {
    body: tonic::body::Body,
    _guard: Option<RequestGuard>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
