use std::os::unix::net::UnixStream;

use super::*;
use crate::attest::socket::peer_inode;

fn wanted(inode: u64) -> HashMap<u64, ()> {
    HashMap::from([(inode, ())])
}

/// Whether any fd table of process `pid` holds the socket `inode`.
fn holds(pid: u32, inode: u64) -> bool {
    let mut found = false;
    for_each_held(pid, &wanted(inode), |_| found = true);
    found
}

#[test]
fn the_holder_of_both_ends_is_found_and_a_missing_end_is_reported() {
    let (a, b) = UnixStream::pair().unwrap();
    let me = std::process::id();
    let b_ino = peer_inode(&a).unwrap();
    check_sole_holder(me, b_ino).unwrap();
    drop(b);
    // Nobody holds the client end any more (the socket is gone).
    assert!(matches!(
        check_sole_holder(me, b_ino),
        Err(Error::NotHeldByCaller { .. })
    ));
}

#[test]
fn a_child_holding_the_client_end_is_named() {
    let (a, b) = UnixStream::pair().unwrap();
    let b_ino = peer_inode(&a).unwrap();
    // A child that inherits `b` (as a forked process would).
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            b.try_clone().unwrap(),
        )))
        .spawn()
        .unwrap();
    let child_pid = child.id();
    let verdict = check_sole_holder(std::process::id(), b_ino);
    child.kill().unwrap();
    child.wait().unwrap();
    match verdict {
        Err(Error::SharedConnection { holder, .. }) => assert_eq!(holder, child_pid),
        other => panic!("expected the child to be named, got {other:?}"),
    }
}

/// Runs a python `script` with `socket` as its stdin, and returns it and
/// the first line it prints (once it has hidden its copy).
fn python_holding(socket: UnixStream, script: &str) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            socket,
        )))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

#[test]
fn a_copy_hidden_in_a_threads_private_fd_table_is_found() {
    let (a, b) = UnixStream::pair().unwrap();
    let b_ino = peer_inode(&a).unwrap();
    // The child gets `b` as stdin; a thread of it unshars its fd table
    // (so it keeps a copy) and the main thread then closes its own.
    let script = r#"
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
ready = threading.Event()
def hide():
    assert libc.unshare(0x400) == 0  # CLONE_FILES
    ready.set()
    time.sleep(30)
threading.Thread(target=hide, daemon=True).start()
ready.wait()
os.close(0)
print("hidden", flush=True)
time.sleep(30)
"#;
    let (mut child, line) = python_holding(b, script);
    assert_eq!(line.trim(), "hidden");
    let base = format!("/proc/{}", child.id());
    let mut in_own_table = false;
    scan_table(&base, &wanted(b_ino), &mut |_| in_own_table = true);
    assert!(!in_own_table, "the process's own table no longer has it");
    let found = holds(child.id(), b_ino);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(found, "the copy in the thread's own table is found");
}

#[test]
fn a_copy_registered_in_an_io_uring_and_closed_is_found() {
    let (a, b) = UnixStream::pair().unwrap();
    let b_ino = peer_inode(&a).unwrap();
    // The child registers its stdin (`b`) as an io_uring fixed file and
    // closes the fd: the ring alone keeps the socket.
    let script = r#"
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
ring = libc.syscall(425, 4, params)  # io_uring_setup
if ring < 0:
    print("no-io-uring", flush=True); time.sleep(30)
files = (ctypes.c_int * 1)(0)
assert libc.syscall(427, ring, 2, files, 1) == 0  # IORING_REGISTER_FILES
os.close(0)
print("registered", flush=True)
time.sleep(30)
"#;
    let (mut child, line) = python_holding(b, script);
    let found = holds(child.id(), b_ino);
    child.kill().unwrap();
    child.wait().unwrap();
    match line.trim() {
        "registered" => assert!(found, "the ring's fixed file is found"),
        other => eprintln!("skipped: {other} (io_uring unavailable here)"),
    }
}

#[test]
fn one_walk_gives_each_check_of_a_batch_its_own_verdict() {
    let me = std::process::id();
    let (a, b) = UnixStream::pair().unwrap();
    let (c, d) = UnixStream::pair().unwrap();
    let (sole, shared) = (peer_inode(&a).unwrap(), peer_inode(&c).unwrap());
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            d.try_clone().unwrap(),
        )))
        .spawn()
        .unwrap();
    let gone = {
        let (e, f) = UnixStream::pair().unwrap();
        let inode = peer_inode(&e).unwrap();
        drop(f);
        inode
    };
    let verdicts = walk(&[
        Wanted {
            pid: me,
            inode: sole,
        },
        Wanted {
            pid: me,
            inode: shared,
        },
        Wanted {
            pid: me,
            inode: gone,
        },
    ]);
    child.kill().unwrap();
    child.wait().unwrap();
    drop((b, d));
    assert!(verdicts[0].is_ok(), "{:?}", verdicts[0]);
    match &verdicts[1] {
        Err(Error::SharedConnection { holder, .. }) => assert_eq!(*holder, child.id()),
        other => panic!("expected the child to be named, got {other:?}"),
    }
    assert!(
        matches!(verdicts[2], Err(Error::NotHeldByCaller { .. })),
        "{:?}",
        verdicts[2]
    );
}

