//! The certificate authority: the trust domain's signing key, and SVID minting.
//!
//! Owns: the CA key and certificate in the state directory (created on first
//! start, reused after), the X.509-SVID profile, and a fresh P-256 key per
//! SVID. Does not own: when SVIDs are minted or rotated (that is `identity`).

pub mod crl;
pub mod keys;
pub mod profile;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;

use crate::fsutil;
use crate::ids::{SpiffeId, TrustDomain};
pub use keys::PrivateKey;

/// Lifetime of a CA certificate this daemon makes for itself.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600); // 1 year

const CA_KEY_FILE: &str = "ca_key.pem";
/// The CA's directory under the state directory (key 0600, certificate).
pub const CA_DIR: &str = "ca";
const CA_CERT_FILE: &str = "ca_cert.pem";

/// Why the CA could not be loaded or could not sign. Each keeps the error
/// that caused it as its `source`. `Clone` because `identity::Error` holds
/// it and is itself cached (a connection's holder verdict), hence `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A CA file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: Arc<io::Error>,
    },
    /// A CA file exists but is not what we wrote.
    #[error(
        "the CA in {dir} is unusable: {reason}. It was left untouched; restore it from a backup, or move both CA files away to make a new CA (verifiers will then need the new bundle)"
    )]
    Corrupt {
        /// The state directory's CA folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
        /// The parser's or rcgen's error, when one said so.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// The CA certificate is for another trust domain than configured.
    #[error(
        "the CA in {dir} belongs to trust domain {found}, but the config says {configured}. Keep {found}, or move this node to {configured}: stop the daemon and move {state_dir} aside (it keeps the old CA, store and audit trail); the next start makes a new CA and store, and verifiers need the new bundle (README: Changing the trust domain)"
    )]
    TrustDomainMismatch {
        /// The CA folder.
        dir: PathBuf,
        /// The state directory it is in.
        state_dir: PathBuf,
        /// The trust domain in the CA certificate.
        found: String,
        /// The configured one.
        configured: String,
    },
    /// The CA directory is somewhere another user could swap it.
    #[error("the CA directory is not safe for a key: {0}")]
    UnsafeDir(#[source] fsutil::Error),
    /// rcgen refused to produce a certificate or CRL, or its inputs are out
    /// of range (an expired CA, a serial that is not hex).
    #[error("cannot sign a certificate for {what}: {message}")]
    Signing {
        /// What was being signed.
        what: String,
        /// Why, for people (rcgen's reason when it was rcgen).
        message: String,
        /// rcgen's error, when rcgen refused.
        #[source]
        source: Option<rcgen::Error>,
    },
}

/// What an SVID is minted for.
#[derive(Clone, Debug)]
pub struct SvidRequest {
    /// The SPIFFE ID (the URI SAN).
    pub spiffe_id: SpiffeId,
    /// Extra DNS SANs.
    pub dns_names: Vec<String>,
    /// Lifetime from now (capped at the CA's own expiry).
    pub ttl: Duration,
    /// The Workload API `hint` (`instance`, `task:<id>`).
    pub hint: String,
}

/// A minted X509-SVID with its private key.
#[derive(Clone, Debug)]
pub struct Svid {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates (none with a self-made CA).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER key, made by Sigil for this SVID alone.
    pub key: PrivateKey,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// When it was minted; rotation is scheduled from here.
    pub issued_at: SystemTime,
    /// Start of validity (backdated by [`profile::BACKDATE`] from `issued_at`).
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The Workload API hint.
    pub hint: String,
}

/// The trust domain's CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    not_after: SystemTime,
}

