//! Identifiers that are valid by construction.
//!
//! SPIFFE IDs and trust domains come from the `spiffe` crate, so every ID we
//! hold has already passed the SPIFFE-ID.md checks. [`InstanceId`] names one
//! attested process; it is derived, never chosen, so a client cannot pick it.
//! [`Echo`] is client input cut to a size fit to quote in an error or a log
//! line: every message that repeats what a client sent goes through it.

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

/// The identity of the program a process runs: the file behind
/// /proc/<pid>/exe and the path it was run by (a hard link is another
/// path, and path selectors tell them apart). An exec of another program
/// changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExeId {
    /// Device of the executable file.
    pub dev: u64,
    /// Inode of the executable file.
    pub ino: u64,
    /// The first 8 bytes of the SHA-256 of the path, as the kernel names it.
    pub path_hash: u64,
}

impl ExeId {
    /// The id of the file `dev`/`ino` run as `path`.
    pub fn new(dev: u64, ino: u64, path: &[u8]) -> Self {
        let digest = Sha256::digest(path);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Self {
            dev,
            ino,
            path_hash: u64::from_be_bytes(first),
        }
    }
}

impl InstanceId {
    /// Derives the id of one run of one program: the process `pid` that
    /// started at `start_time` (clock ticks since boot) during the boot
    /// `boot_id`, running the executable `exe`. A recycled pid is another
    /// instance, and so is the same process after it exec's another program.
    pub fn derive(boot_id: &str, pid: u32, start_time: u64, exe: ExeId) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"sigil-instance-v2\0");
        hasher.update(boot_id.trim().as_bytes());
        hasher.update(b"\0");
        hasher.update(pid.to_be_bytes());
        hasher.update(start_time.to_be_bytes());
        hasher.update(exe.dev.to_be_bytes());
        hasher.update(exe.ino.to_be_bytes());
        hasher.update(exe.path_hash.to_be_bytes());
        let mut hex = hex::encode(hasher.finalize());
        hex.truncate(INSTANCE_ID_HEX_LEN);
        Self(hex)
    }

    /// Reads an id as an operator or the store gives it: exactly the
    /// lower-case hex that [`InstanceId::derive`] produces, or `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let well_formed = text.len() == INSTANCE_ID_HEX_LEN
            && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        well_formed.then(|| Self(text.to_owned()))
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

/// Most bytes of client input quoted back (after escaping) in a message.
pub const ECHO_MAX: usize = 64;

/// Client input as it may be quoted back in a refusal or a log line: quoted
/// and escaped like `{:?}`, cut to [`ECHO_MAX`] bytes of escaped text, and
/// then followed by `… (N bytes)` so the reader still learns the size.
///
/// A client may send a megabyte as a task id: echoing it whole would turn
/// each refusal into a megabyte log line. An error that names client input
/// holds an `Echo`, never the raw `String`, so it cannot do that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Echo(String);

impl Echo {
    /// Quotes `input`, cut to [`ECHO_MAX`] bytes of escaped text.
    pub fn new(input: &str) -> Self {
        let mut kept = String::new();
        let mut cut = false;
        for c in input.chars() {
            let escaped: String = c.escape_debug().collect();
            if kept.len() + escaped.len() > ECHO_MAX {
                cut = true;
                break;
            }
            kept.push_str(&escaped);
        }
        if cut {
            Self(format!("\"{kept}\"… ({} bytes)", input.len()))
        } else {
            Self(format!("\"{kept}\""))
        }
    }

    /// The quoted text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Echo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXE: ExeId = ExeId {
        dev: 8,
        ino: 77,
        path_hash: 5,
    };

    #[test]
    fn a_recycled_pid_gets_a_different_instance_id() {
        let first = InstanceId::derive("boot-a", 4242, 1000, EXE);
        let recycled = InstanceId::derive("boot-a", 4242, 9000, EXE);
        let after_reboot = InstanceId::derive("boot-b", 4242, 1000, EXE);
        assert_ne!(first, recycled);
        assert_ne!(first, after_reboot);
        assert_eq!(first, InstanceId::derive("boot-a\n", 4242, 1000, EXE));
    }

    #[test]
    fn the_same_process_after_an_exec_of_another_program_is_another_instance() {
        let before = InstanceId::derive("boot-a", 4242, 1000, EXE);
        let other = ExeId { ino: 78, ..EXE };
        assert_ne!(before, InstanceId::derive("boot-a", 4242, 1000, other));
        let hard_link = ExeId::new(8, 77, b"/opt/other-name");
        assert_ne!(before, InstanceId::derive("boot-a", 4242, 1000, hard_link));
    }

    #[test]
    fn an_instance_id_is_a_valid_path_segment() {
        let id = InstanceId::derive("boot", 1, 2, EXE);
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

    #[test]
    fn short_input_is_echoed_whole_and_quoted() {
        assert_eq!(Echo::new("job-1").as_str(), "\"job-1\"");
        assert_eq!(Echo::new("").as_str(), "\"\"");
        let exact = "a".repeat(ECHO_MAX);
        assert_eq!(Echo::new(&exact).as_str(), format!("\"{exact}\""));
    }

    #[test]
    fn long_input_is_cut_and_its_size_is_told() {
        let echo = Echo::new(&"a".repeat(1_000_000));
        assert_eq!(
            echo.as_str(),
            format!("\"{}\"… (1000000 bytes)", "a".repeat(ECHO_MAX))
        );
    }

    #[test]
    fn escaping_counts_toward_the_cut_and_never_splits_a_character() {
        // Escapes take several bytes (`\0`, `\u{202e}`), and `é` two: the
        // quoted part stays within the cap whatever the input.
        for input in ["\0".repeat(500), "é".repeat(500), "\u{202e}".repeat(500)] {
            let echo = Echo::new(&input);
            let quoted = echo.as_str().split('…').next().unwrap_or_default();
            assert!(quoted.len() <= ECHO_MAX + 2, "{echo}");
            assert!(echo.as_str().ends_with(&format!("({} bytes)", input.len())));
        }
    }

    #[test]
    fn an_instance_id_parses_back_and_nothing_else_does() {
        let exe = ExeId {
            dev: 1,
            ino: 2,
            path_hash: 3,
        };
        let id = InstanceId::derive("boot", 1, 2, exe);
        assert_eq!(InstanceId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(InstanceId::parse(&id.as_str().to_uppercase()), None);
        assert_eq!(InstanceId::parse(&id.as_str()[1..]), None);
        assert_eq!(InstanceId::parse("../etc"), None);
    }
}
