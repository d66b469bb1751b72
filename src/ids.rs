//! Identifiers that are valid by construction.
//!
//! SPIFFE IDs and trust domains come from the `spiffe` crate, so every ID we
//! hold has already passed the SPIFFE-ID.md checks. [`InstanceId`] names one
//! attested process; it is derived, never chosen, so a client cannot pick it.

use std::fmt;

use sha2::{Digest, Sha256};

pub use spiffe::{SpiffeId, TrustDomain};

/// Names one attested process for its whole life, and never another.
///
/// It is derived from (boot id, pid, process start time): a recycled PID has a
/// different start time, and a reboot a different boot id, so neither can
/// inherit an identity. Hex digits only, so it is a safe SPIFFE path segment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(String);

/// Number of hex digits kept from the digest (80 bits: collisions are not a
/// concern for the processes of one node).
const INSTANCE_ID_HEX_LEN: usize = 20;

impl InstanceId {
    /// Derives the id of the process `pid` that started at `start_time`
    /// (clock ticks since boot) during the boot `boot_id`.
    pub fn derive(boot_id: &str, pid: u32, start_time: u64) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"sigil-instance-v1\0");
        hasher.update(boot_id.trim().as_bytes());
        hasher.update(b"\0");
        hasher.update(pid.to_be_bytes());
        hasher.update(start_time.to_be_bytes());
        let mut hex = hex::encode(hasher.finalize());
        hex.truncate(INSTANCE_ID_HEX_LEN);
        Self(hex)
    }

    /// The id as a SPIFFE path segment.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when `s` is one non-empty SPIFFE path segment: only `[A-Za-z0-9-._]`,
/// and not `.` or `..` (SPIFFE-ID.md, section 2.2).
pub fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_pid_gets_a_different_instance_id() {
        let first = InstanceId::derive("boot-a", 4242, 1000);
        let recycled = InstanceId::derive("boot-a", 4242, 9000);
        let after_reboot = InstanceId::derive("boot-b", 4242, 1000);
        assert_ne!(first, recycled);
        assert_ne!(first, after_reboot);
        assert_eq!(first, InstanceId::derive("boot-a\n", 4242, 1000));
    }

    #[test]
    fn an_instance_id_is_a_valid_path_segment() {
        let id = InstanceId::derive("boot", 1, 2);
        assert_eq!(id.as_str().len(), INSTANCE_ID_HEX_LEN);
        assert!(is_path_segment(id.as_str()));
    }

    #[test]
    fn path_segments_reject_dots_slashes_and_empty() {
        for bad in ["", ".", "..", "a/b", "a b", "é", "a%2f"] {
            assert!(!is_path_segment(bad), "{bad:?} accepted");
        }
        for good in ["a", "A-b_c.d", "...", "0"] {
            assert!(is_path_segment(good), "{good:?} refused");
        }
    }
}
