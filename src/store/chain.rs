//! The audit trail's hash chain: the one rule for what a row's `hash`
//! covers (a canonical, unambiguous encoding of its content, chained to the
//! previous row's hash), the walk that checks a whole trail against that
//! rule, and the migration step that chains rows written before the chain
//! existed.
//!
//! It does not stop anyone from changing rows (the triggers in `schema.rs`
//! do that, for honest SQL); it makes a change, or a deleted row, visible.
//! Deleting the newest rows leaves a shorter chain that still verifies: only
//! a head kept elsewhere ([`AuditVerdict::head`]) shows that.

use rusqlite::types::ValueRef;
use rusqlite::{Connection, Row};
use sha2::{Digest, Sha256};

use super::{Error, sqlite};

/// Tags what is hashed, so an audit hash is never confused with another
/// SHA-256 Sigil computes.
pub(crate) const DOMAIN: &[u8] = b"sigil-audit-v1";

/// The previous hash of the first row.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// Rows chained per read by the migration step: bounds its memory.
const MIGRATION_BATCH: i64 = 512;

/// A row's content as stored (the detail as its JSON text): what its hash
/// covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link<'a> {
    pub(crate) seq: i64,
    pub(crate) at_ms: i64,
    pub(crate) kind: &'a str,
    pub(crate) actor: &'a str,
    pub(crate) instance_id: Option<&'a str>,
    pub(crate) task_id: Option<&'a str>,
    pub(crate) spiffe_id: Option<&'a str>,
    pub(crate) serial: Option<&'a str>,
    pub(crate) detail: &'a str,
}

impl Link<'_> {
    /// SHA-256 over the domain tag, `previous` (the previous row's hash,
    /// [`GENESIS`] for the first row) and the row: integers as 8 bytes big
    /// endian; every text as a presence byte (0 for NULL, 1 then its length
    /// as 8 bytes big endian, then its UTF-8 bytes). Fixed widths and
    /// prefixes make the encoding unambiguous: no two rows encode alike.
    pub(crate) fn hash(&self, previous: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(previous);
        h.update(self.seq.to_be_bytes());
        h.update(self.at_ms.to_be_bytes());
        for text in [
            Some(self.kind),
            Some(self.actor),
            self.instance_id,
            self.task_id,
            self.spiffe_id,
            self.serial,
            Some(self.detail),
        ] {
            match text {
                None => h.update([0]),
                Some(s) => {
                    h.update([1]);
                    h.update((s.len() as u64).to_be_bytes());
                    h.update(s.as_bytes());
                }
            }
        }
        h.finalize().into()
    }

    /// The hash as the `hash` column stores it (lower-case hex).
    pub(crate) fn hash_hex(&self, previous: &[u8; 32]) -> String {
        hex::encode(self.hash(previous))
    }
}

/// Columns a walk reads, in the order [`link_from_row`] expects; the
/// stored hash comes last.
const CHAIN_COLUMNS: &str =
    "seq, at_ms, kind, actor, instance_id, task_id, spiffe_id, serial, detail, hash";

/// Reads a row selected with [`CHAIN_COLUMNS`], borrowing its text.
fn link_from_row<'r>(row: &'r Row<'_>) -> rusqlite::Result<(Link<'r>, Option<&'r str>)> {
    let text = |idx: usize| -> rusqlite::Result<Option<&'r str>> {
        match row.get_ref(idx)? {
            ValueRef::Null => Ok(None),
            value => value.as_str().map(Some).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(idx, value.data_type(), Box::new(e))
            }),
        }
    };
    let required = |idx: usize| -> rusqlite::Result<&'r str> {
        text(idx)?.ok_or(rusqlite::Error::InvalidColumnType(
            idx,
            "NULL".to_owned(),
            rusqlite::types::Type::Null,
        ))
    };
    let link = Link {
        seq: row.get(0)?,
        at_ms: row.get(1)?,
        kind: required(2)?,
        actor: required(3)?,
        instance_id: text(4)?,
        task_id: text(5)?,
        spiffe_id: text(6)?,
        serial: text(7)?,
        detail: required(8)?,
    };
    Ok((link, text(9)?))
}

