//! `sigil helper`: spiffe-helper's job for services that read files
//! (nginx, databases, TLS servers). It stays running on a FetchX509SVID
//! stream (its SVIDs) and a FetchX509Bundles stream (the CRL), rewrites the
//! files (`files`) on every rotation, task and CRL change, then runs a
//! command or signals a process so the service reloads. Its SVIDs stay
//! valid while it runs: it is the attested process. The streams are
//! reopened with a backoff when the daemon goes away or refuses.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use super::{EndpointArg, client, files};
use crate::proto::workload::{X509BundlesRequest, X509svidRequest, X509svidResponse};

/// First pause before reconnecting; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest pause before reconnecting.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a change of the CRL alone waits before the files are rewritten
/// (later CRL changes join it): at most one reload a second for them.
const CRL_SETTLE: Duration = Duration::from_secs(1);

/// `sigil helper`.
#[derive(Debug, clap::Args)]
pub struct HelperArgs {
    #[command(flatten)]
    endpoint: EndpointArg,
    /// Where the files go (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Run this with `sh -c` after each write (its exit status is logged).
    #[arg(long, value_name = "COMMAND")]
    exec: Option<String>,
    /// Send this signal (HUP, USR1, USR2, INT, TERM, QUIT) after each
    /// write, to --pid or to the pid in --pidfile.
    #[arg(long, value_name = "SIGNAL", requires = "target")]
    signal: Option<String>,
    /// The process to signal.
    #[arg(long, group = "target")]
    pid: Option<i32>,
    /// A file holding the pid to signal (read at each signal).
    #[arg(long, group = "target", value_name = "FILE")]
    pidfile: Option<PathBuf>,
}

