//! The file-wide keys and the collector that keeps every problem.
//!
//! Each rule is a function that returns the value or a [`Bad`] naming the
//! field; [`Problems`] records the refusals and goes on, so a file with
//! three mistakes is reported with three lines. A value is built only when
//! nothing it depends on was refused.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::entry;
use super::{
    AdminGroup, AdminSettings, ClientLimits, Config, DEFAULT_ADMIN_SOCKET_NAME,
    DEFAULT_INSTANCE_TTL, DEFAULT_TASK_TTL, EntrySpec, Error, MAX_TTL, MIN_TTL, Overrides, Problem,
    RawAdminApi, RawConfig, RawWorkloadApi, default_paths,
};
use crate::ids::{TrustDomain, is_path_segment};
use crate::policy::Entry;

/// Upper bound for the per-uid, per-connection and per-instance caps.
const MAX_LIMIT: usize = 1 << 20;
/// Longest Unix socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A value one rule refused: the field and what is wrong with it.
pub(super) struct Bad {
    field: String,
    message: String,
}

/// A refusal of `field`.
pub(super) fn bad(field: impl Into<String>, message: impl Into<String>) -> Bad {
    Bad {
        field: field.into(),
        message: message.into(),
    }
}

/// Every problem found in one source, in the order found.
pub(super) struct Problems<'a> {
    source_name: &'a str,
    list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub(super) fn new(source_name: &'a str) -> Self {
        Self {
            source_name,
            list: Vec::new(),
        }
    }

    /// Records a refusal.
    pub(super) fn add(&mut self, bad: Bad) {
        self.list.push(Problem {
            source_name: self.source_name.to_owned(),
            field: bad.field,
            message: bad.message,
        });
    }

    /// The value, or `None` with the refusal recorded.
    pub(super) fn check<T>(&mut self, result: Result<T, Bad>) -> Option<T> {
        result.map_err(|b| self.add(b)).ok()
    }

    /// The value when nothing was refused, else every problem.
    pub(super) fn finish<T>(mut self, value: Option<T>) -> Result<T, Error> {
        match value {
            Some(value) if self.list.is_empty() => Ok(value),
            _ => {
                if self.list.is_empty() {
                    // Every `None` above comes with a recorded refusal; this
                    // keeps a missed one from passing as valid.
                    self.add(bad("", "refused without a reason (a bug in sigil)"));
                }
                Err(Error::Invalid(self.list))
            }
        }
    }
}

/// Validates a whole file: each key on its own, so every mistake is found.
pub(super) fn config(raw: RawConfig, overrides: &Overrides, p: &mut Problems) -> Option<Config> {
    let trust_domain = p.check(trust_domain(raw.trust_domain.as_deref()));
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
    let state_ok = p.check(absolute("state_dir", &state_dir));
    let workload_ok = p.check(socket_path("workload_api.socket", &workload_socket));
    let limits = limits(&raw.workload_api, p);
    let workload = workload_ok.map(|()| workload_socket.as_path());
    let admin = admin(&raw.admin_api, overrides, workload, p);
    let metrics_listen = p.check(metrics_listen(raw.metrics.listen.as_deref()));
    let instance_ttl = p.check(ttl(
        "svid.instance_ttl",
        raw.svid.instance_ttl.as_deref(),
        DEFAULT_INSTANCE_TTL,
    ));
    let task_ttl = p.check(ttl(
        "svid.task_ttl",
        raw.svid.task_ttl.as_deref(),
        DEFAULT_TASK_TTL,
    ));
    let entries = entries(&raw.entries, trust_domain.as_ref(), p);
    state_ok?;
    workload_ok?;
    Some(Config {
        source: p.source_name.to_owned(),
        trust_domain: trust_domain?,
        state_dir,
        workload_socket,
        limits: limits?,
        allow_unauthenticated_verifiers: raw.workload_api.allow_unauthenticated_verifiers,
        admin: admin?,
        metrics_listen: metrics_listen?,
        instance_ttl: instance_ttl?,
        task_ttl: task_ttl?,
        entries: entries?,
    })
}

fn trust_domain(text: Option<&str>) -> Result<TrustDomain, Bad> {
    let text = text.unwrap_or("sigil.local");
    let td = TrustDomain::new(text).map_err(|e| bad("trust_domain", format!("{text:?}: {e}")))?;
    if text.contains("://") || text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad(
            "trust_domain",
            format!("{text:?}: write the bare lower-case name, e.g. \"agents.example.org\""),
        ));
    }
    Ok(td)
}

fn entries(specs: &[EntrySpec], td: Option<&TrustDomain>, p: &mut Problems) -> Option<Vec<Entry>> {
    if specs.is_empty() {
        p.add(bad(
            "entry",
            "no [[entry]]: no process could get an identity; add one (see config/sigil.toml)",
        ));
        return None;
    }
    let mut entries = Vec::with_capacity(specs.len());
    let mut all_valid = true;
    for (i, spec) in specs.iter().enumerate() {
        if is_path_segment(&spec.name) && specs[..i].iter().any(|e| e.name == spec.name) {
            p.add(bad(
                format!("entry[{i}].name"),
                format!(
                    "{:?} is used by an earlier entry; names must be unique",
                    spec.name
                ),
            ));
            all_valid = false;
        }
        match entry::check(spec, &format!("entry[{i}]"), td, p) {
            Some(entry) => entries.push(entry),
            None => all_valid = false,
        }
    }
    all_valid.then_some(entries)
}

