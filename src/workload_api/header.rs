//! The Workload API's security header and the status messages clients rely on.
//!
//! Clients key their behaviour on these strings: the rust `spiffe` client
//! turns a PermissionDenied containing [`NO_IDENTITY_ISSUED`] into a slow
//! retry (and withdraws its SVIDs), and fails fast on InvalidArgument.

use tonic::{Request, Status};

/// The metadata key every Workload API request must carry, with value `true`.
/// Browsers cannot set it, so a web page cannot reach the socket through a
/// proxy (SPIFFE_Workload_Endpoint.md).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The message for a request without the security header (as SPIRE says it).
pub const HEADER_MISSING: &str = "security header missing from request";

/// Prefix of every PermissionDenied message; clients match on it.
pub const NO_IDENTITY_ISSUED: &str = "no identity issued";

/// A tonic interceptor: refuses requests without `workload.spiffe.io: true`.
///
/// # Errors
/// `InvalidArgument` with [`HEADER_MISSING`].
pub fn check_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"true") => Ok(req),
        _ => Err(Status::invalid_argument(HEADER_MISSING)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_the_header_is_an_invalid_argument() {
        let err = check_security_header(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), HEADER_MISSING);
    }

    #[test]
    fn a_request_with_the_header_passes() {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_security_header(req).is_ok());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(SECURITY_HEADER, "false".parse().unwrap());
        assert!(check_security_header(wrong).is_err());
    }
}
