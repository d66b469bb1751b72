//! File-system safety: directories only root or the daemon's user can
//! change, private directories and files, and the workload socket bound only
//! where nothing else lies.
//!
//! One rule, kept here and used for the socket directory, the state
//! directory and the CA directory: every directory on the way to them, and
//! every symlink followed on the way, is owned by root or by the daemon's
//! uid, and no directory is writable by group or others unless it is sticky
//! (as `/tmp` is). Otherwise another user could swap a directory for their
//! own, and the daemon would keep its CA key there or serve a socket root's
//! `sigil fetch` no longer reaches. The walk resolves symlinks itself with
//! `lstat`, as the kernel would, so a symlink cannot hide an ancestor.
//!
//! What the daemon alone may read (the state and CA directories, the CA key,
//! the store, fetched keys) is made here too: directories 0700 and files
//! 0600, the mode set explicitly so the umask cannot loosen or tighten it.
//!
//! Does not own: what goes inside those directories (`ca`, `store`), or the
//! server on the socket (`workload_api`).

use std::ffi::OsString;
use std::fs::{self, DirBuilder, Metadata, OpenOptions, Permissions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;

/// How many symlinks one path may go through (Linux's own limit).
const MAX_SYMLINKS: usize = 40;
/// Mode of a private directory (state, CA): the owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of a private file (the CA key, the store): the owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Why a path is not safe to use, or a socket cannot be bound there.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Someone other than root or the daemon's user could change this path.
    #[error(
        "{path} is {reason}: whoever that is could swap it for their own, so the daemon will not use it; {fix}"
    )]
    Untrusted {
        /// The directory or symlink.
        path: PathBuf,
        /// Who else controls it.
        reason: String,
        /// What the operator should do.
        fix: String,
    },
    /// Something that is not a socket lies at the socket path.
    #[error(
        "{path} is {what}, not a socket; remove it yourself (the daemon does not delete what it did not create), or choose another socket path"
    )]
    NotASocket {
        /// The socket path.
        path: PathBuf,
        /// What is there instead.
        what: String,
    },
    /// Another process already serves on this socket.
    #[error("another process is already serving on {0}; stop it, or choose another socket path")]
    InUse(PathBuf),
    /// A file-system call failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: Arc<io::Error>,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl Fn(io::Error) -> Error + 'a {
    move |e| Error::Io {
        action,
        path: path.to_owned(),
        source: Arc::new(e),
    }
}

/// Checks that only root or the daemon's user can change what `path`
/// resolves to: every existing directory from `/` down, and every symlink
/// on the way. A missing tail is fine (the daemon creates it next).
///
/// # Errors
/// [`Error::Untrusted`] naming the first unsafe directory or symlink and
/// its owner; [`Error::Io`] when a path cannot be inspected.
pub fn check_trusted_path(path: &Path) -> Result<(), Error> {
    let me = nix::unistd::geteuid().as_raw();
    let absolute = std::path::absolute(path).map_err(io_error("resolve", path))?;
    let root = PathBuf::from("/");
    check_directory(&root, &lstat(&root)?, me)?;
    let mut resolved = root;
    let mut todo = Vec::new();
    push_components(&mut todo, &absolute);
    let mut links = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let next = resolved.join(&name);
        let meta = match fs::symlink_metadata(&next) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("inspect", &next)(e)),
        };
        if meta.file_type().is_symlink() {
            check_owner(&next, &meta, me, "a symlink")?;
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(io_error("resolve", path)(io::Error::other(
                    "too many levels of symbolic links",
                )));
            }
            let target = fs::read_link(&next).map_err(io_error("read the symlink", &next))?;
            if target.is_absolute() {
                resolved = PathBuf::from("/");
            }
            push_components(&mut todo, &target);
            continue;
        }
        check_directory(&next, &meta, me)?;
        resolved = next;
    }
    Ok(())
}

/// Pushes `path`'s components so that the first is popped first; `..`
/// stays as a marker, `.` and the root are dropped.
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    let names: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(names.into_iter().rev());
}

fn lstat(path: &Path) -> Result<Metadata, Error> {
    fs::symlink_metadata(path).map_err(io_error("inspect", path))
}

/// A directory on a trusted path: owned by root or us, and not writable by
/// group or others unless sticky.
fn check_directory(path: &Path, meta: &Metadata, me: u32) -> Result<(), Error> {
    if !meta.is_dir() {
        return Err(Error::Untrusted {
            path: path.to_owned(),
            reason: "not a directory".to_owned(),
            fix: "use a path made of directories".to_owned(),
        });
    }
    check_owner(path, meta, me, "a directory")?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(Error::Untrusted {
            path: path.to_owned(),
            reason: format!(
                "a directory writable by group or others without the sticky bit (mode {mode:o})"
            ),
            fix: format!("run chmod go-w {}, or choose another path", path.display()),
        });
    }
    Ok(())
}