impl Ca {
    /// Loads the CA from `state_dir/ca`, or creates it there on first start
    /// (key file 0600). A CA that exists but cannot be read is never replaced.
    ///
    /// # Errors
    /// [`Error::Corrupt`], [`Error::TrustDomainMismatch`] or [`Error::Io`].
    pub fn load_or_create(state_dir: &Path, trust_domain: &TrustDomain) -> Result<Self, Error> {
        let dir = state_dir.join(CA_DIR);
        // The key is read from (or written to) here: nobody but root or us
        // may be able to swap the directory or a symlink on its path.
        fsutil::check_trusted_path(&dir).map_err(Error::UnsafeDir)?;
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Self::load(&dir, &key_path, &cert_path, trust_domain),
            (false, false) => Self::create(&dir, &key_path, &cert_path, trust_domain),
            (key, _) => Err(Error::Corrupt {
                dir,
                reason: format!(
                    "only the {} file is there",
                    if key { CA_KEY_FILE } else { CA_CERT_FILE }
                ),
                source: None,
            }),
        }
    }

    /// A CA file of `state_dir` (the certificate, else the key), if one is
    /// there: proof the directory was used before, so the store must not
    /// start afresh.
    pub fn existing_file(state_dir: &Path) -> Option<PathBuf> {
        [CA_CERT_FILE, CA_KEY_FILE]
            .iter()
            .map(|name| state_dir.join(CA_DIR).join(name))
            .find(|path| std::fs::symlink_metadata(path).is_ok())
    }

    fn create(
        dir: &Path,
        key_path: &Path,
        cert_path: &Path,
        trust_domain: &TrustDomain,
    ) -> Result<Self, Error> {
        fsutil::create_private_dir(dir).map_err(Error::UnsafeDir)?;
        let key = KeyPair::generate().map_err(|e| signing_error("the CA key", e))?;
        let now = SystemTime::now();
        let not_after = now + CA_VALIDITY;
        let params = profile::ca_params(
            trust_domain,
            profile::random_serial(),
            now - profile::BACKDATE,
            not_after,
        )
        .map_err(|e| signing_error("the CA", e))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| signing_error("the CA", e))?;
        // Key first: a crash in between leaves a lone key, which load refuses
        // loudly rather than silently making a second CA.
        fsutil::write_private_file(key_path, key.serialize_pem().as_bytes())
            .map_err(|e| io_error("write", key_path, e))?;
        fsutil::write_private_file(cert_path, cert.pem().as_bytes())
            .map_err(|e| io_error("write", cert_path, e))?;
        tracing::info!(dir = %dir.display(), %trust_domain, "created a new CA");
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: cert.der().clone(),
            not_after,
        })
    }

    fn load(
        dir: &Path,
        key_path: &Path,
        cert_path: &Path,
        trust_domain: &TrustDomain,
    ) -> Result<Self, Error> {
        let corrupt = |reason: String, source: Option<Arc<dyn std::error::Error + Send + Sync>>| {
            Error::Corrupt {
                dir: dir.to_owned(),
                reason,
                source,
            }
        };
        let key_pem =
            std::fs::read_to_string(key_path).map_err(|e| io_error("read", key_path, e))?;
        let cert_pem =
            std::fs::read_to_string(cert_path).map_err(|e| io_error("read", cert_path, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            corrupt(
                format!("{CA_KEY_FILE} is not a private key ({e})"),
                Some(Arc::new(e)),
            )
        })?;
        let cert_der = pem::parse(&cert_pem)
            .map_err(|e| {
                corrupt(
                    format!("{CA_CERT_FILE} is not PEM ({e})"),
                    Some(Arc::new(e)),
                )
            })?
            .into_contents();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| {
            corrupt(
                format!("{CA_CERT_FILE} is not a certificate ({e})"),
                Some(Arc::new(e)),
            )
        })?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(corrupt(
                "the key does not belong to the certificate".into(),
                None,
            ));
        }
        check_trust_domain(dir, &parsed, trust_domain)?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );
        let cert = CertificateDer::from(cert_der);
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| {
            corrupt(
                format!("{CA_CERT_FILE} cannot sign ({e})"),
                Some(Arc::new(e)),
            )
        })?;
        if not_after <= SystemTime::now() {
            tracing::warn!(dir = %dir.display(), "the CA certificate has expired: SVIDs it signs will not verify");
        }
        tracing::info!(dir = %dir.display(), %trust_domain, "loaded the CA");
        Ok(Self {
            issuer,
            cert,
            not_after,
        })
    }

    /// Mints an SVID with a fresh P-256 key.
    ///
    /// # Errors
    /// [`Error::Signing`] when rcgen refuses the parameters.
    pub fn sign_svid(&self, req: &SvidRequest) -> Result<Svid, Error> {
        let what = || req.spiffe_id.to_string();
        let now = SystemTime::now();
        if self.not_after <= now {
            return Err(Error::Signing {
                what: what(),
                message: format!(
                    "the CA certificate expired at {}; move the CA files in state_dir/ca away to make a new CA (verifiers then need the new bundle)",
                    humantime::format_rfc3339_seconds(self.not_after)
                ),
                source: None,
            });
        }
        let key = KeyPair::generate().map_err(|e| signing_error(&what(), e))?;
        let not_before = now - profile::BACKDATE;
        let not_after = (now + req.ttl).min(self.not_after);
        let serial = profile::random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        let params = profile::leaf_params(
            &req.spiffe_id,
            &req.dns_names,
            serial,
            not_before,
            not_after,
        )
        .map_err(|e| signing_error(&what(), e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| signing_error(&what(), e))?;
        Ok(Svid {
            spiffe_id: req.spiffe_id.clone(),
            cert_chain: vec![cert.der().clone()],
            key: PrivateKey::from_pkcs8_der(key.serialize_der()),
            serial: serial_hex,
            issued_at: now,
            not_before,
            not_after,
            hint: req.hint.clone(),
        })
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The X.509 bundle: the concatenated DER of every CA certificate
    /// verifiers should trust (today the one CA).
    pub fn bundle_der(&self) -> Vec<u8> {
        self.cert.to_vec()
    }

    /// When the CA certificate expires; no SVID outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

fn check_trust_domain(
    dir: &Path,
    cert: &x509_parser::certificate::X509Certificate<'_>,
    trust_domain: &TrustDomain,
) -> Result<(), Error> {
    use x509_parser::extensions::GeneralName;
    let found = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        });
    match found {
        Some(uri) if uri == trust_domain.id_string() => Ok(()),
        Some(uri) => Err(Error::TrustDomainMismatch {
            dir: dir.to_owned(),
            state_dir: dir.parent().unwrap_or(dir).to_owned(),
            found: uri.trim_start_matches("spiffe://").to_owned(),
            configured: trust_domain.to_string(),
        }),
        None => Err(Error::Corrupt {
            dir: dir.to_owned(),
            reason: "the CA certificate names no trust domain".into(),
            source: None,
        }),
    }
}

