//! SPIFFE ID patterns: who a service allows.
//!
//! One rule: a pattern is `spiffe://<trust domain>` followed by path
//! segments, where a segment `*` matches exactly one segment and a final
//! `**` matches any number (zero or more) of the rest. `spiffe://td` alone
//! (or `spiffe://td/**`) allows every ID of the trust domain; a pattern
//! without wildcards allows exactly that ID. `**` anywhere but last is
//! refused rather than guessed at.

use std::fmt;
use std::str::FromStr;

use crate::ids::SpiffeId;

/// A pattern that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pattern:?} is not a SPIFFE ID pattern: {why}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong.
    pub why: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Exact(String),
    One,
}

/// A parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern {
    text: String,
    trust_domain: String,
    segments: Vec<Segment>,
    rest: bool,
}

impl FromStr for IdPattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, PatternError> {
        let bad = |why| PatternError {
            pattern: text.to_owned(),
            why,
        };
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("it must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if td.is_empty()
            || !td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(bad(
                "the trust domain must be lower-case letters, digits, '-', '.', '_'",
            ));
        }
        let mut segments = Vec::new();
        let mut any_rest = false;
        if !path.is_empty() {
            let parts: Vec<&str> = path.split('/').collect();
            for (i, part) in parts.iter().enumerate() {
                match *part {
                    "**" if i + 1 == parts.len() => any_rest = true,
                    "**" => return Err(bad("'**' may only be the last segment")),
                    "*" => segments.push(Segment::One),
                    "" | "." | ".." => {
                        return Err(bad("empty, '.' and '..' segments are not allowed"));
                    }
                    s if s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) =>
                    {
                        segments.push(Segment::Exact(s.to_owned()));
                    }
                    _ => {
                        return Err(bad(
                            "segments hold letters, digits, '-', '.', '_', or are '*' / '**'",
                        ));
                    }
                }
            }
        } else {
            // `spiffe://td`: the whole trust domain.
            any_rest = true;
        }
        Ok(Self {
            text: text.to_owned(),
            trust_domain: td.to_owned(),
            segments,
            rest: any_rest,
        })
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl IdPattern {
    /// Whether `id` is allowed by this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        if id.trust_domain().to_string() != self.trust_domain {
            return false;
        }
        let path: Vec<&str> = id.path().split('/').filter(|s| !s.is_empty()).collect();
        if path.len() < self.segments.len() || (!self.rest && path.len() != self.segments.len()) {
            return false;
        }
        self.segments.iter().zip(&path).all(|(s, p)| match s {
            Segment::One => true,
            Segment::Exact(e) => e == p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(pattern: &str, id: &str) -> bool {
        pattern
            .parse::<IdPattern>()
            .unwrap()
            .matches(&SpiffeId::new(id).unwrap())
    }

    #[test]
    fn exact_trust_domain_one_segment_and_any_rest() {
        let id = "spiffe://td/agent/bot/instance/1";
        assert!(allows(id, id));
        assert!(!allows("spiffe://td/agent/bot", id), "exact means exact");
        assert!(allows("spiffe://td", id));
        assert!(allows("spiffe://td/**", id));
        assert!(allows("spiffe://td/agent/*/instance/*", id));
        assert!(!allows("spiffe://td/agent/*", id), "* is one segment");
        assert!(allows("spiffe://td/agent/bot/**", id));
        assert!(
            allows("spiffe://td/agent/bot/instance/1/**", id),
            "** may match nothing"
        );
        assert!(!allows("spiffe://other/**", id));
        assert!(!allows("spiffe://td/agent/other/**", id));
    }

    #[test]
    fn unusable_patterns_are_refused_with_the_reason() {
        for bad in [
            "td/agent",
            "spiffe://TD/x",
            "spiffe://td/**/x",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a b",
            "spiffe:///x",
        ] {
            let e = bad.parse::<IdPattern>().unwrap_err();
            assert!(e.to_string().contains("is not a SPIFFE ID pattern"), "{e}");
        }
    }
}