fn check_owner(path: &Path, meta: &Metadata, me: u32, what: &str) -> Result<(), Error> {
    let owner = meta.uid();
    if owner == 0 || owner == me {
        return Ok(());
    }
    Err(Error::Untrusted {
        path: path.to_owned(),
        reason: format!(
            "{what} owned by {}, not by root or the daemon's uid {me}",
            describe_uid(owner)
        ),
        fix: format!(
            "make root or uid {me} its owner (chown), or choose a path that only root or uid {me} can change"
        ),
    })
}

/// `uid 65534 (nobody)`, or `uid 1234` when it has no name.
fn describe_uid(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

/// Creates `dir` (and missing parents) with `mode` on a trusted path, and
/// checks the whole path again once it exists.
///
/// # Errors
/// As [`check_trusted_path`], or [`Error::Io`] when it cannot be created.
pub fn create_trusted_dir(dir: &Path, mode: u32) -> Result<(), Error> {
    check_trusted_path(dir)?;
    create_dir_with_mode(dir, mode)?;
    check_trusted_path(dir)
}

/// Creates `dir` and its missing parents if it is missing, and gives the
/// new directory exactly `mode`, whatever the umask. An existing directory
/// is left as it is. Checks nothing about the path: see
/// [`create_trusted_dir`] for that.
///
/// # Errors
/// [`Error::Io`] naming the step that failed.
pub fn create_dir_with_mode(dir: &Path, mode: u32) -> Result<(), Error> {
    if dir.exists() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_error("create the directory", dir))?;
    // The umask may have taken rights away that the mode asked for.
    // Through a descriptor opened without following a symlink: a path
    // under a shared sticky directory could be swapped for a link to
    // another file between the mkdir and the chmod.
    let opened = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io_error("open the new directory", dir)(e.into()))?;
    rustix::fs::fchmod(&opened, rustix::fs::Mode::from_raw_mode(mode))
        .map_err(|e| io_error("set permissions on", dir)(e.into()))
}

/// Creates or checks a directory only the daemon's user may use (the state
/// directory, the CA): on a trusted path, owned by the daemon's uid, and
/// not writable by group or others.
///
/// # Errors
/// As [`create_trusted_dir`], or [`Error::Untrusted`] when it is someone
/// else's or writable by others.
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    create_trusted_dir(dir, PRIVATE_DIR_MODE)?;
    let meta = fs::metadata(dir).map_err(io_error("inspect", dir))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::Untrusted {
            path: dir.to_owned(),
            reason: format!(
                "owned by {}, not by the daemon's uid {me}",
                describe_uid(meta.uid())
            ),
            fix: format!("run chown {me} {} or use another directory", dir.display()),
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Error::Untrusted {
            path: dir.to_owned(),
            reason: format!(
                "writable by group or others (mode {:o})",
                meta.mode() & 0o7777
            ),
            fix: format!("run chmod 700 {}", dir.display()),
        });
    }
    Ok(())
}

/// Creates `path` as an empty file readable by the owner only (0600, set
/// on the new file whatever the umask) if nothing is there; returns whether
/// it did. Whatever is already there (a file, or a symlink: never followed)
/// is left alone.
///
/// # Errors
/// The I/O error of the create or the chmod.
pub fn create_private_file(path: &Path) -> io::Result<bool> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path);
    match created {
        Ok(file) => {
            file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE))?;
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets an existing file's mode to 0600, whatever the umask or an earlier
/// owner left.
///
/// # Errors
/// The I/O error of the chmod (`NotFound` when there is no such file).
pub fn set_private_mode(path: &Path) -> io::Result<()> {
    fs::set_permissions(path, Permissions::from_mode(PRIVATE_FILE_MODE))
}

/// Writes `contents` to `path` readable by the owner only (0600),
/// atomically: a crash leaves either the old file or the new one, never
/// half of either.
///
/// # Errors
/// The I/O error of the first step that failed.
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_file_atomic(path, contents, PRIVATE_FILE_MODE)
}

/// Writes `contents` to `path` with `mode`, atomically (a temp file beside
/// it, synced, then renamed over it): a reader sees the old file or the
/// new one, never half of either.
///
/// # Errors
/// The I/O error of the first step that failed.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // mode() is filtered by the umask only towards fewer rights, but a
        // pre-existing file keeps its mode: set it explicitly.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Binds a Unix socket at `path` with `mode`, creating its directory (mode
