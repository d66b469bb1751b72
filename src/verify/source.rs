//! [`WorkloadSource`]: a process's own SVID, its trust bundle and CRL, kept
//! current from a Workload API (Sigil's, or any SPIFFE agent's), so that TLS
//! built on it (`tls`) never needs a restart. Two streams feed it: the own
//! SVID comes from FetchX509SVID, the CRL from FetchX509Bundles (Sigil sends
//! CRLs to verifiers only, on that stream; a `crl` another agent puts on the
//! SVID stream is used while the bundle stream has none). Each stream is
//! reopened with a backoff when it ends or is refused; the last good
//! material stays in force meanwhile (its SVID stays valid until it
//! expires), and `streams_up` says whether both are open.
//!
//! Does not own: what the material is checked against (`verify`), or the
//! TLS built on it (`tls`).

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::ids::{SpiffeId, TrustDomain};
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};

/// First pause before reopening a stream; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest pause before reopening a stream.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest wait for a stream to reopen before trying again.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the two streams make usable at once.
#[derive(Clone, Debug)]
pub struct Material {
    /// This process's SPIFFE ID (the default SVID's).
    pub spiffe_id: SpiffeId,
    /// Its trust domain: the one whose SVIDs are accepted.
    pub trust_domain: TrustDomain,
    /// The default SVID and its key, ready for rustls.
    pub certified: Arc<CertifiedKey>,
    /// The trust domain's CA certificates.
    pub bundle: Arc<Vec<CertificateDer<'static>>>,
    /// Every serial on the CRLs (lower-case hex; each CRL signed by a CA of
    /// `bundle`, checked once as it arrives): what handshakes are
    /// checked against, and how live connections that must be cut are
    /// found.
    pub revoked: Arc<HashSet<String>>,
}

impl Material {
    /// What a peer's SVID is verified against: the trust domain, its CA
    /// certificates and the revoked serials (a lookup per handshake, not a
    /// parse of the CRL).
    pub fn trust(&self) -> crate::verify::TrustSource<'_> {
        crate::verify::TrustSource {
            trust_domain: &self.trust_domain,
            bundle: &self.bundle,
            revocation: crate::verify::Revocation::Serials(&self.revoked),
        }
    }
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
    /// Whether the SVID stream and the bundle stream are open.
    up: [Arc<AtomicBool>; 2],
}

/// The fields of the material one message sets. Each stream owns its
/// fields and sets only those, so a slow CRL parse on one stream cannot
/// publish a stale SVID over a rotation the other just brought (or the
/// reverse).
enum Patch {
    /// The own SVID, its trust domain and the bundle (FetchX509SVID).
    Own(Own),
    /// The CRLs and their serials (FetchX509Bundles).
    Revocations(Revocations),
    /// Both, from an agent that puts the CRL on the SVID stream.
    Both(Own, Revocations),
    /// A message with nothing this source uses.
    Nothing,
}

impl Patch {
    fn apply(self, m: &mut Material) {
        let (own, revocations) = match self {
            Patch::Own(own) => (Some(own), None),
            Patch::Revocations(r) => (None, Some(r)),
            Patch::Both(own, r) => (Some(own), Some(r)),
            Patch::Nothing => (None, None),
        };
        if let Some((spiffe_id, certified, bundle)) = own {
            m.trust_domain = spiffe_id.trust_domain().clone();
            m.spiffe_id = spiffe_id;
            m.certified = certified;
            m.bundle = bundle;
        }
        if let Some(revoked) = revocations {
            m.revoked = revoked;
        }
    }
}

/// One stream's side of the source: where to reconnect, where to publish,
/// and its up flag.
struct Feed {
    socket: PathBuf,
    tx: watch::Sender<Arc<Material>>,
    up: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

impl WorkloadSource {
    /// Connects to the Workload API on `socket`, waits for the first usable
    /// message of both streams (up to `wait` in all), then keeps the
    /// material current in the background until `shutdown`.
    ///
    /// # Errors
    /// [`SourceError`] when no usable material came within `wait`.
    pub async fn start(
        socket: PathBuf,
        wait: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, SourceError> {
        let first = tokio::time::timeout(wait, first_material(&socket))
            .await
            .map_err(|_| SourceError::Unavailable {
                path: socket.clone(),
                message: format!("no SVID, bundle and CRL within {wait:?}"),
            })?;
        let (material, svids, bundles, crl_from_bundles) = first?;
        let (tx, rx) = watch::channel(Arc::new(material));
        let crl_from_bundles = Arc::new(AtomicBool::new(crl_from_bundles));
        let from_bundles = crl_from_bundles.clone();
        let (svids_up, bundles_up) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(true)),
        );
        tokio::spawn(follow(
            Feed {
                socket: socket.clone(),
                tx: tx.clone(),
                up: svids_up.clone(),
                shutdown: shutdown.clone(),
            },
            svids,
            open_svids,
            move |msg: &X509svidResponse, _: &Material| {
                let own = own(msg)?;
                if msg.crl.is_empty() || from_bundles.load(Ordering::Relaxed) {
                    return Ok(Patch::Own(own));
                }
                let revocations = revocations(&msg.crl, &own.2)?;
                Ok(Patch::Both(own, revocations))
            },
        ));
        tokio::spawn(follow(
            Feed {
                socket,
                tx,
                up: bundles_up.clone(),
                shutdown,
            },
            bundles,
            open_bundles,
            move |msg: &X509BundlesResponse, now: &Material| {
                if msg.crl.is_empty() {
                    return Ok(Patch::Nothing);
                }
                crl_from_bundles.store(true, Ordering::Relaxed);
                Ok(Patch::Revocations(revocations(&msg.crl, &now.bundle)?))
            },
        ));
        Ok(Self {
            rx,
            up: [svids_up, bundles_up],
        })
    }

