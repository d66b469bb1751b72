//! `deploy/sigil.service` checked as far as a machine without systemd as
//! PID 1 allows, each part against the unit file itself:
//! - `systemd-analyze verify` accepts it and `systemd-analyze security`
//!   rates it 2.5 or lower ("OK");
//! - the capabilities of its `CapabilityBoundingSet` are enough for a root
//!   daemon to attest another user's process (uid 65534, by the digest of
//!   an executable only that user may read, with `[admin_api] group`), and
//!   each one is needed: without it the daemon refuses or cannot start
//!   (root only: `setpriv --bounding-set`);
//! - every system call the daemon makes while it starts, attests, signs,
//!   serves the admin API, reloads on SIGHUP and stops is allowed by its
//!   `SystemCallFilter` (groups expanded by `systemd-analyze syscall-filter`),
//!   and every socket it opens is of a family `RestrictAddressFamilies`
//!   allows (`strace -f`).
//!
//! A part whose tool is missing (`systemd-analyze` from Debian's `systemd`,
//! `strace`, `setpriv`, root) says so and is skipped; as root on Debian the
//! suite installs what is missing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");
const UNIT: &str = include_str!("../deploy/sigil.service");

/// The values of `key=` in the unit, in order.
fn unit_values(key: &str) -> Vec<String> {
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the daemon exited ({status}) before {} appeared",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn systemd_analyze_verifies_the_unit_and_rates_it_ok() {
    common::venv::apt_install_if_missing("/usr/bin/systemd-analyze", "systemd");
    if !have("systemd-analyze") {
        eprintln!("systemd-analyze is not installed (Debian: apt-get install systemd): skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's program exists: point it at this build.
    let unit = dir.path().join("sigil.service");
    std::fs::write(&unit, UNIT.replace("/usr/local/bin/sigil", SIGIL)).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let complaints = text(&verify.stderr);
    assert!(
        verify.status.success() && !complaints.contains("sigil.service"),
        "systemd-analyze verify: {complaints}"
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = text(&security.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for sigil.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}{}", text(&security.stderr)));
    eprintln!("systemd-analyze security: {level}");
    assert!(level <= 2.5, "exposure {level} > 2.5:\n{report}");
}

/// `sigil run` as root with only `caps` in its bounding set, and an agent
/// as uid 65534 running an executable only that uid may read: the fetch's
/// output, or the daemon's error when it could not start.
fn attest_nobody_with(caps: &[String], work: &Path) -> Result<Output, String> {
    let run = work.join(format!("run-{}", caps.join("-")));
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.join("workload.sock");
    let log = run.join("daemon.log");
    let bounding = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<String>();
    let mut daemon = Running(
        Command::new("setpriv")
            .arg(format!("--bounding-set=-all{bounding}"))
            .args([SIGIL, "run", "--config"])
            .arg(work.join("sigil.toml"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(run.join("state"))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if daemon.0.try_wait().unwrap().is_some() {
            return Err(std::fs::read_to_string(&log).unwrap());
        }
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(work.join("agent/sigil-agent"))
        .args(["fetch", "x509", "--socket"])
        .arg(&socket)
        .output()
        .unwrap())
}

#[test]
fn the_units_capabilities_are_enough_and_each_is_needed() {
    if let Some(why) = common::cannot_run_as_nobody() {
        eprintln!("{why}: skipped");
        return;
    }
    let caps: Vec<String> = unit_values("CapabilityBoundingSet")
        .join(" ")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(!caps.is_empty(), "the unit bounds its capabilities");
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The agent's program: readable by uid 65534 only, in a directory only
    // it may enter; selected by its digest, so the daemon must read it.
    let agent = work.path().join("agent");
    std::fs::create_dir(&agent).unwrap();
    std::fs::copy(SIGIL, agent.join("sigil-agent")).unwrap();
    std::fs::set_permissions(
        agent.join("sigil-agent"),
        std::fs::Permissions::from_mode(0o500),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o700)).unwrap();
    for path in [agent.join("sigil-agent"), agent.clone()] {
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    }
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(std::fs::read(SIGIL).unwrap()))
    };
    std::fs::write(
        work.path().join("sigil.toml"),
        format!(
            "trust_domain = \"caps.test\"\n[admin_api]\ngroup = \"nogroup\"\n\
             [[entry]]\nname = \"nobody-agent\"\nselectors = [\"unix:uid:65534\", \"unix:sha256:{digest}\"]\n"
        ),
    )
    .unwrap();

    let out = attest_nobody_with(&caps, work.path())
        .expect("the daemon starts with the unit's capabilities");
    assert!(
        out.status.success()
            && text(&out.stdout).contains("spiffe://caps.test/agent/nobody-agent/instance/"),
        "attested with {caps:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        match attest_nobody_with(&fewer, work.path()) {
            Ok(out) => assert!(
                !out.status.success() && text(&out.stderr).contains("cannot read the exe"),
                "without {missing} the agent was still attested: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            ),
            Err(log) => assert!(
                log.contains("admin group"),
                "without {missing} the daemon failed otherwise: {log}"
            ),
        }
    }
}

/// The syscalls a filter item names: a group expanded (recursively) by
/// `systemd-analyze syscall-filter`, or one syscall.
fn expand(item: &str, cache: &mut HashMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if !item.starts_with('@') {
        return BTreeSet::from([item.to_owned()]);
    }
    if let Some(found) = cache.get(item) {
        return found.clone();
    }
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", item])
        .output()
        .unwrap();
    let mut set = BTreeSet::new();
    for line in text(&out.stdout).lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        set.extend(expand(name, cache));
    }
    cache.insert(item.to_owned(), set.clone());
    set
}

#[test]
fn every_system_call_of_the_daemon_passes_the_units_filter() {
    common::venv::apt_install_if_missing("/usr/bin/systemd-analyze", "systemd");
    common::venv::apt_install_if_missing("/usr/bin/strace", "strace");
    if !have("systemd-analyze") || !have("strace") {
        eprintln!("systemd-analyze or strace is not installed: skipped");
        return;
    }
    // The filter: allow lists add, `~` lists take away, in order.
    let mut cache = HashMap::new();
    let mut allowed = BTreeSet::new();
    for value in unit_values("SystemCallFilter") {
        let (deny, items) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value.as_str()),
        };
        for item in items.split_whitespace() {
            let names = expand(item, &mut cache);
            if deny {
                allowed.retain(|n| !names.contains(n));
            } else {
                allowed.extend(names);
            }
        }
    }
    assert!(
        allowed.len() > 100,
        "the filter expanded: {}",
        allowed.len()
    );

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let trace = dir.path().join("trace");
    std::fs::write(
        dir.path().join("sigil.toml"),
        format!(
            "trust_domain = \"filter.test\"\n[[entry]]\nname = \"me\"\nselectors = [\"unix:uid:{}\"]\n[entry.tasks]\nself_declare = true\n",
            nix::unistd::geteuid()
        ),
    )
    .unwrap();
    let mut daemon = Running(
        Command::new("strace")
            .args(["-f", "-qq", "-o"])
            .arg(&trace)
            .args([SIGIL, "run", "--config"])
            .arg(dir.path().join("sigil.toml"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&socket, &mut daemon.0);
    // Signals go to the daemon, strace's child, not to strace.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", daemon.0.id())).unwrap();
    let pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let signal = |sig| {
        rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), sig).unwrap();
    };
    let admin = dir.path().join("admin.sock");
    let sigil = |args: &[&str]| {
        let out = Command::new(SIGIL).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    };
    let socket_arg = socket.display().to_string();
    let admin_arg = admin.display().to_string();
    let files = dir.path().join("files").display().to_string();
    // An agent's fetch (attestation, signing, the store) and its exit (revocation, CRL).
    sigil(&["fetch", "x509", "--socket", &socket_arg, "--write", &files]);
    sigil(&["fetch", "bundle", "--socket", &socket_arg]);
    sigil(&["status", "--admin-socket", &admin_arg]);
    sigil(&["instances", "--json", "--admin-socket", &admin_arg]);
    sigil(&["audit", "verify", "--admin-socket", &admin_arg]);
    signal(rustix::process::Signal::HUP);
    std::thread::sleep(Duration::from_millis(300));
    sigil(&["fetch", "x509", "--socket", &socket_arg]);
    signal(rustix::process::Signal::TERM);
    // strace exits when the daemon has.
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }

    let trace = std::fs::read_to_string(&trace).unwrap();
    let mut used = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in trace.lines() {
        // "PID name(args) = result"; resumed and exit lines name no new call.
        let Some(call) = line.split_once(' ').map(|(_, rest)| rest.trim_start()) else {
            continue;
        };
        if call.starts_with('<') || call.starts_with("+++") || call.starts_with("---") {
            continue;
        }
        if let Some((name, args)) = call.split_once('(') {
            if name == "socket" || name == "socketpair" {
                families.insert(args.split(',').next().unwrap_or_default().to_owned());
            }
            used.insert(name.to_owned());
        }
    }
    // strace runs the program: its own execve is the daemon's start.
    let outside: Vec<&String> = used.iter().filter(|n| !allowed.contains(*n)).collect();
    assert!(
        outside.is_empty(),
        "system calls the filter refuses: {outside:?} (all used: {used:?})"
    );
    let allowed_families = unit_values("RestrictAddressFamilies").join(" ");
    for family in &families {
        assert!(
            allowed_families.split_whitespace().any(|f| f == family),
            "a socket of family {family} (allowed: {allowed_families})"
        );
    }
    eprintln!(
        "{} distinct system calls, socket families {families:?}",
        used.len()
    );
    assert!(
        used.contains("kcmp") || used.contains("pidfd_open"),
        "the trace saw attestation: {used:?}"
    );
}
