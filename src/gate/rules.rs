//! The gate's rules: which caller may make which request. One rule: rules
//! are tried in order; the first whose request matchers (path glob, HTTP
//! methods, MCP JSON-RPC method, MCP tool name) all match decides, by
//! whether one of its SPIFFE ID patterns matches the caller. A request no
//! rule matches is refused. At the handshake, a caller that no rule could
//! ever allow is refused already.

use serde::Deserialize;

use crate::ids::SpiffeId;
use crate::verify::IdPattern;

/// A rule file or flag that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The TOML is invalid.
    #[error("{source_name}: {message}")]
    Parse {
        /// The file.
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    #[serde(rename = "rule", default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    path: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    mcp_method: Option<String>,
    mcp_tool: Option<String>,
    allow: Vec<String>,
}

/// One rule.
#[derive(Debug, Clone)]
pub struct Rule {
    path: Option<glob::Pattern>,
    methods: Vec<String>,
    mcp_method: Option<String>,
    mcp_tool: Option<glob::Pattern>,
    allow: Vec<IdPattern>,
}

/// What a request is, as the rules see it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    /// HTTP method, upper case.
    pub method: String,
    /// The path (no query).
    pub path: String,
    /// MCP: the JSON-RPC method (e.g. `tools/call`), if known.
    pub mcp_method: Option<String>,
    /// MCP: the tool of a `tools/call`, if known.
    pub mcp_tool: Option<String>,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward it; the index of the rule that allowed it.
    Allow(usize),
    /// Refuse it with 403: the rule that matched the request but not the
    /// caller (none when no rule matched), and why.
    Deny(Option<usize>, String),
}

