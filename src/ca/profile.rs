//! The X.509-SVID profile (X509-SVID.md), encoded once.
//!
//! Unmodified SPIFFE clients are strict: the rust `spiffe` crate refuses a
//! leaf without a BasicConstraints extension, without KeyUsage
//! digitalSignature, with keyCertSign/cRLSign, or with more than one URI SAN.
//! rcgen's `IsCa::NoCa` emits no BasicConstraints at all, so leaves use
//! `IsCa::ExplicitNoCa` (encoded `30 00` since rcgen 0.14.10). The tests below
//! parse what we mint with two independent parsers and check every rule.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};

use crate::ids::{SpiffeId, TrustDomain};

/// How far back an SVID's notBefore is set, so a verifier whose clock is a
/// little behind ours still accepts a fresh SVID (SPIRE does the same).
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Parameters of a workload leaf certificate (an X509-SVID).
///
/// # Errors
/// When the SPIFFE ID or a DNS name cannot be encoded.
pub fn leaf_params(
    spiffe_id: &SpiffeId,
    dns_names: &[String],
    serial: SerialNumber,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sigil");
    params.distinguished_name = dn;
    params.serial_number = Some(serial);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    // Exactly one URI SAN: the SPIFFE ID. DNS SANs are allowed beside it.
    let mut sans = vec![SanType::URI(spiffe_id.to_string().try_into()?)];
    for name in dns_names {
        sans.push(SanType::DnsName(name.clone().try_into()?));
    }
    params.subject_alt_names = sans;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Parameters of the trust domain's signing (CA) certificate.
///
/// # Errors
/// When the trust domain cannot be encoded as a URI SAN.
pub fn ca_params(
    trust_domain: &TrustDomain,
    serial: SerialNumber,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sigil");
    dn.push(DnType::CommonName, format!("Sigil CA {trust_domain}"));
    params.distinguished_name = dn;
    params.serial_number = Some(serial);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    // No path length limit: with an upstream CA this becomes an intermediate.
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(trust_domain.id_string().try_into()?)];
    Ok(params)
}

/// A fresh random serial number: 16 bytes, positive, non-zero.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive as a DER INTEGER
    bytes[0] |= 0x01; // and never shortened to fewer bytes
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use x509_parser::prelude::*;

    use crate::ca::{Ca, SvidRequest};
    use crate::ids::{SpiffeId, TrustDomain};

    const OID_BASIC_CONSTRAINTS: &str = "2.5.29.19";

    fn minted() -> (Ca, crate::ca::Svid) {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("agents.example.org").unwrap();
        let ca = Ca::load_or_create(dir.path(), &td).unwrap();
        let id = SpiffeId::new("spiffe://agents.example.org/agent/bot/instance/abc").unwrap();
        let svid = ca
            .sign_svid(&SvidRequest {
                spiffe_id: id,
                dns_names: vec![],
                ttl: Duration::from_secs(300),
                hint: "instance".into(),
            })
            .unwrap();
        (ca, svid)
    }

    #[test]
    fn the_leaf_has_basic_constraints_encoded_as_an_empty_sequence() {
        let (_, svid) = minted();
        let (_, cert) = parse_x509_certificate(&svid.cert_chain[0]).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == OID_BASIC_CONSTRAINTS)
            .expect("BasicConstraints present");
        assert_eq!(ext.value, [0x30, 0x00], "cA=false encoded as DER default");
        assert!(!cert.is_ca());
    }

    #[test]
    fn the_leaf_follows_every_x509_svid_rule() {
        let (_, svid) = minted();
        let (_, cert) = parse_x509_certificate(&svid.cert_chain[0]).unwrap();
        let ku = cert.key_usage().unwrap().expect("KeyUsage present").value;
        assert!(ku.digital_signature());
        assert!(!ku.key_cert_sign() && !ku.crl_sign());
        let eku = cert
            .extended_key_usage()
            .unwrap()
            .expect("EKU present")
            .value;
        assert!(eku.server_auth && eku.client_auth);
        let san = cert.subject_alternative_name().unwrap().expect("SAN").value;
        let uris: Vec<_> = san
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://agents.example.org/agent/bot/instance/abc"]);
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 300 + super::BACKDATE.as_secs() as i64);
    }

    #[test]
    fn the_spiffe_crate_accepts_the_leaf_and_its_pkcs8_key() {
        let (ca, svid) = minted();
        let chain: Vec<u8> = svid.cert_chain.iter().flat_map(|c| c.to_vec()).collect();
        let parsed = spiffe::X509Svid::parse_from_der(&chain, svid.key.pkcs8_der()).unwrap();
        assert_eq!(
            parsed.spiffe_id().to_string(),
            "spiffe://agents.example.org/agent/bot/instance/abc"
        );
        let td = TrustDomain::new("agents.example.org").unwrap();
        let bundle = spiffe::X509Bundle::parse_from_der(td, ca.bundle_der().as_ref()).unwrap();
        assert_eq!(bundle.authorities().len(), 1);
    }

    #[test]
    fn the_ca_certificate_may_sign_certificates_and_crls() {
        let (ca, _) = minted();
        let (_, cert) = parse_x509_certificate(ca.certificate_der()).unwrap();
        assert!(cert.is_ca());
        let ku = cert.key_usage().unwrap().expect("KeyUsage present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
    }

    #[test]
    fn serials_are_random_and_positive() {
        let a = super::random_serial().to_bytes();
        let b = super::random_serial().to_bytes();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
    }
}
