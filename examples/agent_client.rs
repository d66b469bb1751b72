//! An agent that begins a task, calls an mTLS service with the task's own
//! SVID (checking the service's SPIFFE ID, not a host name), and ends the
//! task, whose SVID is then revoked.
//!
//! ```sh
//! export SPIFFE_ENDPOINT_SOCKET=unix://$XDG_RUNTIME_DIR/sigil/workload.sock
//! cargo run --example agent_client -- 127.0.0.1:9443 'spiffe://sigil.local/agent/**'
//! ```
//! (Its entry needs `[entry.tasks] self_declare = true`.)

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil::proto::sigil::workload::v1::tasks_client::TasksClient;
use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest};
use sigil::proto::workload::X509svidRequest;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::verify::source::split_certs;
use sigil::verify::tls::SvidServerVerifier;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

/// A Workload API request with the header every SPIFFE client sends.
fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let service = args.first().map_or("127.0.0.1:9443", String::as_str);
    let service_id = args
        .get(1)
        .map_or("spiffe://sigil.local/**", String::as_str)
        .parse()?;
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET").context("set SPIFFE_ENDPOINT_SOCKET")?;
    let socket = endpoint.trim_start_matches("unix://").to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;

    let mut tasks = TasksClient::new(channel.clone());
    let task = tasks
        .begin(request(BeginRequest {
            task_id: "summarize-42".into(),
            ttl: None,
            attributes: Default::default(),
        }))
        .await?
        .into_inner()
        .task
        .context("no task in the answer")?;
    println!("task {} as {}", task.task_id, task.spiffe_id);

    // The task's SVID, from the stream (it arrives with the Begin).
    let mut stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request(X509svidRequest {}))
        .await?
        .into_inner();
    let svid = loop {
        let msg = stream.next().await.context("the stream ended")??;
        if let Some(s) = msg
            .svids
            .into_iter()
            .find(|s| s.spiffe_id == task.spiffe_id)
        {
            break s;
        }
    };
    let chain = split_certs(&svid.x509_svid)?;
    let bundle = split_certs(&svid.bundle)?;
    let td = sigil::ids::SpiffeId::new(&task.spiffe_id)?
        .trust_domain()
        .clone();
    let verifier = SvidServerVerifier::new(td, bundle, Vec::new(), vec![service_id]);
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier))
    .with_client_auth_cert(
        chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.to_vec())),
    )?;
    let tcp = tokio::net::TcpStream::connect(service).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("service.invalid")?, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    sender.ready().await?;
    let response = sender
        .send_request(
            hyper::Request::get("/")
                .header("host", "service")
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    let body = response.into_body().collect().await?.to_bytes();
    print!("{}", String::from_utf8_lossy(&body));

    tasks
        .end(request(EndRequest {
            task_id: task.task_id.clone(),
        }))
        .await?;
    println!("task ended: its SVID is revoked");
    Ok(())
}