    /// Whether both streams are open now. While one is down the material
    /// holds the last SVID or CRL it brought: a CRL that has not arrived
    /// cannot be enforced, which is why `sigil gate`'s `/readyz` says so.
    pub fn streams_up(&self) -> bool {
        self.up.iter().all(|up| up.load(Ordering::Relaxed))
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

type Svids = tonic::Streaming<X509svidResponse>;
type Bundles = tonic::Streaming<X509BundlesResponse>;

/// Opens both streams and builds the material from the first message of
/// each. The last item says whether the CRL came from the bundle stream.
async fn first_material(socket: &Path) -> Result<(Material, Svids, Bundles, bool), SourceError> {
    let unavailable = |message: String| SourceError::Unavailable {
        path: socket.to_owned(),
        message,
    };
    let mut svids = open_svids(socket.to_owned()).await?;
    let mut bundles = open_bundles(socket.to_owned()).await?;
    let svid_msg = first_message(&mut svids).await.map_err(unavailable)?;
    let bundle_msg = first_message(&mut bundles).await.map_err(unavailable)?;
    let mut material = own_material(&svid_msg)?;
    let from_bundles = !bundle_msg.crl.is_empty();
    let crls = if from_bundles {
        &bundle_msg.crl
    } else {
        &svid_msg.crl
    };
    Patch::Revocations(revocations(crls, &material.bundle)?).apply(&mut material);
    Ok((material, svids, bundles, from_bundles))
}

async fn first_message<M>(stream: &mut tonic::Streaming<M>) -> Result<M, String> {
    match stream.next().await {
        Some(Ok(msg)) => Ok(msg),
        Some(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
        None => Err("the stream ended before its first message".into()),
    }
}

async fn channel(socket: &Path) -> Result<Channel, SourceError> {
    crate::connect::channel(socket, crate::connect::Which::Workload)
        .await
        .map_err(|e| SourceError::Unavailable {
            path: socket.to_owned(),
            message: e.to_string(),
        })
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        crate::workload_api::header::SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

fn refused(socket: &Path, s: &tonic::Status) -> SourceError {
    SourceError::Unavailable {
        path: socket.to_owned(),
        message: format!("{}: {}", s.code(), s.message()),
    }
}

async fn open_svids(socket: PathBuf) -> Result<Svids, SourceError> {
    SpiffeWorkloadApiClient::new(channel(&socket).await?)
        .fetch_x509svid(request(X509svidRequest {}))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| refused(&socket, &s))
}

async fn open_bundles(socket: PathBuf) -> Result<Bundles, SourceError> {
    SpiffeWorkloadApiClient::new(channel(&socket).await?)
        .fetch_x509_bundles(request(X509BundlesRequest {}))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| refused(&socket, &s))
}

/// Applies every usable message of one stream to the material (the
/// fields it owns: see [`Patch`]); reopens the stream when it ends.
async fn follow<M, Open, Opened>(
    feed: Feed,
    mut stream: tonic::Streaming<M>,
    open: Open,
    patch: impl Fn(&M, &Material) -> Result<Patch, SourceError>,
) where
    Open: Fn(PathBuf) -> Opened,
    Opened: Future<Output = Result<tonic::Streaming<M>, SourceError>>,
{
    let Feed {
        socket,
        tx,
        up,
        shutdown,
    } = feed;
    let mut retry = RETRY_FIRST;
    loop {
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    // Parsed and checked against a snapshot, outside the
                    // channel's lock; then only this stream's fields change.
                    let snapshot = tx.borrow().clone();
                    match patch(&msg, &snapshot) {
                        Ok(patch) => {
                            retry = RETRY_FIRST;
                            tx.send_modify(|m| {
                                let mut updated = Material::clone(m);
                                patch.apply(&mut updated);
                                *m = Arc::new(updated);
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "an unusable Workload API message was skipped")
                        }
                    }
                }
                Some(Err(s)) => {
                    tracing::warn!(code = ?s.code(), message = s.message(), "a Workload API stream ended");
                    break;
                }
                None => {
                    tracing::warn!("a Workload API stream ended");
                    break;
                }
            }
        }
        up.store(false, Ordering::Relaxed);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(RETRY_MAX);
            let opened = tokio::select! {
                () = shutdown.cancelled() => return,
                opened = tokio::time::timeout(OPEN_TIMEOUT, open(socket.clone())) => opened,
            };
            match opened {
                Ok(Ok(s)) => {
                    stream = s;
                    up.store(true, Ordering::Relaxed);
                    tracing::info!("a Workload API stream is open again");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, retry_in = ?retry, "cannot reopen a Workload API stream")
                }
                Err(_) => {
                    tracing::debug!(retry_in = ?retry, "no answer reopening a Workload API stream")
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

/// The own SVID and bundle of a FetchX509SVID message, with no CRL yet.
fn own_material(msg: &X509svidResponse) -> Result<Material, SourceError> {
    let (spiffe_id, certified, bundle) = own(msg)?;
    Ok(Material {
        trust_domain: spiffe_id.trust_domain().clone(),
        spiffe_id,
        certified,
        bundle,
        revoked: Arc::default(),
    })
}

type Own = (
    SpiffeId,
    Arc<CertifiedKey>,
    Arc<Vec<CertificateDer<'static>>>,
);

fn own(msg: &X509svidResponse) -> Result<Own, SourceError> {
    let svid = msg
        .svids
        .first()
        .ok_or_else(|| SourceError::Unusable("no SVID".into()))?;
    let spiffe_id = SpiffeId::new(&svid.spiffe_id)
        .map_err(|e| SourceError::Unusable(format!("SPIFFE ID {:?}: {e}", svid.spiffe_id)))?;
    let chain = split_certs(&svid.x509_svid)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.to_vec()));
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| SourceError::Unusable(format!("the SVID's key: {e}")))?;
    let bundle = split_certs(&svid.bundle)?;
    Ok((
        spiffe_id,
        Arc::new(CertifiedKey::new(chain, signing)),
        Arc::new(bundle),
    ))
}

