//! Which MCP call a request makes, for the rules that name MCP methods and
//! tools. The answer comes from the JSON-RPC body, because that is what the
//! server acts on: the `Mcp-Method`/`Mcp-Name` headers are the client's
//! claim about the body, so they are checked against it, never believed
//! instead of it. Anything the gate cannot read the same way every server
//! would is refused, not passed to the rules as "no MCP call" (failing open
//! here would let a forbidden tool through a rule that allows the path): a
//! compressed body, a batch, a body that is not one JSON object, a tool
//! name that is not a string, an object with two members whose names are
//! equal or equal ignoring case, or a member spelled like `Method` or
//! `paramſ`, which servers that match names without case (Go's
//! `encoding/json`) read as `method`/`params`.
//!
//! Does not own: reading the body (bounded, in `super`), or what the rules
//! decide.

use base64::Engine as _;
use http::HeaderMap;
use http::StatusCode;

/// The JSON-RPC method and, for `tools/call`, the tool of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpCall {
    /// The JSON-RPC `method`; none for a response the client sends back.
    pub method: Option<String>,
    /// The tool `params.name` of a `tools/call`.
    pub tool: Option<String>,
}

/// Why a request's MCP call cannot be known: its status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// 400 or 415.
    pub status: StatusCode,
    /// Why, naming the fix.
    pub message: String,
}

fn bad(message: impl Into<String>) -> Unreadable {
    Unreadable {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

/// Whether the body may be compressed: the gate reads bodies as sent.
///
/// # Errors
/// 415 for a `Content-Encoding` other than `identity`.
pub fn check_encoding(headers: &HeaderMap) -> Result<(), Unreadable> {
    for value in headers.get_all(http::header::CONTENT_ENCODING) {
        if !value.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(Unreadable {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message: "the gate reads MCP request bodies to apply its rules: send them without Content-Encoding".into(),
            });
        }
    }
    Ok(())
}

/// The MCP call of a POST body, checked against the request's headers.
/// An empty body is no call (the server has nothing to act on).
///
/// # Errors
/// [`Unreadable`] when the body is not one readable JSON-RPC message, or
/// its headers name another method or tool.
pub fn of_request(headers: &HeaderMap, body: &[u8]) -> Result<McpCall, Unreadable> {
    let call = if body.iter().all(u8::is_ascii_whitespace) {
        McpCall::default()
    } else {
        of_body(body)?
    };
    if let Some(claimed) = single(headers, "mcp-method")?
        && Some(&claimed) != call.method.as_ref()
    {
        return Err(bad(format!(
            "the Mcp-Method header says {claimed:?} but the body calls {:?}",
            call.method.as_deref().unwrap_or("nothing")
        )));
    }
    if let Some(tool) = &call.tool
        && let Some(claimed) = single(headers, "mcp-name")?
    {
        let claimed = decode_name(&claimed)?;
        if &claimed != tool {
            return Err(bad(format!(
                "the Mcp-Name header says {claimed:?} but the body calls the tool {tool:?}"
            )));
        }
    }
    Ok(call)
}

/// The one value of header `name`, if sent.
fn single(headers: &HeaderMap, name: &str) -> Result<Option<String>, Unreadable> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad(format!("more than one {name} header")));
    }
    first
        .to_str()
        .map(|v| Some(v.trim().to_owned()))
        .map_err(|_| bad(format!("the {name} header is not visible ASCII")))
}

/// An `Mcp-Name` value: as sent, or decoded from the `=?base64?…?=` form
/// MCP clients use for names that are not plain ASCII.
fn decode_name(value: &str) -> Result<String, Unreadable> {
    let Some(encoded) = value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="))
    else {
        return Ok(value.to_owned());
    };
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| bad("the Mcp-Name header's base64 form does not decode"))
}

fn of_body(body: &[u8]) -> Result<McpCall, Unreadable> {
    let Strict(value) = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "the body is not a JSON-RPC message the gate can read ({e}); it must be one JSON object whose member names are unique, even ignoring case"
        ))
    })?;
    let serde_json::Value::Object(message) = value else {
        return Err(bad(
            "JSON-RPC batches (and bodies that are not one object) are refused: the gate decides one call at a time; send each call on its own",
        ));
    };
    spelled_exactly(
        &message,
        &["jsonrpc", "id", "method", "params", "result", "error"],
    )?;
    if let Some(serde_json::Value::Object(params)) = message.get("params") {
        spelled_exactly(params, &["name", "arguments"])?;
    }
    let method = match message.get("method") {
        None => None,
        Some(serde_json::Value::String(m)) => Some(m.clone()),
        Some(_) => return Err(bad("the JSON-RPC method is not a string")),
    };
    let tool = if method.as_deref() == Some("tools/call") {
        match message.get("params").and_then(|p| p.get("name")) {
            Some(serde_json::Value::String(name)) => Some(name.clone()),
            _ => return Err(bad("a tools/call without a string params.name")),
        }
    } else {
        None
    };
    Ok(McpCall { method, tool })
}

