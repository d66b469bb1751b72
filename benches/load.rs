//! `cargo bench --bench load -- [--quick] [scenario...]`: the daemon under
//! load, driven over its socket by real client processes.
//!
//! The real `sigil` binary runs on a temp dir (a fresh daemon per scenario).
//! Clients are separate processes: this binary re-executes itself in a
//! hidden client mode, and each client times its own requests with
//! `Instant` and prints one JSON line per step to stdout. The parent steps
//! them together (a `go` line on each client's stdin), samples the daemon's
//! CPU time (utime+stime), VmRSS and Threads from /proc, and prints every
//! figure next to an `openssl speed ecdsap256` single-core baseline measured
//! in the same run, as a ratio:
//!
//! - CPU as sign-equivalents: daemon CPU seconds x openssl P-256 signs/s;
//! - latencies as sign-times: the same product for wall-clock time;
//! - rates as a fraction of the openssl sign rate.
//!
//! Scenarios (default: all but `revocation`):
//! - `new-processes`: N processes at once do a connect-only round trip
//!   (FetchX509SVID without the `workload.spiffe.io` header, answered
//!   InvalidArgument without attestation), then, at a second `go`, connect
//!   and FetchX509SVID until the first message;
//! - `streams`: N FetchX509SVID streams held open, RSS per stream, and RSS
//!   after they close;
//! - `tasks`: Begin+End pairs per second from 1 and from 8 client processes,
//!   each holding a FetchX509SVID stream as an agent would;
//! - `rotation`: streams from several processes under a short instance TTL;
//!   rotations (a new set of serials on one process's streams, counted once
//!   per process) per one-second bin over a window;
//! - `revocation` (only when named: minutes long): N agent FetchX509SVID
//!   streams held by `streams` clients, V verifier processes each holding a
//!   FetchX509Bundles stream, a real `sigil gate`, and K task drivers each
//!   holding its own FetchX509SVID stream and starting Begin -> (task SVID
//!   on its stream) -> a connection through the gate with it -> End cycles
//!   on a fixed schedule (open loop: a slow answer does not delay the next
//!   cycle) at R cycles/s in total, for S seconds. Measured: Begin -> the
//!   task SVID (hint `task:<id>`) on the driver's stream; End -> the task
//!   SVID's serial in the CRL of every verifier (the driver's wall clock
//!   before End joined with each verifier's first sighting of the serial,
//!   both epoch ms; the worst verifier counts), and ends never seen; End ->
//!   the gate closed the task's connection; the protobuf
//!   bytes (`encoded_len`) every client received, per kind of stream, per
//!   second and per task end; daemon RSS each second (start, 30 s, end,
//!   max); daemon, client and whole-machine CPU. The window is cut short
//!   (and says so) if MemAvailable falls under a floor.
//!
//! Flags: `--quick` (small sizes, a short window: a smoke run), `--processes
//! N`, `--streams N`, `--streams-per-process N`, `--streams-per-connection
//! N`, `--task-secs S`, `--rotation-secs S`, `--rotation-processes N`,
//! `--rotation-streams N`, `--rotation-ttl DURATION`, `--rounds N` (streams:
//! N identical rounds against one daemon, RSS after each: memory that grows
//! round after round is a leak, memory that plateaus is allocator retention),
//! `--revocation-streams N` (10000), `--revocation-verifiers V` (4),
//! `--revocation-rate R` (100 Begin+End per second in total),
//! `--revocation-drivers K` (8), `--revocation-secs S` (120),
//! `--revocation-min-available-mib M` (2048: the memory floor). `--quick`
//! makes these 500 streams, 20/s, 15 s.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// argv[1] of a client process.
const CLIENT_ARG: &str = "__sigil_load_client";
/// Longest a client waits for any one answer before reporting an error
/// (the first run saw first SVIDs after 109 s with 1,000 processes).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);
/// Threads allowed above 2 x cores (signal, blocking-pool, logging threads).
const THREADS_SLACK: usize = 8;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(CLIENT_ARG) {
        client::main(&args[1..]);
        return;
    }
    // `cargo bench -- --list` style probes from cargo: nothing to list.
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let opts = Opts::parse(&args);
    raise_fd_limit();
    let baseline = openssl_sign_rate();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut report = Report::new(baseline, cores);
    println!(
        "sigil load bench: {cores} cores, load average {}, scenarios {:?}",
        load_average(),
        opts.scenarios
    );
    match baseline {
        Some(b) => println!("openssl speed -seconds 3 ecdsap256: {b:.0} sign/s (single core)"),
        None => println!("openssl not found or unparsable: raw figures only, no ratios"),
    }
    for scenario in opts.scenarios.clone() {
        let from = report.rows.len();
        match scenario.as_str() {
            "new-processes" => new_processes(&opts, &mut report),
            "streams" => streams(&opts, &mut report),
            "tasks" => tasks(&opts, &mut report),
            "rotation" => rotation(&opts, &mut report),
            "revocation" => revocation::run(&opts, &mut report),
            _ => unreachable!("checked by Opts::parse"),
        }
        report.print(from);
    }
    println!("\n== all figures (load average now {}) ==", load_average());
    report.print(0);
}

// ---------------------------------------------------------------- options

#[derive(Clone, Debug)]
struct Opts {
    scenarios: Vec<String>,
    processes: usize,
    streams: usize,
    streams_per_process: usize,
    streams_per_connection: usize,
    task_secs: f64,
    rotation_secs: u64,
    rotation_processes: usize,
    rotation_streams: usize,
    rotation_ttl: String,
    rounds: usize,
    revocation_streams: usize,
    revocation_verifiers: usize,
    revocation_rate: f64,
    revocation_drivers: usize,
    revocation_secs: u64,
    revocation_min_available_mib: u64,
}

const SCENARIOS: [&str; 5] = [
    "new-processes",
    "streams",
    "tasks",
    "rotation",
    "revocation",
];
/// What runs when no scenario is named: `revocation` only when asked for.
const DEFAULT_SCENARIOS: [&str; 4] = ["new-processes", "streams", "tasks", "rotation"];

impl Opts {
    fn parse(args: &[String]) -> Self {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = if quick {
            Opts {
                scenarios: vec![],
                processes: 50,
                streams: 500,
                streams_per_process: 100,
                streams_per_connection: 100,
                task_secs: 1.0,
                rotation_secs: 12,
                rotation_processes: 10,
                rotation_streams: 100,
                rotation_ttl: "4s".into(),
                rounds: 1,
                revocation_streams: 500,
                revocation_verifiers: 4,
                revocation_rate: 20.0,
                revocation_drivers: 8,
                revocation_secs: 15,
                revocation_min_available_mib: 2048,
            }
        } else {
            Opts {
                scenarios: vec![],
                processes: 1000,
                streams: 10_000,
                streams_per_process: 100,
                streams_per_connection: 100,
                task_secs: 5.0,
                rotation_secs: 120,
                rotation_processes: 50,
                rotation_streams: 1000,
                rotation_ttl: "10s".into(),
                rounds: 1,
                revocation_streams: 10_000,
                revocation_verifiers: 4,
                revocation_rate: 100.0,
                revocation_drivers: 8,
                revocation_secs: 120,
                revocation_min_available_mib: 2048,
            }
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || -> String {
                it.next()
                    .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
                    .clone()
            };
            let num = |v: String| -> usize {
                v.parse()
                    .unwrap_or_else(|_| usage(&format!("{arg}: {v:?} is not a number")))
            };
            match arg.as_str() {
                "--bench" | "--quick" => {}
                "--processes" => o.processes = num(value()),
                "--streams" => o.streams = num(value()),
                "--streams-per-process" => o.streams_per_process = num(value()),
                "--streams-per-connection" => o.streams_per_connection = num(value()),
                "--task-secs" => o.task_secs = num(value()) as f64,
                "--rotation-secs" => o.rotation_secs = num(value()) as u64,
                "--rotation-processes" => o.rotation_processes = num(value()),
                "--rotation-streams" => o.rotation_streams = num(value()),
                "--rotation-ttl" => o.rotation_ttl = value(),
                "--rounds" => o.rounds = num(value()),
                "--revocation-streams" => o.revocation_streams = num(value()),
                "--revocation-verifiers" => o.revocation_verifiers = num(value()),
                "--revocation-rate" => {
                    let v = value();
                    o.revocation_rate = v
                        .parse()
                        .ok()
                        .filter(|r: &f64| r.is_finite() && *r > 0.0)
                        .unwrap_or_else(|| usage(&format!("{arg}: {v:?} is not a rate")));
                }
                "--revocation-drivers" => o.revocation_drivers = num(value()),
                "--revocation-secs" => o.revocation_secs = num(value()) as u64,
                "--revocation-min-available-mib" => {
                    o.revocation_min_available_mib = num(value()) as u64;
                }
                s if SCENARIOS.contains(&s) => o.scenarios.push(s.to_owned()),
                s => usage(&format!("unknown argument {s:?}")),
            }
        }
        if o.scenarios.is_empty() {
            o.scenarios = DEFAULT_SCENARIOS.iter().map(|s| (*s).to_owned()).collect();
        }
        let positive = [
            o.processes,
            o.streams,
            o.streams_per_process,
            o.streams_per_connection,
            o.rotation_processes,
            o.rotation_streams,
            o.rounds,
            o.revocation_streams,
            o.revocation_verifiers,
            o.revocation_drivers,
        ];
        if positive.contains(&0) || o.rotation_secs == 0 || o.revocation_secs == 0 {
            usage("sizes must be at least 1");
        }
        o
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: cargo bench --bench load -- [--quick] [{}]... \
         [--processes N] [--streams N] [--streams-per-process N] \
         [--streams-per-connection N] [--task-secs S] [--rotation-secs S] \
         [--rotation-processes N] [--rotation-streams N] [--rotation-ttl 10s] \
         [--rounds N] [--revocation-streams N] [--revocation-verifiers V] \
         [--revocation-rate R] [--revocation-drivers K] [--revocation-secs S] \
         [--revocation-min-available-mib M]",
        SCENARIOS.join("|")
    );
    std::process::exit(2)
}

