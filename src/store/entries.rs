//! Registration entries created over the admin API, kept across restarts.
//! The store keeps each one opaque (its spec as JSON text, under its name):
//! `config` validates a spec and `policy` matches with it; neither lives
//! here. Entries from the configuration file are not stored.

use std::time::SystemTime;

use rusqlite::{Connection, Row, params};

use super::records::{collect, from_ms, is_duplicate, to_ms};
use super::{Error, sqlite};

/// A registration entry created at run time, as stored.
///
/// Times are stored to the millisecond.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The entry's name, unique among stored entries.
    pub name: String,
    /// The entry's spec as JSON text, as `config` wrote it (opaque here).
    pub spec_json: String,
    /// Who owns it (e.g. a team), if anyone said.
    pub owner: Option<String>,
    /// When it was created.
    pub created_at: SystemTime,
    /// Who created it (e.g. `admin uid:0`).
    pub created_by: String,
}

/// Inserts an entry; refuses a name already stored.
pub(crate) fn insert_entry(conn: &Connection, entry: &StoredEntry) -> Result<(), Error> {
    let result = conn
        .prepare_cached(
            "INSERT INTO entries (name, spec, owner, created_at_ms, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                entry.name,
                entry.spec_json,
                entry.owner,
                to_ms(entry.created_at),
                entry.created_by,
            ])
        });
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_duplicate(&e) => Err(Error::EntryExists {
            name: entry.name.clone(),
        }),
        Err(e) => Err(sqlite("insert entry")(e)),
    }
}

/// Deletes an entry; returns whether it existed.
pub(crate) fn delete_entry(conn: &Connection, name: &str) -> Result<bool, Error> {
    conn.prepare_cached("DELETE FROM entries WHERE name = ?1")
        .and_then(|mut stmt| stmt.execute([name]))
        .map(|deleted| deleted > 0)
        .map_err(sqlite("delete entry"))
}

/// Every stored entry in creation order (the order they were inserted, by
/// creation time, then insertion).
pub(crate) fn stored_entries(conn: &Connection) -> Result<Vec<StoredEntry>, Error> {
    collect(
        conn,
        "SELECT name, spec, owner, created_at_ms, created_by FROM entries
         ORDER BY created_at_ms, rowid",
        [],
        entry_from_row,
    )
    .map_err(sqlite("list stored entries"))
}

fn entry_from_row(row: &Row<'_>) -> rusqlite::Result<StoredEntry> {
    Ok(StoredEntry {
        name: row.get(0)?,
        spec_json: row.get(1)?,
        owner: row.get(2)?,
        created_at: from_ms(row.get(3)?),
        created_by: row.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::StoredEntry;
    use crate::store::Error;
    use crate::store::fixtures::{store, t};

    fn entry(name: &str, secs: u64) -> StoredEntry {
        StoredEntry {
            name: name.to_owned(),
            spec_json: format!(r#"{{"spiffe_id":"spiffe://example.org/{name}"}}"#),
            owner: Some("team-a".to_owned()),
            created_at: t(secs),
            created_by: "admin uid:0".to_owned(),
        }
    }

    #[test]
    fn stored_entries_read_back_in_creation_order() {
        let (_dir, store) = store();
        let (b, a) = (entry("b", 1), entry("a", 2));
        let no_owner = StoredEntry {
            owner: None,
            ..entry("c", 2)
        };
        for e in [b.clone(), a.clone(), no_owner.clone()] {
            store.write(move |tx| tx.insert_entry(&e)).unwrap();
        }
        assert_eq!(store.stored_entries().unwrap(), vec![b, a, no_owner]);
    }

    #[test]
    fn a_taken_name_is_refused_with_a_message_that_names_the_fix() {
        let (_dir, store) = store();
        store.write(|tx| tx.insert_entry(&entry("web", 1))).unwrap();
        let err = store
            .write(|tx| tx.insert_entry(&entry("web", 2)))
            .unwrap_err();
        assert!(
            matches!(&err, Error::EntryExists { name } if name == "web"),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("delete it first") && text.contains("web"),
            "{text}"
        );
        assert_eq!(store.stored_entries().unwrap(), vec![entry("web", 1)]);
    }

    #[test]
    fn deleting_says_whether_the_entry_existed_and_frees_its_name() {
        let (_dir, store) = store();
        store.write(|tx| tx.insert_entry(&entry("web", 1))).unwrap();
        assert!(store.write(|tx| tx.delete_entry("web")).unwrap());
        assert!(!store.write(|tx| tx.delete_entry("web")).unwrap());
        assert!(store.stored_entries().unwrap().is_empty());
        store.write(|tx| tx.insert_entry(&entry("web", 3))).unwrap();
        assert_eq!(store.stored_entries().unwrap(), vec![entry("web", 3)]);
    }
}