/// Runs until SIGINT or SIGTERM.
///
/// # Errors
/// Bad arguments (an unknown signal, a relative socket path).
pub async fn run(args: HelperArgs) -> anyhow::Result<ExitCode> {
    let signal = args.signal.as_deref().map(parse_signal).transpose()?;
    files::check_dir(&args.dir)?;
    let socket = args.endpoint.resolve()?;
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut last: Option<[u8; 32]> = None;
    let mut retry = RETRY_FIRST;
    loop {
        let session = follow(&socket, &args, signal, &mut last, &mut retry);
        tokio::select! {
            () = &mut stop => return Ok(ExitCode::SUCCESS),
            outcome = session => {
                if is_permanent(&outcome) {
                    return Err(outcome);
                }
                tracing::warn!(error = %outcome, retry_in = ?retry, "the Workload API stream ended; reconnecting");
            }
        }
        tokio::select! {
            () = &mut stop => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Whether retrying cannot help: the path is not a socket at all (a
/// mistake in the command line, not a daemon that is starting).
fn is_permanent(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::connect::ConnectError>()
        .is_some_and(|c| matches!(c.problem, crate::connect::Problem::NotASocket(_)))
}

/// One session of both streams: writes and notifies on each change until
/// either ends; returns why it ended.
async fn follow(
    socket: &Path,
    args: &HelperArgs,
    signal: Option<rustix::process::Signal>,
    last: &mut Option<[u8; 32]>,
    retry: &mut Duration,
) -> anyhow::Error {
    let mut api = match client::connect(socket).await {
        Ok(api) => api,
        Err(e) => return e,
    };
    let refused = |s: tonic::Status| anyhow::anyhow!("refused: {}: {}", s.code(), s.message());
    let mut svids = match api
        .fetch_x509svid(client::request(X509svidRequest {}))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return refused(s),
    };
    let mut bundles = match api
        .fetch_x509_bundles(client::request(X509BundlesRequest {}))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return refused(s),
    };
    let ended = |s: Option<tonic::Status>| match s {
        Some(s) => anyhow::anyhow!("{}: {}", s.code(), s.message()),
        None => anyhow::anyhow!("the daemon closed the stream"),
    };
    // Nothing is written until both streams have spoken: the first files
    // hold the CRL too. A change of the SVIDs is written at once; a change
    // of the CRL alone (any agent's task ending on the node) waits
    // CRL_SETTLE, so a busy node does not reload the service many times a
    // second.
    let mut response: Option<X509svidResponse> = None;
    let mut crls: Option<Vec<bytes::Bytes>> = None;
    let mut crl_due: Option<tokio::time::Instant> = None;
    loop {
        let settle = async {
            match crl_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = svids.next() => match next {
                Some(Ok(r)) => {
                    response = Some(r);
                    crl_due = None;
                }
                other => return ended(other.and_then(Result::err)),
            },
            next = bundles.next() => match next {
                Some(Ok(b)) => {
                    let first = crls.is_none();
                    crls = Some(b.crl);
                    if !first {
                        crl_due.get_or_insert(tokio::time::Instant::now() + CRL_SETTLE);
                        continue;
                    }
                }
                other => return ended(other.and_then(Result::err)),
            },
            () = settle => crl_due = None,
        }
        let (Some(response), Some(crls)) = (&response, &crls) else {
            continue;
        };
        *retry = RETRY_FIRST;
        let digest = fingerprint(response, crls);
        if last.as_ref() == Some(&digest) {
            continue;
        }
        match files::write_x509(&args.dir, response, crls) {
            Ok(written) => {
                *last = Some(digest);
                tracing::info!(dir = %args.dir.display(), files = written.len(), svids = response.svids.len(), "wrote the SVID files");
                notify(args, signal).await;
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot write the SVID files; the old ones stay")
            }
        }
    }
}

/// What the files are made of: rewriting is skipped when a message only
/// repeats it.
fn fingerprint(response: &X509svidResponse, crls: &[bytes::Bytes]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for svid in &response.svids {
        hash.update(&svid.x509_svid);
        hash.update(&svid.bundle);
    }
    for crl in crls.iter().chain(&response.crl) {
        hash.update(crl);
    }
    hash.finalize().into()
}

/// Runs the command and sends the signal, after a write.
async fn notify(args: &HelperArgs, signal: Option<rustix::process::Signal>) {
    if let Some(command) = args.exec.clone() {
        let status = tokio::task::spawn_blocking(move || {
            std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&command)
                .status()
        })
        .await;
        match status {
            Ok(Ok(status)) if status.success() => tracing::info!("the command ran"),
            Ok(Ok(status)) => tracing::warn!(%status, "the command failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot run the command"),
            Err(_) => {}
        }
    }
    if let Some(signal) = signal {
        match target_pid(args) {
            Ok(pid) => match rustix::process::kill_process(pid, signal) {
                Ok(()) => tracing::info!(pid = pid.as_raw_nonzero().get(), ?signal, "signalled"),
                Err(e) => tracing::warn!(error = %e, "cannot signal the process"),
            },
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "no process to signal"),
        }
    }
}

fn target_pid(args: &HelperArgs) -> anyhow::Result<rustix::process::Pid> {
    let raw = match (&args.pid, &args.pidfile) {
        (Some(pid), _) => *pid,
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} holds no pid", file.display()))?,
        (None, None) => bail!("give --pid or --pidfile"),
    };
    rustix::process::Pid::from_raw(raw).with_context(|| format!("{raw} is not a pid"))
}

fn parse_signal(name: &str) -> anyhow::Result<rustix::process::Signal> {
    use rustix::process::Signal;
    Ok(
        match name.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
            "HUP" => Signal::HUP,
            "USR1" => Signal::USR1,
            "USR2" => Signal::USR2,
            "INT" => Signal::INT,
            "TERM" => Signal::TERM,
            "QUIT" => Signal::QUIT,
            _ => bail!("--signal {name:?}: use HUP, USR1, USR2, INT, TERM or QUIT"),
        },
    )
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_named_with_or_without_sig() {
        assert_eq!(parse_signal("HUP").unwrap(), rustix::process::Signal::HUP);
        assert_eq!(
            parse_signal("SIGUSR1").unwrap(),
            rustix::process::Signal::USR1
        );
        assert!(parse_signal("KILLALL").is_err());
    }
}
