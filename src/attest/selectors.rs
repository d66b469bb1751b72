//! Selectors: the runtime properties an entry can require of a process.
//!
//! A selector is written `type:key:value`, as in SPIRE (`unix:uid:1000`).
//! Parsing checks the type and key against the kinds Sigil can attest, so a
//! typo in the config fails at start-up instead of silently matching nothing.

use std::fmt;
use std::str::FromStr;

/// The selector kinds Sigil attests, each read from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SelectorKind {
    /// Effective uid of the process.
    UnixUid,
    /// User name of the effective uid.
    UnixUser,
    /// Effective gid of the process.
    UnixGid,
    /// Group name of the effective gid.
    UnixGroup,
    /// One of the supplementary gids.
    UnixSupplementaryGid,
    /// Path of the executable.
    UnixPath,
    /// SHA-256 of the executable, lower-case hex.
    UnixSha256,
    /// Path of the parent's executable.
    UnixParentPath,
    /// A cgroup path the process is in.
    CgroupPath,
    /// Container id, parsed from the cgroup path.
    ContainerId,
    /// systemd unit, parsed from the cgroup path.
    SystemdUnit,
}

impl SelectorKind {
    /// Every kind, in the order they are documented.
    pub const ALL: [SelectorKind; 11] = [
        Self::UnixUid,
        Self::UnixUser,
        Self::UnixGid,
        Self::UnixGroup,
        Self::UnixSupplementaryGid,
        Self::UnixPath,
        Self::UnixSha256,
        Self::UnixParentPath,
        Self::CgroupPath,
        Self::ContainerId,
        Self::SystemdUnit,
    ];

    /// The `type:key` prefix of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnixUid => "unix:uid",
            Self::UnixUser => "unix:user",
            Self::UnixGid => "unix:gid",
            Self::UnixGroup => "unix:group",
            Self::UnixSupplementaryGid => "unix:supplementary_gid",
            Self::UnixPath => "unix:path",
            Self::UnixSha256 => "unix:sha256",
            Self::UnixParentPath => "unix:ppath",
            Self::CgroupPath => "cgroup:path",
            Self::ContainerId => "container:id",
            Self::SystemdUnit => "systemd:unit",
        }
    }
}

/// One attested property, or one requirement of an entry.
///
/// Values are canonical (numbers in decimal, digests in lower-case hex), so
/// equality is the matching rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: SelectorKind,
    value: String,
}

/// Why a selector string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not of the form `type:key:value`.
    #[error("selector {0:?} is not of the form type:key:value")]
    Malformed(String),
    /// The `type:key` is not one Sigil attests.
    #[error("unknown selector {0:?}; known selectors are {known}", known = known_kinds())]
    UnknownKind(String),
    /// The value does not fit the kind.
    #[error("selector {selector:?}: {reason}")]
    BadValue {
        /// The selector as written.
        selector: String,
        /// What is wrong with its value.
        reason: &'static str,
    },
}

fn known_kinds() -> String {
    SelectorKind::ALL.map(SelectorKind::as_str).join(", ")
}

impl Selector {
    /// Builds a selector from attested facts. Numeric kinds are canonical
    /// already, so this never fails for values read from the kernel.
    pub fn new(kind: SelectorKind, value: impl Into<String>) -> Self {
        Self {
            kind,
            value: value.into(),
        }
    }

    /// The kind of property.
    pub fn kind(&self) -> SelectorKind {
        self.kind
    }

    /// The canonical value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':');
        let (Some(ty), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ParseError::Malformed(s.to_owned()));
        };
        if value.is_empty() {
            return Err(ParseError::Malformed(s.to_owned()));
        }
        let prefix = format!("{ty}:{key}");
        let kind = SelectorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == prefix)
            .ok_or(ParseError::UnknownKind(prefix))?;
        let bad = |reason| ParseError::BadValue {
            selector: s.to_owned(),
            reason,
        };
        let value = match kind {
            SelectorKind::UnixUid | SelectorKind::UnixGid | SelectorKind::UnixSupplementaryGid => {
                value
                    .parse::<u32>()
                    .map_err(|_| bad("expected a decimal id"))?
                    .to_string()
            }
            SelectorKind::UnixSha256 => {
                let lower = value.to_ascii_lowercase();
                if lower.len() != 64 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("expected 64 hex digits"));
                }
                lower
            }
            SelectorKind::UnixPath | SelectorKind::UnixParentPath | SelectorKind::CgroupPath => {
                if !value.starts_with('/') {
                    return Err(bad("expected an absolute path"));
                }
                value.to_owned()
            }
            _ => value.to_owned(),
        };
        Ok(Self { kind, value })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_round_trip_through_their_text_form() {
        for text in [
            "unix:uid:1000",
            "unix:user:alice",
            "unix:path:/usr/bin/python3",
            "cgroup:path:/user.slice/a:b",
            "systemd:unit:agent.service",
        ] {
            let selector: Selector = text.parse().unwrap();
            assert_eq!(selector.to_string(), text);
        }
    }

    #[test]
    fn values_are_made_canonical() {
        let uid: Selector = "unix:uid:01000".parse().unwrap();
        assert_eq!(uid, Selector::new(SelectorKind::UnixUid, "1000"));
        let digest: Selector = format!("unix:sha256:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(digest.value(), "ab".repeat(32));
    }

    #[test]
    fn a_typo_in_the_kind_names_the_known_kinds() {
        let err = "unix:pth:/bin/sh".parse::<Selector>().unwrap_err();
        assert!(err.to_string().contains("unix:path"), "{err}");
    }

    #[test]
    fn malformed_selectors_are_refused() {
        for bad in [
            "",
            "unix",
            "unix:uid",
            "unix:uid:",
            "unix:uid:alice",
            "unix:sha256:abc",
            "unix:path:bin/sh",
        ] {
            assert!(bad.parse::<Selector>().is_err(), "{bad:?} accepted");
        }
    }
}