/// Member names as servers that ignore case compare them: Unicode simple
/// case folding, near enough (`ſ` and `S` fold to `s`, `K` to `k`).
fn fold(name: &str) -> String {
    name.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// Refuses a member whose name folds to one of `names` without being it.
fn spelled_exactly(
    object: &serde_json::Map<String, serde_json::Value>,
    names: &[&str],
) -> Result<(), Unreadable> {
    for key in object.keys() {
        let folded = fold(key);
        if names.iter().any(|n| *n == folded) && !names.contains(&key.as_str()) {
            return Err(bad(format!(
                "the member {key:?} is read as {folded:?} by some servers: spell it {folded:?}"
            )));
        }
    }
    Ok(())
}

/// JSON that refuses, at every depth, an object with two members whose
/// names are equal or fold to the same name.
struct Strict(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        let mut folded = std::collections::HashSet::new();
        while let Some((key, Strict(value))) = map.next_entry::<String, Strict>()? {
            if !folded.insert(fold(&key)) {
                return Err(serde::de::Error::custom(format!(
                    "the member name {key:?} appears twice (ignoring case)"
                )));
            }
            object.insert(key, value);
        }
        Ok(object.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{}}}"#;

    #[test]
    fn the_call_comes_from_the_body() {
        let call = of_request(&HeaderMap::new(), CALL).unwrap();
        assert_eq!(call.method.as_deref(), Some("tools/call"));
        assert_eq!(call.tool.as_deref(), Some("search"));
        let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"name":"x"}}"#;
        let call = of_request(&HeaderMap::new(), init).unwrap();
        assert_eq!(
            (call.method.as_deref(), call.tool),
            (Some("initialize"), None)
        );
        let response = br#"{"jsonrpc":"2.0","id":7,"result":{}}"#;
        assert_eq!(
            of_request(&HeaderMap::new(), response).unwrap(),
            McpCall::default()
        );
        assert_eq!(
            of_request(&HeaderMap::new(), b"").unwrap(),
            McpCall::default()
        );
    }

    #[test]
    fn headers_that_agree_with_the_body_pass_and_others_are_refused() {
        let agree = headers(&[("mcp-method", "tools/call"), ("mcp-name", "search")]);
        assert!(of_request(&agree, CALL).is_ok());
        let encoded = headers(&[
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?c2VhcmNo?="),
        ]);
        assert!(of_request(&encoded, CALL).is_ok());
        for lying in [
            headers(&[("mcp-method", "tools/list")]),
            headers(&[("mcp-method", "tools/call"), ("mcp-name", "echo")]),
            headers(&[("mcp-name", "=?base64?ZWNobw==?=")]),
            headers(&[("mcp-method", "tools/call"), ("mcp-method", "tools/call")]),
        ] {
            let refused = of_request(&lying, CALL).unwrap_err();
            assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{lying:?}");
        }
        // Headers naming a call, with no call in the body.
        assert!(of_request(&headers(&[("mcp-method", "tools/call")]), b"").is_err());
    }

    #[test]
    fn what_the_gate_cannot_read_as_the_server_would_is_refused() {
        for body in [
            &b"not json"[..],
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}]"#,
            // Python's json accepts NaN; serde_json does not.
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":NaN}}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":["tools/call"]}"#,
            // Duplicates: serde keeps the last, other parsers the first.
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"x"}}"#,
            // Go's encoding/json matches member names without case.
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","METHOD":"tools/call","params":{"name":"x"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","NAME":"x"}}"#,
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"paramſ\":{\"name\":\"x\"}}".as_bytes(),
            br#"{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"x"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"a":1,"A":2}}}"#,
        ] {
            assert!(
                of_request(&HeaderMap::new(), body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn compressed_bodies_are_refused() {
        assert!(check_encoding(&HeaderMap::new()).is_ok());
        assert!(check_encoding(&headers(&[("content-encoding", "identity")])).is_ok());
        let gzip = check_encoding(&headers(&[("content-encoding", "gzip")])).unwrap_err();
        assert_eq!(gzip.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
