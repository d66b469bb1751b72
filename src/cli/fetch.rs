//! `sigil fetch x509|bundle` and `sigil healthcheck`: Workload API clients.
//!
//! `fetch x509` prints what an agent running as this process would get, and
//! can write it as PEM files (`files`: svid.pem, svid_key.pem 0600,
//! bundle.pem, crl.pem, every SVID numbered) once; `sigil helper` keeps
//! such files current.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use serde::Serialize;
use tokio_stream::StreamExt;

use super::EndpointArg;
use super::client;
use super::files::{self, pem_chain};
use crate::proto::workload::{X509BundlesRequest, X509svidRequest};

/// What to fetch.
#[derive(Debug, clap::Subcommand)]
pub enum FetchCommand {
    /// This process's X509-SVIDs (first message of the FetchX509SVID stream).
    X509(FetchArgs),
    /// The X.509 trust bundles.
    Bundle(FetchArgs),
}

/// Arguments shared by the fetch commands.
#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    #[command(flatten)]
    endpoint: EndpointArg,
    /// Write PEM files into this directory.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct SvidSummary {
    spiffe_id: String,
    hint: String,
    serial: String,
    not_before: String,
    not_after: String,
}

/// Runs a fetch command.
///
/// # Errors
/// When the daemon cannot be reached or refuses, with its reason.
pub async fn run(cmd: FetchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        FetchCommand::X509(args) => fetch_x509(args).await,
        FetchCommand::Bundle(args) => fetch_bundle(args).await,
    }
}

async fn fetch_x509(args: FetchArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = &args.write {
        files::check_dir(dir)?;
    }
    let socket = args.endpoint.resolve()?;
    let mut api = client::connect(&socket).await?;
    let mut stream = api
        .fetch_x509svid(client::request(X509svidRequest {}))
        .await
        .map_err(refusal)?
        .into_inner();
    let response = stream
        .next()
        .await
        .context("the daemon closed the stream without sending SVIDs")?
        .map_err(refusal)?;
    let summaries = response
        .svids
        .iter()
        .map(|s| summarize(&s.spiffe_id, &s.hint, &s.x509_svid))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    } else {
        for s in &summaries {
            println!("SPIFFE ID:  {}", s.spiffe_id);
            println!("Hint:       {}", s.hint);
            println!("Serial:     {}", s.serial);
            println!("Valid:      {} to {}\n", s.not_before, s.not_after);
        }
    }
    if let Some(dir) = &args.write {
        let crls = client::first_bundles(&mut api).await.map_err(refusal)?.crl;
        let written = files::write_x509(dir, &response, &crls)?;
        eprintln!("wrote {} to {}", written.join(", "), dir.display());
        eprintln!(
            "note: these SVIDs belong to this `sigil fetch` process and are revoked within a second of its exit; for files that stay valid and are renewed, run `sigil helper --dir {}`",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn fetch_bundle(args: FetchArgs) -> anyhow::Result<ExitCode> {
    let socket = args.endpoint.resolve()?;
    let mut api = client::connect(&socket).await?;
    let response = client::first_bundles(&mut api).await.map_err(refusal)?;
    let mut bundles: Vec<_> = response.bundles.iter().collect();
    bundles.sort();
    if args.json {
        let map = bundles
            .iter()
            .map(|(td, der)| Ok((td.as_str(), pem_chain("CERTIFICATE", der)?)))
            .collect::<anyhow::Result<std::collections::BTreeMap<_, _>>>()?;
        println!("{}", serde_json::to_string_pretty(&map)?);
    } else {
        for (td, der) in &bundles {
            println!("# {td}");
            print!("{}", pem_chain("CERTIFICATE", der)?);
        }
    }
    if let Some(dir) = &args.write {
        let all: Vec<u8> = bundles.iter().flat_map(|(_, der)| der.to_vec()).collect();
        let pem = pem_chain("CERTIFICATE", &all)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("bundle.pem");
        crate::fsutil::write_file_atomic(&path, pem.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
        if let Some(crl) = response.crl.first() {
            let path = dir.join("crl.pem");
            crate::fsutil::write_file_atomic(
                &path,
                files::pem_block("X509 CRL", crl).as_bytes(),
                0o644,
            )
            .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit 0 when a daemon answers the Workload API on the socket, 1
/// otherwise. It asks without the security header on purpose: the daemon
/// must then answer InvalidArgument before attesting anything, so a probe
/// run every few seconds creates no instance, no SVID and no CRL entry.
///
/// # Errors
/// When the endpoint is malformed.
pub async fn healthcheck(args: &HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let socket = args.endpoint.resolve()?;
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_secs(args.wait.unwrap_or(0));
    loop {
        let verdict = probe(&socket).await;
        if verdict.is_ok() || tokio::time::Instant::now() >= deadline {
            return Ok(match verdict {
                Ok(healthy) => {
                    println!("{healthy}");
                    ExitCode::SUCCESS
                }
                Err(unhealthy) => {
                    println!("unhealthy: {unhealthy}");
                    ExitCode::FAILURE
                }
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Arguments of `sigil healthcheck`.
#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    endpoint: EndpointArg,
    /// Keep trying for up to this many seconds (a daemon that is starting).
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

/// One probe: a request without the security header, which a Sigil
/// daemon answers with its own refusal and nothing else.
async fn probe(socket: &std::path::Path) -> Result<String, String> {
    let mut api = client::connect(socket)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let probe = tonic::Request::new(X509BundlesRequest {});
    match api.fetch_x509_bundles(probe).await {
        Err(s)
            if s.code() == tonic::Code::InvalidArgument
                && s.message() == crate::workload_api::header::HEADER_MISSING =>
        {
            Ok(format!("serving the Workload API on {}", socket.display()))
        }
        Err(s) => Err(format!("{}: {}", s.code(), s.message())),
        Ok(_) => Err(format!(
            "the server on {} does not check the Workload API security header",
            socket.display()
        )),
    }
}

/// The daemon's refusal, in its own words (they name the rule and the fix).
fn refusal(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "the daemon refused ({:?}): {}",
        status.code(),
        status.message()
    )
}

fn summarize(spiffe_id: &str, hint: &str, chain: &[u8]) -> anyhow::Result<SvidSummary> {
    let (_, leaf) = x509_parser::parse_x509_certificate(chain)
        .map_err(|e| anyhow::anyhow!("the SVID of {spiffe_id} is not a certificate: {e}"))?;
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        )
        .to_string()
    };
    Ok(SvidSummary {
        spiffe_id: spiffe_id.to_owned(),
        hint: hint.to_owned(),
        serial: hex::encode(leaf.raw_serial()),
        not_before: time(leaf.validity().not_before),
        not_after: time(leaf.validity().not_after),
    })
}