/// The serials (lower-case hex) the current CRLs list.
type Revocations = Arc<HashSet<String>>;

/// The revoked serials the CRLs list, once each CRL's signature checks
/// against a CA certificate of `bundle`.
fn revocations(
    crls: &[bytes::Bytes],
    bundle: &[CertificateDer<'static>],
) -> Result<Revocations, SourceError> {
    let mut revoked = HashSet::new();
    for crl in crls {
        let (_, parsed) = x509_parser::parse_x509_crl(crl)
            .map_err(|e| SourceError::Unusable(format!("a CRL: {e}")))?;
        let signed = bundle.iter().any(|ca| {
            x509_parser::parse_x509_certificate(ca.as_ref())
                .is_ok_and(|(_, ca)| parsed.verify_signature(ca.public_key()).is_ok())
        });
        if !signed {
            return Err(SourceError::Unusable(
                "a CRL not signed by a CA of the trust bundle".into(),
            ));
        }
        revoked.extend(
            parsed
                .iter_revoked_certificates()
                .map(|r| hex::encode(r.raw_serial())),
        );
    }
    Ok(Arc::new(revoked))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::ca::Ca;
    use crate::ca::crl::RevokedEntry;

    fn ca(td: &str) -> (tempfile::TempDir, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), &TrustDomain::new(td).unwrap()).unwrap();
        (dir, ca)
    }

    fn crl_of(ca: &Ca, serial: &str) -> bytes::Bytes {
        let now = SystemTime::now();
        let entry = RevokedEntry {
            serial_hex: serial.into(),
            revoked_at: now,
        };
        let der = ca
            .sign_crl(
                1,
                &[entry],
                now - Duration::from_secs(60),
                now + Duration::from_secs(600),
            )
            .unwrap();
        bytes::Bytes::copy_from_slice(&der)
    }

    fn material(bundle: &Ca) -> Material {
        let (_d, other) = ca("sigil.test");
        let svid = other
            .sign_svid(&crate::ca::SvidRequest {
                spiffe_id: SpiffeId::new("spiffe://sigil.test/agent/gate/x").unwrap(),
                dns_names: vec![],
                ttl: Duration::from_secs(600),
                hint: "instance".into(),
            })
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key.pkcs8_der().to_vec()));
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)
            .unwrap();
        Material {
            spiffe_id: svid.spiffe_id.clone(),
            trust_domain: TrustDomain::new("sigil.test").unwrap(),
            certified: Arc::new(CertifiedKey::new(svid.cert_chain.clone(), signing)),
            bundle: Arc::new(vec![bundle.certificate_der().clone()]),
            revoked: Arc::default(),
        }
    }

    #[test]
    fn a_crl_is_taken_only_when_a_ca_of_the_bundle_signed_it() {
        let (_a, trusted) = ca("sigil.test");
        let (_b, stranger) = ca("sigil.test");
        let m = material(&trusted);
        let revoked = revocations(&[crl_of(&trusted, "0a0b")], &m.bundle).unwrap();
        assert!(revoked.contains("0a0b"));
        let refused = revocations(&[crl_of(&stranger, "0c0d")], &m.bundle).unwrap_err();
        assert!(refused.to_string().contains("not signed"), "{refused}");
    }
}