// ---------------------------------------------------------------- machine facts

/// ECDSA P-256 signs per second according to `openssl speed`, single core.
fn openssl_sign_rate() -> Option<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "3", "ecdsap256"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "256 bits ecdsa (nistp256)   0.0000s   0.0001s  40000.0  13000.0"
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    fields.get(fields.len().checked_sub(2)?)?.parse().ok()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// A thousand clients need more descriptors than the usual soft limit.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        );
    }
}

// ---------------------------------------------------------------- the daemon

/// The real `sigil run` on a temp dir; killed when dropped (also on panic).
struct Daemon {
    child: Child,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(instance_ttl: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sigil-load")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("w.sock");
        let config = dir.path().join("sigil.toml");
        let uid = rustix::process::geteuid().as_raw();
        std::fs::write(
            &config,
            format!(
                r#"trust_domain = "load.test"
state_dir = "{state}"
[workload_api]
socket = "{socket}"
# raised so that limits built against hostile clients do not cap the load
max_connections_per_uid = 1000000
max_streams_per_connection = 100000
max_streams_per_instance = 1000000
handshake_timeout = "10m"
idle_timeout = "1h"
[svid]
instance_ttl = "{instance_ttl}"
[[entry]]
name = "load"
selectors = ["unix:uid:{uid}"]
[entry.tasks]
self_declare = true
max_concurrent = 1024
begin_burst = 1000
begin_per_second = 1000.0
"#,
                state = dir.path().join("state").display(),
                socket = socket.display(),
            ),
        )
        .unwrap();
        let log = dir.path().join("daemon.log");
        let out = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sigil"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("SIGIL_SOCKET")
            .env_remove("SIGIL_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut daemon = Daemon {
            child,
            pid,
            socket,
            log,
            dir,
        };
        let start = Instant::now();
        loop {
            daemon.check_alive();
            if std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok() {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                daemon.fail("the daemon did not open its socket within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.fail(&format!("the daemon exited: {status}"));
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n--- daemon log tail ---\n{}", tail(&self.log, 30))
    }

    /// utime + stime of the daemon, in seconds.
    fn cpu_secs(&self) -> f64 {
        process_cpu_secs(self.pid).unwrap_or_else(|| self.fail("cannot read the daemon's stat"))
    }

    fn status(&self) -> Status {
        read_status(self.pid).unwrap_or_else(|| self.fail("cannot read the daemon's status"))
    }

    /// Runs one client to completion so that the executable's digest and
    /// the daemon's lazy state are warm before anything is measured.
    fn warm_up(&mut self) {
        let mut clients = Clients::spawn(self, 1, "warm", &[]);
        let lines = clients.step(None);
        clients.expect_ok(&lines, "warm-up");
        clients.finish();
        std::thread::sleep(Duration::from_secs(1));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.pid)
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("({}: {e})", path.display()),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// utime + stime of process `pid`, in seconds; `None` once it is gone.
fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / procfs::ticks_per_second() as f64)
}

#[derive(Clone, Copy, Debug, Default)]
struct Status {
    rss_kib: u64,
    threads: u64,
}

fn read_status(pid: u32) -> Option<Status> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some(Status {
        rss_kib: field("VmRSS:")?,
        threads: field("Threads:")?,
    })
}

/// Samples the daemon's RSS and threads every 50 ms until finished.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Status>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = Status::default();
            while !flag.load(Ordering::Relaxed) {
                if let Some(s) = read_status(pid) {
                    peak.rss_kib = peak.rss_kib.max(s.rss_kib);
                    peak.threads = peak.threads.max(s.threads);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> Status {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

// ---------------------------------------------------------------- client processes

/// Client processes of one kind, stepped together: each prints one JSON
/// line per step; a failed client is counted and left out of later steps.
struct Clients {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    outs: Vec<BufReader<ChildStdout>>,
    failed: Vec<Option<String>>,
    log: PathBuf,
}

impl Clients {
    fn spawn(daemon: &Daemon, n: usize, kind: &str, params: &[String]) -> Self {
        let exe = std::env::current_exe().unwrap();
        let log = daemon.dir.path().join(format!("clients-{kind}.log"));
        let err = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut clients = Clients {
            children: Vec::with_capacity(n),
            stdins: Vec::with_capacity(n),
            outs: Vec::with_capacity(n),
            failed: vec![None; n],
            log,
        };
        for _ in 0..n {
            let mut child = Command::new(&exe)
                .arg(CLIENT_ARG)
                .arg(kind)
                .arg(&daemon.socket)
                .args(params)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(err.try_clone().unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start client process: {e}"));
            clients.stdins.push(child.stdin.take());
            clients
                .outs
                .push(BufReader::new(child.stdout.take().unwrap()));
            clients.children.push(child);
        }
        clients
    }

    fn len(&self) -> usize {
        self.children.len()
    }

    fn failures(&self) -> usize {
        self.failed.iter().filter(|f| f.is_some()).count()
    }

    fn first_failure(&self) -> Option<&str> {
        self.failed.iter().flatten().next().map(String::as_str)
    }

    /// Writes `command` to every live client without waiting for answers.
    fn send(&mut self, command: &str) {
        for (i, stdin) in self.stdins.iter_mut().enumerate() {
            if self.failed[i].is_some() {
                continue;
            }
            if let Some(s) = stdin
                && let Err(e) = s.write_all(format!("{command}\n").as_bytes())
            {
                self.failed[i] = Some(format!("cannot write to client: {e}"));
            }
        }
    }

    /// The process ids of the clients still running.
    fn pids(&mut self) -> Vec<u32> {
        self.children
            .iter_mut()
            .filter_map(|c| matches!(c.try_wait(), Ok(None)).then(|| c.id()))
            .collect()
    }

    /// Writes `command` (if any) to every live client, then reads one line
    /// from each. A client's `{"error": ...}` line marks it failed.
    fn step(&mut self, command: Option<&str>) -> Vec<Option<Value>> {
        if let Some(command) = command {
            self.send(command);
        }
        let mut lines = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            if self.failed[i].is_some() {
                lines.push(None);
                continue;
            }
            let mut line = String::new();
            let parsed = match self.outs[i].read_line(&mut line) {
                Ok(0) => Err("exited without answering".to_owned()),
                Ok(_) => serde_json::from_str::<Value>(&line)
                    .map_err(|e| format!("bad line {line:?}: {e}")),
                Err(e) => Err(format!("cannot read: {e}")),
            };
            match parsed {
                Ok(v) if v.get("error").is_some_and(|e| !e.is_null()) => {
                    self.failed[i] = Some(v["error"].to_string());
                    lines.push(None);
                }
                Ok(v) => lines.push(Some(v)),
                Err(e) => {
                    self.failed[i] = Some(e);
                    lines.push(None);
                }
            }
        }
        lines
    }

    fn expect_ok(&self, lines: &[Option<Value>], what: &str) {
        if lines.iter().all(Option::is_none) {
            panic!(
                "{what}: every client failed, e.g. {}\n--- client log tail ---\n{}",
                self.first_failure().unwrap_or("?"),
                tail(&self.log, 20)
            );
        }
    }

    /// Closes every stdin (a client exits on EOF) and reaps them.
    fn finish(mut self) {
        self.stdins.clear();
        let start = Instant::now();
        for child in &mut self.children {
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

fn numbers(lines: &[Option<Value>], key: &str) -> Vec<f64> {
    lines
        .iter()
        .flatten()
        .flat_map(|v| match &v[key] {
            Value::Array(a) => a.iter().filter_map(Value::as_f64).collect::<Vec<_>>(),
            other => other.as_f64().into_iter().collect::<Vec<_>>(),
        })
        .collect()
}

fn sum(lines: &[Option<Value>], key: &str) -> f64 {
    numbers(lines, key).iter().sum()
}

/// The `p` quantile (0..=1) of `values`, nearest rank.
fn quantile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

// ---------------------------------------------------------------- report

struct Row {
    figure: String,
    value: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

struct Report {
    baseline: Option<f64>,
    cores: usize,
    rows: Vec<Row>,
}

impl Report {
    fn new(baseline: Option<f64>, cores: usize) -> Self {
        Report {
            baseline,
            cores,
            rows: vec![],
        }
    }

    fn row(
        &mut self,
        figure: String,
        value: String,
        ratio: String,
        target: &str,
        met: Option<bool>,
    ) {
        self.rows.push(Row {
            figure,
            value,
            ratio,
            target: target.to_owned(),
            met,
        });
    }

    /// Daemon CPU seconds per operation, as sign-equivalents.
    fn cpu(&mut self, figure: &str, secs: f64, target: Option<f64>) {
        let eq = self.baseline.map(|b| secs * b);
        self.row(
            figure.into(),
            format!("{:.3} ms CPU", secs * 1e3),
            eq.map_or("-".into(), |e| format!("{e:.2} sign-eq")),
            &target.map_or(String::new(), |t| format!("<= {t} sign-eq")),
            target.and_then(|t| eq.map(|e| e <= t)),
        );
    }

    /// A wall-clock time, as sign-times (how many single-core signs fit).
    fn latency(&mut self, figure: &str, ms: f64, target: Option<(f64, &str)>) {
        self.row(
            figure.into(),
            format!("{ms:.1} ms"),
            self.baseline
                .map_or("-".into(), |b| format!("{:.0} sign-times", ms / 1e3 * b)),
            target.map_or("", |t| t.1),
            target.map(|t| ms <= t.0),
        );
    }

    /// Operations per second, as a fraction of the sign rate.
    fn rate(&mut self, figure: &str, per_sec: f64) {
        self.row(
            figure.into(),
            format!("{per_sec:.1} /s"),
            self.baseline
                .map_or("-".into(), |b| format!("{:.4} x sign/s", per_sec / b)),
            "",
            None,
        );
    }

    fn plain(&mut self, figure: &str, value: String, target: &str, met: Option<bool>) {
        self.row(figure.into(), value, "-".into(), target, met);
    }

    fn threads(&mut self, scenario: &str, peak: Status) {
        let limit = 2 * self.cores + THREADS_SLACK;
        self.plain(
            &format!("{scenario}: daemon threads, max"),
            peak.threads.to_string(),
            &format!("<= {limit} (2x{} + {THREADS_SLACK})", self.cores),
            Some(peak.threads as usize <= limit),
        );
    }

    fn failures(&mut self, scenario: &str, clients: &Clients) {
        let n = clients.failures();
        let mut value = format!("{n} of {}", clients.len());
        if let Some(first) = clients.first_failure() {
            value.push_str(&format!(
                " (first: {})",
                first.chars().take(80).collect::<String>()
            ));
        }
        self.plain(
            &format!("{scenario}: client failures"),
            value,
            "0",
            Some(n == 0),
        );
    }

    fn print(&self, from: usize) {
        let baseline = self
            .baseline
            .map_or("-".to_owned(), |b| format!("{b:.0} sign/s"));
        println!(
            "\n{:<52} {:>22} {:>14} {:>20}  {:<22} met",
            "figure", "value", "baseline", "ratio", "target"
        );
        for r in &self.rows[from..] {
            let met = match r.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            };
            let base = if r.ratio == "-" { "-" } else { &baseline };
            println!(
                "{:<52} {:>22} {:>14} {:>20}  {:<22} {met}",
                r.figure, r.value, base, r.ratio, r.target
            );
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------- scenarios

fn new_processes(opts: &Opts, report: &mut Report) {
    let n = opts.processes;
    let mut daemon = Daemon::start("1h");
    daemon.warm_up();
    let sampler = Sampler::start(daemon.pid);
    println!("\nnew-processes: starting {n} client processes");
    let mut clients = Clients::spawn(&daemon, n, "new", &[]);
    let ready = clients.step(None);
    clients.expect_ok(&ready, "new-processes start");
    let cpu0 = daemon.cpu_secs();
    let connect = clients.step(Some("go"));
    let cpu1 = daemon.cpu_secs();
    let mut connect_ms = numbers(&connect, "ms");
    let svid = clients.step(Some("go"));
    let cpu2 = daemon.cpu_secs();
    clients.expect_ok(&svid, "new-processes first SVID");
    daemon.check_alive();
    let mut svid_ms = numbers(&svid, "ms");
    let failures = clients.failures();
    let served = svid_ms.len() as f64;
    clients.step(Some("stop"));
    let (cpu3, _) = settle(&daemon, clients);
    let peak = sampler.finish();

    let s = format!("new-processes ({n})");
    let c99 = quantile(&mut connect_ms, 0.99);
    let f99 = quantile(&mut svid_ms, 0.99);
    for (label, values) in [
        ("connect-only", &mut connect_ms),
        ("first SVID", &mut svid_ms),
    ] {
        for (p, name) in [(0.5, "p50"), (0.99, "p99"), (1.0, "max")] {
            let v = quantile(values, p);
            report.latency(&format!("{s}: {label} {name}"), v, None);
        }
    }
    report.latency(
        &format!("{s}: first-SVID p99 - connect-only p99"),
        f99 - c99,
        Some((150.0, "<= 150 ms")),
    );
    report.cpu(
        &format!("{s}: daemon CPU per connect-only"),
        (cpu1 - cpu0) / connect_ms.len().max(1) as f64,
        None,
    );
    report.cpu(
        &format!("{s}: daemon CPU per first SVID"),
        (cpu2 - cpu1) / served.max(1.0),
        Some(5.0),
    );
    report.cpu(
        &format!("{s}: daemon CPU per process exit"),
        (cpu3 - cpu2) / served.max(1.0),
        None,
    );
    report.plain(
        &format!("{s}: daemon RSS, max"),
        mib(peak.rss_kib),
        "",
        None,
    );
    report.threads(&s, peak);
    report.plain(
        &format!("{s}: client failures"),
        format!("{failures} of {n}"),
        "0",
        Some(failures == 0),
    );
}

/// Closes the clients and waits for the daemon to go quiet (its CPU time
/// unchanged over 1 s, at most 20 s). Returns its CPU time then.
fn settle(daemon: &Daemon, clients: Clients) -> (f64, Duration) {
    let start = Instant::now();
    clients.finish();
    let mut last = daemon.cpu_secs();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = daemon.cpu_secs();
        if now - last < 0.011 || start.elapsed() > Duration::from_secs(20) {
            return (now, start.elapsed());
        }
        last = now;
    }
}

fn streams(opts: &Opts, report: &mut Report) {
    let n = opts.streams;
    let per = opts.streams_per_process.min(n);
    let processes = n.div_ceil(per);
    let mut daemon = Daemon::start("1h");
    daemon.warm_up();
    std::thread::sleep(Duration::from_secs(1));
    let before = daemon.status();
    println!("\nstreams: daemon pid {}", daemon.pid);
    hold("SIGIL_LOAD_HOLD_BEFORE_SECS");
    for round in 1..=opts.rounds {
        let s = if opts.rounds == 1 {
            format!("streams ({n})")
        } else {
            format!("streams ({n}) round {round}")
        };
        streams_round(opts, report, &mut daemon, before, &s, processes, per);
    }
    hold("SIGIL_LOAD_HOLD_AFTER_SECS");
}

/// Sleeps for the seconds in the environment variable `var`, if set: time
/// to attach a profiler or debugger to the daemon (its pid is printed).
fn hold(var: &str) {
    if let Some(secs) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
        println!("{var}: holding {secs} s");
        std::thread::sleep(Duration::from_secs(secs));
    }
}

fn streams_round(
    opts: &Opts,
    report: &mut Report,
    daemon: &mut Daemon,
    before: Status,
    s: &str,
    processes: usize,
    per: usize,
) {
    let n = opts.streams;
    let sampler = Sampler::start(daemon.pid);
    println!(
        "\n{s}: {n} streams from {processes} processes, {} per connection",
        opts.streams_per_connection
    );
    let mut clients = Clients::spawn(
        daemon,
        processes,
        "streams",
        &[per.to_string(), opts.streams_per_connection.to_string()],
    );
    let ready = clients.step(None);
    clients.expect_ok(&ready, "streams start");
    let cpu0 = daemon.cpu_secs();
    let start = Instant::now();
    let up = clients.step(Some("go"));
    let all_up = start.elapsed();
    let cpu1 = daemon.cpu_secs();
    clients.expect_ok(&up, "streams");
    daemon.check_alive();
    let mut lat = numbers(&up, "ms");
    let opened = lat.len();
    let stream_errors = sum(&up, "errors");
    std::thread::sleep(Duration::from_secs(2));
    let open = daemon.status();
    report.failures(s, &clients);
    clients.step(Some("stop"));
    let (_, took) = settle(daemon, clients);
    std::thread::sleep(Duration::from_secs(5u64.saturating_sub(took.as_secs())));
    let after = daemon.status();
    let peak = sampler.finish();
    println!(
        "{s}: RSS before {}, all open {}, after close {}",
        mib(before.rss_kib),
        mib(open.rss_kib),
        mib(after.rss_kib)
    );

    report.plain(
        &format!("{s}: streams opened"),
        format!("{opened} ({stream_errors} stream errors)"),
        &format!("{n}"),
        Some(opened == n),
    );
    report.latency(
        &format!("{s}: time to all first messages"),
        all_up.as_secs_f64() * 1e3,
        None,
    );
    for (p, name) in [(0.5, "p50"), (0.99, "p99"), (1.0, "max")] {
        let v = quantile(&mut lat, p);
        report.latency(&format!("{s}: first message per stream {name}"), v, None);
    }
    report.cpu(
        &format!("{s}: daemon CPU per stream opened"),
        (cpu1 - cpu0) / opened.max(1) as f64,
        None,
    );
    report.plain(
        &format!("{s}: daemon RSS before"),
        mib(before.rss_kib),
        "",
        None,
    );
    report.plain(
        &format!("{s}: daemon RSS with all open"),
        mib(open.rss_kib),
        "<= 150 MiB",
        Some(open.rss_kib <= 150 * 1024),
    );
    report.plain(
        &format!("{s}: daemon RSS, max sampled"),
        mib(peak.rss_kib),
        "",
        None,
    );
    report.plain(
        &format!("{s}: daemon RSS per stream"),
        format!(
            "{:.1} KiB",
            open.rss_kib.saturating_sub(before.rss_kib) as f64 / opened.max(1) as f64
        ),
        "",
        None,
    );
    let ratio = after.rss_kib as f64 / before.rss_kib.max(1) as f64;
    report.plain(
        &format!("{s}: daemon RSS after close / before"),
        format!("{} ({ratio:.2}x)", mib(after.rss_kib)),
        "<= 1.20x",
        Some(ratio <= 1.2),
    );
    report.threads(s, peak);
}

fn tasks(opts: &Opts, report: &mut Report) {
    for n in [1usize, 8] {
        let mut daemon = Daemon::start("1h");
        daemon.warm_up();
        let sampler = Sampler::start(daemon.pid);
        println!("\ntasks: {n} client process(es), {} s", opts.task_secs);
        let mut clients = Clients::spawn(&daemon, n, "tasks", &[opts.task_secs.to_string()]);
        let ready = clients.step(None);
        clients.expect_ok(&ready, "tasks start");
        let cpu0 = daemon.cpu_secs();
        let done = clients.step(Some("go"));
        let cpu1 = daemon.cpu_secs();
        clients.expect_ok(&done, "tasks");
        daemon.check_alive();
        let s = format!("tasks ({n} client{})", if n == 1 { "" } else { "s" });
        report.failures(&s, &clients);
        settle(&daemon, clients);
        let peak = sampler.finish();
        let pairs = sum(&done, "pairs");
        let per_sec: f64 = done
            .iter()
            .flatten()
            .map(|v| v["pairs"].as_f64().unwrap_or(0.0) / v["secs"].as_f64().unwrap_or(1.0))
            .sum();
        let mut lat = numbers(&done, "lat_ms");
        report.rate(&format!("{s}: Begin+End pairs"), per_sec);
        report.cpu(
            &format!("{s}: daemon CPU per Begin+End"),
            (cpu1 - cpu0) / pairs.max(1.0),
            Some(5.0),
        );
        report.latency(
            &format!("{s}: Begin+End p50"),
            quantile(&mut lat, 0.5),
            None,
        );
        report.latency(
            &format!("{s}: Begin+End p99"),
            quantile(&mut lat, 0.99),
            None,
        );
        report.plain(
            &format!("{s}: Begins refused (rate limit)"),
            format!("{}", sum(&done, "refused")),
            "",
            None,
        );
        report.threads(&s, peak);
    }
}

fn rotation(opts: &Opts, report: &mut Report) {
    let processes = opts.rotation_processes;
    let n = opts.rotation_streams.max(processes);
    let per = n.div_ceil(processes);
    let mut daemon = Daemon::start(&opts.rotation_ttl);
    daemon.warm_up();
    let sampler = Sampler::start(daemon.pid);
    println!(
        "\nrotation: {} streams from {processes} processes, instance TTL {}, {} s window",
        per * processes,
        opts.rotation_ttl,
        opts.rotation_secs
    );
    let mut clients = Clients::spawn(
        &daemon,
        processes,
        "rotation",
        &[per.to_string(), opts.streams_per_connection.to_string()],
    );
    let ready = clients.step(None);
    clients.expect_ok(&ready, "rotation start");
    let up = clients.step(Some("go"));
    clients.expect_ok(&up, "rotation streams");
    let window_start = epoch_ms();
    let cpu0 = daemon.cpu_secs();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(opts.rotation_secs) {
        std::thread::sleep(Duration::from_millis(200));
        daemon.check_alive();
    }
    let cpu1 = daemon.cpu_secs();
    let window_end = epoch_ms();
    let done = clients.step(Some("stop"));
    let s = format!("rotation ({processes} procs, {} streams)", per * processes);
    report.failures(&s, &clients);
    settle(&daemon, clients);
    let peak = sampler.finish();

    let secs = opts.rotation_secs as usize;
    let mut bins = vec![0u64; secs];
    for t in numbers(&done, "rotations") {
        let t = t as u64;
        if (window_start..window_end).contains(&t) {
            let i = ((t - window_start) / 1000) as usize;
            if let Some(b) = bins.get_mut(i) {
                *b += 1;
            }
        }
    }
    let total: u64 = bins.iter().sum();
    let mean = total as f64 / secs as f64;
    let max = bins.iter().copied().max().unwrap_or(0);
    let min = bins.iter().copied().min().unwrap_or(0);
    report.plain(
        &format!("{s}: rotations in the window"),
        format!("{total} in {secs} s (TTL {})", opts.rotation_ttl),
        "",
        None,
    );
    report.rate(&format!("{s}: rotations, mean"), mean);
    report.plain(
        &format!("{s}: rotations, max / min second"),
        format!("{max} / {min}"),
        "",
        None,
    );
    report.plain(
        &format!("{s}: rotations, max second / mean"),
        format!("{:.2}", max as f64 / mean.max(f64::MIN_POSITIVE)),
        "<= 2",
        Some(max as f64 <= 2.0 * mean && total > 0),
    );
    report.cpu(
        &format!("{s}: daemon CPU per rotation"),
        (cpu1 - cpu0) / (total.max(1)) as f64,
        None,
    );
    report.plain(
        &format!("{s}: stream errors / messages"),
        format!("{} / {}", sum(&done, "errors"), sum(&done, "messages")),
        "",
        None,
    );
    report.threads(&s, peak);
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------- client side

/// The client processes. Each step ends with one JSON line on stdout; any
/// failure is a line `{"error": "..."}` and a non-zero exit.
mod client {
    use super::*;
    use sigil::proto::sigil::workload::v1::tasks_client::TasksClient;
    use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest};
    use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use sigil::proto::workload::{X509svidRequest, X509svidResponse};
    use tokio::sync::mpsc;
    use tonic::transport::Channel;

    pub(super) type Stream = tonic::Streaming<X509svidResponse>;
    pub(super) type Lines = mpsc::UnboundedReceiver<String>;
    /// Largest message a client accepts.
    const MAX_MESSAGE: usize = 256 << 20; // 256 MiB

    /// Protobuf bytes (`encoded_len`, without gRPC or HTTP/2 framing) and
    /// messages received, over all of a process's streams of one kind.
    #[derive(Default)]
    pub(super) struct Counts {
        bytes: std::sync::atomic::AtomicU64,
        messages: std::sync::atomic::AtomicU64,
    }

    impl Counts {
        pub(super) fn add(&self, msg: &impl prost::Message) {
            self.bytes
                .fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
            self.messages.fetch_add(1, Ordering::Relaxed);
        }

        pub(super) fn json(&self) -> Value {
            json!({
                "bytes": self.bytes.load(Ordering::Relaxed),
                "messages": self.messages.load(Ordering::Relaxed),
            })
        }
    }

    pub fn main(args: &[String]) {
        let (kind, socket) = (args[0].as_str(), PathBuf::from(&args[1]));
        let params: Vec<usize> = args[2..].iter().filter_map(|a| a.parse().ok()).collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let lines = stdin_lines();
        let result = runtime.block_on(async {
            match kind {
                "warm" => warm(&socket).await,
                "new" => new_process(&socket, lines).await,
                "streams" => streams(&socket, lines, params[0], params[1]).await,
                "tasks" => {
                    let secs: f64 = args[2].parse().map_err(|_| "bad seconds".to_owned())?;
                    tasks(&socket, lines, secs).await
                }
                "rotation" => rotation(&socket, lines, params[0], params[1]).await,
                "verifier" => crate::revocation::verifier(&socket, lines).await,
                "revtasks" => {
                    let rate: f64 = args[2].parse().map_err(|_| "bad rate".to_owned())?;
                    let gate = args.get(3).and_then(|a| a.parse().ok());
                    crate::revocation::driver(&socket, lines, rate, gate).await
                }
                other => Err(format!("unknown client kind {other}")),
            }
        });
        if let Err(e) = result {
            say(json!({ "error": e }));
            std::process::exit(1);
        }
    }

    pub(super) fn say(v: Value) {
        println!("{v}");
    }

    /// stdin lines, read on a thread; EOF (the parent is gone) ends it.
    fn stdin_lines() -> Lines {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// Waits for the parent's next command; EOF counts as "stop".
    pub(super) async fn next(lines: &mut Lines) -> String {
        lines.recv().await.unwrap_or_else(|| "stop".into())
    }

    pub(super) async fn timed<T, E: std::fmt::Display>(
        what: &str,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(CLIENT_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: no answer in {CLIENT_TIMEOUT:?}")),
        }
    }

    pub(super) async fn channel(socket: &Path) -> Result<Channel, String> {
        let path = socket.to_owned();
        let endpoint = tonic::transport::Endpoint::from_static("http://localhost");
        let connect = endpoint.connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }));
        timed("connect", connect).await
    }

    pub(super) fn with_header<T>(msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        req
    }

    /// A Workload API client that takes messages of any size the bench
    /// makes (a CRL of every task ended in a long run passes tonic's 4 MiB
    /// default).
    pub(super) fn workload_client(ch: Channel) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(ch).max_decoding_message_size(MAX_MESSAGE)
    }

    pub(super) async fn open_stream(ch: Channel) -> Result<Stream, String> {
        let mut client = workload_client(ch);
        let call = client.fetch_x509svid(with_header(X509svidRequest {}));
        Ok(timed("FetchX509SVID", call).await?.into_inner())
    }

    pub(super) async fn first_message(stream: &mut Stream) -> Result<X509svidResponse, String> {
        timed("first message", stream.message())
            .await?
            .ok_or_else(|| "stream ended before its first message".to_owned())
    }

    pub(super) fn ms(since: Instant) -> f64 {
        since.elapsed().as_secs_f64() * 1e3
    }

    async fn warm(socket: &Path) -> Result<(), String> {
        let mut stream = open_stream(channel(socket).await?).await?;
        first_message(&mut stream).await?;
        say(json!({ "ok": true }));
        Ok(())
    }

    /// Connect-only round trip, then (at the second go) the first SVID,
    /// each timed from before connect().
    async fn new_process(socket: &Path, mut lines: Lines) -> Result<(), String> {
        say(json!({ "ready": true }));
        next(&mut lines).await;
        let start = Instant::now();
        let ch = channel(socket).await?;
        let answer = tokio::time::timeout(
            CLIENT_TIMEOUT,
            SpiffeWorkloadApiClient::new(ch).fetch_x509svid(X509svidRequest {}),
        )
        .await;
        let connect_ms = ms(start);
        match answer {
            Err(_) => return Err("connect-only: no answer".into()),
            Ok(Ok(_)) => return Err("connect-only: answered without the header".into()),
            Ok(Err(s)) if s.code() != tonic::Code::InvalidArgument => {
                return Err(format!("connect-only: {s}"));
            }
            Ok(Err(_)) => {}
        }
        say(json!({ "ms": connect_ms }));
        next(&mut lines).await;
        let start = Instant::now();
        let mut stream = open_stream(channel(socket).await?).await?;
        first_message(&mut stream).await?;
        say(json!({ "ms": ms(start) }));
        next(&mut lines).await;
        drop(stream);
        say(json!({ "closed": true }));
        Ok(())
    }

    /// Opens `count` streams, `per_conn` to a connection; reports when each
    /// got its first message; keeps them open (drained) until "stop".
    async fn open_many(
        socket: &Path,
        count: usize,
        per_conn: usize,
        forward: Option<mpsc::UnboundedSender<Vec<Vec<u8>>>>,
        counts: Arc<Counts>,
    ) -> Result<(tokio::task::JoinSet<()>, Vec<f64>, usize), String> {
        let mut channels = Vec::new();
        for _ in 0..count.div_ceil(per_conn.max(1)) {
            channels.push(channel(socket).await?);
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Result<f64, String>>();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..count {
            let ch = channels[i / per_conn.max(1)].clone();
            let (tx, forward, counts) = (tx.clone(), forward.clone(), counts.clone());
            set.spawn(async move {
                let start = Instant::now();
                let mut stream = match open_stream(ch).await {
                    Ok(s) => s,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                match first_message(&mut stream).await {
                    Ok(msg) => {
                        counts.add(&msg);
                        let _ = tx.send(Ok(ms(start)));
                        if let Some(f) = &forward {
                            let _ = f.send(serials(&msg));
                        }
                    }
                    Err(e) => return drop(tx.send(Err(e))),
                }
                while let Ok(Some(msg)) = stream.message().await {
                    counts.add(&msg);
                    if let Some(f) = &forward {
                        let _ = f.send(serials(&msg));
                    }
                }
                if let Some(f) = &forward {
                    let _ = f.send(vec![]); // the stream ended
                }
            });
        }
        let (mut lat, mut errors) = (Vec::with_capacity(count), 0);
        let mut first_error = None;
        for _ in 0..count {
            match rx.recv().await {
                Some(Ok(ms)) => lat.push(ms),
                Some(Err(e)) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
                None => break,
            }
        }
        if lat.is_empty() {
            return Err(first_error.unwrap_or_else(|| "no stream opened".into()));
        }
        Ok((set, lat, errors))
    }

    fn serials(msg: &X509svidResponse) -> Vec<Vec<u8>> {
        let mut s: Vec<Vec<u8>> = msg
            .svids
            .iter()
            .filter_map(|svid| {
                x509_parser::parse_x509_certificate(&svid.x509_svid)
                    .ok()
                    .map(|(_, c)| c.raw_serial().to_vec())
            })
            .collect();
        s.sort();
        s
    }

    async fn streams(
        socket: &Path,
        mut lines: Lines,
        count: usize,
        per_conn: usize,
    ) -> Result<(), String> {
        say(json!({ "ready": true }));
        next(&mut lines).await;
        let counts = Arc::new(Counts::default());
        let (set, lat, errors) = open_many(socket, count, per_conn, None, counts.clone()).await?;
        say(json!({ "ms": lat, "errors": errors }));
        // `count`: the bytes and messages so far; anything else closes.
        while next(&mut lines).await == "count" {
            say(counts.json());
        }
        drop(set);
        let mut closed = counts.json();
        closed["closed"] = json!(true);
        say(closed);
        Ok(())
    }

    async fn rotation(
        socket: &Path,
        mut lines: Lines,
        count: usize,
        per_conn: usize,
    ) -> Result<(), String> {
        say(json!({ "ready": true }));
        next(&mut lines).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        let (set, _, errors) = open_many(socket, count, per_conn, Some(tx), counts).await?;
        say(json!({ "up": true, "errors": errors }));
        let mut seen: HashSet<Vec<Vec<u8>>> = HashSet::new();
        let (mut rotations, mut messages, mut ended) = (Vec::new(), 0u64, 0u64);
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(s) = msg else { break };
                    if s.is_empty() {
                        ended += 1;
                        continue;
                    }
                    messages += 1;
                    let first = seen.is_empty();
                    if seen.insert(s) && !first {
                        rotations.push(epoch_ms());
                    }
                }
                _ = next(&mut lines) => break,
            }
        }
        drop(set);
        say(json!({
            "rotations": rotations,
            "messages": messages,
            "errors": errors as u64 + ended,
        }));
        Ok(())
    }

    /// Holds a FetchX509SVID stream (drained), then loops Begin + End on
    /// this process's own instance for `secs`.
    async fn tasks(socket: &Path, mut lines: Lines, secs: f64) -> Result<(), String> {
        let ch = channel(socket).await?;
        let mut stream = open_stream(ch.clone()).await?;
        first_message(&mut stream).await?;
        tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
        let mut tasks = TasksClient::new(ch);
        say(json!({ "ready": true }));
        next(&mut lines).await;
        let (mut pairs, mut refused, mut lat) = (0u64, 0u64, Vec::new());
        let start = Instant::now();
        let run_for = Duration::from_secs_f64(secs);
        while start.elapsed() < run_for {
            let id = format!("t{pairs}");
            let t = Instant::now();
            let begin = BeginRequest {
                task_id: id.clone(),
                ttl: None,
                attributes: Default::default(),
            };
            match tokio::time::timeout(CLIENT_TIMEOUT, tasks.begin(with_header(begin))).await {
                Ok(Ok(_)) => {}
                Ok(Err(s)) if s.code() == tonic::Code::ResourceExhausted => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                Ok(Err(s)) => return Err(format!("Begin: {s}")),
                Err(_) => return Err("Begin: no answer".into()),
            }
            timed("End", tasks.end(with_header(EndRequest { task_id: id }))).await?;
            lat.push(ms(t));
            pairs += 1;
        }
        say(json!({
            "pairs": pairs,
            "secs": start.elapsed().as_secs_f64(),
            "refused": refused,
            "lat_ms": lat,
        }));
        next(&mut lines).await;
        Ok(())
    }
}

// ---------------------------------------------------------------- revocation at scale

/// The `revocation` scenario: the parent's side (`run`) and its two client
/// kinds (`verifier`, `driver`); the agent streams are `streams` clients.
mod revocation {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use sigil::proto::sigil::workload::v1::tasks_client::TasksClient;
    use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest};
    use sigil::proto::workload::{X509BundlesRequest, X509BundlesResponse, X509svidResponse};
    use tokio::sync::watch;
    use tonic::transport::Channel;

    use super::client::{
        Counts, Lines, channel, first_message, ms, next, open_stream, say, timed, with_header,
        workload_client,
    };
    use super::*;

    /// How long a driver waits for a task SVID on its stream after Begin
    /// answered; past it the Begin counts as never seen (and is ended).
    const SEEN_TIMEOUT: Duration = Duration::from_secs(30);
    /// How long a driver waits for a Begin or an End answer.
    const RPC_TIMEOUT: Duration = Duration::from_secs(60);
    /// After the window, how long the verifiers get to see the last ends.
    const GRACE: Duration = Duration::from_secs(30);
    /// Latency target of issue 14 for both Begin and End, ms.
    const TARGET_MS: f64 = 200.0;
    /// The RSS figure compared with the end: this far into the window.
    const RSS_MARK: Duration = Duration::from_secs(30);

    /// Wall clock in ms since the epoch, to the microsecond: the one clock
    /// a driver's End and a verifier's sighting share across processes.
    fn epoch_ms_f64() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }

    // ------------------------------------------------------------ parent

    /// The daemon's RSS every second, and whether the machine ran short of
    /// memory (MemAvailable under the floor), until finished.
    struct RssLog {
        stop: Arc<AtomicBool>,
        low: Arc<AtomicBool>,
        handle: std::thread::JoinHandle<Vec<(f64, u64)>>,
    }

    impl RssLog {
        fn start(pid: u32, floor_mib: u64) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let low = Arc::new(AtomicBool::new(false));
            let (flag, short) = (stop.clone(), low.clone());
            let handle = std::thread::spawn(move || {
                let start = Instant::now();
                let mut samples = Vec::new();
                let mut next = Duration::ZERO;
                while !flag.load(Ordering::Relaxed) {
                    if start.elapsed() >= next {
                        if let Some(s) = read_status(pid) {
                            samples.push((start.elapsed().as_secs_f64(), s.rss_kib));
                        }
                        if mem_available_mib().is_some_and(|m| m < floor_mib) {
                            short.store(true, Ordering::Relaxed);
                        }
                        next += Duration::from_secs(1);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Some(s) = read_status(pid) {
                    samples.push((start.elapsed().as_secs_f64(), s.rss_kib));
                }
                samples
            });
            RssLog { stop, low, handle }
        }

        fn low(&self) -> bool {
            self.low.load(Ordering::Relaxed)
        }

        fn finish(self) -> Vec<(f64, u64)> {
            self.stop.store(true, Ordering::Relaxed);
            self.handle.join().unwrap()
        }
    }

    fn mem_available_mib() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    }

    /// Busy CPU seconds of the whole machine (all cores, from /proc/stat).
    fn machine_busy_secs() -> f64 {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let busy: u64 = fields
            .iter()
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, v)| v)
            .sum();
        busy as f64 / procfs::ticks_per_second() as f64
    }

