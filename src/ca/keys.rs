//! Private keys: kept out of logs, and written to disk only as 0600 files.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// A PKCS#8 DER private key. Its `Debug` prints `<redacted>`, so a key that
/// ends up in a log line or an error message shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(Vec<u8>);

impl PrivateKey {
    /// Wraps PKCS#8 DER bytes.
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        Self(der)
    }

    /// The PKCS#8 DER bytes, for the Workload API response or a key file.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Writes `contents` to `path` readable by the owner only (0600), atomically:
/// a crash leaves either the old file or the new one, never half of either.
///
/// # Errors
/// The I/O error of the first step that failed.
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // mode() is filtered by the umask only towards fewer rights, but a
        // pre-existing file keeps its mode: set it explicitly.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_key_never_prints_its_bytes() {
        let key = PrivateKey::from_pkcs8_der(vec![0x30, 0x42, 0x13, 0x37]);
        let shown = format!("{key:?} {:?}", Some(&key));
        assert!(!shown.contains("48") && !shown.contains("0x30") && !shown.contains("19"));
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn private_files_are_written_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
