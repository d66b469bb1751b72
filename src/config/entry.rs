//! Registration entries as written ([`EntrySpec`]) and their rules.
//!
//! One function checks an entry, whether it comes from an `[[entry]]` table
//! of the file or from the admin API ([`validate_entry`]), so both follow
//! the same rules and name fields the same way (`entry "bot".selectors[0]`).
//! [`EntrySpec::from`] writes a validated entry back, for the store, which
//! keeps specs as JSON text.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::{Bad, Problems, bad, ttl};
use super::{ADMIN_API_SOURCE, DEFAULT_INSTANCE_TTL, Error, MAX_OWNER_LEN};
use crate::attest::Selector;
use crate::ids::{ExeId, InstanceId, TrustDomain, is_path_segment};
use crate::policy::rate::RateError;
use crate::policy::{BeginRate, Context, DEFAULT_TEMPLATE, Entry, TaskPolicy, Template};

/// Most concurrent tasks an entry may allow per instance.
const MAX_CONCURRENT_LIMIT: u32 = 1024;

/// One registration entry as written: an `[[entry]]` table of the config
/// file, or an entry sent over the admin API. Validate it with
/// [`validate_entry`] (or as part of a [`Config`](super::Config)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// Unique name; a SPIFFE path segment.
    pub name: String,
    /// The team or person accountable for the agent (printable, 1 to 128
    /// bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Selectors, `type:key:value`; at least one.
    pub selectors: Vec<String>,
    /// SPIFFE ID template; [`DEFAULT_TEMPLATE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// SVID lifetime (humantime, e.g. `"30m"`); `svid.instance_ttl` when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Extra DNS SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// The `[entry.tasks]` table; defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<TaskSpec>,
}

/// The `[entry.tasks]` table as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// May the agent begin and end its own tasks?
    #[serde(default)]
    pub self_declare: bool,
    /// Longest task lifetime (humantime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<String>,
    /// Most live tasks per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Glob a task id must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_pattern: Option<String>,
    /// Begins allowed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_burst: Option<u32>,
    /// Begins per second once the burst is spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_per_second: Option<f64>,
}

/// Validates an entry sent over the admin API by the rules of `[[entry]]`.
/// Errors name the source `admin API` and the field, e.g.
/// `admin API: entry "bot".selectors[0]: ...`. Whether the name is already
/// taken is the caller's to check (it knows the entries in force).
///
/// # Errors
/// [`Error::Invalid`] with every problem of the entry.
pub fn validate_entry(spec: &EntrySpec, trust_domain: &TrustDomain) -> Result<Entry, Error> {
    let mut problems = Problems::new(ADMIN_API_SOURCE);
    let entry = check(spec, "entry", Some(trust_domain), &mut problems);
    problems.finish(entry)
}

/// Checks every field of `spec`, recording each problem. Fields are named
/// `entry "<name>".<field>`, or `<unnamed>.<field>` when the name itself is
/// invalid. Without a trust domain (it was invalid) the SPIFFE ID template
/// is parsed but not rendered.
pub(super) fn check(
    spec: &EntrySpec,
    unnamed: &str,
    td: Option<&TrustDomain>,
    p: &mut Problems,
) -> Option<Entry> {
    let name_ok = is_path_segment(&spec.name);
    let label = if name_ok {
        format!("entry {:?}", spec.name)
    } else {
        p.add(bad(
            format!("{unnamed}.name"),
            format!(
                "{:?} must be a SPIFFE path segment: letters, digits, '-', '.', '_'",
                spec.name
            ),
        ));
        unnamed.to_owned()
    };
    let at = |field: &str| format!("{label}.{field}");
    let owner = p.check(owner(&at("owner"), spec.owner.as_deref()));
    let selectors = selectors(&at, &spec.selectors, p);
    // A template with `{entry}` renders only with a valid name.
    let spiffe_id = p.check(template(&at("spiffe_id"), spec, td.filter(|_| name_ok)));
    let ttl = match spec.ttl.as_deref() {
        Some(text) => p.check(ttl(&at("ttl"), Some(text), DEFAULT_INSTANCE_TTL).map(Some)),
        None => Some(None),
    };
    let mut dns_ok = true;
    for (j, name) in spec.dns_names.iter().enumerate() {
        if !is_dns_name(name) {
            p.add(bad(
                at(&format!("dns_names[{j}]")),
                format!("{name:?} is not a DNS name"),
            ));
            dns_ok = false;
        }
    }
    let tasks = match &spec.tasks {
        Some(t) => tasks(&at, t, p),
        None => Some(TaskPolicy::default()),
    };
    if !(name_ok && dns_ok) {
        return None;
    }
    Some(Entry {
        name: spec.name.clone(),
        owner: owner?,
        selectors: selectors?,
        spiffe_id: spiffe_id?,
        ttl: ttl?,
        dns_names: spec.dns_names.clone(),
        tasks: tasks?,
    })
}

