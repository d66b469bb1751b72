//! Configuration: a TOML file, or embedded defaults for a single user.
//!
//! Parsing is strict (`deny_unknown_fields`) and validation is pure, so a
//! mistake is reported at start-up with the file, the entry and the field,
//! and never half-applied. Nothing here touches sockets or the CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::attest::Selector;
use crate::ids::{InstanceId, TrustDomain, is_path_segment};
use crate::policy::rate::RateError;
use crate::policy::{BeginRate, Context, DEFAULT_TEMPLATE, Entry, TaskPolicy, Template};

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
/// Upper bound for the per-uid, per-connection and per-instance caps.
const MAX_LIMIT: usize = 1 << 20;
/// Longest Unix socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
const EMBEDDED: &str = "<embedded defaults>";

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
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{source_name}: {source}")]
    Parse {
        /// The file (or the embedded defaults).
        source_name: String,
        /// The TOML parser's error; its message has the line and column.
        source: toml::de::Error,
    },
    /// A value is not acceptable.
    #[error("{source_name}: {field}: {message}")]
    Invalid {
        /// The file (or the embedded defaults).
        source_name: String,
        /// The key, e.g. `entry "bot".selectors[1]`.
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    workload_api: RawWorkloadApi,
    #[serde(default)]
    svid: RawSvid,
    #[serde(default, rename = "entry")]
    entries: Vec<RawEntry>,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSvid {
    instance_ttl: Option<String>,
    task_ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    selectors: Vec<String>,
    spiffe_id: Option<String>,
    ttl: Option<String>,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    tasks: Option<RawTasks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTasks {
    #[serde(default)]
    self_declare: bool,
    max_ttl: Option<String>,
    max_concurrent: Option<u32>,
    id_pattern: Option<String>,
    begin_burst: Option<u32>,
    begin_per_second: Option<f64>,
}

/// Most concurrent tasks an entry may allow per instance.
const MAX_CONCURRENT_LIMIT: u32 = 1024;

/// Command-line values that take precedence over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--socket`
    pub socket: Option<PathBuf>,
    /// `--state-dir`
    pub state_dir: Option<PathBuf>,
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
    /// [`Error`] naming the file, the entry and the field.
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
    /// [`Error::Parse`] or [`Error::Invalid`].
    pub fn parse(text: &str, source_name: &str, overrides: &Overrides) -> Result<Self, Error> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|source| Error::Parse {
            source_name: source_name.to_owned(),
            source,
        })?;
        if source_name == EMBEDDED && raw.entries.is_empty() {
            raw.entries.push(default_entry());
        }
        Validator { source_name }.validate(raw, overrides)
    }
}

fn default_entry() -> RawEntry {
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .filter(|n| is_path_segment(n))
        .unwrap_or_else(|| format!("uid-{uid}"));
    RawEntry {
        name,
        selectors: vec![format!("unix:uid:{uid}")],
        spiffe_id: None,
        ttl: None,
        dns_names: vec![],
        tasks: None,
    }
}

/// Where a user's daemon keeps its files by default: /var/lib and /run for
/// root, `$XDG_RUNTIME_DIR/sigil` or `/tmp/sigil-<uid>` for anyone else.
pub fn default_paths() -> (PathBuf, PathBuf) {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return (
            PathBuf::from("/var/lib/sigil"),
            PathBuf::from("/run/sigil/workload.sock"),
        );
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .map(|p| p.join("sigil"))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/sigil-{uid}")));
    (base.join("state"), base.join("workload.sock"))
}

struct Validator<'a> {
    source_name: &'a str,
}

