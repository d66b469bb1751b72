//! rustls over a [`WorkloadSource`]: the server presents the current SVID
//! (rotations take effect at the next handshake), and client certificates
//! are verified by [`verify_svid`] against the current bundle and CRL and
//! the allowed SPIFFE IDs. Built once; never needs a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::source::WorkloadSource;
use super::{IdPattern, Refusal, TrustSource, verify_svid};

/// The signature algorithms both verifiers check handshakes with: the
/// crypto provider's (ring), as the server config uses.
fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Presents the source's current SVID.
#[derive(Clone)]
pub struct SvidResolver(pub WorkloadSource);

impl std::fmt::Debug for SvidResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SvidResolver")
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

/// Accepts client SVIDs of the source's trust domain that chain to its
/// bundle, are not on its CRL, and match one of `allow`.
pub struct SvidClientVerifier {
    source: WorkloadSource,
    allow: Vec<IdPattern>,
    /// The handshake signature algorithms (ring's, as rustls is built).
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for SvidClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidClientVerifier")
            .field("allow", &self.allow)
            .finish()
    }
}

impl SvidClientVerifier {
    /// A verifier over `source` admitting `allow` (every ID of the trust
    /// domain when empty).
    pub fn new(source: WorkloadSource, allow: Vec<IdPattern>) -> Self {
        Self {
            source,
            allow,
            algorithms: algorithms(),
        }
    }
}

fn tls_error(refusal: Refusal) -> rustls::Error {
    rustls::Error::InvalidCertificate(match refusal {
        Refusal::Revoked { .. } => CertificateError::Revoked,
        Refusal::Expired { .. } => CertificateError::Expired,
        Refusal::Untrusted(_) | Refusal::ForeignTrustDomain { .. } => {
            CertificateError::UnknownIssuer
        }
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let material = self.source.current();
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let trust = material.trust();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        match verify_svid(&chain, &trust, &self.allow, at) {
            Ok(v) => {
                tracing::debug!(peer = %v.spiffe_id, "client SVID accepted");
                Ok(ClientCertVerified::assertion())
            }
            Err(refusal) => {
                tracing::info!(decision = "refused", stage = "handshake", reason = %refusal, "client SVID refused");
                Err(tls_error(refusal))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A server config for mTLS with SVIDs from `source`, admitting `allow`.
///
/// # Errors
/// When rustls refuses the protocol versions (it does not with ring).
pub fn server_config(
    source: WorkloadSource,
    allow: Vec<IdPattern>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(SvidClientVerifier::new(source.clone(), allow)))
        .with_cert_resolver(Arc::new(SvidResolver(source)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The client side: accepts a server's SVID of the trust domain that
/// chains to the bundle, is not on the CRL, and matches one of `allow`
/// (SPIFFE has no host names: the SPIFFE ID is what is checked).
pub struct SvidServerVerifier {
    trust_domain: crate::ids::TrustDomain,
    bundle: Vec<CertificateDer<'static>>,
    crls: Vec<Vec<u8>>,
    allow: Vec<IdPattern>,
    /// The handshake signature algorithms (ring's, as rustls is built).
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for SvidServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidServerVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("allow", &self.allow)
            .finish()
    }
}

impl SvidServerVerifier {
    /// A verifier of servers of `trust_domain` by `bundle` and `crls`.
    pub fn new(
        trust_domain: crate::ids::TrustDomain,
        bundle: Vec<CertificateDer<'static>>,
        crls: Vec<Vec<u8>>,
        allow: Vec<IdPattern>,
    ) -> Self {
        Self {
            trust_domain,
            bundle,
            crls,
            allow,
            algorithms: algorithms(),
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let trust = TrustSource {
            trust_domain: &self.trust_domain,
            bundle: &self.bundle,
            revocation: crate::verify::Revocation::Crls(&self.crls),
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        verify_svid(&chain, &trust, &self.allow, at)
            .map(|_| rustls::client::danger::ServerCertVerified::assertion())
            .map_err(tls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
