//! Reaching the daemon's Unix sockets as a client (the CLI, the gate, the
//! helper, `verify::source`). One place turns a failed connect into what is
//! wrong and what to do, once: no such file, not a socket, permission
//! denied, nothing listening.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Which of the daemon's sockets a command wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The Workload API (`workload.sock`).
    Workload,
    /// The admin API (`admin.sock`).
    Admin,
}

impl Which {
    fn api(self) -> &'static str {
        match self {
            Self::Workload => "Workload API",
            Self::Admin => "admin API",
        }
    }

    fn how_to_choose(self) -> &'static str {
        match self {
            Self::Workload => "--socket or SPIFFE_ENDPOINT_SOCKET",
            Self::Admin => "--admin-socket or SIGIL_ADMIN_SOCKET",
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Self::Workload => "workload.sock",
            Self::Admin => "admin.sock",
        }
    }
}

/// Why a client could not reach a socket: one message saying what is
/// wrong and what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    /// What went wrong, for code that acts on it.
    pub problem: Problem,
    message: String,
}

/// A gRPC channel over the socket at `path`.
///
/// # Errors
/// [`ConnectError`], naming the path, the problem and the fix.
pub async fn channel(path: &Path, which: Which) -> Result<Channel, ConnectError> {
    // What the path is, before connecting: connect(2) says "connection
    // refused" for a regular file, which sends people looking for a daemon.
    match std::fs::metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            let kind = if meta.is_dir() {
                "a directory"
            } else {
                "a regular file"
            };
            return Err(problem(path, which, Problem::NotASocket(kind)));
        }
        Ok(_) => {}
        Err(e) => return Err(problem(path, which, Problem::from(e.kind()))),
    }
    let target = path.to_owned();
    // The URI is a placeholder: the connector ignores it.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let target = target.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(target).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            let kind = io_kind(&e).unwrap_or(ErrorKind::Other);
            match Problem::from(kind) {
                Problem::Other => ConnectError {
                    problem: Problem::Other,
                    message: format!(
                        "cannot connect to the {} at {}: {e}",
                        which.api(),
                        path.display()
                    ),
                },
                p => problem(path, which, p),
            }
        })
}

/// What went wrong reaching a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// No file at the path.
    Missing,
    /// Something else than a socket there (what it is).
    NotASocket(&'static str),
    /// This user may not reach or open it.
    PermissionDenied,
    /// A socket nobody listens on.
    NothingListening,
    /// Anything else.
    Other,
}

impl From<ErrorKind> for Problem {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::NotFound => Self::Missing,
            ErrorKind::PermissionDenied => Self::PermissionDenied,
            ErrorKind::ConnectionRefused => Self::NothingListening,
            _ => Self::Other,
        }
    }
}

/// The message for a problem: what is wrong, then what to do.
fn problem(path: &Path, which: Which, problem: Problem) -> ConnectError {
    let path = path.display();
    let (api, choose, file) = (which.api(), which.how_to_choose(), which.file_name());
    let message = match problem {
        Problem::Missing => format!(
            "no socket at {path}: start the daemon (`sigil run`), or point {choose} at the \
             {file} it printed when it started"
        ),
        Problem::NotASocket(kind) => {
            format!("{path} is {kind}, not a socket: point {choose} at the daemon's {file}")
        }
        Problem::PermissionDenied => match which {
            Which::Workload => format!(
                "permission denied on {path} for uid {}: a directory on its path is not open to \
                 this user (the daemon makes its socket 0777 in a 0755 directory; check the \
                 modes with `namei -l {path}`)",
                nix::unistd::geteuid()
            ),
            Which::Admin => format!(
                "{path} is not accessible to uid {}: the admin socket is for root, the daemon's \
                 user, [admin_api] allowed_uids and members of [admin_api] group",
                nix::unistd::geteuid()
            ),
        },
        Problem::NothingListening => format!(
            "nothing answers on {path}: no daemon is serving the {api} there (a daemon that was \
             killed leaves its socket behind); start `sigil run`"
        ),
        Problem::Other => format!("cannot connect to the {api} at {path}"),
    };
    ConnectError { problem, message }
}

/// The I/O error kind somewhere in an error's chain.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_problem_is_named_once_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let e = channel(&missing, Which::Workload).await.unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("no socket at "), "{text}");
        assert!(text.contains("SPIFFE_ENDPOINT_SOCKET"), "{text}");
        assert!(
            !text.contains("os error"),
            "the OS error is not repeated: {text}"
        );

        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let text = channel(&file, Which::Admin).await.unwrap_err().to_string();
        assert!(text.contains("is a regular file, not a socket"), "{text}");
        assert!(text.contains("--admin-socket"), "{text}");
        let text = format!(
            "{:#}",
            channel(dir.path(), Which::Workload).await.unwrap_err()
        );
        assert!(text.contains("is a directory, not a socket"), "{text}");

        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let text = channel(&stale, Which::Workload)
            .await
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("nothing answers on "), "{text}");
    }
}
