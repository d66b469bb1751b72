//! Certificate revocation lists signed by the trust domain's CA.
//!
//! Owns: turning a list of revoked SVID serials into a signed X.509 v2 CRL
//! (RFC 5280 §5) with a CRL number and an authority key identifier equal to
//! the CA's subject key identifier. Does not own: which SVIDs are revoked,
//! CRL numbering, or publishing (the store and `identity` do that).
//!
//! Why a CRL at all: revocation reaches only the verifiers that check CRLs
//! (rustls-webpki, `openssl verify -crl_check`, Envoy). For those that don't,
//! the short SVID TTL bounds the damage. Callers drop an entry once the
//! revoked certificate has expired (an expired certificate fails on its own),
//! so the CRL stays small however long the daemon runs.

use std::time::SystemTime;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use time::OffsetDateTime;

use super::{Ca, Error};

/// RFC 5280 §4.1.2.2: serial numbers are at most 20 octets.
const MAX_SERIAL_LEN: usize = 20;

/// One revoked certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Its serial number, lower-case hex, as in [`super::Svid::serial`].
    pub serial_hex: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
}

impl Ca {
    /// Signs a CRL (v2, with CRL number and authority key identifier) listing
    /// `revoked`, valid from `this_update` to `next_update`. Times are
    /// truncated to whole seconds. No reason codes are written (RFC 5280
    /// prefers an absent reason code over "unspecified"). Returns the DER.
    ///
    /// # Errors
    /// [`Error::Signing`] when a serial is not hex (or empty, or longer than
    /// 20 bytes), a time cannot be encoded, `next_update` is not after
    /// `this_update`, or the CA certificate does not allow cRLSign.
    pub fn sign_crl(
        &self,
        crl_number: u64,
        revoked: &[RevokedEntry],
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<bytes::Bytes, Error> {
        let what = || format!("CRL number {crl_number}");
        let fail = |message: String| Error::Signing {
            what: what(),
            message,
            source: None,
        };
        let revoked_certs = revoked
            .iter()
            .map(|entry| {
                Ok(RevokedCertParams {
                    serial_number: parse_serial(&entry.serial_hex).map_err(&fail)?,
                    revocation_time: to_offset(entry.revoked_at, "revocation time")
                        .map_err(&fail)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let params = CertificateRevocationListParams {
            this_update: to_offset(this_update, "thisUpdate").map_err(&fail)?,
            next_update: to_offset(next_update, "nextUpdate").map_err(&fail)?,
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_id_method().map_err(&fail)?,
        };
        let crl = params.signed_by(&self.issuer).map_err(|e| Error::Signing {
            what: what(),
            message: e.to_string(),
            source: Some(e),
        })?;
        Ok(bytes::Bytes::copy_from_slice(crl.der()))
    }

    /// The key identifier method that reproduces the CA certificate's subject
    /// key identifier, so the CRL's AKI matches it: `openssl verify
    /// -crl_check` skips a CRL whose AKI differs ("unable to get certificate
    /// CRL"), though webpki ignores the AKI. A CA certificate without an SKI
    /// falls back to SHA-256, as rcgen does for such an issuer.
    fn key_id_method(&self) -> Result<KeyIdMethod, String> {
        use x509_parser::extensions::ParsedExtension;
        let (_, cert) = x509_parser::parse_x509_certificate(&self.cert)
            .map_err(|e| format!("the CA certificate does not parse ({e})"))?;
        let ski = cert
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        Ok(ski.map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified))
    }
}

fn parse_serial(serial_hex: &str) -> Result<SerialNumber, String> {
    let bytes = hex::decode(serial_hex)
        .map_err(|e| format!("revoked serial {serial_hex:?} is not hex ({e})"))?;
    if bytes.is_empty() || bytes.len() > MAX_SERIAL_LEN {
        return Err(format!(
            "revoked serial {serial_hex:?} must be 1 to {MAX_SERIAL_LEN} bytes, it is {}",
            bytes.len()
        ));
    }
    Ok(SerialNumber::from_slice(&bytes))
}

/// `SystemTime` to whole seconds, without the panic of `OffsetDateTime::from`
/// on times outside the years -9999..=9999.
fn to_offset(t: SystemTime, field: &str) -> Result<OffsetDateTime, String> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok(),
        // Floor, like the truncation after the epoch.
        Err(before) => {
            let d = before.duration();
            i64::try_from(d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)))
                .ok()
                .map(|s| -s)
        }
    };
    secs.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| format!("the {field} {t:?} cannot be encoded"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::*;

    use super::*;
    use crate::ca::{Svid, SvidRequest};
    use crate::ids::{SpiffeId, TrustDomain};

    const HOUR: Duration = Duration::from_secs(3600);

    fn new_ca(dir: &Path) -> Ca {
        Ca::load_or_create(dir, &TrustDomain::new("example.org").unwrap()).unwrap()
    }

    fn leaf(ca: &Ca, path: &str) -> Svid {
        ca.sign_svid(&SvidRequest {
            spiffe_id: SpiffeId::new(format!("spiffe://example.org/{path}")).unwrap(),
            dns_names: vec![],
            ttl: Duration::from_secs(300),
            hint: String::new(),
        })
        .unwrap()
    }

    fn revoked(svid: &Svid) -> RevokedEntry {
        RevokedEntry {
            serial_hex: svid.serial.clone(),
            revoked_at: SystemTime::now() - Duration::from_secs(5),
        }
    }

    /// A CRL valid from a minute ago for an hour.
    fn sign(ca: &Ca, number: u64, entries: &[RevokedEntry]) -> bytes::Bytes {
        let now = SystemTime::now();
        ca.sign_crl(number, entries, now - Duration::from_secs(60), now + HOUR)
            .unwrap()
    }

    fn unix(t: SystemTime) -> i64 {
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn pem(label: &str, der: &[u8]) -> String {
        ::pem::encode(&::pem::Pem::new(label, der.to_vec()))
    }

    fn openssl_present() -> bool {
        let found = Command::new("openssl").arg("version").output().is_ok();
        if !found {
            eprintln!("openssl is not installed; skipping the openssl checks");
        }
        found
    }

    /// Runs `openssl verify -crl_check`; returns (success, stdout + stderr).
    fn openssl_verify(dir: &Path, ca: &Ca, crl: &[u8], leaf: &Svid) -> (bool, String) {
        std::fs::write(dir.join("ca.pem"), pem("CERTIFICATE", ca.certificate_der())).unwrap();
        std::fs::write(dir.join("crl.pem"), pem("X509 CRL", crl)).unwrap();
        std::fs::write(
            dir.join("leaf.pem"),
            pem("CERTIFICATE", &leaf.cert_chain[0]),
        )
        .unwrap();
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(["verify", "-crl_check", "-CAfile", "ca.pem", "-CRLfile"])
            .args(["crl.pem", "leaf.pem"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn webpki_verify(ca: &Ca, crl: &[u8], leaf: &Svid) -> Result<(), webpki::Error> {
        let crl = webpki::BorrowedCertRevocationList::from_der(crl)?.to_owned()?;
        let crls = [&webpki::CertRevocationList::Owned(crl)];
        let revocation = webpki::RevocationOptionsBuilder::new(&crls)
            .unwrap()
            .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
            .build();
        let anchor = webpki::anchor_from_trusted_cert(ca.certificate_der()).unwrap();
        let cert = webpki::EndEntityCert::try_from(&leaf.cert_chain[0]).unwrap();
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            Some(revocation),
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn the_crl_names_the_ca_its_number_its_serials_and_its_dates() {
        let dir = tempfile::tempdir().unwrap();
        let created = new_ca(dir.path());
        let reloaded = new_ca(dir.path());
        let (a, b) = (leaf(&created, "a"), leaf(&created, "b"));
        let this_update = SystemTime::now() - Duration::from_millis(1500);
        let next_update = this_update + HOUR;
        for ca in [&created, &reloaded] {
            let der = ca
                .sign_crl(
                    u64::MAX,
                    &[revoked(&a), revoked(&b)],
                    this_update,
                    next_update,
                )
                .unwrap();
            let (rest, crl) = parse_x509_crl(&der).unwrap();
            assert!(rest.is_empty());
            let (_, cert) = parse_x509_certificate(ca.certificate_der()).unwrap();
            assert_eq!(crl.version(), Some(X509Version::V2));
            assert_eq!(crl.issuer().as_raw(), cert.subject().as_raw());
            assert_eq!(crl.crl_number().unwrap().to_u64_digits(), [u64::MAX]);
            let serials: Vec<_> = crl
                .iter_revoked_certificates()
                .map(|r| hex::encode(r.serial().to_bytes_be()))
                .collect();
            assert_eq!(serials, [a.serial.clone(), b.serial.clone()]);
            assert_eq!(crl.last_update().timestamp(), unix(this_update));
            assert_eq!(crl.next_update().unwrap().timestamp(), unix(next_update));
            let aki = crl
                .extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
                    _ => None,
                });
            let ski = cert
                .extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.clone()),
                    _ => None,
                });
            assert_eq!(aki.unwrap().0, ski.unwrap().0, "AKI matches the CA's SKI");
        }
    }

    #[test]
    fn openssl_lists_the_serials_and_refuses_only_the_revoked_leaf() {
        if !openssl_present() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        let (bad, good) = (leaf(&ca, "bad"), leaf(&ca, "good"));
        let der = sign(&ca, 7, &[revoked(&bad)]);
        std::fs::write(dir.path().join("crl.der"), &der).unwrap();
        let out = Command::new("openssl")
            .current_dir(dir.path())
            .args(["crl", "-inform", "DER", "-in", "crl.der", "-noout", "-text"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_uppercase();
        assert!(out.status.success(), "{text}");
        assert!(text.contains(&bad.serial.to_uppercase()), "{text}");
        assert!(!text.contains(&good.serial.to_uppercase()), "{text}");
        assert!(text.contains("X509V3 CRL NUMBER"), "{text}");

        let (ok, text) = openssl_verify(dir.path(), &ca, &der, &bad);
        assert!(!ok && text.contains("certificate revoked"), "{text}");
        let (ok, text) = openssl_verify(dir.path(), &ca, &der, &good);
        assert!(ok, "{text}");
    }

    #[test]
    fn webpki_refuses_the_revoked_leaf_and_accepts_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        let (bad, good) = (leaf(&ca, "bad"), leaf(&ca, "good"));
        let der = sign(&ca, 1, &[revoked(&bad)]);
        assert_eq!(
            webpki_verify(&ca, &der, &bad),
            Err(webpki::Error::CertRevoked)
        );
        webpki_verify(&ca, &der, &good).unwrap();
    }

    #[test]
    fn an_empty_crl_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        let svid = leaf(&ca, "a");
        let der = sign(&ca, 0, &[]);
        let (_, crl) = parse_x509_crl(&der).unwrap();
        assert_eq!(crl.iter_revoked_certificates().count(), 0);
        webpki_verify(&ca, &der, &svid).unwrap();
        if openssl_present() {
            let (ok, text) = openssl_verify(dir.path(), &ca, &der, &svid);
            assert!(ok, "{text}");
        }
    }

    #[test]
    fn a_malformed_serial_or_window_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        let now = SystemTime::now();
        for serial in ["not-hex", "abc", "", &"01".repeat(21)] {
            let entry = RevokedEntry {
                serial_hex: serial.into(),
                revoked_at: now,
            };
            let err = ca.sign_crl(1, &[entry], now, now + HOUR).unwrap_err();
            assert!(matches!(err, Error::Signing { .. }), "{err}");
            assert!(err.to_string().contains("revoked serial"), "{err}");
        }
        let err = ca.sign_crl(1, &[], now, now).unwrap_err();
        assert!(matches!(err, Error::Signing { .. }), "{err}");
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40);
        let err = ca.sign_crl(1, &[], now, far).unwrap_err();
        assert!(err.to_string().contains("nextUpdate"), "{err}");
    }
}