/// `dir_mode`) on a trusted path if needed. A stale socket left by a
/// crashed daemon is replaced; a live one, or anything that is not a
/// socket (a file, a directory, a symlink), is refused and left in place.
///
/// # Errors
/// [`Error::InUse`] when a daemon answers on the path,
/// [`Error::NotASocket`], [`Error::Untrusted`] or [`Error::Io`].
pub async fn bind_socket(path: &Path, mode: u32, dir_mode: u32) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_trusted_dir(dir, dir_mode)?;
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("inspect", path)(e)),
        Ok(meta) if meta.file_type().is_socket() => {
            // Only a refused connection proves nobody serves there: a busy
            // daemon whose backlog is full answers EAGAIN, and is live.
            match tokio::net::UnixStream::connect(path).await {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    fs::remove_file(path).map_err(io_error("remove the stale socket", path))?;
                }
                _ => return Err(Error::InUse(path.to_owned())),
            }
        }
        Ok(meta) => {
            return Err(Error::NotASocket {
                path: path.to_owned(),
                what: describe_non_socket(path, &meta),
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(io_error("bind", path))?;
    // Before the mode lets anyone connect: sockets accepted later inherit
    // SO_PASSCRED from the listener when they connect, so every byte a
    // client writes names its writer (see `attest::socket`).
    crate::attest::socket::pass_credentials(&listener)
        .map_err(io_error("enable SO_PASSCRED on", path))?;
    fs::set_permissions(path, Permissions::from_mode(mode))
        .map_err(io_error("set permissions on", path))?;
    Ok(listener)
}

/// Lets each of `uids` read and write the file at `path` (a socket: to
/// connect) besides its owner and, when `group_rw`, its group, by giving it
/// a POSIX access ACL; everyone else gets nothing. This is how the admin
/// socket admits `[admin_api] allowed_uids` without ever being
/// world-accessible.
///
/// # Errors
/// [`Error::Io`] when the file system refuses the ACL (mounted without ACL
/// support: the message says to use `[admin_api] group` instead).
pub fn grant_users(path: &Path, uids: &[u32], group_rw: bool) -> Result<(), Error> {
    if uids.is_empty() {
        return Ok(());
    }
    rustix::fs::setxattr(
        path,
        "system.posix_acl_access",
        &posix_acl(uids, group_rw),
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| Error::Io {
        action: "give allowed_uids access (a POSIX ACL; on a file system without ACL support use [admin_api] group instead) to",
        path: path.to_owned(),
        source: Arc::new(e.into()),
    })
}

/// The kernel's encoding of a POSIX access ACL (`posix_acl_xattr.h`):
/// version 2, then (tag, perm, id) entries sorted by tag and id.
fn posix_acl(uids: &[u32], group_rw: bool) -> Vec<u8> {
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const RW: u16 = 0o6;
    const NO_ID: u32 = u32::MAX;
    let mut uids = uids.to_vec();
    uids.sort_unstable();
    uids.dedup();
    let mut entries = vec![(USER_OBJ, RW, NO_ID)];
    entries.extend(uids.into_iter().map(|uid| (USER, RW, uid)));
    entries.push((GROUP_OBJ, if group_rw { RW } else { 0 }, NO_ID));
    entries.push((MASK, RW, NO_ID));
    entries.push((OTHER, 0, NO_ID));
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(perm.to_le_bytes());
        out.extend(id.to_le_bytes());
    }
    out
}

fn describe_non_socket(path: &Path, meta: &Metadata) -> String {
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "an unreadable target".to_owned());
        let dangling = if path.exists() { "" } else { " (dangling)" };
        format!("a symlink to {target}{dangling}")
    } else if kind.is_dir() {
        "a directory".to_owned()
    } else if kind.is_file() {
        "a regular file".to_owned()
    } else {
        "a special file".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn an_acl_lists_the_owner_each_uid_once_in_order_and_nobody_else() {
        let acl = posix_acl(&[1001, 65534, 1001], false);
        let entries: Vec<(u16, u16, u32)> = acl[4..]
            .chunks(8)
            .map(|c| {
                (
                    u16::from_le_bytes([c[0], c[1]]),
                    u16::from_le_bytes([c[2], c[3]]),
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect();
        assert_eq!(acl[..4], 2u32.to_le_bytes());
        assert_eq!(
            entries,
            [
                (0x01, 6, u32::MAX),
                (0x02, 6, 1001),
                (0x02, 6, 65534),
                (0x04, 0, u32::MAX),
                (0x10, 6, u32::MAX),
                (0x20, 0, u32::MAX),
            ]
        );
    }

    #[test]
    fn a_granted_file_keeps_no_access_for_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        match grant_users(&path, &[65534], false) {
            Ok(()) => assert_eq!(mode(&path) & 0o007, 0, "others get nothing"),
            // A file system without ACLs: the error says what to use.
            Err(e) => assert!(e.to_string().contains("[admin_api] group"), "{e}"),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_temp_directory_under_sticky_tmp_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        check_trusted_path(&dir.path().join("not/yet/there")).unwrap();
    }

    #[test]
    fn a_directory_writable_by_others_is_refused_unless_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, Permissions::from_mode(0o777)).unwrap();
        let err = check_trusted_path(&open.join("state")).unwrap_err();
        assert!(
            matches!(&err, Error::Untrusted { path, .. } if *path == open),
            "{err}"
        );
        assert!(err.to_string().contains("mode 777"), "{err}");
        fs::set_permissions(&open, Permissions::from_mode(0o1777)).unwrap();
        check_trusted_path(&open.join("state")).unwrap();
    }

    #[test]
    fn an_unsafe_directory_behind_a_symlink_is_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, Permissions::from_mode(0o777)).unwrap();
        fs::create_dir(open.join("real")).unwrap();
        let link = dir.path().join("link");
        symlink("open/real", &link).unwrap();
        let err = check_trusted_path(&link).unwrap_err();
        assert!(
            matches!(&err, Error::Untrusted { path, .. } if *path == open),
            "{err}"
        );
    }

    #[test]
    fn a_created_directory_gets_its_mode_despite_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("a/b");
        create_trusted_dir(&made, 0o755).unwrap();
        assert_eq!(mode(&made), 0o755);
        create_private_dir(&dir.path().join("private")).unwrap();
        assert_eq!(mode(&dir.path().join("private")), 0o700);
    }

    #[test]
    fn a_new_directory_without_trust_checks_gets_its_mode_and_an_old_one_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("a/b");
        create_dir_with_mode(&made, PRIVATE_DIR_MODE).unwrap();
        assert_eq!(mode(&made), 0o700);
        fs::set_permissions(&made, Permissions::from_mode(0o750)).unwrap();
        create_dir_with_mode(&made, PRIVATE_DIR_MODE).unwrap();
        assert_eq!(mode(&made), 0o750);
    }

    #[test]
    fn private_files_are_written_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn a_private_file_is_created_0600_once_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        assert!(create_private_file(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
        fs::write(&path, b"kept").unwrap();
        assert!(!create_private_file(&path).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"kept");

        let target = dir.path().join("elsewhere");
        let link = dir.path().join("link");
        symlink(&target, &link).unwrap();
        assert!(!create_private_file(&link).unwrap());
        assert!(!target.exists(), "the symlink was not followed");
    }

    #[test]
    fn a_loosened_file_is_set_back_to_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        fs::write(&path, b"").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        set_private_mode(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let missing = set_private_mode(&dir.path().join("none")).unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn a_private_directory_open_to_the_group_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, Permissions::from_mode(0o770)).unwrap();
        let err = create_private_dir(&state).unwrap_err();
        assert!(err.to_string().contains("chmod"), "{err}");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_the_new_one_has_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/w.sock");
        drop(bind_socket(&path, 0o777, 0o755).await.unwrap());
        let listener = bind_socket(&path, 0o777, 0o755).await.unwrap();
        assert_eq!(mode(&path), 0o777);
        assert_eq!(mode(path.parent().unwrap()), 0o755);
        drop(listener);
    }

    #[tokio::test]
    async fn a_live_socket_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let _live = bind_socket(&path, 0o777, 0o755).await.unwrap();
        let err = bind_socket(&path, 0o777, 0o755).await.unwrap_err();
        assert!(matches!(err, Error::InUse(_)), "{err}");
    }

    #[tokio::test]
    async fn whatever_is_not_a_socket_is_named_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file.sock");
        fs::write(&file, b"precious").unwrap();
        let err = bind_socket(&file, 0o777, 0o755).await.unwrap_err();
        assert!(
            err.to_string().contains("is a regular file, not a socket"),
            "{err}"
        );
        assert_eq!(fs::read(&file).unwrap(), b"precious");

        let link = dir.path().join("link.sock");
        symlink("/nonexistent/elsewhere.sock", &link).unwrap();
        let err = bind_socket(&link, 0o777, 0o755).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("is a symlink to /nonexistent/elsewhere.sock (dangling), not a socket"),
            "{text}"
        );
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );

        let sub = dir.path().join("dir.sock");
        fs::create_dir(&sub).unwrap();
        let err = bind_socket(&sub, 0o777, 0o755).await.unwrap_err();
        assert!(
            err.to_string().contains("is a directory, not a socket"),
            "{err}"
        );
    }
}