fn limits(raw: &RawWorkloadApi, p: &mut Problems) -> Option<ClientLimits> {
    let d = ClientLimits::default();
    let connections = p.check(count(
        "max_connections_per_uid",
        raw.max_connections_per_uid,
        d.max_connections_per_uid,
    ));
    let streams = p.check(count(
        "max_streams_per_connection",
        raw.max_streams_per_connection.map(|n| n as usize),
        d.max_streams_per_connection as usize,
    ));
    let per_instance = p.check(count(
        "max_streams_per_instance",
        raw.max_streams_per_instance,
        d.max_streams_per_instance,
    ));
    let handshake = p.check(timeout(
        "handshake_timeout",
        raw.handshake_timeout.as_deref(),
        d.handshake_timeout,
    ));
    let idle = p.check(timeout(
        "idle_timeout",
        raw.idle_timeout.as_deref(),
        d.idle_timeout,
    ));
    Some(ClientLimits {
        max_connections_per_uid: connections?,
        max_streams_per_connection: u32::try_from(streams?).unwrap_or(u32::MAX),
        max_streams_per_instance: per_instance?,
        handshake_timeout: handshake?,
        idle_timeout: idle?,
    })
}

fn count(field: &str, value: Option<usize>, default: usize) -> Result<usize, Bad> {
    match value {
        None => Ok(default),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(bad(
            format!("workload_api.{field}"),
            format!("{n} is out of range: between 1 and {MAX_LIMIT}"),
        )),
    }
}

fn timeout(field: &str, text: Option<&str>, default: Duration) -> Result<Duration, Bad> {
    let Some(text) = text else { return Ok(default) };
    let field = format!("workload_api.{field}");
    let value = humantime::parse_duration(text).map_err(|e| {
        bad(
            &field,
            format!("{text:?} is not a duration ({e}); write e.g. \"5s\" or \"1m\""),
        )
    })?;
    if !(Duration::from_millis(100)..=Duration::from_secs(24 * 3600)).contains(&value) {
        return Err(bad(
            &field,
            format!("{text:?} is out of range: 100ms to 24h"),
        ));
    }
    Ok(value)
}

const ADMIN_SOCKET: &str = "admin_api.socket";

fn admin(
    raw: &RawAdminApi,
    overrides: &Overrides,
    workload: Option<&Path>,
    p: &mut Problems,
) -> Option<AdminSettings> {
    let explicit = overrides
        .admin_socket
        .clone()
        .or_else(|| raw.socket.clone());
    let socket = match (explicit, workload) {
        (Some(path), _) => p.check(socket_path(ADMIN_SOCKET, &path).map(|()| path)),
        (None, Some(workload)) => {
            let path = workload.with_file_name(DEFAULT_ADMIN_SOCKET_NAME);
            let checked = socket_path(ADMIN_SOCKET, &path).map_err(|b| {
                let message = format!(
                    "{} (the default, {DEFAULT_ADMIN_SOCKET_NAME} beside the workload socket); set {ADMIN_SOCKET}",
                    b.message
                );
                bad(b.field, message)
            });
            p.check(checked.map(|()| path))
        }
        // The workload socket's own problem is reported already.
        (None, None) => None,
    };
    let socket = socket.and_then(|socket| {
        let shared = workload.is_some_and(|w| w == socket);
        let message = format!(
            "{} is the workload socket too; the admin API needs a socket of its own: set {ADMIN_SOCKET} to another path",
            socket.display()
        );
        p.check(if shared { Err(bad(ADMIN_SOCKET, message)) } else { Ok(socket) })
    });
    let group = match raw.group.as_deref() {
        None => Some(None),
        Some(name) => p.check(admin_group(name)).map(Some),
    };
    Some(AdminSettings {
        socket: socket?,
        group: group?,
        allowed_uids: raw.allowed_uids.clone(),
    })
}

fn admin_group(name: &str) -> Result<AdminGroup, Bad> {
    const FIELD: &str = "admin_api.group";
    if name.is_empty() {
        return Err(bad(
            FIELD,
            "is empty: name the group whose members may use the admin socket, or leave group out",
        ));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(AdminGroup {
            name: name.to_owned(),
            gid: group.gid.as_raw(),
        }),
        Ok(None) => Err(bad(
            FIELD,
            format!("there is no group {name:?} on this host; create it or name an existing group"),
        )),
        Err(e) => Err(bad(FIELD, format!("cannot look up group {name:?}: {e}"))),
    }
}

fn metrics_listen(text: Option<&str>) -> Result<Option<SocketAddr>, Bad> {
    let Some(text) = text else { return Ok(None) };
    text.parse().map(Some).map_err(|e| {
        bad(
            "metrics.listen",
            format!(
                "{text:?} is not an address ({e}); write IP:port, e.g. \"127.0.0.1:9464\", or leave listen out to serve no metrics"
            ),
        )
    })
}

fn absolute(field: &str, path: &Path) -> Result<(), Bad> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("{} is not an absolute path", path.display()),
        ))
    }
}

fn socket_path(field: &str, path: &Path) -> Result<(), Bad> {
    absolute(field, path)?;
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(bad(
            field,
            format!(
                "{} is longer than {MAX_SOCKET_PATH} bytes, the Unix socket limit",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// An SVID lifetime (`svid.*_ttl`, an entry's `ttl`, `tasks.max_ttl`).
pub(super) fn ttl(field: &str, text: Option<&str>, default: Duration) -> Result<Duration, Bad> {
    let Some(text) = text else { return Ok(default) };
    let ttl = humantime::parse_duration(text).map_err(|e| {
        bad(
            field,
            format!("{text:?} is not a duration ({e}); write e.g. \"90s\", \"5m\" or \"1h\""),
        )
    })?;
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(bad(
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
