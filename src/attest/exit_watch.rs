//! Notices when an attested process exits.
//!
//! A pidfd refers to one process, never to a later one that reuses its pid,
//! and becomes readable when that process exits: tokio wakes us then, with no
//! polling. On kernels without pidfd (before 5.3) we fall back to polling /proc.

use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, pidfd_open};
use tokio::io::unix::AsyncFd;

use super::{Error, process};

/// How often the fallback checks /proc when pidfds are unavailable.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Resolves when the process `pid` that started at `start_time` has exited
/// (at once if it already has, or if its pid now names another process).
///
/// # Errors
/// Never fails for a process that exits; errors only if the watch itself
/// cannot be set up, in which case the caller should treat the process as gone.
pub async fn process_exit(pid: u32, start_time: u64) -> Result<(), Error> {
    let fd = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .map(|p| pidfd_open(p, PidfdFlags::NONBLOCK));
    let fd = match fd {
        None | Some(Err(rustix::io::Errno::SRCH)) => return Ok(()),
        Some(Err(_)) => return poll_for_exit(pid, start_time).await,
        Some(Ok(fd)) => fd,
    };
    // The pidfd was opened for whatever process had the pid just now: make
    // sure that is still ours before waiting on it.
    if !is_same_process(pid, start_time) {
        return Ok(());
    }
    let fd = register(fd).map_err(|e| Error::ProcRead {
        pid,
        what: "pidfd",
        source: std::sync::Arc::new(e),
    })?;
    let _ready = fd.readable().await.map_err(|e| Error::ProcRead {
        pid,
        what: "pidfd",
        source: std::sync::Arc::new(e),
    })?;
    Ok(())
}

#[expect(
    deprecated,
    reason = "the safety concern is a T that does not own its fd; OwnedFd does, and the replacement is unsafe, which this crate forbids"
)]
fn register(fd: std::os::fd::OwnedFd) -> std::io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)
}

/// False only when the kernel says the process is gone or the pid is now
/// another process; a passing read error (e.g. out of file descriptors)
/// counts as still running, so it cannot end a live agent's identity.
fn is_same_process(pid: u32, start_time: u64) -> bool {
    match process::start_time(pid) {
        Ok(t) => t == start_time,
        Err(Error::ProcessGone { .. } | Error::ProcessChanged { .. }) => false,
        Err(_) => true,
    }
}

async fn poll_for_exit(pid: u32, start_time: u64) -> Result<(), Error> {
    while is_same_process(pid, start_time) {
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_exit_of_a_child_is_noticed_promptly() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = process::start_time(pid).unwrap();
        let began = std::time::Instant::now();
        let reaper = std::thread::spawn(move || child.wait());
        tokio::time::timeout(Duration::from_secs(5), process_exit(pid, start))
            .await
            .expect("exit noticed")
            .unwrap();
        assert!(began.elapsed() < Duration::from_secs(2));
        reaper.join().unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_process_with_another_start_time_counts_as_exited() {
        let pid = std::process::id();
        let start = process::start_time(pid).unwrap();
        tokio::time::timeout(Duration::from_secs(1), process_exit(pid, start + 1))
            .await
            .expect("resolves at once")
            .unwrap();
    }
}
