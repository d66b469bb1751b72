//! Configuration: a TOML file, or embedded defaults for a single user.
//!
//! Parsing is strict (`deny_unknown_fields`) and validation is pure, so a
//! mistake is reported at start-up with the file, the entry and the field,
//! and never half-applied. Validation goes on past a mistake, so one run
//! names every one ([`Error::problems`]). Entries sent over the admin API
//! are checked by the same code ([`validate_entry`]).
//! Nothing here touches sockets or the CA.
//!
//! - `validate`: the file-wide keys (`trust_domain`, paths, `[workload_api]`,
//!   `[svid]`, `[admin_api]`, `[metrics]`) and the problem collector.
//! - `entry`: `[[entry]]` as [`EntrySpec`], its rules, and the way back
//!   from a [`policy::Entry`](crate::policy::Entry).

mod entry;
mod validate;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ids::{TrustDomain, is_path_segment};
use crate::policy::Entry;
pub use entry::{EntrySpec, TaskSpec, validate_entry};
use validate::Problems;

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");
/// Default lifetime of an instance SVID.
pub const DEFAULT_INSTANCE_TTL: Duration = Duration::from_secs(60 * 60); // 1 hour
/// Default lifetime of a task SVID.
pub const DEFAULT_TASK_TTL: Duration = Duration::from_secs(5 * 60); // 5 minutes
/// Shortest SVID lifetime accepted (rotation happens at half of it).
pub const MIN_TTL: Duration = Duration::from_secs(2); // 2 seconds
/// Longest SVID lifetime accepted: SVIDs are meant to be short-lived.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600); // 30 days
/// Default cap on the connections one uid may hold open on the workload socket.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 64;
/// Default cap on the concurrent HTTP/2 streams of one connection.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Default cap on the open Workload API streams of one agent instance.
pub const DEFAULT_MAX_STREAMS_PER_INSTANCE: usize = 128;
/// Default time a new connection has to get its first request to a handler.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5); // 5 seconds
/// Default time a connection may stay open with no request or stream.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60); // 1 minute
/// File name of the admin socket when `admin_api.socket` is not set: it
/// lies beside the workload socket.
pub const DEFAULT_ADMIN_SOCKET_NAME: &str = "admin.sock";
/// Longest `owner` of an entry, in bytes.
pub const MAX_OWNER_LEN: usize = 128;
/// Source name in the errors of [`validate_entry`].
pub const ADMIN_API_SOURCE: &str = "admin API";
/// The source name of the embedded defaults (`Config::source`).
pub const EMBEDDED: &str = "<embedded defaults>";

/// A configuration mistake, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys. Nothing
    /// is validated after it, so it comes alone.
    #[error("{source_name}: {source}")]
    Parse {
        /// The file (or the embedded defaults).
        source_name: String,
        /// The TOML parser's error; its message has the line and column.
        source: toml::de::Error,
    },
    /// Values are not acceptable: every one found, in file order, one per
    /// line when displayed. Never empty.
    #[error("{}", lines(.0))]
    Invalid(Vec<Problem>),
}

/// One value that is not acceptable: where it is and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {field}: {message}")]
pub struct Problem {
    /// The file, `<embedded defaults>` or `admin API`.
    pub source_name: String,
    /// The key, e.g. `entry "bot".selectors[1]`.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

fn lines(problems: &[Problem]) -> String {
    let mut text = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        let _ = write!(text, "{p}");
    }
    text
}