/// The previous hash a stored hash stands for: its bytes, or [`GENESIS`]
/// when it is missing or not 64 hex digits (that row fails verification
/// itself, so what comes after it matters less).
pub(crate) fn previous_of(stored: Option<&str>) -> [u8; 32] {
    let mut bytes = GENESIS;
    match stored.map(|s| hex::decode_to_slice(s, &mut bytes)) {
        Some(Ok(())) => bytes,
        _ => GENESIS,
    }
}

/// What [`Store::verify_audit`](super::Store::verify_audit) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerdict {
    /// Rows in the trail.
    pub rows: u64,
    /// The first row that breaks the chain; `None` when every row verifies.
    pub first_bad: Option<BrokenLink>,
    /// The newest row's stored hash: keep it elsewhere (a log, a ticket) to
    /// detect later that the newest rows were deleted. `None` for an empty
    /// trail.
    pub head: Option<String>,
}

/// A row whose hash does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    /// The row's sequence number.
    pub seq: i64,
    /// What is wrong, and what most likely happened, for people.
    pub problem: String,
}

/// A walk over the trail in `seq` order, one row at a time (O(1) memory).
#[derive(Debug, Default)]
pub(crate) struct Walk {
    rows: u64,
    /// The previous row's seq and stored hash bytes.
    previous: Option<(i64, [u8; 32])>,
    first_bad: Option<BrokenLink>,
    head: Option<String>,
}

impl Walk {
    /// Checks the next row against the previous row's stored hash.
    pub(crate) fn step(&mut self, link: &Link<'_>, stored: Option<&str>) {
        self.rows += 1;
        self.head = stored.map(str::to_owned);
        if self.first_bad.is_none()
            && let Some(problem) = self.problem(link, stored)
        {
            self.first_bad = Some(BrokenLink {
                seq: link.seq,
                problem,
            });
        }
        self.previous = Some((link.seq, previous_of(stored)));
    }

    /// What is wrong with this row, if anything. Sequence numbers have no
    /// gaps (AUTOINCREMENT, and a rolled-back append takes its number back
    /// with it), so a gap is a deletion even where the hashes match: after
    /// the newest rows are deleted, the next append chains to the row
    /// before them.
    fn problem(&self, link: &Link<'_>, stored: Option<&str>) -> Option<String> {
        let seq = link.seq;
        let Some(stored) = stored else {
            return Some(format!(
                "row {seq} has no hash: it was written by something other than Sigil, or its hash was cleared"
            ));
        };
        let (previous_seq, previous) = self.previous.unwrap_or((0, GENESIS));
        let matches = link.hash_hex(&previous) == stored;
        if seq != previous_seq + 1 {
            let gone = if previous_seq + 1 == seq - 1 {
                format!("row {} was", previous_seq + 1)
            } else {
                format!("rows {} to {} were", previous_seq + 1, seq - 1)
            };
            let place = if previous_seq == 0 {
                format!("row {seq} is the first row")
            } else {
                format!("row {seq} follows row {previous_seq}")
            };
            let changed = if matches {
                String::new()
            } else {
                format!(" (or row {seq} itself was changed)")
            };
            return Some(format!("{place}: {gone} deleted{changed}"));
        }
        if matches {
            None
        } else if previous_seq == 0 {
            Some(format!(
                "row {seq} does not match its hash: the row was changed"
            ))
        } else {
            Some(format!(
                "row {seq} does not match its hash and the hash of row {previous_seq}: the row was changed (or the hash of row {previous_seq} was rewritten)"
            ))
        }
    }

    pub(crate) fn verdict(self) -> AuditVerdict {
        AuditVerdict {
            rows: self.rows,
            first_bad: self.first_bad,
            head: self.head,
        }
    }
}

