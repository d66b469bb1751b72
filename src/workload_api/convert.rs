//! Identity state → Workload API messages. The only place that builds them.
//!
//! Every message is complete (clients replace their whole state on each).
//! Certificates go out as concatenated DER, keys as PKCS#8 DER; the default
//! (instance) SVID comes first.
//!
//! The CRL goes to verifiers only: FetchX509Bundles messages carry it, and
//! FetchX509SVID messages leave the optional `crl` field empty. Agents'
//! clients (go-spiffe, py-spiffe, the rust `spiffe` crate) ignore it, and
//! every task end changes it: carried on agent streams, one task's end
//! would cost a CRL's bytes on every agent's stream (issue 14 measured 400
//! to 500 MB/s at 10,000 streams and 100 task ends/s). A process that
//! verifies peers opens a FetchX509Bundles stream, as `verify::source` does.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use crate::identity::{IdentitySet, TrustBundle};
use crate::proto::workload::{X509BundlesResponse, X509svid, X509svidResponse};

/// The FetchX509SVID message for an instance: its SVIDs, each with the
/// trust domain's CA certificates (`anchors`, concatenated DER), no CRL.
pub fn x509_svid_response(set: &IdentitySet, anchors: &Bytes) -> X509svidResponse {
    let svids = set
        .svids
        .iter()
        .map(|svid| {
            let mut chain = BytesMut::new();
            for cert in &svid.cert_chain {
                chain.extend_from_slice(cert);
            }
            X509svid {
                spiffe_id: svid.spiffe_id.to_string(),
                x509_svid: chain.freeze(),
                x509_svid_key: Bytes::copy_from_slice(svid.key.pkcs8_der()),
                bundle: anchors.clone(),
                hint: svid.hint.clone(),
            }
        })
        .collect();
    X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

/// The FetchX509Bundles message: the CA certificates and the current CRL.
pub fn x509_bundles_response(bundle: &TrustBundle) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: bundle.crls.clone(),
        bundles: HashMap::from([(bundle.trust_domain.id_string(), bundle.x509_der.clone())]),
    }
}