/// A stand-in walk that records each batch it is given and waits for the
/// test's word before answering (all held alone).
struct FakeWalk {
    batches: Mutex<Vec<Vec<Wanted>>>,
    started: std::sync::mpsc::SyncSender<()>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

fn fake_scans() -> (
    HolderScans,
    Arc<FakeWalk>,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::SyncSender<()>,
) {
    let (started, walk_started) = std::sync::mpsc::sync_channel(8);
    let (let_go, go) = std::sync::mpsc::sync_channel(8);
    let fake = Arc::new(FakeWalk {
        batches: Mutex::default(),
        started,
        go: Mutex::new(go),
    });
    let recorder = fake.clone();
    let scans = HolderScans::with_walk(move |batch: &[Wanted]| {
        recorder.batches.lock().unwrap().push(batch.to_vec());
        recorder.started.send(()).unwrap();
        recorder.go.lock().unwrap().recv().unwrap();
        batch.iter().map(|_| Ok(())).collect()
    });
    (scans, fake, walk_started, let_go)
}

fn check(scans: &HolderScans, inode: u64) -> tokio::task::JoinHandle<Result<(), Error>> {
    let scans = scans.clone();
    tokio::spawn(async move { scans.check(1, inode).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_that_arrive_during_a_walk_wait_and_share_the_next_walk() {
    let (scans, fake, walk_started, let_go) = fake_scans();
    let first = check(&scans, 10);
    walk_started.recv().unwrap(); // the first walk runs, looking for 10 only
    let second = check(&scans, 20);
    let third = check(&scans, 30);
    // Let both reach the queue while the first walk still runs.
    while scans.shared.lock().waiting.len() < 2 {
        tokio::task::yield_now().await;
    }
    let_go.send(()).unwrap();
    first.await.unwrap().unwrap();
    walk_started.recv().unwrap(); // the second walk, for both late checks
    let_go.send(()).unwrap();
    second.await.unwrap().unwrap();
    third.await.unwrap().unwrap();
    let batches = fake.batches.lock().unwrap().clone();
    // Within a batch the order is the order the checks were queued, which
    // the two late checks race for.
    let inodes: Vec<Vec<u64>> = batches
        .iter()
        .map(|b| {
            let mut inodes: Vec<u64> = b.iter().map(|w| w.inode).collect();
            inodes.sort_unstable();
            inodes
        })
        .collect();
    assert_eq!(
        inodes,
        vec![vec![10], vec![20, 30]],
        "two walks for three checks"
    );
    walker_stopped(&scans).await;
}

/// Waits (up to 5 s) until the walker of `scans` has stopped.
async fn walker_stopped(scans: &HolderScans) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while scans.shared.lock().walking {
        assert!(Instant::now() < deadline, "the walker stops when idle");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walker_that_dies_refuses_its_checks_and_the_next_check_walks_again() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let scans = HolderScans::with_walk(move |batch: &[Wanted]| {
        if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("the first walk fails");
        }
        batch.iter().map(|_| Ok(())).collect()
    });
    let refused = scans.check(1, 10).await;
    assert!(
        matches!(refused, Err(Error::HolderScanTooLong { pid: 1 })),
        "fail closed: {refused:?}"
    );
    walker_stopped(&scans).await;
    scans.check(1, 10).await.unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_checks_of_real_connections_share_few_walks() {
    let me = std::process::id();
    let pairs: Vec<_> = (0..64).map(|_| UnixStream::pair().unwrap()).collect();
    let walks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = walks.clone();
    let scans = HolderScans::with_walk(move |batch: &[Wanted]| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        walk(batch)
    });
    let checks: Vec<_> = pairs
        .iter()
        .map(|(a, _)| {
            let (scans, inode) = (scans.clone(), peer_inode(a).unwrap());
            tokio::spawn(async move { scans.check(me, inode).await })
        })
        .collect();
    for check in checks {
        check.await.unwrap().unwrap();
    }
    let walks = walks.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=pairs.len() / 4).contains(&walks),
        "64 checks took {walks} walks"
    );
}

#[test]
fn back_to_back_walks_pause_twice_the_last_walk_up_to_a_cap() {
    use std::time::Duration;
    assert_eq!(
        walk_gap(Duration::from_millis(10)),
        Duration::from_millis(20)
    );
    assert_eq!(walk_gap(Duration::ZERO), Duration::ZERO);
    assert_eq!(walk_gap(Duration::from_secs(1)), MAX_WALK_GAP);
}
