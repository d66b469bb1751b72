//! A Workload API client over the Unix socket, for `sigil fetch` and
//! `sigil healthcheck`. It speaks exactly what SPIFFE clients speak: the
//! standard proto and the `workload.spiffe.io: true` header.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tonic::transport::Channel;

use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::workload_api::header::SECURITY_HEADER;

/// The environment variable SPIFFE clients read the endpoint from.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Picks the socket: the flag, else `SPIFFE_ENDPOINT_SOCKET`, else the
/// default socket for this user. Accepts a path, `unix:///path` or `unix:/path`.
///
/// # Errors
/// When the address is not a Unix socket path.
pub fn resolve_endpoint(flag: Option<&str>) -> anyhow::Result<PathBuf> {
    if let Some(addr) = flag {
        return parse_endpoint(addr);
    }
    if let Ok(addr) = std::env::var(ENDPOINT_ENV) {
        return parse_endpoint(&addr).with_context(|| format!("in {ENDPOINT_ENV}"));
    }
    Ok(crate::config::default_paths().1)
}

fn parse_endpoint(addr: &str) -> anyhow::Result<PathBuf> {
    let path = addr
        .strip_prefix("unix://")
        .or_else(|| addr.strip_prefix("unix:"))
        .unwrap_or(addr);
    if addr.starts_with("tcp:") {
        bail!("{addr:?}: sigil serves on a Unix socket; give unix:///path/to/workload.sock");
    }
    if !path.starts_with('/') {
        bail!("{addr:?} is not an absolute socket path or a unix:///path URI");
    }
    Ok(PathBuf::from(path))
}

/// The first FetchX509Bundles message: the bundles and the CRL (Sigil
/// sends CRLs on that stream only). A stream that ends before its first
/// message is `Unavailable`.
///
/// # Errors
/// The daemon's refusal.
pub async fn first_bundles(
    api: &mut SpiffeWorkloadApiClient<Channel>,
) -> Result<crate::proto::workload::X509BundlesResponse, tonic::Status> {
    use tokio_stream::StreamExt as _;
    api.fetch_x509_bundles(request(crate::proto::workload::X509BundlesRequest {}))
        .await?
        .into_inner()
        .next()
        .await
        .unwrap_or_else(|| {
            Err(tonic::Status::unavailable(
                "the daemon closed the stream without sending bundles",
            ))
        })
}

/// Connects to the Workload API on `socket`.
///
/// # Errors
/// When the socket is missing, is not a socket, is not accessible or
/// nothing answers on it: one message each, with what to do.
pub async fn connect(socket: &Path) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    let channel = crate::connect::channel(socket, crate::connect::Which::Workload).await?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

/// Wraps a message in a request that carries the security header.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_in_every_accepted_form_give_the_path() {
        for addr in ["unix:///run/s.sock", "unix:/run/s.sock", "/run/s.sock"] {
            assert_eq!(parse_endpoint(addr).unwrap(), PathBuf::from("/run/s.sock"));
        }
        assert!(parse_endpoint("tcp://127.0.0.1:8081").is_err());
        assert!(parse_endpoint("unix://relative.sock").is_err());
    }
}
