//! Shared output helpers for the admin commands: plain tables, relative
//! and RFC 3339 times, durations, sizes and JSON.
//!
//! Every renderer takes `now` as an argument, so tests fix the clock.

use std::io::Write;

use comfy_table::{Table, presets};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A table with a header row, no borders and no colours; columns are
/// separated by two spaces of padding (comfy-table's, not ours).
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.force_no_tty();
    table.set_header(header.to_vec());
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

/// A two-column table of names and values, with no header.
pub fn key_values<'a>(rows: impl IntoIterator<Item = (&'a str, String)>) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.force_no_tty();
    for (key, value) in rows {
        table.add_row(vec![format!("{key}:"), value]);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

/// Writes a table without trailing spaces, ending in a newline.
///
/// # Errors
/// When the output cannot be written.
pub fn write_table(out: &mut impl Write, table: &Table) -> std::io::Result<()> {
    writeln!(out, "{}", table.trim_fmt())
}

/// Writes `value` as pretty JSON and a newline.
///
/// # Errors
/// When the output cannot be written.
pub fn write_json<T: Serialize>(out: &mut impl Write, value: &T) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// A protobuf timestamp as a time; unset (and the epoch, which no daemon
/// sends for a real event) is `None`.
pub fn time_of(ts: Option<&prost_types::Timestamp>) -> Option<OffsetDateTime> {
    let ts = ts?;
    if ts.seconds == 0 && ts.nanos == 0 {
        return None;
    }
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// A timestamp as RFC 3339 in UTC for JSON; `None` (null) when unset.
pub fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    time_of(ts).and_then(|t| t.format(&Rfc3339).ok())
}

/// A timestamp as RFC 3339 in UTC to the second, for people.
pub fn rfc3339_seconds(ts: Option<&prost_types::Timestamp>) -> String {
    time_of(ts)
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".to_owned())
}

/// `t` relative to `now` in one rounded unit: "in 42m", "3m ago", "in 5s",
/// "2h ago", "in 3d"; "now" within a second.
pub fn relative(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let delta = t - now;
    let secs = delta.as_seconds_f64().abs();
    if secs < 1.0 {
        return "now".to_owned();
    }
    let amount = one_unit(secs);
    if delta.is_positive() {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// A span of seconds in one rounded unit ("42m").
fn one_unit(secs: f64) -> String {
    let s = secs.round();
    if s < 60.0 {
        return format!("{s}s");
    }
    let m = (secs / 60.0).round();
    if m < 60.0 {
        return format!("{m}m");
    }
    let h = (secs / 3600.0).round();
    if h < 24.0 {
        return format!("{h}h");
    }
    format!("{}d", (secs / 86_400.0).round())
}

/// A timestamp relative to `now`, or "-" when unset.
pub fn relative_or_dash(ts: Option<&prost_types::Timestamp>, now: OffsetDateTime) -> String {
    time_of(ts).map_or_else(|| "-".to_owned(), |t| relative(t, now))
}

/// A protobuf duration in whole seconds for JSON; `None` when unset.
pub fn seconds(d: Option<&prost_types::Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.seconds).unwrap_or(0))
}

/// A protobuf duration for people ("10m", "1h 30m"), or `unset`.
pub fn duration(d: Option<&prost_types::Duration>, unset: &str) -> String {
    seconds(d).map_or_else(
        || unset.to_owned(),
        |s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
    )
}

/// A byte count for people ("512 B", "1.5 KiB", "3.2 MiB").
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// An empty string as `None`, for optional JSON fields.
pub fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// An empty string as "-", for table cells.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// An id shortened to 12 characters for a table cell.
pub fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    /// A rendered table's header names (columns are two or more spaces
    /// apart; a name holds at most one).
    pub(crate) fn header_cells(text: &str) -> Vec<String> {
        text.lines()
            .next()
            .unwrap_or_default()
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub(crate) fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
    }

    fn rel(offset: i64) -> String {
        let now = now();
        relative(now + time::Duration::seconds(offset), now)
    }

    #[test]
    fn relative_times_use_one_rounded_unit() {
        assert_eq!(rel(42 * 60), "in 42m");
        assert_eq!(rel(-3 * 60), "3m ago");
        assert_eq!(rel(5), "in 5s");
        assert_eq!(rel(-2 * 3600), "2h ago");
        assert_eq!(rel(3 * 86_400), "in 3d");
        assert_eq!(rel(0), "now");
        assert_eq!(
            rel(59 * 60 + 50),
            "in 1h",
            "59m50s rounds up to the next unit"
        );
        assert_eq!(rel(-(42 * 60 + 29)), "42m ago");
        assert_eq!(rel(90), "in 2m");
    }

    #[test]
    fn json_times_are_rfc3339_utc_and_unset_is_none() {
        assert_eq!(
            rfc3339(ts(1_700_000_000).as_ref()).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        let with_nanos = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 500_000_000,
        };
        assert_eq!(
            rfc3339(Some(&with_nanos)).as_deref(),
            Some("2023-11-14T22:13:20.5Z")
        );
        assert_eq!(rfc3339(None), None);
        assert_eq!(rfc3339(Some(&prost_types::Timestamp::default())), None);
        assert_eq!(rfc3339_seconds(Some(&with_nanos)), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn tables_have_no_borders_and_no_trailing_spaces() {
        let mut t = table(&["NAME", "SPIFFE ID"]);
        t.add_row(vec!["a", "spiffe://x/y"]);
        let text = t.trim_fmt();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "NAME  SPIFFE ID");
        assert_eq!(lines[1], "a     spiffe://x/y");
    }

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        let d = prost_types::Duration {
            seconds: 5400,
            nanos: 0,
        };
        assert_eq!(duration(Some(&d), "default"), "1h 30m");
        assert_eq!(duration(None, "default"), "default");
    }
}
