//! SPIFFE ID templates: how an entry names the processes it admits.
//!
//! A template is parsed once, at config load, into literal text and known
//! placeholders, so an unknown placeholder is a config error and rendering
//! cannot fail on syntax, only on an ID that SPIFFE-ID.md refuses.

use std::fmt;
use std::str::FromStr;

use crate::ids::{InstanceId, SpiffeId, TrustDomain};

/// The template used when an entry gives none.
pub const DEFAULT_TEMPLATE: &str = "spiffe://{trust_domain}/agent/{entry}/instance/{instance}";

/// The values a template can refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placeholder {
    TrustDomain,
    Entry,
    Instance,
    Uid,
}

impl Placeholder {
    const ALL: [(&'static str, Placeholder); 4] = [
        ("trust_domain", Self::TrustDomain),
        ("entry", Self::Entry),
        ("instance", Self::Instance),
        ("uid", Self::Uid),
    ];
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Value(Placeholder),
}

/// A parsed SPIFFE ID template such as [`DEFAULT_TEMPLATE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

/// What a template is rendered with.
pub struct Context<'a> {
    /// The daemon's trust domain.
    pub trust_domain: &'a TrustDomain,
    /// The entry's name.
    pub entry: &'a str,
    /// The attested instance.
    pub instance: &'a InstanceId,
    /// The attested uid.
    pub uid: u32,
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{name}` is not a known placeholder.
    #[error(
        "unknown placeholder {{{0}}}; known placeholders are {{trust_domain}}, {{entry}}, {{instance}}, {{uid}}"
    )]
    UnknownPlaceholder(String),
    /// A `{` without its `}`.
    #[error("unclosed '{{' in SPIFFE ID template")]
    Unclosed,
    /// The rendered ID is not a valid SPIFFE ID.
    #[error("renders to {id:?}, which is not a valid SPIFFE ID: {reason}")]
    InvalidId {
        /// The rendered text.
        id: String,
        /// What SPIFFE-ID.md rule it breaks.
        reason: String,
    },
    /// The rendered ID is in another trust domain than the daemon's.
    #[error("renders to {id}, outside the trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The rendered ID.
        id: String,
        /// The daemon's trust domain.
        trust_domain: String,
    },
}

impl FromStr for Template {
    type Err = TemplateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(TemplateError::Unclosed)?;
            let name = &after[..close];
            let placeholder = Placeholder::ALL
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| *p)
                .ok_or_else(|| TemplateError::UnknownPlaceholder(name.to_owned()))?;
            parts.push(Part::Value(placeholder));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Self {
            text: text.to_owned(),
            parts,
        })
    }
}

impl Template {
    /// Renders the template and checks the result is a valid SPIFFE ID of the
    /// daemon's trust domain.
    ///
    /// # Errors
    /// [`TemplateError::InvalidId`] or [`TemplateError::ForeignTrustDomain`].
    pub fn render(&self, ctx: &Context<'_>) -> Result<SpiffeId, TemplateError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Value(Placeholder::TrustDomain) => out.push_str(ctx.trust_domain.as_str()),
                Part::Value(Placeholder::Entry) => out.push_str(ctx.entry),
                Part::Value(Placeholder::Instance) => out.push_str(ctx.instance.as_str()),
                Part::Value(Placeholder::Uid) => out.push_str(&ctx.uid.to_string()),
            }
        }
        let id = SpiffeId::new(&out).map_err(|e| TemplateError::InvalidId {
            id: out.clone(),
            reason: e.to_string(),
        })?;
        if id.path().is_empty() {
            return Err(TemplateError::InvalidId {
                id: out,
                reason: "an SVID's SPIFFE ID needs a non-empty path".into(),
            });
        }
        if id.trust_domain_name() != ctx.trust_domain.as_str() {
            return Err(TemplateError::ForeignTrustDomain {
                id: out,
                trust_domain: ctx.trust_domain.to_string(),
            });
        }
        Ok(id)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str) -> Result<SpiffeId, TemplateError> {
        let td = TrustDomain::new("agents.example.org").unwrap();
        let instance = InstanceId::derive("boot", 7, 9, crate::ids::ExeId::new(1, 1, b"/bin/x"));
        let ctx = Context {
            trust_domain: &td,
            entry: "research-bot",
            instance: &instance,
            uid: 1000,
        };
        template.parse::<Template>()?.render(&ctx)
    }

    #[test]
    fn the_default_template_names_entry_and_instance() {
        let id = render(DEFAULT_TEMPLATE).unwrap();
        let instance = InstanceId::derive("boot", 7, 9, crate::ids::ExeId::new(1, 1, b"/bin/x"));
        assert_eq!(
            id.to_string(),
            format!("spiffe://agents.example.org/agent/research-bot/instance/{instance}")
        );
    }

    #[test]
    fn the_uid_placeholder_is_rendered() {
        let id = render("spiffe://{trust_domain}/uid/{uid}").unwrap();
        assert_eq!(id.path(), "/uid/1000");
    }

    #[test]
    fn unknown_placeholders_and_bad_ids_are_refused() {
        assert!(matches!(
            render("spiffe://{trust_domain}/{pid}"),
            Err(TemplateError::UnknownPlaceholder(p)) if p == "pid"
        ));
        assert_eq!(
            render("spiffe://{trust_domain}/{entry"),
            Err(TemplateError::Unclosed)
        );
        assert!(matches!(
            render("spiffe://{trust_domain}/a//b"),
            Err(TemplateError::InvalidId { .. })
        ));
        assert!(matches!(
            render("spiffe://{trust_domain}"),
            Err(TemplateError::InvalidId { .. })
        ));
        assert!(matches!(
            render("spiffe://other.org/{entry}"),
            Err(TemplateError::ForeignTrustDomain { .. })
        ));
    }
}
