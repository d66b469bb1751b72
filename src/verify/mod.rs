//! Verifying an agent's X.509-SVID, as a service that receives it must:
//! the chain to the trust bundle, the CRL, the lifetime, the SPIFFE ID and
//! who may call.
//!
//! Owns the one verdict on a presented SVID ([`verify_svid`]: each way it
//! can fail is a [`Refusal`] variant) and the SPIFFE ID patterns that say
//! who is allowed (`pattern`). The chain, signature, lifetime and CRL
//! checks are rustls-webpki's (no hand-written X.509 path building); the
//! SVID rules (exactly one SPIFFE ID, in the bundle's trust domain) are
//! read with x509-parser. `source` keeps a process's own SVID, bundle and
//! CRL current from a Workload API stream; `tls` builds rustls on both.
//! `sigil verify x509` and `sigil gate` are thin layers over this.

pub mod pattern;
pub mod source;
pub mod tls;

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::ids::{SpiffeId, TrustDomain};
pub use pattern::{IdPattern, PatternError};

/// Why a presented SVID is not accepted; each names what to look at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No certificate, or one that is not DER X.509.
    #[error("not an X.509 certificate: {0}")]
    Malformed(String),
    /// The leaf does not carry exactly one `spiffe://` URI SAN.
    #[error("not an X.509-SVID: {0}")]
    NotAnSvid(String),
    /// The SPIFFE ID is in another trust domain than the bundle's.
    #[error("{id} is not in trust domain {expected}")]
    ForeignTrustDomain {
        /// The certificate's SPIFFE ID.
        id: String,
        /// The bundle's trust domain.
        expected: String,
    },
    /// Past its notAfter (or before its notBefore).
    #[error("the certificate is expired or not yet valid (valid until {not_after})")]
    Expired {
        /// Its notAfter, RFC 3339.
        not_after: String,
    },
    /// Its serial is on the CRL.
    #[error("the certificate (serial {serial}) is revoked")]
    Revoked {
        /// Its serial, lower-case hex.
        serial: String,
    },
    /// It does not chain to the bundle (or a signature, usage or CRL is
    /// invalid).
    #[error("the certificate does not verify against the trust bundle: {0}")]
    Untrusted(String),
    /// Valid, but no `--allow` pattern admits its SPIFFE ID.
    #[error("{id} is not allowed (allowed: {allowed})")]
    NotAllowed {
        /// The SPIFFE ID.
        id: String,
        /// The patterns, comma-separated.
        allowed: String,
    },
}

/// A verified SVID: what a service may rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The caller's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The leaf's serial, lower-case hex.
    pub serial: String,
    /// When it expires.
    pub not_after: SystemTime,
    /// Certificates in the presented chain (leaf included).
    pub chain_len: usize,
}

/// What a verification is checked against.
pub struct TrustSource<'a> {
    /// The trust domain whose SVIDs are accepted.
    pub trust_domain: &'a TrustDomain,
    /// Its CA certificates (DER).
    pub bundle: &'a [CertificateDer<'a>],
    /// What says a certificate is revoked.
    pub revocation: Revocation<'a>,
}

