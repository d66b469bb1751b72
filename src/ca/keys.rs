//! Private keys, kept out of logs. Writing one to disk (0600, atomically) is
//! `fsutil::write_private_file`.

use std::fmt;

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
}
