//! `sigil verify x509 CERT.pem`: would a service accept this certificate as
//! an agent's SVID? A thin command over [`crate::verify`]: the bundle and
//! CRL come from files, or from the Workload API (FetchX509Bundles) when
//! not given; the exit code says valid (0) or not (1).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, bail};
use rustls_pki_types::CertificateDer;
use serde::Serialize;

use super::{EndpointArg, client};
use crate::ids::TrustDomain;
use crate::verify::{IdPattern, TrustSource, verify_svid};

/// Largest PEM or DER file read (a chain of 16 certificates, or a CRL of
/// many thousands of entries, is far less).
const MAX_FILE_BYTES: u64 = 16 << 20; // 16 MiB

/// What to verify.
#[derive(Debug, clap::Subcommand)]
pub enum VerifyCommand {
    /// An X.509-SVID (PEM, leaf first, intermediates after).
    X509(X509Args),
}

/// `sigil verify x509`.
#[derive(Debug, clap::Args)]
pub struct X509Args {
    /// The certificate (PEM; the leaf first).
    #[arg(value_name = "CERT.pem")]
    cert: PathBuf,
    /// CA certificates to trust (PEM); from the Workload API when absent.
    #[arg(long, value_name = "BUNDLE.pem")]
    bundle: Option<PathBuf>,
    /// CRL (PEM or DER); from the Workload API when absent (and no
    /// --bundle is given).
    #[arg(long, value_name = "CRL")]
    crl: Option<PathBuf>,
    /// The trust domain (when --bundle's CA names none).
    #[arg(long, value_name = "TD")]
    trust_domain: Option<String>,
    /// SPIFFE ID patterns to allow (exact, `spiffe://td`, `*` one segment,
    /// a final `**` any); any ID of the trust domain when absent.
    #[arg(long, value_name = "PATTERN")]
    allow: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    endpoint: EndpointArg,
}

#[derive(Serialize)]
struct Report {
    valid: bool,
    spiffe_id: Option<String>,
    serial: Option<String>,
    not_after: Option<String>,
    chain_len: usize,
    trust_domain: String,
    crl_checked: bool,
    problem: Option<String>,
}