fn owner(field: &str, owner: Option<&str>) -> Result<Option<String>, Bad> {
    let Some(owner) = owner else { return Ok(None) };
    if owner.trim().is_empty() {
        return Err(bad(
            field,
            "is empty: name the team or person accountable for the agent, or leave owner out",
        ));
    }
    if owner.len() > MAX_OWNER_LEN {
        return Err(bad(
            field,
            format!(
                "is {} bytes long: at most {MAX_OWNER_LEN}; name a team or a person",
                owner.len()
            ),
        ));
    }
    if owner.chars().any(char::is_control) {
        return Err(bad(
            field,
            format!("{owner:?} has a control character: write printable text on one line"),
        ));
    }
    Ok(Some(owner.to_owned()))
}

fn selectors(
    at: &dyn Fn(&str) -> String,
    texts: &[String],
    p: &mut Problems,
) -> Option<Vec<Selector>> {
    if texts.is_empty() {
        p.add(bad(
            at("selectors"),
            "is empty: an entry must require at least one selector, or it would admit every process",
        ));
        return None;
    }
    let mut selectors = Vec::with_capacity(texts.len());
    for (j, text) in texts.iter().enumerate() {
        let field = at(&format!("selectors[{j}]"));
        if let Some(s) = p.check(
            text.parse::<Selector>()
                .map_err(|e| bad(field, e.to_string())),
        ) {
            selectors.push(s);
        }
    }
    (selectors.len() == texts.len()).then_some(selectors)
}

fn template(field: &str, spec: &EntrySpec, td: Option<&TrustDomain>) -> Result<Template, Bad> {
    let text = spec.spiffe_id.as_deref().unwrap_or(DEFAULT_TEMPLATE);
    let template: Template = text.parse().map_err(|e| bad(field, format!("{e}")))?;
    if let Some(td) = td {
        // Render once with sample values so an ID that can never be valid is
        // caught now rather than at the first request.
        let sample = InstanceId::derive("sample", 1, 1, ExeId::new(1, 1, b"/bin/x"));
        template
            .render(&Context {
                trust_domain: td,
                entry: &spec.name,
                instance: &sample,
                uid: 0,
            })
            .map_err(|e| bad(field, format!("{e}")))?;
    }
    Ok(template)
}

fn tasks(at: &dyn Fn(&str) -> String, raw: &TaskSpec, p: &mut Problems) -> Option<TaskPolicy> {
    let defaults = TaskPolicy::default();
    let max_ttl = p.check(ttl(
        &at("tasks.max_ttl"),
        raw.max_ttl.as_deref(),
        defaults.max_ttl,
    ));
    let max_concurrent = p.check(match raw.max_concurrent {
        None => Ok(defaults.max_concurrent),
        Some(n) if (1..=MAX_CONCURRENT_LIMIT).contains(&n) => Ok(n as usize),
        Some(n) => Err(bad(
            at("tasks.max_concurrent"),
            format!("{n} is out of range: between 1 and {MAX_CONCURRENT_LIMIT}"),
        )),
    });
    let id_pattern = match raw.id_pattern.as_deref() {
        None => Some(None),
        Some(text) => p.check(glob::Pattern::new(text).map(Some).map_err(|e| {
            bad(
                at("tasks.id_pattern"),
                format!("{text:?} is not a glob pattern: {e}"),
            )
        })),
    };
    let burst = raw.begin_burst.unwrap_or(defaults.begin_rate.burst);
    let per_second = raw
        .begin_per_second
        .unwrap_or(1.0 / defaults.begin_rate.every.as_secs_f64());
    let begin_rate = p.check(BeginRate::new(burst, per_second).map_err(|e| {
        let field = match e {
            RateError::Burst(_) => "tasks.begin_burst",
            RateError::PerSecond(_) => "tasks.begin_per_second",
        };
        bad(at(field), e.to_string())
    }));
    Some(TaskPolicy {
        self_declare: raw.self_declare,
        max_ttl: max_ttl?,
        max_concurrent: max_concurrent?,
        id_pattern: id_pattern?,
        begin_rate: begin_rate?,
    })
}

pub(super) fn is_dns_name(name: &str) -> bool {
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

impl From<&Entry> for EntrySpec {
    /// The spec that validates back to `entry` (defaults left out).
    fn from(entry: &Entry) -> Self {
        let template = entry.spiffe_id.to_string();
        Self {
            name: entry.name.clone(),
            owner: entry.owner.clone(),
            selectors: entry.selectors.iter().map(ToString::to_string).collect(),
            spiffe_id: (template != DEFAULT_TEMPLATE).then_some(template),
            ttl: entry.ttl.map(duration_text),
            dns_names: entry.dns_names.clone(),
            tasks: (entry.tasks != TaskPolicy::default()).then(|| TaskSpec::from(&entry.tasks)),
        }
    }
}

impl From<&TaskPolicy> for TaskSpec {
    fn from(policy: &TaskPolicy) -> Self {
        Self {
            self_declare: policy.self_declare,
            max_ttl: Some(duration_text(policy.max_ttl)),
            max_concurrent: Some(u32::try_from(policy.max_concurrent).unwrap_or(u32::MAX)),
            id_pattern: policy.id_pattern.as_ref().map(|p| p.as_str().to_owned()),
            begin_burst: Some(policy.begin_rate.burst),
            begin_per_second: Some(1.0 / policy.begin_rate.every.as_secs_f64()),
        }
    }
}

fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