/// Where revocation is looked up.
#[derive(Clone, Copy, Debug)]
pub enum Revocation<'a> {
    /// DER CRLs, parsed and their signatures checked by rustls-webpki at
    /// each verification: for one-shot checks (`sigil verify`). Each costs
    /// time in the CRL's size.
    Crls(&'a [Vec<u8>]),
    /// The serials (lower-case hex) of CRLs already parsed and checked
    /// against the bundle, once per CRL (`source::Material`): a lookup per
    /// verification, whatever the CRL's size, for servers that verify a
    /// handshake at a time.
    Serials(&'a std::collections::HashSet<String>),
}

/// Verifies `chain` (leaf first) as an X.509-SVID of `trust.trust_domain`
/// at `now`, then that one of `allow` admits its SPIFFE ID (any ID of the
/// trust domain when `allow` is empty).
///
/// # Errors
/// The first [`Refusal`] that applies, checked in the order a person would
/// want to hear it: not an SVID, another trust domain, revoked, expired,
/// untrusted, not allowed.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    trust: &TrustSource<'_>,
    allow: &[IdPattern],
    now: SystemTime,
) -> Result<Verified, Refusal> {
    let leaf_der = chain
        .first()
        .ok_or_else(|| Refusal::Malformed("no certificate given".into()))?;
    let (_, leaf) = X509Certificate::from_der(leaf_der.as_ref())
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    let spiffe_id = spiffe_id_of(&leaf)?;
    if spiffe_id.trust_domain() != trust.trust_domain {
        return Err(Refusal::ForeignTrustDomain {
            id: spiffe_id.to_string(),
            expected: trust.trust_domain.to_string(),
        });
    }
    // As Sigil writes serials (the DER INTEGER's bytes in hex), so they
    // match `sigil instances show` and the audit trail.
    let serial = hex::encode(leaf.raw_serial());
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(leaf.validity().not_after.timestamp()).unwrap_or(0));
    if let Revocation::Serials(revoked) = trust.revocation
        && revoked.contains(&serial)
    {
        return Err(Refusal::Revoked { serial });
    }
    webpki_verdict(chain, trust, now, &serial, not_after)?;
    if !allow.is_empty() && !allow.iter().any(|p| p.matches(&spiffe_id)) {
        return Err(Refusal::NotAllowed {
            id: spiffe_id.to_string(),
            allowed: allow
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(Verified {
        spiffe_id,
        serial,
        not_after,
        chain_len: chain.len(),
    })
}

/// The one `spiffe://` URI SAN of an SVID.
fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, Refusal> {
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    match uris.as_slice() {
        [uri] => SpiffeId::new(uri)
            .map_err(|e| Refusal::NotAnSvid(format!("its URI SAN {uri:?} is no SPIFFE ID: {e}"))),
        [] => Err(Refusal::NotAnSvid("it has no URI SAN".into())),
        _ => Err(Refusal::NotAnSvid(format!(
            "it has {} URI SANs; an SVID has exactly one",
            uris.len()
        ))),
    }
}

/// rustls-webpki's check of the chain, signatures, lifetime, usage (client
/// authentication, which every Sigil SVID allows) and the CRLs, with its
/// errors named as [`Refusal`]s.
fn webpki_verdict(
    chain: &[CertificateDer<'_>],
    trust: &TrustSource<'_>,
    now: SystemTime,
    serial: &str,
    not_after: SystemTime,
) -> Result<(), Refusal> {
    let anchors = trust
        .bundle
        .iter()
        .map(|ca| webpki::anchor_from_trusted_cert(ca).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Refusal::Untrusted(format!("a bundle certificate is unusable: {e}")))?;
    let crls = match trust.revocation {
        Revocation::Crls(crls) => crls,
        Revocation::Serials(_) => &[],
    };
    let crls = crls
        .iter()
        .map(|der| {
            webpki::BorrowedCertRevocationList::from_der(der)
                .and_then(|crl| crl.to_owned())
                .map(webpki::CertRevocationList::Owned)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Refusal::Untrusted(format!("a CRL is unusable: {e}")))?;
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
    let revocation = if crl_refs.is_empty() {
        None
    } else {
        Some(
            webpki::RevocationOptionsBuilder::new(&crl_refs)
                .map_err(|e| Refusal::Untrusted(format!("{e:?}")))?
                .with_depth(webpki::RevocationCheckDepth::EndEntity)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .build(),
        )
    };
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        UnixTime::since_unix_epoch(since),
        webpki::KeyUsage::client_auth(),
        revocation,
        None,
    )
    .map(drop)
    .map_err(|e| match e {
        webpki::Error::CertRevoked => Refusal::Revoked {
            serial: serial.to_owned(),
        },
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
            Refusal::Expired {
                not_after: humantime::format_rfc3339_seconds(not_after).to_string(),
            }
        }
        other => Refusal::Untrusted(format!("{other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::crl::RevokedEntry;
    use crate::ca::{Ca, SvidRequest};

    fn new_ca(td: &str) -> (tempfile::TempDir, Ca, TrustDomain) {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new(td).unwrap();
        let ca = Ca::load_or_create(dir.path(), &td).unwrap();
        (dir, ca, td)
    }

    fn svid(ca: &Ca, id: &str, ttl: Duration) -> crate::ca::Svid {
        ca.sign_svid(&SvidRequest {
            spiffe_id: SpiffeId::new(id).unwrap(),
            dns_names: vec![],
            ttl,
            hint: "instance".into(),
        })
        .unwrap()
    }

    fn check(
        ca: &Ca,
        td: &TrustDomain,
        leaf: &crate::ca::Svid,
        crls: &[Vec<u8>],
        allow: &[&str],
        now: SystemTime,
    ) -> Result<Verified, Refusal> {
        let bundle = [ca.certificate_der().clone()];
        let allow: Vec<IdPattern> = allow.iter().map(|p| p.parse().unwrap()).collect();
        let trust = TrustSource {
            trust_domain: td,
            bundle: &bundle,
            revocation: Revocation::Crls(crls),
        };
        verify_svid(&leaf.cert_chain, &trust, &allow, now)
    }

    #[test]
    fn each_way_an_svid_fails_is_named_and_a_good_one_passes() {
        let (_d, ca, td) = new_ca("sigil.test");
        let good = svid(
            &ca,
            "spiffe://sigil.test/agent/bot/instance/1",
            Duration::from_secs(600),
        );
        let now = SystemTime::now();
        let ok = check(
            &ca,
            &td,
            &good,
            &[],
            &["spiffe://sigil.test/agent/*/**"],
            now,
        )
        .unwrap();
        assert_eq!(
            ok.spiffe_id.to_string(),
            "spiffe://sigil.test/agent/bot/instance/1"
        );
        assert_eq!(ok.serial, good.serial);

        let crl = ca
            .sign_crl(
                1,
                &[RevokedEntry {
                    serial_hex: good.serial.clone(),
                    revoked_at: now - Duration::from_secs(1),
                }],
                now - Duration::from_secs(60),
                now + Duration::from_secs(600),
            )
            .unwrap()
            .to_vec();
        let revoked = check(&ca, &td, &good, &[crl], &[], now).unwrap_err();
        assert!(matches!(revoked, Refusal::Revoked { .. }), "{revoked}");
        // The same verdict from serials already taken off a checked CRL.
        let bundle = [ca.certificate_der().clone()];
        let serials = std::collections::HashSet::from([good.serial.clone()]);
        let by_serial = TrustSource {
            trust_domain: &td,
            bundle: &bundle,
            revocation: Revocation::Serials(&serials),
        };
        let revoked = verify_svid(&good.cert_chain, &by_serial, &[], now).unwrap_err();
        assert!(matches!(revoked, Refusal::Revoked { .. }), "{revoked}");
        let none = std::collections::HashSet::new();
        let clean = TrustSource {
            revocation: Revocation::Serials(&none),
            ..by_serial
        };
        assert!(verify_svid(&good.cert_chain, &clean, &[], now).is_ok());

        let later = now + Duration::from_secs(3600);
        let expired = check(&ca, &td, &good, &[], &[], later).unwrap_err();
        assert!(matches!(expired, Refusal::Expired { .. }), "{expired}");

        let (_o, other_ca, _) = new_ca("other.test");
        let foreign = svid(
            &other_ca,
            "spiffe://other.test/agent/x",
            Duration::from_secs(600),
        );
        let refused = check(&ca, &td, &foreign, &[], &[], now).unwrap_err();
        assert!(
            matches!(refused, Refusal::ForeignTrustDomain { .. }),
            "{refused}"
        );

        let (_s, stranger, _) = new_ca("sigil.test");
        let forged = svid(
            &stranger,
            "spiffe://sigil.test/agent/bot",
            Duration::from_secs(600),
        );
        let untrusted = check(&ca, &td, &forged, &[], &[], now).unwrap_err();
        assert!(matches!(untrusted, Refusal::Untrusted(_)), "{untrusted}");

        let denied = check(
            &ca,
            &td,
            &good,
            &[],
            &["spiffe://sigil.test/agent/other/**"],
            now,
        )
        .unwrap_err();
        assert!(matches!(denied, Refusal::NotAllowed { .. }), "{denied}");
        assert!(
            check(&ca, &td, &good, &[], &[], now).is_ok(),
            "no pattern: any ID of the domain"
        );
    }

    #[test]
    fn garbage_and_an_empty_chain_are_refused_not_panicked_on() {
        let (_d, ca, td) = new_ca("sigil.test");
        let bundle = [ca.certificate_der().clone()];
        let trust = TrustSource {
            trust_domain: &td,
            bundle: &bundle,
            revocation: Revocation::Crls(&[]),
        };
        let now = SystemTime::now();
        assert!(matches!(
            verify_svid(&[], &trust, &[], now),
            Err(Refusal::Malformed(_))
        ));
        let junk = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])];
        assert!(matches!(
            verify_svid(&junk, &trust, &[], now),
            Err(Refusal::Malformed(_))
        ));
        // The CA certificate itself is no SVID of the domain (a URI SAN
        // without a path is no SPIFFE ID of a workload, or no leaf usage).
        let ca_as_leaf = [ca.certificate_der().clone()];
        assert!(verify_svid(&ca_as_leaf, &trust, &[], now).is_err());
    }
}