fn io_error(action: &'static str, path: &Path, e: io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_owned(),
        source: Arc::new(e),
    }
}

fn signing_error(what: &str, e: rcgen::Error) -> Error {
    Error::Signing {
        what: what.to_owned(),
        message: e.to_string(),
        source: Some(e),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    #[test]
    fn the_ca_is_reused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path(), &td("example.org")).unwrap();
        let second = Ca::load_or_create(dir.path(), &td("example.org")).unwrap();
        assert_eq!(first.bundle_der(), second.bundle_der());
        let key = dir.path().join("ca").join(CA_KEY_FILE);
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_corrupt_ca_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), &td("example.org")).unwrap();
        let cert = dir.path().join("ca").join(CA_CERT_FILE);
        std::fs::write(&cert, "garbage").unwrap();
        let err = Ca::load_or_create(dir.path(), &td("example.org"))
            .err()
            .unwrap();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), "garbage");
    }

    #[test]
    fn a_refusal_keeps_the_error_that_caused_it_as_its_source() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), &td("example.org")).unwrap();
        let ca_dir = dir.path().join("ca");
        std::fs::write(ca_dir.join(CA_CERT_FILE), "garbage").unwrap();
        let err = Ca::load_or_create(dir.path(), &td("example.org"))
            .err()
            .unwrap();
        let cause = err.source().expect("the PEM parser's error");
        assert!(err.to_string().contains(&cause.to_string()), "{err}");

        std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Ca::load_or_create(dir.path(), &td("example.org"))
            .err()
            .unwrap();
        let cause = err.source().expect("the file-system check's error");
        assert!(cause.is::<fsutil::Error>(), "{cause}");
    }

    #[test]
    fn a_lone_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), &td("example.org")).unwrap();
        std::fs::remove_file(dir.path().join("ca").join(CA_CERT_FILE)).unwrap();
        let err = Ca::load_or_create(dir.path(), &td("example.org"))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("only the ca_key.pem file"),
            "{err}"
        );
    }

    #[test]
    fn a_ca_directory_writable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), &td("example.org")).unwrap();
        let ca_dir = dir.path().join("ca");
        std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Ca::load_or_create(dir.path(), &td("example.org"))
            .err()
            .unwrap();
        assert!(matches!(err, Error::UnsafeDir(_)), "{err}");
        assert!(err.to_string().contains("chmod go-w"), "{err}");
    }

    #[test]
    fn a_ca_of_another_trust_domain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), &td("example.org")).unwrap();
        let err = Ca::load_or_create(dir.path(), &td("other.org"))
            .err()
            .unwrap();
        assert!(matches!(err, Error::TrustDomainMismatch { .. }), "{err}");
    }

    #[test]
    fn a_leaf_chains_to_the_ca_by_webpki() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), &td("example.org")).unwrap();
        let svid = ca
            .sign_svid(&SvidRequest {
                spiffe_id: SpiffeId::new("spiffe://example.org/a").unwrap(),
                dns_names: vec![],
                ttl: Duration::from_secs(60),
                hint: String::new(),
            })
            .unwrap();
        let anchor = webpki::anchor_from_trusted_cert(ca.certificate_der()).unwrap();
        let leaf = webpki::EndEntityCert::try_from(&svid.cert_chain[0]).unwrap();
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
    }
}
