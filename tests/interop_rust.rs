//! The rust `spiffe` crate, unmodified, against the daemon: what it fetches
//! is checked with independent verifiers (rustls-webpki, x509-parser, rcgen).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::time::{Duration, SystemTime};

use common::{TestDaemon, config_for_me};
use spiffe::{TrustDomain, WorkloadApiClient, X509Source};
use x509_parser::prelude::*;

fn leaf_of(svid: &spiffe::X509Svid) -> X509Certificate<'_> {
    parse_x509_certificate(svid.leaf().as_bytes()).unwrap().1
}

#[tokio::test]
async fn the_rust_client_fetches_a_valid_x509_context() {
    let daemon = TestDaemon::start().await;
    let client = WorkloadApiClient::connect_to(daemon.endpoint())
        .await
        .unwrap();
    let context = client.fetch_x509_context().await.unwrap();
    let svid = context.default_svid().expect("a default SVID");

    // The SPIFFE ID names the entry and this process's instance.
    let instances = daemon.identity().instances();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].pid, std::process::id());
    let expected = format!(
        "spiffe://sigil.test/agent/tester/instance/{}",
        instances[0].instance_id
    );
    assert_eq!(svid.spiffe_id().to_string(), expected);
    assert_eq!(svid.hint(), Some("instance"));

    // The leaf chains to the bundle, checked by rustls-webpki.
    let td = TrustDomain::new("sigil.test").unwrap();
    let bundle = context
        .bundle_set()
        .get(&td)
        .expect("bundle for the trust domain");
    let anchors: Vec<_> = bundle
        .authorities()
        .iter()
        .map(|ca| {
            let der = rustls_pki_types::CertificateDer::from(ca.as_bytes());
            webpki::anchor_from_trusted_cert(&der).unwrap().to_owned()
        })
        .collect();
    let leaf_der = rustls_pki_types::CertificateDer::from(svid.leaf().as_bytes());
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            rustls_pki_types::UnixTime::now(),
            usage,
            None,
            None,
        )
        .unwrap();
    }

    // The private key is the certificate's.
    let key = rcgen::KeyPair::try_from(svid.private_key().as_bytes()).unwrap();
    let cert = leaf_of(svid);
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    // TTL and extensions per X509-SVID.md (default instance TTL: 1 hour).
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 3600 + 10, "1h plus the 10s backdate");
    assert!(!cert.is_ca());
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    daemon.stop().await;
}

#[tokio::test]
async fn the_rust_x509_source_sees_a_rotation_before_expiry() {
    let daemon = TestDaemon::start_with(&config_for_me("[svid]\ninstance_ttl = \"4s\"")).await;
    let source = X509Source::builder()
        .endpoint(daemon.endpoint())
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    let first_cert = leaf_of(&first);
    let first_serial = first_cert.raw_serial().to_vec();
    let first_expiry = first_cert.validity().not_after.timestamp();
    let mut updates = source.updated();
    let waiting = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), updates.changed())
        .await
        .expect("a rotation within 10s")
        .unwrap();
    // Rotation is due at half of the 4s lifetime, not before.
    assert!(
        waiting.elapsed() >= Duration::from_millis(1500),
        "rotated too early: {:?}",
        waiting.elapsed()
    );
    let second = source.svid().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        now < first_expiry,
        "the new SVID came before the old one expired"
    );
    assert_ne!(
        leaf_of(&second).raw_serial(),
        first_serial.as_slice(),
        "new serial"
    );
    assert_ne!(
        second.private_key().as_bytes(),
        first.private_key().as_bytes(),
        "new key"
    );
    assert_eq!(second.spiffe_id(), first.spiffe_id(), "same identity");
    source.shutdown().await;
    daemon.stop().await;
}
