//! The one module allowed `unsafe`: system calls that no safe crate wraps,
//! and the allocator's options symbol.
//!
//! Each function is a single system call taking plain integers, with its
//! SAFETY argument beside it; [`JEMALLOC_CONF`] is a static that jemalloc
//! reads before `main`. Everything else in the crate stays safe
//! (`unsafe_code` is denied at the crate root and allowed only here).
#![allow(unsafe_code)]

/// `KCMP_FILES` from linux/kcmp.h: compare file descriptor tables.
const KCMP_FILES: libc::c_int = 2;

/// Whether tasks `a` and `b` share one file descriptor table, by kcmp(2).
/// `None` when the kernel cannot tell (no kcmp, no permission, a task gone):
/// callers must then treat the tables as different.
pub fn same_fd_table(a: u32, b: u32) -> Option<bool> {
    let a = libc::pid_t::try_from(a).ok()?;
    let b = libc::pid_t::try_from(b).ok()?;
    // SAFETY: kcmp takes five integers and reads or writes no memory of
    // this process; a bad pid is reported as an error return.
    let result = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            a,
            b,
            KCMP_FILES,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    match result {
        0 => Some(true),
        1..=3 => Some(false),
        _ => None,
    }
}

/// jemalloc's options (the `sigil` binary's allocator), read by jemalloc
/// itself before `main`: a background thread gives freed pages back to the
/// kernel one second after they were last used, so memory freed when
/// thousands of streams close is returned while the daemon is idle
/// (BENCHMARKS.md "Memory after load"). `_RJEM_MALLOC_CONF` in the
/// environment still overrides these.
// SAFETY: jemalloc declares `const char *malloc_conf` (prefixed
// `_rjem_`) and only reads it: a thin pointer to NUL-terminated bytes that
// live for the whole program, which this static is.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: &[u8; 85] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Gives SIGPIPE back its default action (end the process quietly), for
/// the client commands: `sigil audit --json | head` must stop when `head`
/// does, as every Unix tool does, not panic on a failed print. The daemon
/// keeps Rust's default (ignored), so a peer that hangs up is an error on
/// that one socket.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with a plain signal number and SIG_DFL (no handler
    // code runs); called once from `main` before any other thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_share_their_table_and_a_child_process_does_not() {
        let me = std::process::id();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            tx.send(
                rustix::thread::gettid()
                    .as_raw_nonzero()
                    .get()
                    .unsigned_abs(),
            )
            .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        assert_eq!(same_fd_table(me, tid), Some(true));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(same_fd_table(me, child.id()), Some(false));
        child.kill().unwrap();
        child.wait().unwrap();
        thread.join().unwrap();
    }
}