    /// CPU seconds of the given processes; ones gone are left out.
    fn cpu_of(pids: &[u32]) -> HashMap<u32, f64> {
        pids.iter()
            .filter_map(|&p| process_cpu_secs(p).map(|c| (p, c)))
            .collect()
    }

    fn cpu_between(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
        after
            .iter()
            .map(|(p, c)| c - before.get(p).copied().unwrap_or(0.0))
            .sum()
    }

    fn total(lines: &[Option<Value>], key: &str) -> u64 {
        sum(lines, key) as u64
    }

    /// Bytes and messages of one kind of stream over the window.
    struct Traffic {
        bytes: u64,
        messages: u64,
    }

    impl Traffic {
        fn between(before: &[Option<Value>], after: &[Option<Value>]) -> Self {
            Traffic {
                bytes: total(after, "bytes").saturating_sub(total(before, "bytes")),
                messages: total(after, "messages").saturating_sub(total(before, "messages")),
            }
        }

        fn report(&self, report: &mut Report, s: &str, kind: &str, secs: f64, ends: u64) {
            report.plain(
                &format!("{s}: {kind} bytes / messages"),
                format!("{:.1} MB / {}", self.bytes as f64 / 1e6, self.messages),
                "",
                None,
            );
            report.plain(
                &format!("{s}: {kind} MB/s"),
                format!("{:.2} MB/s", self.bytes as f64 / 1e6 / secs.max(1e-9)),
                "",
                None,
            );
            report.plain(
                &format!("{s}: {kind} bytes per task end"),
                format!("{:.0} B", self.bytes as f64 / ends.max(1) as f64),
                "",
                None,
            );
        }
    }