/// Runs `sigil verify`.
///
/// # Errors
/// When the inputs cannot be read (a verdict of "invalid" is exit code 1,
/// not an error).
pub async fn run(cmd: VerifyCommand) -> anyhow::Result<ExitCode> {
    let VerifyCommand::X509(args) = cmd;
    let allow = args
        .allow
        .iter()
        .map(|p| p.parse::<IdPattern>())
        .collect::<Result<Vec<_>, _>>()?;
    let chain = pem_certs(&read(&args.cert)?, &args.cert)?;
    let (trust_domain, bundle, crls) = match &args.bundle {
        Some(path) => {
            let bundle = pem_certs(&read(path)?, path)?;
            let td = match &args.trust_domain {
                Some(td) => TrustDomain::new(td)
                    .map_err(|e| anyhow::anyhow!("--trust-domain {td:?}: {e}"))?,
                None => trust_domain_of(&bundle).with_context(|| {
                    format!(
                        "{} names no trust domain: give --trust-domain",
                        path.display()
                    )
                })?,
            };
            let crls = match &args.crl {
                Some(path) => vec![crl_der(&read(path)?, path)?],
                None => Vec::new(),
            };
            (td, bundle, crls)
        }
        None => from_workload_api(&args).await?,
    };
    let trust = TrustSource {
        trust_domain: &trust_domain,
        bundle: &bundle,
        revocation: crate::verify::Revocation::Crls(&crls),
    };
    let verdict = verify_svid(&chain, &trust, &allow, SystemTime::now());
    let report = Report {
        valid: verdict.is_ok(),
        spiffe_id: verdict.as_ref().ok().map(|v| v.spiffe_id.to_string()),
        serial: verdict.as_ref().ok().map(|v| v.serial.clone()),
        not_after: verdict
            .as_ref()
            .ok()
            .map(|v| humantime::format_rfc3339_seconds(v.not_after).to_string()),
        chain_len: chain.len(),
        trust_domain: trust_domain.to_string(),
        crl_checked: !crls.is_empty(),
        problem: verdict.as_ref().err().map(ToString::to_string),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match &verdict {
            Ok(v) => {
                println!("valid");
                println!("SPIFFE ID:  {}", v.spiffe_id);
                println!("serial:     {}", v.serial);
                println!("expires:    {}", report.not_after.as_deref().unwrap_or("-"));
                println!(
                    "chain:      {} certificate(s) to trust domain {trust_domain}",
                    v.chain_len
                );
                println!(
                    "revocation: {}",
                    if crls.is_empty() {
                        "not checked (no CRL)"
                    } else {
                        "not revoked"
                    }
                );
            }
            Err(e) => println!("invalid: {e}"),
        }
    }
    Ok(if verdict.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The bundle and CRL of the Workload API's first FetchX509Bundles message.
async fn from_workload_api(
    args: &X509Args,
) -> anyhow::Result<(TrustDomain, Vec<CertificateDer<'static>>, Vec<Vec<u8>>)> {
    if args.crl.is_some() {
        bail!("--crl needs --bundle (without both, the Workload API gives them)");
    }
    let socket = args.endpoint.resolve()?;
    let mut api = client::connect(&socket).await?;
    let response = client::first_bundles(&mut api).await.map_err(|s| anyhow::anyhow!("the Workload API refused the bundle: {}: {} (a service with no entry needs allow_unauthenticated_verifiers = true, or pass --bundle and --crl)", s.code(), s.message()))?;
    let (td, der) = response
        .bundles
        .iter()
        .next()
        .context("the Workload API sent no bundle")?;
    let td = TrustDomain::new(td.trim_start_matches("spiffe://"))
        .map_err(|e| anyhow::anyhow!("the Workload API's trust domain {td:?}: {e}"))?;
    let bundle = der_certs(der)?;
    Ok((
        td,
        bundle,
        response.crl.iter().map(|c| c.to_vec()).collect(),
    ))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        bail!("{} is larger than {MAX_FILE_BYTES} bytes", path.display());
    }
    Ok(bytes)
}

fn pem_certs(bytes: &[u8], path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let blocks =
        pem::parse_many(bytes).with_context(|| format!("{} is not PEM", path.display()))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        bail!("{} holds no CERTIFICATE block", path.display());
    }
    Ok(certs)
}

fn crl_der(bytes: &[u8], path: &Path) -> anyhow::Result<Vec<u8>> {
    if bytes.first() == Some(&0x30) {
        return Ok(bytes.to_vec());
    }
    let block =
        pem::parse(bytes).with_context(|| format!("{} is neither DER nor PEM", path.display()))?;
    if block.tag() != "X509 CRL" {
        bail!(
            "{} holds a {} block, not an X509 CRL",
            path.display(),
            block.tag()
        );
    }
    Ok(block.into_contents())
}

/// Concatenated DER certificates, split.
fn der_certs(mut der: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) =
            X509Certificate::from_der(der).context("the bundle is not DER certificates")?;
        out.push(CertificateDer::from(der[..der.len() - rest.len()].to_vec()));
        der = rest;
    }
    Ok(out)
}

/// The trust domain a CA certificate names in its URI SAN (Sigil's do).
fn trust_domain_of(bundle: &[CertificateDer<'_>]) -> anyhow::Result<TrustDomain> {
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
    for ca in bundle {
        let Ok((_, cert)) = X509Certificate::from_der(ca.as_ref()) else {
            continue;
        };
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name
                        && let Some(td) = uri.strip_prefix("spiffe://")
                        && let Ok(td) = TrustDomain::new(td.trim_end_matches('/'))
                    {
                        return Ok(td);
                    }
                }
            }
        }
    }
    bail!("no spiffe:// URI SAN in the bundle")
}
