//! Workload API responses as PEM files, for programs that read files
//! (nginx, databases, TLS servers): `sigil fetch x509 --write` and
//! `sigil helper`. One layout, written by one function:
//!
//! - `svid.pem` (the default SVID's chain), `svid_key.pem` (its PKCS#8
//!   key, 0600), `bundle.pem`, `crl.pem` (when the daemon sent a CRL: it
//!   comes on the FetchX509Bundles stream, not with the SVIDs);
//! - every SVID numbered as SPIRE's `api fetch -write` does: `svid.N.pem`
//!   and `svid.N.key` (0600), N from 0 in the response's order.
//!
//! Each file is written atomically (a temp file renamed over it), so a
//! reader never sees half a certificate; PEM uses LF line endings.

use std::path::Path;

use anyhow::{Context, bail};

use crate::fsutil::{PRIVATE_FILE_MODE, write_file_atomic};
use crate::proto::workload::X509svidResponse;

/// Mode of the certificate, bundle and CRL files: public material.
const PUBLIC_FILE_MODE: u32 = 0o644;

/// PEM with LF line endings.
pub(super) fn pem_block(tag: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der.to_vec()), config)
}

/// Splits concatenated DER certificates and encodes each as PEM.
pub(super) fn pem_chain(tag: &str, mut der: &[u8]) -> anyhow::Result<String> {
    let mut out = String::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("malformed certificate in the response: {e}"))?;
        let len = der.len() - rest.len();
        out.push_str(&pem_block(tag, &der[..len]));
        der = rest;
    }
    Ok(out)
}

fn write(dir: &Path, name: &str, contents: &str, mode: u32) -> anyhow::Result<()> {
    let path = dir.join(name);
    write_file_atomic(&path, contents.as_bytes(), mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Checks, before anything is fetched, that `dir` can be the directory
/// the files go to: a directory, or a path that does not exist yet.
///
/// # Errors
/// When `dir` is a file or something else that is not a directory.
pub(super) fn check_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => bail!(
            "{} exists and is not a directory: give a directory for the PEM files (it is created \
             if missing)",
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// Writes `response` and the CRLs `crls` (the first is written) into `dir`
/// (created if missing); returns the names written.
///
/// # Errors
/// A response with no SVID, a malformed certificate, or an I/O error.
pub(super) fn write_x509(
    dir: &Path,
    response: &X509svidResponse,
    crls: &[bytes::Bytes],
) -> anyhow::Result<Vec<String>> {
    let Some(first) = response.svids.first() else {
        bail!("the response holds no SVID");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut put = |name: String, contents: &str, mode: u32| -> anyhow::Result<()> {
        write(dir, &name, contents, mode)?;
        written.push(name);
        Ok(())
    };
    for (i, svid) in response.svids.iter().enumerate() {
        put(
            format!("svid.{i}.pem"),
            &pem_chain("CERTIFICATE", &svid.x509_svid)?,
            PUBLIC_FILE_MODE,
        )?;
        put(
            format!("svid.{i}.key"),
            &pem_block("PRIVATE KEY", &svid.x509_svid_key),
            PRIVATE_FILE_MODE,
        )?;
    }
    put(
        "bundle.pem".into(),
        &pem_chain("CERTIFICATE", &first.bundle)?,
        PUBLIC_FILE_MODE,
    )?;
    if let Some(crl) = crls.first().or(response.crl.first()) {
        put(
            "crl.pem".into(),
            &pem_block("X509 CRL", crl),
            PUBLIC_FILE_MODE,
        )?;
    }
    // The default SVID's files last: a program that watches svid.pem sees
    // everything else in place when it changes.
    put(
        "svid_key.pem".into(),
        &pem_block("PRIVATE KEY", &first.x509_svid_key),
        PRIVATE_FILE_MODE,
    )?;
    put(
        "svid.pem".into(),
        &pem_chain("CERTIFICATE", &first.x509_svid)?,
        PUBLIC_FILE_MODE,
    )?;
    Ok(written)
}
