//! Who may call the admin API: the one rule, from the caller's peer
//! credentials (SO_PEERCRED, taken by the kernel at connect) and, for group
//! membership, its supplementary groups from /proc.
//!
//! The socket's mode already keeps others out (0600, or 0660 with the admin
//! group); this check holds even when the mode does not (a socket made
//! world-writable by hand, a descriptor passed to another user).

use std::fmt;

/// Who called, as the kernel says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Its uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
    /// Its pid at connect.
    pub pid: u32,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "admin uid:{} pid:{}", self.uid, self.pid)
    }
}

/// The callers the admin API admits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// The daemon's own uid.
    pub daemon_uid: u32,
    /// `[admin_api] allowed_uids`.
    pub allowed_uids: Vec<u32>,
    /// `[admin_api] group`'s gid.
    pub group: Option<u32>,
}

impl Access {
    /// Admits root, the daemon's uid, `allowed_uids` and members of the
    /// group (as their effective gid or a supplementary group, read by
    /// `groups_of` only when needed).
    ///
    /// # Errors
    /// Why the caller is refused, for its error and the audit row.
    pub fn admit(
        &self,
        caller: &Caller,
        groups_of: impl FnOnce(u32) -> Option<Vec<u32>>,
    ) -> Result<(), String> {
        if caller.uid == 0
            || caller.uid == self.daemon_uid
            || self.allowed_uids.contains(&caller.uid)
        {
            return Ok(());
        }
        if let Some(group) = self.group
            && (caller.gid == group || groups_of(caller.pid).is_some_and(|g| g.contains(&group)))
        {
            return Ok(());
        }
        Err(format!(
            "uid {} may not use the admin API: it is for root, the daemon's uid ({}), [admin_api] allowed_uids and members of [admin_api] group",
            caller.uid, self.daemon_uid
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, gid: u32) -> Caller {
        Caller { uid, gid, pid: 42 }
    }

    #[test]
    fn root_the_daemon_and_allowed_uids_are_admitted_without_reading_groups() {
        let access = Access {
            daemon_uid: 999,
            allowed_uids: vec![1001],
            group: Some(50),
        };
        let never = |_| -> Option<Vec<u32>> { panic!("groups need not be read") };
        for uid in [0, 999, 1001] {
            assert_eq!(access.admit(&caller(uid, 100), never), Ok(()));
        }
    }

    #[test]
    fn a_member_of_the_group_is_admitted_by_its_gid_or_supplementary_groups() {
        let access = Access {
            daemon_uid: 999,
            allowed_uids: vec![],
            group: Some(50),
        };
        assert_eq!(access.admit(&caller(1002, 50), |_| None), Ok(()));
        assert_eq!(
            access.admit(&caller(1002, 100), |_| Some(vec![7, 50])),
            Ok(())
        );
        let refused = access
            .admit(&caller(1002, 100), |_| Some(vec![7]))
            .unwrap_err();
        assert!(
            refused.contains("uid 1002 may not use the admin API"),
            "{refused}"
        );
    }

    #[test]
    fn without_a_group_others_are_refused_whatever_their_groups() {
        let access = Access {
            daemon_uid: 999,
            allowed_uids: vec![],
            group: None,
        };
        assert!(access.admit(&caller(65534, 0), |_| Some(vec![0])).is_err());
    }
}
