//! Identity state → Workload API messages. The only place that builds them.
//!
//! Every message is complete (clients replace their whole state on each):
//! all SVIDs, the bundle and the CRLs. Certificates go out as concatenated
//! DER, keys as PKCS#8 DER; the default (instance) SVID comes first.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use crate::identity::{IdentitySet, TrustBundle};
use crate::proto::workload::{X509BundlesResponse, X509svid, X509svidResponse};

/// The FetchX509SVID message for an instance.
pub fn x509_svid_response(set: &IdentitySet, bundle: &TrustBundle) -> X509svidResponse {
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
                bundle: bundle.x509_der.clone(),
                hint: svid.hint.clone(),
            }
        })
        .collect();
    X509svidResponse {
        svids,
        crl: bundle.crls.clone(),
        federated_bundles: HashMap::new(),
    }
}

/// The FetchX509Bundles message.
pub fn x509_bundles_response(bundle: &TrustBundle) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: bundle.crls.clone(),
        bundles: HashMap::from([(bundle.trust_domain.id_string(), bundle.x509_der.clone())]),
    }
}