    pub(super) fn run(opts: &Opts, report: &mut Report) {
        let n = opts.revocation_streams;
        let per = opts.streams_per_process.min(n);
        let processes = n.div_ceil(per);
        let (v, k) = (opts.revocation_verifiers, opts.revocation_drivers);
        let rate = opts.revocation_rate;
        let secs = opts.revocation_secs;
        let mut daemon = Daemon::start("1h");
        daemon.warm_up();
        let peak_sampler = Sampler::start(daemon.pid);
        println!(
            "\nrevocation: {} agent streams from {processes} processes, {v} verifiers, \
             {rate}/s Begin+End from {k} drivers, {secs} s; daemon pid {}",
            per * processes,
            daemon.pid
        );
        let mut agents = Clients::spawn(
            &daemon,
            processes,
            "streams",
            &[per.to_string(), opts.streams_per_connection.to_string()],
        );
        let ready = agents.step(None);
        agents.expect_ok(&ready, "revocation agents start");
        let t = Instant::now();
        let up = agents.step(Some("go"));
        agents.expect_ok(&up, "revocation agent streams");
        let opened = numbers(&up, "ms").len();
        let stream_errors = sum(&up, "errors");
        println!(
            "{opened} agent streams up in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let mut verifiers = Clients::spawn(&daemon, v, "verifier", &[]);
        let ready = verifiers.step(None);
        verifiers.expect_ok(&ready, "revocation verifiers");
        let gate = Gate::start(&daemon);
        println!("gate pid {} on {}", gate.child.id(), gate.addr);
        let mut drivers = Clients::spawn(
            &daemon,
            k,
            "revtasks",
            &[(rate / k as f64).to_string(), gate.addr.to_string()],
        );
        let ready = drivers.step(None);
        drivers.expect_ok(&ready, "revocation drivers");
        std::thread::sleep(Duration::from_secs(2));
        daemon.check_alive();

        // The window: from the drivers' go to their stop.
        let agents0 = agents.step(Some("count"));
        let verifiers0 = verifiers.step(Some("count"));
        // The clients by kind, and this process (it samples /proc and
        // steps them).
        let groups = [
            agents.pids(),
            verifiers.pids(),
            drivers.pids(),
            vec![std::process::id()],
            vec![gate.child.id()],
        ];
        let cpu_groups = || groups.iter().map(|g| cpu_of(g)).collect::<Vec<_>>();
        let (clients0, machine0, cpu0) = (cpu_groups(), machine_busy_secs(), daemon.cpu_secs());
        let rss = RssLog::start(daemon.pid, opts.revocation_min_available_mib);
        let start = Instant::now();
        drivers.send("go");
        let mut cut_short = None;
        let (mut shown, mut shown_cpu) = (Duration::ZERO, cpu0);
        while start.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(200));
            daemon.check_alive();
            if start.elapsed() >= shown + Duration::from_secs(10) {
                let cpu = daemon.cpu_secs();
                println!(
                    "  {:>4.0} s: daemon RSS {}, {:.2} cores over the last {:.0} s; \
                     MemAvailable {} MiB",
                    start.elapsed().as_secs_f64(),
                    mib(daemon.status().rss_kib),
                    (cpu - shown_cpu) / (start.elapsed() - shown).as_secs_f64(),
                    (start.elapsed() - shown).as_secs_f64(),
                    mem_available_mib().unwrap_or(0)
                );
                (shown, shown_cpu) = (start.elapsed(), cpu);
            }
            if rss.low() {
                cut_short = Some(start.elapsed());
                println!(
                    "MemAvailable under {} MiB after {:.1} s: window cut short",
                    opts.revocation_min_available_mib,
                    start.elapsed().as_secs_f64()
                );
                break;
            }
        }
        drivers.send("stop");
        let window = start.elapsed().as_secs_f64();
        let (clients1, machine1, cpu1) = (cpu_groups(), machine_busy_secs(), daemon.cpu_secs());
        let rss_samples = rss.finish();
        let agents1 = agents.step(Some("count"));
        let after_window = Instant::now();
        let verifiers1 = verifiers.step(Some("count"));
        let done = drivers.step(None);
        drivers.expect_ok(&done, "revocation drivers' results");
        let ends = driver_ends(&done);

