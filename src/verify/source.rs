//! [`WorkloadSource`]: a process's own SVID, its trust bundle and CRL, kept
//! current from one FetchX509SVID stream of a Workload API (Sigil's, or any
//! SPIFFE agent's), so that TLS built on it (`tls`) never needs a restart.
//! The stream is reopened with a backoff when it ends or is refused; the
//! last good material stays in force meanwhile (its SVID stays valid until
//! it expires).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::ids::{SpiffeId, TrustDomain};
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::proto::workload::{X509svidRequest, X509svidResponse};

/// First pause before reopening the stream; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest pause before reopening the stream.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What a message of the stream makes usable at once.
#[derive(Debug)]
pub struct Material {
    /// This process's SPIFFE ID (the default SVID's).
    pub spiffe_id: SpiffeId,
    /// Its trust domain: the one whose SVIDs are accepted.
    pub trust_domain: TrustDomain,
    /// The default SVID and its key, ready for rustls.
    pub certified: Arc<CertifiedKey>,
    /// The trust domain's CA certificates.
    pub bundle: Vec<CertificateDer<'static>>,
    /// The CRLs (DER).
    pub crls: Vec<Vec<u8>>,
    /// Every serial on those CRLs (lower-case hex), to find live
    /// connections that must be cut.
    pub revoked: HashSet<String>,
}

/// Why no material could be made.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The Workload API could not be reached or refused.
    #[error("the Workload API at {path}: {message}")]
    Unavailable {
        /// The socket.
        path: PathBuf,
        /// What happened.
        message: String,
    },
    /// A message could not be used.
    #[error("the Workload API sent unusable material: {0}")]
    Unusable(String),
}

/// The live material of one process.
#[derive(Clone)]
pub struct WorkloadSource {
    rx: watch::Receiver<Arc<Material>>,
}

impl WorkloadSource {
    /// Connects to the Workload API on `socket`, waits for the first usable
    /// message (up to `wait`), then keeps the material current in the
    /// background until `shutdown`.
    ///
    /// # Errors
    /// [`SourceError`] when no usable material came within `wait`.
    pub async fn start(
        socket: PathBuf,
        wait: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, SourceError> {
        let mut stream = tokio::time::timeout(wait, open(&socket))
            .await
            .map_err(|_| SourceError::Unavailable {
                path: socket.clone(),
                message: format!("no answer within {wait:?}"),
            })??;
        let first = match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(Ok(msg))) => material(&msg)?,
            Ok(Some(Err(s))) => {
                return Err(SourceError::Unavailable {
                    path: socket,
                    message: format!("{}: {}", s.code(), s.message()),
                });
            }
            _ => {
                return Err(SourceError::Unavailable {
                    path: socket,
                    message: "the stream ended without SVIDs".into(),
                });
            }
        };
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(follow(socket, stream, tx, shutdown));
        Ok(Self { rx })
    }

    /// The material now.
    pub fn current(&self) -> Arc<Material> {
        self.rx.borrow().clone()
    }

    /// Every change of the material.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Material>> {
        self.rx.clone()
    }
}

type Stream = tonic::Streaming<X509svidResponse>;

async fn open(socket: &Path) -> Result<Stream, SourceError> {
    let unavailable = |message: String| SourceError::Unavailable {
        path: socket.to_owned(),
        message,
    };
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(X509svidRequest {});
    request.metadata_mut().insert(
        crate::workload_api::header::SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| unavailable(format!("{}: {}", s.code(), s.message())))
}

/// Publishes every usable message; reopens the stream when it ends.
async fn follow(
    socket: PathBuf,
    mut stream: Stream,
    tx: watch::Sender<Arc<Material>>,
    shutdown: CancellationToken,
) {
    let mut retry = RETRY_FIRST;
    loop {
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(msg)) => match material(&msg) {
                    Ok(m) => {
                        retry = RETRY_FIRST;
                        tx.send_replace(Arc::new(m));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "an unusable Workload API message was skipped")
                    }
                },
                Some(Err(s)) => {
                    tracing::warn!(code = ?s.code(), message = s.message(), "the Workload API stream ended");
                    break;
                }
                None => break,
            }
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(RETRY_MAX);
            match open(&socket).await {
                Ok(s) => {
                    stream = s;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?retry, "cannot reopen the Workload API stream")
                }
            }
        }
    }
}

/// Concatenated DER certificates, split.
pub fn split_certs(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>, SourceError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| SourceError::Unusable(format!("a certificate: {e}")))?;
        out.push(CertificateDer::from(der[..der.len() - rest.len()].to_vec()));
        der = rest;
    }
    Ok(out)
}

fn material(msg: &X509svidResponse) -> Result<Material, SourceError> {
    let svid = msg
        .svids
        .first()
        .ok_or_else(|| SourceError::Unusable("no SVID".into()))?;
    let spiffe_id = SpiffeId::new(&svid.spiffe_id)
        .map_err(|e| SourceError::Unusable(format!("SPIFFE ID {:?}: {e}", svid.spiffe_id)))?;
    let trust_domain = spiffe_id.trust_domain().clone();
    let chain = split_certs(&svid.x509_svid)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.to_vec()));
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| SourceError::Unusable(format!("the SVID's key: {e}")))?;
    let bundle = split_certs(&svid.bundle)?;
    let crls: Vec<Vec<u8>> = msg.crl.iter().map(|c| c.to_vec()).collect();
    let mut revoked = HashSet::new();
    for crl in &crls {
        let (_, parsed) = x509_parser::parse_x509_crl(crl)
            .map_err(|e| SourceError::Unusable(format!("a CRL: {e}")))?;
        revoked.extend(
            parsed
                .iter_revoked_certificates()
                .map(|r| hex::encode(r.raw_serial())),
        );
    }
    Ok(Material {
        spiffe_id,
        trust_domain,
        certified: Arc::new(CertifiedKey::new(chain, signing)),
        bundle,
        crls,
        revoked,
    })
}