/// Walks the whole trail in `seq` order, in one read transaction (a
/// consistent snapshot while the writer goes on).
pub(crate) fn verify(conn: &Connection) -> Result<AuditVerdict, Error> {
    let fail = sqlite("verify the audit chain");
    let mut stmt = conn
        .prepare(&format!("SELECT {CHAIN_COLUMNS} FROM audit ORDER BY seq"))
        .map_err(&fail)?;
    let mut rows = stmt.query([]).map_err(&fail)?;
    let mut walk = Walk::default();
    while let Some(row) = rows.next().map_err(&fail)? {
        let (link, stored) = link_from_row(row).map_err(&fail)?;
        walk.step(&link, stored);
    }
    Ok(walk.verdict())
}

/// The migration step that chains the rows written before the chain
/// existed, in `seq` order, a batch at a time. Runs inside the migration's
/// transaction, between the SQL steps that drop and recreate the trigger
/// refusing updates.
pub(crate) fn chain_existing_rows(conn: &Connection) -> Result<(), Error> {
    let fail = sqlite("chain the existing audit rows");
    let select = format!(
        "SELECT {CHAIN_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT {MIGRATION_BATCH}"
    );
    let mut previous = GENESIS;
    let mut after = i64::MIN;
    loop {
        let mut batch = Vec::new();
        {
            let mut stmt = conn.prepare_cached(&select).map_err(&fail)?;
            let mut rows = stmt.query([after]).map_err(&fail)?;
            while let Some(row) = rows.next().map_err(&fail)? {
                let (link, _) = link_from_row(row).map_err(&fail)?;
                previous = link.hash(&previous);
                batch.push((link.seq, hex::encode(previous)));
            }
        }
        let Some(&(last, _)) = batch.last() else {
            return Ok(());
        };
        let mut update = conn
            .prepare_cached("UPDATE audit SET hash = ?2 WHERE seq = ?1")
            .map_err(&fail)?;
        for (seq, hash) in &batch {
            update
                .execute(rusqlite::params![seq, hash])
                .map_err(&fail)?;
        }
        after = last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(seq: i64, detail: &str) -> Link<'_> {
        Link {
            seq,
            at_ms: 1_700_000_000_000,
            kind: "admin",
            actor: "admin uid:0",
            instance_id: Some("i1"),
            task_id: None,
            spiffe_id: None,
            serial: None,
            detail,
        }
    }

    /// Hashes of a chain of rows 1..=n, as `append` would store them.
    fn chain(details: &[&str]) -> Vec<String> {
        let mut previous = GENESIS;
        details
            .iter()
            .zip(1..)
            .map(|(detail, seq)| {
                previous = link(seq, detail).hash(&previous);
                hex::encode(previous)
            })
            .collect()
    }

    #[test]
    fn the_hash_is_sha256_over_the_documented_encoding() {
        let row = Link {
            task_id: Some("t"),
            ..link(7, "{}")
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(b"sigil-audit-v1");
        expected.extend_from_slice(&[0xAB; 32]);
        expected.extend_from_slice(&7_i64.to_be_bytes());
        expected.extend_from_slice(&1_700_000_000_000_i64.to_be_bytes());
        for text in [
            Some("admin"),
            Some("admin uid:0"),
            Some("i1"),
            Some("t"),
            None,
            None,
            Some("{}"),
        ] {
            match text {
                None => expected.push(0),
                Some(s) => {
                    expected.push(1);
                    expected.extend_from_slice(&(s.len() as u64).to_be_bytes());
                    expected.extend_from_slice(s.as_bytes());
                }
            }
        }
        let digest: [u8; 32] = Sha256::digest(&expected).into();
        assert_eq!(row.hash(&[0xAB; 32]), digest);
    }

    #[test]
    fn a_null_and_an_empty_text_hash_differently() {
        let null = link(1, "{}");
        let empty = Link {
            instance_id: Some(""),
            ..null
        };
        assert_ne!(null.hash(&GENESIS), empty.hash(&GENESIS));
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_hash() {
        let a = Link {
            actor: "ab",
            instance_id: Some("c"),
            ..link(1, "{}")
        };
        let b = Link {
            actor: "a",
            instance_id: Some("bc"),
            ..a
        };
        assert_ne!(a.hash(&GENESIS), b.hash(&GENESIS));
    }

    #[test]
    fn every_field_and_the_previous_hash_are_covered() {
        let base = link(1, "{}");
        let variants = [
            Link { seq: 2, ..base },
            Link { at_ms: 0, ..base },
            Link {
                kind: "issuance",
                ..base
            },
            Link { actor: "x", ..base },
            Link {
                instance_id: None,
                ..base
            },
            Link {
                task_id: Some("t"),
                ..base
            },
            Link {
                spiffe_id: Some("s"),
                ..base
            },
            Link {
                serial: Some("01"),
                ..base
            },
            Link {
                detail: "null",
                ..base
            },
        ];
        for v in variants {
            assert_ne!(v.hash(&GENESIS), base.hash(&GENESIS), "{v:?}");
        }
        assert_ne!(base.hash(&[1; 32]), base.hash(&GENESIS));
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        let details = ["{}", "{\"a\":1}", "null"];
        let hashes = chain(&details);
        let mut walk = Walk::default();
        for (seq, (detail, hash)) in (1..).zip(details.iter().zip(&hashes)) {
            walk.step(&link(seq, detail), Some(hash));
        }
        let verdict = walk.verdict();
        assert_eq!(verdict.rows, 3);
        assert_eq!(verdict.first_bad, None);
        assert_eq!(verdict.head.as_deref(), Some(hashes[2].as_str()));
    }

    #[test]
    fn a_changed_row_is_named_and_the_rows_after_it_still_chain() {
        let hashes = chain(&["{}", "{}", "{}"]);
        let mut walk = Walk::default();
        walk.step(&link(1, "{}"), Some(&hashes[0]));
        walk.step(&link(2, "{\"forged\":true}"), Some(&hashes[1]));
        walk.step(&link(3, "{}"), Some(&hashes[2]));
        let bad = walk.verdict().first_bad.unwrap();
        assert_eq!(bad.seq, 2);
        assert!(bad.problem.contains("changed"), "{}", bad.problem);
    }

    #[test]
    fn a_gap_in_the_sequence_is_reported_as_deleted_rows() {
        let hashes = chain(&["{}", "{}", "{}", "{}"]);
        let mut walk = Walk::default();
        walk.step(&link(1, "{}"), Some(&hashes[0]));
        walk.step(&link(4, "{}"), Some(&hashes[3]));
        let bad = walk.verdict().first_bad.unwrap();
        assert_eq!(bad.seq, 4);
        assert!(
            bad.problem.contains("rows 2 to 3 were deleted"),
            "{}",
            bad.problem
        );
    }

    #[test]
    fn a_gap_is_reported_even_where_the_hashes_chain() {
        let mut walk = Walk::default();
        let first = link(1, "{}").hash(&GENESIS);
        walk.step(&link(1, "{}"), Some(&hex::encode(first)));
        let third = link(3, "{}").hash(&first);
        walk.step(&link(3, "{}"), Some(&hex::encode(third)));
        let bad = walk.verdict().first_bad.unwrap();
        assert_eq!(bad.seq, 3);
        assert_eq!(bad.problem, "row 3 follows row 1: row 2 was deleted");
    }

    #[test]
    fn deleting_the_first_rows_is_reported() {
        let hashes = chain(&["{}", "{}"]);
        let mut walk = Walk::default();
        walk.step(&link(2, "{}"), Some(&hashes[1]));
        let bad = walk.verdict().first_bad.unwrap();
        assert_eq!(bad.seq, 2);
        assert!(bad.problem.contains("row 1 was deleted"), "{}", bad.problem);
    }

    #[test]
    fn a_missing_hash_is_named_as_such() {
        let mut walk = Walk::default();
        walk.step(&link(1, "{}"), None);
        let verdict = walk.verdict();
        let bad = verdict.first_bad.unwrap();
        assert_eq!(bad.seq, 1);
        assert!(bad.problem.contains("no hash"), "{}", bad.problem);
        assert_eq!(verdict.head, None);
    }

    #[test]
    fn a_stored_hash_that_is_not_hex_chains_from_genesis() {
        assert_eq!(previous_of(Some("not hex")), GENESIS);
        assert_eq!(previous_of(None), GENESIS);
        assert_eq!(previous_of(Some(&hex::encode([7; 32]))), [7; 32]);
    }
}
