//! A Rust service that accepts agents by their SPIFFE ID over mTLS, with
//! its own SVID, bundle and CRL kept current from the Workload API by
//! `sigil::verify` (rotation needs no restart; a revoked SVID is refused at
//! the next handshake). It answers every request with the caller's ID.
//!
//! ```sh
//! export SPIFFE_ENDPOINT_SOCKET=unix://$XDG_RUNTIME_DIR/sigil/workload.sock
//! cargo run --example mtls_service -- 127.0.0.1:9443 'spiffe://sigil.local/agent/**'
//! ```

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use sigil::verify::source::WorkloadSource;
use sigil::verify::{IdPattern, verify_svid};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen = args.first().map_or("127.0.0.1:9443", String::as_str);
    let allow = args
        .iter()
        .skip(1)
        .map(|p| p.parse::<IdPattern>())
        .collect::<Result<Vec<_>, _>>()?;
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET").context("set SPIFFE_ENDPOINT_SOCKET")?;
    let socket = endpoint.trim_start_matches("unix://").into();
    let source =
        WorkloadSource::start(socket, Duration::from_secs(30), CancellationToken::new()).await?;
    println!("serving as {} on {listen}", source.current().spiffe_id);
    let config = sigil::verify::tls::server_config(source.clone(), allow)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, source) = (acceptor.clone(), source.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            // The handshake verified the caller; read its ID back.
            let material = source.current();
            let trust = material.trust();
            let Some(chain) = tls.get_ref().1.peer_certificates() else {
                return;
            };
            let Ok(caller) = verify_svid(chain, &trust, &[], SystemTime::now()) else {
                return;
            };
            let id = caller.spiffe_id.to_string();
            let service = hyper::service::service_fn(move |_req| {
                let id = id.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        format!("hello {id}\n"),
                    ))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