        // Grace: until every verifier has a sighting per end, at most GRACE.
        let grace = Instant::now();
        let initial = numbers(&verifiers0, "seen");
        loop {
            let now = verifiers.step(Some("count"));
            let seen = numbers(&now, "seen");
            let all = seen.len() == initial.len()
                && seen
                    .iter()
                    .zip(&initial)
                    .all(|(s, i)| s - i >= ends.len() as f64);
            if all || grace.elapsed() > GRACE {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let grace_secs = grace.elapsed().as_secs_f64();
        let verdicts = verifiers.step(Some("stop"));
        let agents2 = agents.step(Some("stop"));
        let after_secs = after_window.elapsed().as_secs_f64();
        daemon.check_alive();
        let s = "revocation".to_owned();
        report.plain(
            &format!("{s}: layout"),
            format!("{opened} streams, {v} verifiers, {k} drivers, {rate}/s, {window:.0} s"),
            "",
            None,
        );
        report.failures(&format!("{s} agents"), &agents);
        report.failures(&format!("{s} verifiers"), &verifiers);
        report.failures(&format!("{s} drivers"), &drivers);
        verifiers.finish();
        drivers.finish();
        settle(&daemon, agents);
        let peak = peak_sampler.finish();

        report.plain(
            &format!("{s}: agent streams opened"),
            format!("{opened} ({stream_errors} stream errors)"),
            &format!("{}", per * processes),
            Some(opened == per * processes),
        );
        if let Some(at) = cut_short {
            report.plain(
                &format!("{s}: window CUT SHORT (memory floor)"),
                format!("{:.1} s of {secs} s", at.as_secs_f64()),
                "",
                Some(false),
            );
        }
        let ended = total(&done, "ended");
        report_tasks(report, &s, &done, window, rate);
        report_ends(report, &s, &ends, &verdicts, ended, grace_secs);
        let mut closes = numbers(&done, "gate_close_ms");
        latency_rows(
            report,
            &s,
            "End -> the gate closed the task's connection",
            &mut closes,
            true,
        );
        report.plain(
            &format!("{s}: gate connections not measured"),
            format!(
                "{} ({})",
                total(&done, "gate_errors"),
                done.iter()
                    .flatten()
                    .find_map(|d| d["first_gate_error"].as_str())
                    .unwrap_or("-")
            ),
            "0",
            Some(total(&done, "gate_errors") == 0),
        );
        drop(gate);
        let agent = Traffic::between(&agents0, &agents1);
        let verifier = Traffic::between(&verifiers0, &verifiers1);
        let driver = Traffic {
            bytes: total(&done, "bytes"),
            messages: total(&done, "messages"),
        };
        agent.report(report, &s, "agent streams", window, ended);
        verifier.report(report, &s, "verifier streams", window, ended);
        driver.report(report, &s, "driver streams", window, ended);
        let late = Traffic::between(&agents1, &agents2);
        report.plain(
            &format!("{s}: agent bytes after the window, until stop"),
            format!("{:.1} MB in {after_secs:.1} s", late.bytes as f64 / 1e6),
            "",
            None,
        );
        let crl = verdicts.iter().flatten().next();
        report.plain(
            &format!("{s}: CRL at the end (entries / bytes)"),
            crl.map_or("-".into(), |c| {
                format!("{} / {}", c["crl_entries"], c["crl_bytes"])
            }),
            "",
            None,
        );
        report_rss(report, &s, &rss_samples);
        let daemon_cpu = cpu1 - cpu0;
        let by_kind: Vec<f64> = clients0
            .iter()
            .zip(&clients1)
            .map(|(a, b)| cpu_between(a, b))
            .collect();
        let client_cpu: f64 = by_kind.iter().sum();
        let machine = machine1 - machine0;
        report.cpu(
            &format!("{s}: daemon CPU per task end"),
            daemon_cpu / ended.max(1) as f64,
            None,
        );
        report.plain(
            &format!("{s}: CPU cores: daemon / clients / rest"),
            format!(
                "{:.2} / {:.2} / {:.2}",
                daemon_cpu / window,
                client_cpu / window,
                (machine - daemon_cpu - client_cpu).max(0.0) / window
            ),
            &format!("of {} (rest: other work)", report.cores),
            None,
        );
        report.plain(
            &format!("{s}: client cores: agents / verifiers / drivers / bench / gate"),
            by_kind
                .iter()
                .map(|c| format!("{:.2}", c / window))
                .collect::<Vec<_>>()
                .join(" / "),
            "",
            None,
        );
        report.threads(&s, peak);
    }

    /// Every End with its task SVID's serial: (serial hex, epoch ms before
    /// the End was sent).
    fn driver_ends(done: &[Option<Value>]) -> Vec<(String, f64)> {
        done.iter()
            .flatten()
            .flat_map(|d| d["ends"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| Some((e[0].as_str()?.to_owned(), e[1].as_f64()?)))
            .collect()
    }

    fn latency_rows(report: &mut Report, s: &str, what: &str, values: &mut [f64], target: bool) {
        for (p, name) in [(0.5, "p50"), (0.99, "p99"), (1.0, "max")] {
            let v = quantile(values, p);
            let t = (target && name == "p99").then_some((TARGET_MS, "<= 200 ms"));
            report.latency(&format!("{s}: {what} {name}"), v, t);
        }
    }

    fn report_tasks(report: &mut Report, s: &str, done: &[Option<Value>], window: f64, rate: f64) {
        let ended = total(done, "ended");
        report.plain(
            &format!("{s}: cycles scheduled / begun / ended"),
            format!(
                "{} / {} / {ended}",
                total(done, "scheduled"),
                total(done, "begun")
            ),
            "",
            None,
        );
        report.row(
            format!("{s}: task ends"),
            format!("{:.1} /s", ended as f64 / window),
            "-".into(),
            &format!("{rate} /s"),
            Some(ended as f64 / window >= 0.95 * rate),
        );
        report.plain(
            &format!("{s}: Begins refused (rate limit) / errors"),
            format!(
                "{} / {}{}",
                total(done, "refused"),
                total(done, "errors"),
                done.iter()
                    .flatten()
                    .find_map(|d| d["first_error"].as_str())
                    .map_or(String::new(), |e| format!(
                        " (first: {})",
                        e.chars().take(60).collect::<String>()
                    ))
            ),
            "0 / 0",
            Some(total(done, "refused") == 0 && total(done, "errors") == 0),
        );
        let mut begin = numbers(done, "begin_ms");
        latency_rows(report, s, "Begin -> SVID on own stream", &mut begin, true);
        report.plain(
            &format!("{s}: task SVIDs not seen on own stream"),
            format!(
                "{} (waited {} s each)",
                total(done, "unseen"),
                SEEN_TIMEOUT.as_secs()
            ),
            "0",
            Some(total(done, "unseen") == 0),
        );
        let mut begin_rpc = numbers(done, "begin_rpc_ms");
        let mut end_rpc = numbers(done, "end_rpc_ms");
        for (what, values) in [("Begin RPC", &mut begin_rpc), ("End RPC", &mut end_rpc)] {
            for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
                report.latency(&format!("{s}: {what} {name}"), quantile(values, p), None);
            }
        }
    }

    /// End -> the serial in every verifier's CRL: per end, the latest of
    /// the verifiers' first sightings.
    fn report_ends(
        report: &mut Report,
        s: &str,
        ends: &[(String, f64)],
        verdicts: &[Option<Value>],
        ended: u64,
        grace: f64,
    ) {
        let maps: Vec<&serde_json::Map<String, Value>> = verdicts
            .iter()
            .flatten()
            .filter_map(|v| v["first_seen"].as_object())
            .collect();
        let (mut lat, mut never) = (Vec::with_capacity(ends.len()), 0usize);
        for (serial, end_ms) in ends {
            let worst = maps.iter().try_fold(f64::MIN, |worst, m| {
                m.get(serial)
                    .and_then(Value::as_f64)
                    .map(|seen| worst.max(seen - end_ms))
            });
            match worst {
                Some(w) if !maps.is_empty() => lat.push(w),
                _ => never += 1,
            }
        }
        latency_rows(report, s, "End -> in every verifier's CRL", &mut lat, true);
        let unknown = ended.saturating_sub(ends.len() as u64);
        report.plain(
            &format!("{s}: ends not in every verifier's CRL"),
            format!(
                "{never} of {} ({} verifiers; waited {grace:.1} s more after the last End){}",
                ends.len(),
                maps.len(),
                if unknown > 0 {
                    format!("; {unknown} ends without a known serial")
                } else {
                    String::new()
                }
            ),
            "0",
            Some(never == 0 && unknown == 0 && !maps.is_empty()),
        );
    }

    fn report_rss(report: &mut Report, s: &str, samples: &[(f64, u64)]) {
        let Some(&(_, first)) = samples.first() else {
            return;
        };
        let &(end_t, last) = samples.last().unwrap();
        // 30 s in, or half the window when it is shorter than a minute.
        let mark_t = if end_t >= 2.0 * RSS_MARK.as_secs_f64() {
            RSS_MARK.as_secs_f64()
        } else {
            end_t / 2.0
        };
        let &(mark_at, mark) = samples
            .iter()
            .find(|(t, _)| *t >= mark_t)
            .unwrap_or(samples.last().unwrap());
        let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
        report.plain(
            &format!("{s}: daemon RSS start / {mark_at:.0} s / end / max"),
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0} MiB",
                first as f64 / 1024.0,
                mark as f64 / 1024.0,
                last as f64 / 1024.0,
                max as f64 / 1024.0
            ),
            "",
            None,
        );
        let ratio = last as f64 / mark.max(1) as f64;
        report.plain(
            &format!("{s}: daemon RSS end / at {mark_at:.0} s"),
            format!("{ratio:.2}x ({} samples, 1 s apart)", samples.len()),
            "<= 1.20x (stable)",
            Some(ratio <= 1.2),
        );
    }

    // ------------------------------------------------------------ verifier

    /// What one verifier has seen: when each serial first appeared in a
    /// CRL on its FetchX509Bundles stream.
    #[derive(Default)]
    struct Seen {
        counts: Counts,
        first_seen: HashMap<String, f64>,
        last_crl: bytes::Bytes,
        crl_entries: usize,
    }

    impl Seen {
        fn absorb(&mut self, msg: &X509BundlesResponse) -> Result<(), String> {
            let now = epoch_ms_f64();
            self.counts.add(msg);
            for der in &msg.crl {
                if *der == self.last_crl {
                    continue;
                }
                let (_, crl) =
                    x509_parser::parse_x509_crl(der).map_err(|e| format!("unparsable CRL: {e}"))?;
                let mut entries = 0;
                for revoked in crl.iter_revoked_certificates() {
                    entries += 1;
                    self.first_seen
                        .entry(hex::encode(revoked.raw_serial()))
                        .or_insert(now);
                }
                self.crl_entries = entries;
                self.last_crl = der.clone();
            }
            Ok(())
        }
    }

    /// Holds one FetchX509Bundles stream and notes when each revoked
    /// serial first shows up. `count`: bytes, messages, serials seen;
    /// anything else: the sightings, then exit at the next line.
    pub(super) async fn verifier(socket: &Path, mut lines: Lines) -> Result<(), String> {
        let mut client = workload_client(channel(socket).await?);
        let call = client.fetch_x509_bundles(with_header(X509BundlesRequest {}));
        let mut stream = timed("FetchX509Bundles", call).await?.into_inner();
        let mut seen = Seen::default();
        let first = timed("first bundle message", stream.message())
            .await?
            .ok_or_else(|| "bundle stream ended before its first message".to_owned())?;
        seen.absorb(&first)?;
        say(json!({ "ready": true }));
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(m)) => seen.absorb(&m)?,
                    Ok(None) => return Err("the bundle stream ended".into()),
                    Err(s) => return Err(format!("bundle stream: {s}")),
                },
                line = next(&mut lines) => {
                    if line != "count" {
                        break;
                    }
                    let mut c = seen.counts.json();
                    c["seen"] = json!(seen.first_seen.len());
                    say(c);
                }
            }
        }
        let mut out = seen.counts.json();
        out["first_seen"] = json!(seen.first_seen);
        out["crl_entries"] = json!(seen.crl_entries);
        out["crl_bytes"] = json!(seen.last_crl.len());
        say(out);
        next(&mut lines).await;
        Ok(())
    }

    // ------------------------------------------------------------ gate

    /// `sigil gate` in front of nothing (requests get 502), admitting the
    /// load trust domain, on the daemon's socket: the drivers hold a
    /// connection through it with each task SVID and time its close.
    struct Gate {
        child: Child,
        addr: std::net::SocketAddr,
    }

    impl Gate {
        fn start(daemon: &Daemon) -> Self {
            // An upstream port nobody listens on.
            let upstream = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap();
            let log = daemon.dir.path().join("gate.log");
            let mut child = Command::new(env!("CARGO_BIN_EXE_sigil"))
                .args(["gate", "--listen", "127.0.0.1:0", "--upstream"])
                .arg(format!("http://{upstream}"))
                .args(["--allow", "spiffe://load.test", "--socket"])
                .arg(&daemon.socket)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let Some(addr) = line.trim().strip_prefix("listening on ") else {
                panic!("the gate did not start: {}", tail(&log, 20));
            };
            Self {
                addr: addr.parse().unwrap(),
                child,
            }
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    // ------------------------------------------------------------ driver

    /// A task SVID as a driver saw it: when, its serial (hex), and what a
    /// TLS client needs to present it (chain DER, PKCS#8 key, bundle DER).
    #[derive(Clone)]
    struct Sighting {
        at: Instant,
        serial: String,
        chain: bytes::Bytes,
        key: bytes::Bytes,
        bundle: bytes::Bytes,
    }

    /// Task SVIDs seen on a driver's own stream, by hint.
    struct Sightings {
        counts: Counts,
        seen: Mutex<HashMap<String, Sighting>>,
        /// Bumped on every new task SVID and when the stream ends.
        tick: watch::Sender<u64>,
        ended: AtomicBool,
    }

    impl Sightings {
        fn absorb(&self, msg: &X509svidResponse) {
            let now = Instant::now();
            self.counts.add(msg);
            let mut seen = self.seen.lock().unwrap();
            let mut new = false;
            for svid in msg.svids.iter().filter(|s| s.hint.starts_with("task:")) {
                if seen.contains_key(&svid.hint) {
                    continue;
                }
                let serial = x509_parser::parse_x509_certificate(&svid.x509_svid)
                    .map(|(_, c)| hex::encode(c.raw_serial()))
                    .unwrap_or_default();
                seen.insert(
                    svid.hint.clone(),
                    Sighting {
                        at: now,
                        serial,
                        // Copies: a slice would pin the whole received
                        // buffer for the driver's life.
                        chain: bytes::Bytes::copy_from_slice(&svid.x509_svid),
                        key: bytes::Bytes::copy_from_slice(&svid.x509_svid_key),
                        bundle: bytes::Bytes::copy_from_slice(&svid.bundle),
                    },
                );
                new = true;
            }
            drop(seen);
            if new {
                self.tick.send_modify(|n| *n += 1);
            }
        }

        fn end(&self) {
            self.ended.store(true, Ordering::Relaxed);
            self.tick.send_modify(|n| *n += 1);
        }

        /// When the SVID with `hint` appeared, waiting up to SEEN_TIMEOUT.
        async fn wait(&self, hint: &str) -> Option<Sighting> {
            let mut tick = self.tick.subscribe();
            let deadline = tokio::time::Instant::now() + SEEN_TIMEOUT;
            loop {
                if let Some(found) = self.seen.lock().unwrap().get(hint) {
                    return Some(found.clone());
                }
                if self.ended.load(Ordering::Relaxed) {
                    return None;
                }
                match tokio::time::timeout_at(deadline, tick.changed()).await {
                    Ok(Ok(())) => {}
                    _ => return None,
                }
            }
        }
    }

    /// One Begin -> task SVID on the stream -> End.
    #[derive(Default)]
    struct Cycle {
        refused: bool,
        error: Option<String>,
        begin_rpc_ms: Option<f64>,
        begin_ms: Option<f64>,
        end_rpc_ms: Option<f64>,
        /// The task SVID's serial (if it was seen) and the wall clock just
        /// before End was sent.
        ended: Option<(Option<String>, f64)>,
        /// With a gate: End -> the gate closed the connection the task SVID
        /// had open through it, ms; or why that was not measured.
        gate_close_ms: Option<f64>,
        gate_error: Option<String>,
    }

    async fn cycle(
        mut tasks: TasksClient<Channel>,
        seen: Arc<Sightings>,
        id: String,
        gate: Option<std::net::SocketAddr>,
    ) -> Cycle {
        let mut out = Cycle::default();
        let t0 = Instant::now();
        let begin = BeginRequest {
            task_id: id.clone(),
            ttl: None,
            attributes: Default::default(),
        };
        match tokio::time::timeout(RPC_TIMEOUT, tasks.begin(with_header(begin))).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if s.code() == tonic::Code::ResourceExhausted => {
                out.refused = true;
                return out;
            }
            Ok(Err(s)) => {
                out.error = Some(format!("Begin: {s}"));
                return out;
            }
            Err(_) => {
                out.error = Some("Begin: no answer".into());
                return out;
            }
        }
        out.begin_rpc_ms = Some(ms(t0));
        let sighting = seen.wait(&format!("task:{id}")).await;
        out.begin_ms = sighting
            .as_ref()
            .map(|s| s.at.saturating_duration_since(t0).as_secs_f64() * 1e3);
        // With a gate: a connection with the task SVID, admitted (one
        // request answered) before End, whose close is then timed.
        let mut through_gate = None;
        if let (Some(addr), Some(s)) = (gate, &sighting) {
            match gate_connection(addr, s).await {
                Ok(conn) => through_gate = Some(conn),
                Err(e) => out.gate_error = Some(e),
            }
        }
        let end_at = epoch_ms_f64();
        let t1 = Instant::now();
        let end = EndRequest { task_id: id };
        match tokio::time::timeout(RPC_TIMEOUT, tasks.end(with_header(end))).await {
            Ok(Ok(_)) => {
                out.end_rpc_ms = Some(ms(t1));
                out.ended = Some((sighting.map(|s| s.serial), end_at));
            }
            Ok(Err(s)) => out.error = Some(format!("End: {s}")),
            Err(_) => out.error = Some("End: no answer".into()),
        }
        if let Some(mut conn) = through_gate {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1024];
            let closed = tokio::time::timeout(SEEN_TIMEOUT, async {
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            match closed {
                Ok(()) => out.gate_close_ms = Some(epoch_ms_f64() - end_at),
                Err(_) => out.gate_error = Some("the gate never closed the connection".into()),
            }
        }
        out
    }

    /// A TLS connection to the gate with the task SVID `s` as the client
    /// certificate, once the gate has answered one request on it (so the
    /// gate has admitted it: a 502 from the absent upstream is fine).
    async fn gate_connection(
        addr: std::net::SocketAddr,
        s: &Sighting,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let split = |der: &[u8]| sigil::verify::source::split_certs(der).map_err(|e| e.to_string());
        let verifier = sigil::verify::tls::SvidServerVerifier::new(
            sigil::ids::TrustDomain::new("load.test").map_err(|e| e.to_string())?,
            split(&s.bundle)?,
            Vec::new(),
            vec!["spiffe://load.test".parse().map_err(|e| format!("{e}"))?],
        );
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(s.key.to_vec()));
        let chain: Vec<CertificateDer<'static>> = split(&s.chain)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to the gate: {e}"))?;
        let name = ServerName::try_from("gate").map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake with the gate: {e}"))?;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: gate\r\n\r\n")
            .await
            .map_err(|e| format!("request to the gate: {e}"))?;
        let mut buf = [0u8; 1024];
        let n = tls
            .read(&mut buf)
            .await
            .map_err(|e| format!("the gate refused the task SVID: {e}"))?;
        if !buf[..n].starts_with(b"HTTP/1.1 ") {
            return Err("the gate did not answer the request".into());
        }
        Ok(tls)
    }

    /// Holds its own FetchX509SVID stream; from `go` until the next line
    /// starts a cycle every 1/`rate` s (from a random phase, so that the
    /// drivers do not start theirs together), waits for the cycles under
    /// way, and reports them all.
    pub(super) async fn driver(
        socket: &Path,
        mut lines: Lines,
        rate: f64,
        gate: Option<std::net::SocketAddr>,
    ) -> Result<(), String> {
        let ch = channel(socket).await?;
        let mut stream = open_stream(ch.clone()).await?;
        let first = first_message(&mut stream).await?;
        let seen = Arc::new(Sightings {
            counts: Counts::default(),
            seen: Mutex::new(HashMap::new()),
            tick: watch::Sender::new(0),
            ended: AtomicBool::new(false),
        });
        seen.absorb(&first);
        let reader = seen.clone();
        let reading = tokio::spawn(async move {
            while let Ok(Some(msg)) = stream.message().await {
                reader.absorb(&msg);
            }
            reader.end();
        });
        let tasks = TasksClient::new(ch);
        say(json!({ "ready": true }));
        next(&mut lines).await;
        let before = seen.counts.json();
        let period = Duration::from_secs_f64(1.0 / rate);
        let start = tokio::time::Instant::now() + period.mul_f64(rand::random::<f64>());
        let mut cycles = tokio::task::JoinSet::new();
        let mut scheduled = 0u64;
        loop {
            let at = start + period.mul_f64(scheduled as f64);
            tokio::select! {
                () = tokio::time::sleep_until(at) => {
                    let id = format!("r{scheduled}");
                    cycles.spawn(cycle(tasks.clone(), seen.clone(), id, gate));
                    scheduled += 1;
                }
                _ = next(&mut lines) => break,
            }
        }
        let after = seen.counts.json();
        let (mut begin_ms, mut begin_rpc_ms, mut end_rpc_ms) = (vec![], vec![], vec![]);
        let (mut ends, mut begun, mut ended) = (vec![], 0u64, 0u64);
        let (mut gate_close_ms, mut gate_errors, mut first_gate_error) = (vec![], 0u64, None);
        let (mut refused, mut errors, mut unseen, mut first_error) = (0u64, 0u64, 0u64, None);
        while let Some(c) = cycles.join_next().await {
            let c = c.map_err(|e| format!("a cycle panicked: {e}"))?;
            refused += u64::from(c.refused);
            if let Some(e) = c.error {
                errors += 1;
                first_error.get_or_insert(e);
            }
            if let Some(b) = c.begin_rpc_ms {
                begun += 1;
                begin_rpc_ms.push(b);
                match c.begin_ms {
                    Some(ms) => begin_ms.push(ms),
                    None => unseen += 1,
                }
            }
            end_rpc_ms.extend(c.end_rpc_ms);
            gate_close_ms.extend(c.gate_close_ms);
            if let Some(e) = c.gate_error {
                gate_errors += 1;
                first_gate_error.get_or_insert(e);
            }
            if let Some((serial, at)) = c.ended {
                ended += 1;
                if let Some(serial) = serial.filter(|s| !s.is_empty()) {
                    ends.push(json!([serial, at]));
                }
            }
        }
        reading.abort();
        let diff = |key: &str| after[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0);
        say(json!({
            "scheduled": scheduled,
            "begun": begun,
            "ended": ended,
            "refused": refused,
            "errors": errors,
            "first_error": first_error,
            "unseen": unseen,
            "begin_ms": begin_ms,
            "begin_rpc_ms": begin_rpc_ms,
            "end_rpc_ms": end_rpc_ms,
            "gate_close_ms": gate_close_ms,
            "gate_errors": gate_errors,
            "first_gate_error": first_gate_error,
            "ends": ends,
            "bytes": diff("bytes"),
            "messages": diff("messages"),
        }));
        next(&mut lines).await;
        Ok(())
    }
}
