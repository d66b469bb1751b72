//! What the gate reads from a request before its rules see it, each read
//! the way the service behind it will read it or refused: the HTTP method
//! (upper case, as servers that upper-case it would see it), the path
//! (percent-decoded, with no dot segments and no encoded separators, so
//! `/%66orbidden` and `/mcp/../admin` cannot dodge a path rule), and, when
//! an MCP rule could apply, the JSON-RPC call of the body (`mcp`).
//!
//! Does not own: reading the body (bounded, in `super`), or the decision.

use http::StatusCode;
use percent_encoding::percent_decode_str;

use super::mcp::Unreadable;

fn bad(message: impl Into<String>) -> Unreadable {
    Unreadable {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

/// The request's method, refused unless it is upper case: HTTP methods are
/// case-sensitive, but some servers (WSGI) upper-case them, so `post`
/// would pass rules for another method and be served as POST.
///
/// # Errors
/// 400 for a method with a lower-case letter.
pub fn method(method: &http::Method) -> Result<String, Unreadable> {
    let name = method.as_str();
    if name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(bad(format!(
            "the HTTP method {name:?} is not upper case; send {:?}",
            name.to_ascii_uppercase()
        )));
    }
    Ok(name.to_owned())
}

/// The path the rules match: percent-decoded, refused when decoding or a
/// server's path clean-up could turn it into another path.
///
/// # Errors
/// 400 for an encoded `/`, `\` or NUL, a `\`, a `.` segment or one that
/// starts with `..`, an empty segment (`//`), or bytes that are not UTF-8.
pub fn path(raw: &str) -> Result<String, Unreadable> {
    let lower = raw.to_ascii_lowercase();
    if ["%2f", "%5c", "%00", "%25"]
        .iter()
        .any(|e| lower.contains(e))
    {
        return Err(bad(format!(
            "the path {raw:?} encodes a separator, a NUL or a %: send it plainly"
        )));
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad(format!("the path {raw:?} does not decode to UTF-8")))?;
    // `//admin` is `/admin` to most servers; `..;` and `.. ` are `..` to
    // some.
    if decoded.contains('\\')
        || decoded.contains("//")
        || decoded
            .split('/')
            .any(|segment| segment == "." || segment.starts_with(".."))
    {
        return Err(bad(format!(
            "the path {raw:?} has a dot segment, an empty segment or a backslash: send the path it means"
        )));
    }
    Ok(decoded.into_owned())
}

/// Whether `name` is, to a server that reads `_` as `-` and ignores case
/// (WSGI, CGI), the header `identity` (one of the gate's own).
pub fn same_header(name: &str, identity: &str) -> bool {
    name.len() == identity.len()
        && name
            .bytes()
            .zip(identity.bytes())
            .all(|(a, b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_must_be_upper_case() {
        assert_eq!(method(&http::Method::POST).unwrap(), "POST");
        let post = http::Method::from_bytes(b"post").unwrap();
        assert!(method(&post).is_err());
        let ext = http::Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(method(&ext).unwrap(), "PURGE");
    }

    #[test]
    fn paths_are_decoded_and_tricks_refused() {
        assert_eq!(path("/mcp").unwrap(), "/mcp");
        assert_eq!(path("/%66orbidden").unwrap(), "/forbidden");
        assert_eq!(path("/a%20b").unwrap(), "/a b");
        for trick in [
            "/mcp/../admin",
            "/mcp/./x",
            "/mcp/%2e%2e/admin",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a%00",
            "/%2566orbidden",
            "/%ff",
            "/..",
            "//admin",
            "/public//admin",
            "/public/..;/admin",
            "/public/..%20/admin",
        ] {
            assert!(path(trick).is_err(), "{trick}");
        }
    }

    #[test]
    fn identity_headers_are_matched_as_wsgi_reads_them() {
        assert!(same_header("x-sigil-spiffe-id", "x-sigil-spiffe-id"));
        assert!(same_header("x_sigil_spiffe_id", "x-sigil-spiffe-id"));
        assert!(same_header("x-sigil_spiffe-id", "x-sigil-spiffe-id"));
        assert!(!same_header("x-sigil-spiffe-ids", "x-sigil-spiffe-id"));
        assert!(!same_header("x-other", "x-sigil-task"));
    }
}