impl Error {
    /// Every problem as one line each (`file: field: message`); a read or
    /// parse error is the one line.
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Invalid(list) => list.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }

    /// The invalid values, with their fields; empty for a read or parse
    /// error.
    pub fn invalid(&self) -> &[Problem] {
        match self {
            Self::Invalid(list) => list,
            _ => &[],
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    workload_api: RawWorkloadApi,
    #[serde(default)]
    admin_api: RawAdminApi,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    svid: RawSvid,
    #[serde(default, rename = "entry")]
    entries: Vec<EntrySpec>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorkloadApi {
    socket: Option<PathBuf>,
    max_connections_per_uid: Option<usize>,
    max_streams_per_connection: Option<u32>,
    max_streams_per_instance: Option<usize>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    #[serde(default)]
    allow_unauthenticated_verifiers: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdminApi {
    socket: Option<PathBuf>,
    group: Option<String>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSvid {
    instance_ttl: Option<String>,
    task_ttl: Option<String>,
}

/// Command-line values that take precedence over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--socket`
    pub socket: Option<PathBuf>,
    /// `--state-dir`
    pub state_dir: Option<PathBuf>,
    /// `--admin-socket`
    pub admin_socket: Option<PathBuf>,
}

/// What one client may hold on the workload socket (`[workload_api]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// Connections one uid may hold open at once; more are closed at accept.
    pub max_connections_per_uid: usize,
    /// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// Open Workload API streams per agent instance, over all its connections.
    pub max_streams_per_instance: usize,
    /// Time from accept until the first request reaches a handler.
    pub handshake_timeout: Duration,
    /// Time a connection may stay open with no request or stream in flight.
    pub idle_timeout: Duration,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_streams_per_instance: DEFAULT_MAX_STREAMS_PER_INSTANCE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Who may use the admin socket and where it is (`[admin_api]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminSettings {
    /// The socket path: `admin_api.socket`, `--admin-socket`, or
    /// `admin.sock` beside the workload socket.
    pub socket: PathBuf,
    /// Members of this group may use it (socket mode 0660), if set.
    pub group: Option<AdminGroup>,
    /// These uids may use it too (the daemon's own uid always may).
    pub allowed_uids: Vec<u32>,
}

/// `admin_api.group`, resolved when the config was validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminGroup {
    /// The group name as written.
    pub name: String,
    /// Its gid on this host.
    pub gid: u32,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it came from: a file path or `<embedded defaults>`.
    pub source: String,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// State directory (CA, store).
    pub state_dir: PathBuf,
    /// Workload API socket path.
    pub workload_socket: PathBuf,
    /// Per-client bounds on the workload socket.
    pub limits: ClientLimits,
    /// `[workload_api] allow_unauthenticated_verifiers` (SPIRE's name): a
    /// caller that matches no entry is still sent the trust bundle and CRL
    /// (FetchX509Bundles), with nothing minted; otherwise it is refused.
    pub allow_unauthenticated_verifiers: bool,
    /// The admin socket and who may use it.
    pub admin: AdminSettings,
    /// Where the metrics and health listener binds (`metrics.listen`);
    /// `None` (the default) serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Default instance SVID lifetime.
    pub instance_ttl: Duration,
    /// Default task SVID lifetime.
    pub task_ttl: Duration,
    /// Registration entries.
    pub entries: Vec<Entry>,
}

impl Config {
    /// Loads `path`, or the embedded defaults (with one entry admitting the
    /// current user) when `path` is `None`, then applies `overrides`.
    ///
    /// # Errors
    /// [`Error`] naming the file, the entry and the field; every invalid
    /// value at once ([`Error::problems`]).
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, Error> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text, &path.display().to_string(), overrides)
            }
            None => Self::parse(DEFAULT_CONFIG, EMBEDDED, overrides),
        }
    }

    /// Parses and validates config text. `source_name` is used in errors.
    /// The embedded defaults (`source_name == "<embedded defaults>"`) get an
    /// entry for the current user; a file must declare its own entries.
    ///
    /// # Errors
    /// [`Error::Parse`] alone, or [`Error::Invalid`] with every problem.
    pub fn parse(text: &str, source_name: &str, overrides: &Overrides) -> Result<Self, Error> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|source| Error::Parse {
            source_name: source_name.to_owned(),
            source,
        })?;
        if source_name == EMBEDDED && raw.entries.is_empty() {
            raw.entries.push(default_entry());
        }
        let mut problems = Problems::new(source_name);
        let config = validate::config(raw, overrides, &mut problems);
        problems.finish(config)
    }
}

fn default_entry() -> EntrySpec {
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .filter(|n| is_path_segment(n))
        .unwrap_or_else(|| format!("uid-{uid}"));
    EntrySpec {
        name,
        owner: None,
        selectors: vec![format!("unix:uid:{uid}")],
        spiffe_id: None,
        ttl: None,
        dns_names: vec![],
        tasks: None,
    }
}

/// Where a user's daemon keeps its files by default; returns the state
/// directory (CA and store) and the workload socket:
/// - root: `/var/lib/sigil` and `/run/sigil/workload.sock`;
/// - anyone else: the state in `$XDG_STATE_HOME/sigil` (default
///   `~/.local/state/sigil`), which outlives logout and reboot; the socket in
///   `$XDG_RUNTIME_DIR/sigil/`, or `/tmp/sigil-<uid>/` without a runtime
///   dir. A user with no home directory (`nobody`) keeps the state beside
///   the socket, in `state/`, and loses it at reboot.
pub fn default_paths() -> (PathBuf, PathBuf) {
    let uid = nix::unistd::geteuid();
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    user_paths(
        uid.as_raw(),
        var("XDG_RUNTIME_DIR"),
        var("XDG_STATE_HOME"),
        var("HOME").filter(|home| home.is_dir()),
    )
}

/// [`default_paths`] from the facts it reads: the uid, `XDG_RUNTIME_DIR`,
/// `XDG_STATE_HOME` and `HOME` (given only when it is an existing directory).
fn user_paths(
    uid: u32,
    runtime_dir: Option<PathBuf>,
    state_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> (PathBuf, PathBuf) {
    if uid == 0 {
        return (
            PathBuf::from("/var/lib/sigil"),
            PathBuf::from("/run/sigil/workload.sock"),
        );
    }
    // The XDG spec: relative values are invalid and ignored.
    let absolute = |p: PathBuf| p.is_absolute().then_some(p);
    let runtime = runtime_dir
        .and_then(absolute)
        .map(|p| p.join("sigil"))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/sigil-{uid}")));
    let state = state_home
        .and_then(absolute)
        .or_else(|| home.and_then(absolute).map(|h| h.join(".local/state")))
        .map(|p| p.join("sigil"))
        .unwrap_or_else(|| runtime.join("state"));
    (state, runtime.join("workload.sock"))
}

/// The admin socket a daemon run by this user with no config listens on:
/// `admin.sock` beside the default workload socket. For CLI clients.
pub fn default_admin_socket() -> PathBuf {
    default_paths().1.with_file_name(DEFAULT_ADMIN_SOCKET_NAME)
}

#[cfg(test)]
mod tests;
