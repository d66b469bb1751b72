//! `sigil gate`: run the mTLS reverse proxy (`crate::gate`) in front of a
//! service, with its own SVID, bundle and CRL from a Workload API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::EndpointArg;
use crate::gate::Rules;
use crate::verify::IdPattern;
use crate::verify::source::WorkloadSource;

/// How long the gate waits for its first SVID.
const FIRST_SVID_WAIT: Duration = Duration::from_secs(30);

/// `sigil gate`.
#[derive(Debug, clap::Args)]
pub struct GateArgs {
    /// Address to listen on (TLS), e.g. 0.0.0.0:8443.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// The service to forward to, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    upstream: String,
    /// SPIFFE ID patterns allowed for every request (exact, `spiffe://td`,
    /// `*` one segment, a final `**` any).
    #[arg(
        long,
        value_name = "PATTERN",
        conflicts_with = "rules",
        required_unless_present = "rules"
    )]
    allow: Vec<String>,
    /// A rules file: ordered `[[rule]]` tables (path, methods, mcp_method,
    /// mcp_tool, allow); the first rule that matches a request decides.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Serve `/metrics` (the gate's decisions), `/livez` and `/readyz`
    /// (ready while the gate's own SVID is valid) over plain HTTP here,
    /// e.g. 127.0.0.1:9102.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// The Workload API the gate gets its own SVID, bundle and CRL from.
    #[command(flatten)]
    endpoint: EndpointArg,
}

/// The gate's readiness and metrics, for the `--metrics` listener.
struct GateHealth(WorkloadSource);

impl crate::metrics::http::Health for GateHealth {
    fn check(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = crate::metrics::http::Readiness> + Send + '_>,
    > {
        let material = self.0.current();
        if !self.0.streams_up() {
            return Box::pin(std::future::ready(Err(vec![
                "a Workload API stream of the gate is down: new SVIDs and CRLs are not arriving, so revocations would go unenforced (is the daemon running?)".to_owned(),
            ])));
        }
        let answer = match material.certified.end_entity_cert().map(|c| {
            x509_parser::parse_x509_certificate(c.as_ref())
                .map(|(_, cert)| cert.validity().time_to_expiration().is_some())
        }) {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(vec![format!(
                "the gate's own SVID ({}) has expired: is the Workload API reachable?",
                material.spiffe_id
            )]),
            _ => Err(vec!["the gate's own SVID cannot be read".to_owned()]),
        };
        Box::pin(std::future::ready(answer))
    }

    fn encode_metrics(&self) -> Result<String, std::fmt::Error> {
        crate::metrics::gate::global().encode()
    }
}

/// Runs the gate until SIGINT or SIGTERM.
///
/// # Errors
/// Bad arguments, no SVID from the Workload API, or a port in use.
pub async fn run(args: GateArgs) -> anyhow::Result<ExitCode> {
    let rules = match &args.rules {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Rules::parse(&text, &path.display().to_string())?
        }
        None => Rules::allow_all(
            args.allow
                .iter()
                .map(|p| p.parse::<IdPattern>())
                .collect::<Result<_, _>>()?,
        ),
    };
    let upstream: http::Uri = args
        .upstream
        .parse()
        .with_context(|| format!("--upstream {:?} is not a URL", args.upstream))?;
    if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
        bail!(
            "--upstream {:?}: give http://host:port (the gate speaks plain HTTP to the service behind it)",
            args.upstream
        );
    }
    let socket = args.endpoint.resolve()?;
    let shutdown = CancellationToken::new();
    let source = WorkloadSource::start(socket, FIRST_SVID_WAIT, shutdown.clone())
        .await
        .context(
            "the gate needs its own SVID and the trust bundle with its CRL (give it an entry only it matches, e.g. unix:uid of its service user with unix:path of the sigil binary)",
        )?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(listen = %bound, upstream = %upstream, id = %source.current().spiffe_id, "the gate is serving");
    // The bound address on stdout alone (useful with port 0).
    println!("listening on {bound}");
    if let Some(addr) = args.metrics {
        let metrics = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr} (--metrics)"))?;
        let at = metrics.local_addr().unwrap_or(addr);
        tracing::info!(listen = %at, "serving /metrics, /livez and /readyz");
        println!("metrics on {at}");
        tokio::spawn(crate::metrics::http::serve(
            metrics,
            std::sync::Arc::new(GateHealth(source.clone())),
            shutdown.clone(),
        ));
    }
    let stop = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping (signal)");
            stop.cancel();
        }
    });
    crate::gate::serve(listener, source, rules, upstream, shutdown).await?;
    tracing::info!("the gate stopped");
    Ok(ExitCode::SUCCESS)
}
