//! `sigil entries create --file`: one entry in TOML, as a config file's
//! `[[entry]]` table (or its keys at the top level), into the proto fields.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use super::entries::proto_duration;
use crate::proto::sigil::admin::v1::{Entry, TaskPolicy};

/// One entry as written in a file: the config file's `[[entry]]` keys,
/// plus `owner`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    name: String,
    selectors: Vec<String>,
    spiffe_id: Option<String>,
    ttl: Option<String>,
    #[serde(default)]
    dns_names: Vec<String>,
    owner: Option<String>,
    tasks: Option<TasksFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksFile {
    #[serde(default)]
    self_declare: bool,
    max_ttl: Option<String>,
    max_concurrent: Option<u32>,
    id_pattern: Option<String>,
    begin_burst: Option<u32>,
    begin_per_second: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesFile {
    entry: Vec<EntryFile>,
}

pub fn read_entry_file(path: &Path) -> anyhow::Result<Entry> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_entry_file(&text).with_context(|| format!("{}", path.display()))
}

/// Parses one entry: a single `[[entry]]` table, or its keys at the top
/// level. Durations are humantime ("10m").
fn parse_entry_file(text: &str) -> anyhow::Result<Entry> {
    let table: toml::Table = toml::from_str(text)?;
    let raw = if table.contains_key("entry") {
        let mut file: EntriesFile = table.try_into()?;
        if file.entry.len() != 1 {
            anyhow::bail!(
                "holds {} [[entry]] tables; give one per file",
                file.entry.len()
            );
        }
        file.entry.remove(0)
    } else {
        table.try_into()?
    };
    let duration = |field: &str, text: &Option<String>| -> anyhow::Result<_> {
        text.as_deref()
            .map(|t| {
                let d = humantime::parse_duration(t)
                    .with_context(|| format!("{field} = {t:?} is not a duration like \"10m\""))?;
                proto_duration(d, field)
            })
            .transpose()
    };
    let tasks = raw
        .tasks
        .as_ref()
        .map(|t| -> anyhow::Result<TaskPolicy> {
            Ok(TaskPolicy {
                self_declare: t.self_declare,
                max_ttl: duration("tasks.max_ttl", &t.max_ttl)?,
                max_concurrent: t.max_concurrent.unwrap_or(0),
                id_pattern: t.id_pattern.clone().unwrap_or_default(),
                begin_burst: t.begin_burst.unwrap_or(0),
                begin_per_second: t.begin_per_second.unwrap_or(0.0),
            })
        })
        .transpose()?;
    Ok(Entry {
        ttl: duration("ttl", &raw.ttl)?,
        name: raw.name,
        selectors: raw.selectors,
        spiffe_id: raw.spiffe_id.unwrap_or_default(),
        dns_names: raw.dns_names,
        owner: raw.owner.unwrap_or_default(),
        tasks,
        ..Entry::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[entry]]
name = "research-bot"
selectors = ["unix:uid:1000", "unix:path:/opt/bot/python3"]
ttl = "30m"
dns_names = ["bot.local"]
owner = "team-a"

[entry.tasks]
self_declare = true
max_ttl = "10m"
max_concurrent = 8
id_pattern = "ticket-*"
"#;

    #[test]
    fn an_entry_file_holds_one_entry_table() {
        let entry = parse_entry_file(FILE).unwrap();
        assert_eq!(entry.name, "research-bot");
        assert_eq!(entry.selectors.len(), 2);
        assert_eq!(entry.ttl.unwrap().seconds, 1800);
        assert_eq!(entry.owner, "team-a");
        assert_eq!(entry.dns_names, ["bot.local"]);
        let tasks = entry.tasks.unwrap();
        assert!(tasks.self_declare);
        assert_eq!(tasks.max_ttl.unwrap().seconds, 600);
        assert_eq!(
            (tasks.max_concurrent, tasks.id_pattern.as_str()),
            (8, "ticket-*")
        );
    }

    #[test]
    fn an_entry_file_may_give_the_keys_at_the_top_level() {
        let entry = parse_entry_file("name = \"a\"\nselectors = [\"unix:uid:0\"]\n").unwrap();
        assert_eq!(entry.name, "a");
        assert!(entry.tasks.is_none() && entry.ttl.is_none());
    }

    #[test]
    fn a_bad_entry_file_says_what_is_wrong() {
        let two = format!("{FILE}\n[[entry]]\nname = \"b\"\nselectors = []\n");
        assert!(format!("{:#}", parse_entry_file(&two).unwrap_err()).contains("give one per file"));
        let unknown = "name = \"a\"\nselectors = []\ncolour = \"red\"\n";
        assert!(format!("{:#}", parse_entry_file(unknown).unwrap_err()).contains("colour"));
        let ttl = "name = \"a\"\nselectors = []\nttl = \"soon\"\n";
        assert!(format!("{:#}", parse_entry_file(ttl).unwrap_err()).contains("ttl = \"soon\""));
    }
}