/// The rules in order.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// One rule allowing `patterns` for every request (`--allow`).
    pub fn allow_all(patterns: Vec<IdPattern>) -> Self {
        Self {
            rules: vec![Rule {
                path: None,
                methods: Vec::new(),
                mcp_method: None,
                mcp_tool: None,
                allow: patterns,
            }],
        }
    }

    /// Parses a rules file: `[[rule]]` tables with `path` (glob),
    /// `methods`, `mcp_method`, `mcp_tool` (glob) and `allow` (patterns).
    ///
    /// # Errors
    /// [`RuleError`] naming the file, the rule and the field.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, RuleError> {
        let bad = |message: String| RuleError::Parse {
            source_name: source_name.to_owned(),
            message,
        };
        let raw: RawRules = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if raw.rules.is_empty() {
            return Err(bad(
                "no [[rule]]: the gate would refuse every request".into()
            ));
        }
        let mut rules = Vec::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let glob = |field: &str, p: Option<String>| {
                p.map(|p| {
                    glob::Pattern::new(&p)
                        .map_err(|e| bad(format!("rule[{i}].{field}: {p:?} is not a glob: {e}")))
                })
                .transpose()
            };
            if r.allow.is_empty() {
                return Err(bad(format!(
                    "rule[{i}].allow is empty: the rule would allow nobody"
                )));
            }
            let allow = r
                .allow
                .iter()
                .map(|p| p.parse().map_err(|e| bad(format!("rule[{i}].allow: {e}"))))
                .collect::<Result<Vec<IdPattern>, _>>()?;
            rules.push(Rule {
                path: glob("path", r.path)?,
                methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                mcp_method: r.mcp_method,
                mcp_tool: glob("mcp_tool", r.mcp_tool)?,
                allow,
            });
        }
        Ok(Self { rules })
    }

    /// Every pattern any rule allows: what the handshake admits.
    pub fn all_patterns(&self) -> Vec<IdPattern> {
        let mut all: Vec<IdPattern> = Vec::new();
        for pattern in self.rules.iter().flat_map(|r| &r.allow) {
            if !all.contains(pattern) {
                all.push(pattern.clone());
            }
        }
        all
    }

    /// Whether a rule that names an MCP method or tool could apply to a
    /// request with this HTTP method and path: only then is its body read
    /// (other requests, an upload on another path say, pass unread).
    pub fn need_mcp_for(&self, method: &str, path: &str) -> bool {
        self.rules.iter().any(|r| {
            (r.mcp_method.is_some() || r.mcp_tool.is_some())
                && r.path.as_ref().is_none_or(|p| p.matches(path))
                && (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
        })
    }

    /// The decision for `request` by `caller`.
    pub fn decide(&self, caller: &SpiffeId, request: &Request) -> Decision {
        for (i, rule) in self.rules.iter().enumerate() {
            let path_ok = rule.path.as_ref().is_none_or(|p| p.matches(&request.path));
            let method_ok = rule.methods.is_empty() || rule.methods.contains(&request.method);
            let mcp_ok = rule
                .mcp_method
                .as_ref()
                .is_none_or(|m| request.mcp_method.as_ref() == Some(m));
            let tool_ok = rule
                .mcp_tool
                .as_ref()
                .is_none_or(|t| request.mcp_tool.as_ref().is_some_and(|n| t.matches(n)));
            if path_ok && method_ok && mcp_ok && tool_ok {
                return if rule.allow.iter().any(|p| p.matches(caller)) {
                    Decision::Allow(i)
                } else {
                    Decision::Deny(Some(i), format!("rule {i} does not allow {caller}"))
                };
            }
        }
        Decision::Deny(None, "no rule matches this request".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
        [[rule]]
        mcp_method = "tools/call"
        mcp_tool = "search*"
        allow = ["spiffe://td/agent/research-bot/**"]
        [[rule]]
        mcp_method = "tools/call"
        allow = ["spiffe://td/agent/admin/**"]
        [[rule]]
        path = "/mcp"
        methods = ["post", "GET"]
        allow = ["spiffe://td/agent/*/**"]
    "#;

    fn req(method: &str, path: &str, mcp: Option<(&str, &str)>) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            mcp_method: mcp.map(|m| m.0.into()),
            mcp_tool: mcp.map(|m| m.1.into()).filter(|t: &String| !t.is_empty()),
        }
    }

    #[test]
    fn the_first_matching_rule_decides_and_unmatched_requests_are_refused() {
        let rules = Rules::parse(RULES, "gate.toml").unwrap();
        let twice = "[[rule]]\npath = \"/a\"\nallow = [\"spiffe://td\"]\n[[rule]]\nallow = [\"spiffe://td\"]";
        let twice = Rules::parse(twice, "gate.toml").unwrap();
        assert_eq!(
            twice.all_patterns().len(),
            1,
            "the handshake lists each once"
        );
        let bot = SpiffeId::new("spiffe://td/agent/research-bot/instance/1").unwrap();
        let tool = |name| req("POST", "/mcp", Some(("tools/call", name)));
        assert_eq!(rules.decide(&bot, &tool("search_web")), Decision::Allow(0));
        assert!(
            matches!(rules.decide(&bot, &tool("delete_all")), Decision::Deny(..)),
            "rule 1 decides: admins only"
        );
        assert_eq!(
            rules.decide(&bot, &req("POST", "/mcp", Some(("initialize", "")))),
            Decision::Allow(2)
        );
        assert!(matches!(
            rules.decide(&bot, &req("DELETE", "/mcp", None)),
            Decision::Deny(..)
        ));
        assert!(matches!(
            rules.decide(&bot, &req("GET", "/other", None)),
            Decision::Deny(..)
        ));
        assert!(
            rules.need_mcp_for("POST", "/anything"),
            "rule 0 names no path"
        );
        let pathed = Rules::parse(
            "[[rule]]\npath = \"/mcp\"\nmcp_method = \"tools/call\"\nallow = [\"spiffe://td\"]\n[[rule]]\nallow = [\"spiffe://td\"]",
            "gate.toml",
        )
        .unwrap();
        assert!(pathed.need_mcp_for("POST", "/mcp"));
        assert!(
            !pathed.need_mcp_for("POST", "/upload"),
            "other paths stream through"
        );
        assert_eq!(rules.all_patterns().len(), 3);
    }

    #[test]
    fn a_bad_rules_file_names_the_rule_and_field() {
        for (text, wanted) in [
            ("", "no [[rule]]"),
            ("[[rule]]\nallow = []", "rule[0].allow is empty"),
            ("[[rule]]\nallow = [\"td\"]", "rule[0].allow"),
            (
                "[[rule]]\npath = \"[\"\nallow = [\"spiffe://td\"]",
                "rule[0].path",
            ),
            (
                "[[rule]]\ncolour = 1\nallow = [\"spiffe://td\"]",
                "unknown field",
            ),
        ] {
            let e = Rules::parse(text, "gate.toml").unwrap_err().to_string();
            assert!(e.contains(wanted) && e.starts_with("gate.toml"), "{e}");
        }
    }
}