impl Validator<'_> {
    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Invalid {
            source_name: self.source_name.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn validate(&self, raw: RawConfig, overrides: &Overrides) -> Result<Config, Error> {
        let td_text = raw.trust_domain.unwrap_or_else(|| "sigil.local".to_owned());
        let trust_domain = TrustDomain::new(&td_text)
            .map_err(|e| self.invalid("trust_domain", format!("{td_text:?}: {e}")))?;
        if td_text.contains("://") || td_text.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(self.invalid(
                "trust_domain",
                format!("{td_text:?}: write the bare lower-case name, e.g. \"agents.example.org\""),
            ));
        }
        let (default_state, default_socket) = default_paths();
        let state_dir = overrides
            .state_dir
            .clone()
            .or(raw.state_dir)
            .unwrap_or(default_state);
        let workload_socket = overrides
            .socket
            .clone()
            .or(raw.workload_api.socket.clone())
            .unwrap_or(default_socket);
        self.check_path("state_dir", &state_dir)?;
        self.check_path("workload_api.socket", &workload_socket)?;
        if workload_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(self.invalid(
                "workload_api.socket",
                format!(
                    "{} is longer than {MAX_SOCKET_PATH} bytes, the Unix socket limit",
                    workload_socket.display()
                ),
            ));
        }
        let limits = self.limits(&raw.workload_api)?;
        let instance_ttl = self.ttl(
            "svid.instance_ttl",
            raw.svid.instance_ttl.as_deref(),
            DEFAULT_INSTANCE_TTL,
        )?;
        let task_ttl = self.ttl(
            "svid.task_ttl",
            raw.svid.task_ttl.as_deref(),
            DEFAULT_TASK_TTL,
        )?;
        if raw.entries.is_empty() {
            return Err(self.invalid(
                "entry",
                "no [[entry]]: no process could get an identity; add one (see config/sigil.toml)",
            ));
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(raw.entries.len());
        for (i, raw_entry) in raw.entries.into_iter().enumerate() {
            let entry = self.entry(i, raw_entry, &trust_domain)?;
            if entries.iter().any(|e| e.name == entry.name) {
                return Err(self.invalid(
                    format!("entry[{i}].name"),
                    format!(
                        "{:?} is used by an earlier entry; names must be unique",
                        entry.name
                    ),
                ));
            }
            entries.push(entry);
        }
        Ok(Config {
            source: self.source_name.to_owned(),
            trust_domain,
            state_dir,
            workload_socket,
            limits,
            instance_ttl,
            task_ttl,
            entries,
        })
    }

    fn limits(&self, raw: &RawWorkloadApi) -> Result<ClientLimits, Error> {
        let d = ClientLimits::default();
        let count = |field: &str, value: Option<usize>, default: usize| match value {
            None => Ok(default),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(self.invalid(
                format!("workload_api.{field}"),
                format!("{n} is out of range: between 1 and {MAX_LIMIT}"),
            )),
        };
        let timeout = |field: &str, text: Option<&str>, default: Duration| {
            let Some(text) = text else { return Ok(default) };
            let field = format!("workload_api.{field}");
            let value = humantime::parse_duration(text).map_err(|e| {
                self.invalid(
                    &field,
                    format!("{text:?} is not a duration ({e}); write e.g. \"5s\" or \"1m\""),
                )
            })?;
            if !(Duration::from_millis(100)..=Duration::from_secs(24 * 3600)).contains(&value) {
                return Err(self.invalid(&field, format!("{text:?} is out of range: 100ms to 24h")));
            }
            Ok(value)
        };
        let streams = count(
            "max_streams_per_connection",
            raw.max_streams_per_connection.map(|n| n as usize),
            d.max_streams_per_connection as usize,
        )?;
        Ok(ClientLimits {
            max_connections_per_uid: count(
                "max_connections_per_uid",
                raw.max_connections_per_uid,
                d.max_connections_per_uid,
            )?,
            max_streams_per_connection: u32::try_from(streams).unwrap_or(u32::MAX),
            max_streams_per_instance: count(
                "max_streams_per_instance",
                raw.max_streams_per_instance,
                d.max_streams_per_instance,
            )?,
            handshake_timeout: timeout(
                "handshake_timeout",
                raw.handshake_timeout.as_deref(),
                d.handshake_timeout,
            )?,
            idle_timeout: timeout("idle_timeout", raw.idle_timeout.as_deref(), d.idle_timeout)?,
        })
    }

    fn check_path(&self, field: &str, path: &Path) -> Result<(), Error> {
        if path.is_absolute() {
            Ok(())
        } else {
            Err(self.invalid(field, format!("{} is not an absolute path", path.display())))
        }
    }

    fn ttl(&self, field: &str, text: Option<&str>, default: Duration) -> Result<Duration, Error> {
        let Some(text) = text else { return Ok(default) };
        let ttl = humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                field,
                format!("{text:?} is not a duration ({e}); write e.g. \"90s\", \"5m\" or \"1h\""),
            )
        })?;
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(self.invalid(
                field,
                format!(
                    "{text:?} is out of range: between {} and {}",
                    humantime::format_duration(MIN_TTL),
                    humantime::format_duration(MAX_TTL)
                ),
            ));
        }
        Ok(ttl)
    }

    fn entry(&self, i: usize, raw: RawEntry, td: &TrustDomain) -> Result<Entry, Error> {
        if !is_path_segment(&raw.name) {
            return Err(self.invalid(
                format!("entry[{i}].name"),
                format!(
                    "{:?} must be a SPIFFE path segment: letters, digits, '-', '.', '_'",
                    raw.name
                ),
            ));
        }
        let at = |field: &str| format!("entry {:?}.{field}", raw.name);
        if raw.selectors.is_empty() {
            return Err(self.invalid(at("selectors"), "is empty: an entry must require at least one selector, or it would admit every process"));
        }
        let mut selectors = Vec::with_capacity(raw.selectors.len());
        for (j, text) in raw.selectors.iter().enumerate() {
            let selector: Selector = text
                .parse()
                .map_err(|e| self.invalid(at(&format!("selectors[{j}]")), format!("{e}")))?;
            selectors.push(selector);
        }
        let template_text = raw.spiffe_id.as_deref().unwrap_or(DEFAULT_TEMPLATE);
        let template: Template = template_text
            .parse()
            .map_err(|e| self.invalid(at("spiffe_id"), format!("{e}")))?;
        // Render once with sample values so an ID that can never be valid is
        // caught now rather than at the first request.
        let sample = InstanceId::derive("sample", 1, 1, crate::ids::ExeId::new(1, 1, b"/bin/x"));
        template
            .render(&Context {
                trust_domain: td,
                entry: &raw.name,
                instance: &sample,
                uid: 0,
            })
            .map_err(|e| self.invalid(at("spiffe_id"), format!("{e}")))?;
        let ttl = match raw.ttl.as_deref() {
            Some(text) => Some(self.ttl(&at("ttl"), Some(text), DEFAULT_INSTANCE_TTL)?),
            None => None,
        };
        for (j, name) in raw.dns_names.iter().enumerate() {
            if !is_dns_name(name) {
                return Err(self.invalid(
                    at(&format!("dns_names[{j}]")),
                    format!("{name:?} is not a DNS name"),
                ));
            }
        }
        let tasks = match raw.tasks {
            Some(t) => self.tasks(&at, t)?,
            None => TaskPolicy::default(),
        };
        Ok(Entry {
            name: raw.name,
            selectors,
            spiffe_id: template,
            ttl,
            dns_names: raw.dns_names,
            tasks,
        })
    }

    fn tasks(&self, at: &dyn Fn(&str) -> String, raw: RawTasks) -> Result<TaskPolicy, Error> {
        let defaults = TaskPolicy::default();
        let max_ttl = self.ttl(
            &at("tasks.max_ttl"),
            raw.max_ttl.as_deref(),
            defaults.max_ttl,
        )?;
        let max_concurrent = match raw.max_concurrent {
            None => defaults.max_concurrent,
            Some(n) if (1..=MAX_CONCURRENT_LIMIT).contains(&n) => n as usize,
            Some(n) => {
                return Err(self.invalid(
                    at("tasks.max_concurrent"),
                    format!("{n} is out of range: between 1 and {MAX_CONCURRENT_LIMIT}"),
                ));
            }
        };
        let id_pattern = match raw.id_pattern {
            None => None,
            Some(p) => Some(glob::Pattern::new(&p).map_err(|e| {
                self.invalid(
                    at("tasks.id_pattern"),
                    format!("{p:?} is not a glob pattern: {e}"),
                )
            })?),
        };
        let burst = raw.begin_burst.unwrap_or(defaults.begin_rate.burst);
        let per_second = raw
            .begin_per_second
            .unwrap_or(1.0 / defaults.begin_rate.every.as_secs_f64());
        let begin_rate = BeginRate::new(burst, per_second).map_err(|e| {
            let field = match e {
                RateError::Burst(_) => "tasks.begin_burst",
                RateError::PerSecond(_) => "tasks.begin_per_second",
            };
            self.invalid(at(field), e.to_string())
        })?;
        Ok(TaskPolicy {
            self_declare: raw.self_declare,
            max_ttl,
            max_concurrent,
            id_pattern,
            begin_rate,
        })
    }
}

fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && !name.is_empty()
        && name.split('.').enumerate().all(|(i, label)| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || b == b'-'
                        || (b == b'*' && i == 0 && label.len() == 1)
                })
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, "test.toml", &Overrides::default())
    }

    const GOOD: &str = r#"
        trust_domain = "agents.example.org"
        state_dir = "/var/lib/sigil"
        [workload_api]
        socket = "/run/sigil/workload.sock"
        [svid]
        instance_ttl = "1h"
        task_ttl = "5m"
        [[entry]]
        name = "research-bot"
        selectors = ["unix:uid:1000", "unix:path:/usr/bin/python3"]
    "#;

    #[test]
    fn the_issue_example_config_is_accepted() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.trust_domain.as_str(), "agents.example.org");
        assert_eq!(c.instance_ttl, Duration::from_secs(3600));
        assert_eq!(c.entries[0].selectors.len(), 2);
    }

    #[test]
    fn the_shipped_example_and_the_defaults_are_valid() {
        let example = include_str!("../../config/sigil.toml");
        assert_eq!(parse(example).unwrap().entries.len(), 2);
        let defaults = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(defaults.trust_domain.as_str(), "sigil.local");
        let uid = nix::unistd::geteuid().to_string();
        assert_eq!(defaults.entries[0].selectors[0].value(), uid);
        assert_eq!(defaults.source, EMBEDDED);
    }

    #[test]
    fn flags_override_the_file() {
        let overrides = Overrides {
            socket: Some("/tmp/x.sock".into()),
            state_dir: Some("/tmp/st".into()),
        };
        let c = Config::parse(GOOD, "f", &overrides).unwrap();
        assert_eq!(c.workload_socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/st"));
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn each_kind_of_mistake_names_the_file_and_the_field() {
        let cases = [
            (
                GOOD.replace(
                    "trust_domain = \"agents.example.org\"",
                    "trust_domain = \"Bad Domain\"",
                ),
                "trust_domain",
            ),
            (
                GOOD.replace("instance_ttl = \"1h\"", "instance_ttl = \"soon\""),
                "svid.instance_ttl",
            ),
            (
                GOOD.replace("instance_ttl = \"1h\"", "instance_ttl = \"100d\""),
                "out of range",
            ),
            (
                GOOD.replace("unix:uid:1000", "unix:uid:bob"),
                "entry \"research-bot\".selectors[0]",
            ),
            (
                GOOD.replace("unix:uid:1000", "unix:pid:1"),
                "unknown selector",
            ),
            (
                GOOD.replace("name = \"research-bot\"", "name = \"research bot\""),
                "entry[0].name",
            ),
            (
                GOOD.replace(
                    "selectors = [\"unix:uid:1000\", \"unix:path:/usr/bin/python3\"]",
                    "selectors = []",
                ),
                "admit every process",
            ),
            (
                format!("{GOOD}spiffe_id = \"spiffe://other.org/x\""),
                "outside the trust domain",
            ),
            (
                format!("{GOOD}spiffe_id = \"spiffe://{{trust_domain}}/{{pid}}\""),
                "unknown placeholder",
            ),
            (
                format!("{GOOD}dns_names = [\"not a name\"]"),
                "dns_names[0]",
            ),
            (format!("{GOOD}colour = \"blue\""), "unknown field"),
            (
                GOOD.replace(
                    "socket = \"/run/sigil/workload.sock\"",
                    "socket = \"relative.sock\"",
                ),
                "workload_api.socket",
            ),
            (
                format!("{GOOD}[[entry]]\nname = \"research-bot\"\nselectors = [\"unix:uid:1\"]"),
                "unique",
            ),
            ("trust_domain = [".to_owned(), "test.toml"),
            ("trust_domain = \"a.org\"".to_owned(), "no [[entry]]"),
            (
                format!("{GOOD}[entry.tasks]\nmax_ttl = \"1y\""),
                "tasks.max_ttl",
            ),
            (
                format!("{GOOD}[entry.tasks]\nmax_concurrent = 0"),
                "tasks.max_concurrent",
            ),
            (
                format!("{GOOD}[entry.tasks]\nid_pattern = \"[\""),
                "tasks.id_pattern",
            ),
            (
                format!("{GOOD}[entry.tasks]\nself_declare = \"yes\""),
                "self_declare",
            ),
            (
                format!("{GOOD}[entry.tasks]\nbegin_burst = 0"),
                "entry \"research-bot\".tasks.begin_burst: 0 is out of range",
            ),
            (
                format!("{GOOD}[entry.tasks]\nbegin_burst = 5000"),
                "tasks.begin_burst",
            ),
            (
                format!("{GOOD}[entry.tasks]\nbegin_per_second = 0.0"),
                "entry \"research-bot\".tasks.begin_per_second: 0 is out of range",
            ),
            (
                format!("{GOOD}[entry.tasks]\nbegin_per_second = -2"),
                "tasks.begin_per_second",
            ),
            (
                format!("{GOOD}[entry.tasks]\nbegin_per_second = nan"),
                "tasks.begin_per_second",
            ),
            (
                format!("{GOOD}[entry.tasks]\nbegin_per_second = \"fast\""),
                "begin_per_second",
            ),
        ];
        for (text, expected) in cases {
            let err = error_of(&text);
            assert!(err.starts_with("test.toml"), "no file name in {err:?}");
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn entry_task_policy_is_read_with_defaults() {
        let c = parse(&format!(
            "{GOOD}[entry.tasks]\nself_declare = true\nmax_ttl = \"10m\"\nid_pattern = \"ticket-*\""
        ))
        .unwrap();
        let tasks = &c.entries[0].tasks;
        assert!(tasks.self_declare);
        assert_eq!(tasks.max_ttl, Duration::from_secs(600));
        assert_eq!(tasks.max_concurrent, TaskPolicy::default().max_concurrent);
        assert!(tasks.id_pattern.as_ref().unwrap().matches("ticket-9"));
        assert!(!parse(GOOD).unwrap().entries[0].tasks.self_declare);
    }

    #[test]
    fn entry_begin_rate_is_read_with_defaults() {
        let c = parse(&format!(
            "{GOOD}[entry.tasks]\nbegin_burst = 5\nbegin_per_second = 4"
        ))
        .unwrap();
        let rate = c.entries[0].tasks.begin_rate;
        assert_eq!(rate.burst, 5);
        assert_eq!(rate.every, Duration::from_millis(250));
        let c = parse(&format!("{GOOD}[entry.tasks]\nbegin_per_second = 0.5")).unwrap();
        assert_eq!(c.entries[0].tasks.begin_rate.every, Duration::from_secs(2));
        assert_eq!(
            c.entries[0].tasks.begin_rate.burst,
            crate::policy::rate::DEFAULT_BEGIN_BURST
        );
        assert_eq!(
            parse(GOOD).unwrap().entries[0].tasks.begin_rate,
            BeginRate::default()
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = Config::load(
            Some(Path::new("/nonexistent/sigil.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/sigil.toml"));
    }

    #[test]
    fn dns_names_are_checked() {
        assert!(is_dns_name("mcp.internal"));
        assert!(is_dns_name("*.agents.example.org"));
        assert!(!is_dns_name("a..b"));
        assert!(!is_dns_name("-a.b"));
        assert!(!is_dns_name("a.*.b"));
    }
}
