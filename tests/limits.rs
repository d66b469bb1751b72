//! The documented limits of the task extension, enforced over the real
//! socket against a hostile local client: attribute count and sizes (before
//! anything is stored or audited), the size of a whole request, the task id
//! length, a per-instance Begin rate, well-formed protobuf Durations, and
//! refusals and log lines that quote client input cut short.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{TestDaemon, config_for_me, tasks_client, with_header};
use sigil::proto::sigil::workload::v1::{BeginRequest, EndRequest, ListRequest};
use sigil::store::{AuditKind, AuditQuery};
use tonic::Code;

/// An entry whose agents declare their own tasks; `extra` adds
/// `[entry.tasks]` keys.
fn config(extra: &str) -> String {
    format!(
        "{}[entry.tasks]\nself_declare = true\n{extra}\n",
        config_for_me("")
    )
}

fn request(task_id: &str, attributes: HashMap<String, String>) -> tonic::Request<BeginRequest> {
    with_header(BeginRequest {
        task_id: task_id.into(),
        ttl: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        attributes,
    })
}

fn with_ttl(task_id: &str, seconds: i64, nanos: i32) -> tonic::Request<BeginRequest> {
    with_header(BeginRequest {
        task_id: task_id.into(),
        ttl: Some(prost_types::Duration { seconds, nanos }),
        attributes: HashMap::new(),
    })
}

fn end(task_id: &str) -> tonic::Request<EndRequest> {
    with_header(EndRequest {
        task_id: task_id.into(),
    })
}

fn refusal<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Status {
    result.expect_err("the request is refused")
}

/// Bytes on disk of the store: the database and its write-ahead log.
fn store_bytes(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [db.to_owned(), wal.into()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Everything the daemon logs in this test binary, as `sigil run` would
/// print it (one global subscriber: the daemon runs in this process).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        logs
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_attributes_are_refused_before_anything_is_stored_or_audited() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    // The instance exists (attested, recorded) before we measure.
    tasks.list(with_header(ListRequest {})).await.unwrap();
    let db = daemon.store().path().to_owned();
    let bytes_before = store_bytes(&db);
    let audited_before = daemon.store().audit(&AuditQuery::default()).unwrap().len();

    let marker = "M".repeat(1024);
    let too_many: HashMap<_, _> = (0..33).map(|i| (format!("k{i}"), marker.clone())).collect();
    let long_key: HashMap<_, _> = [("K".repeat(65), marker.clone())].into();
    let long_value: HashMap<_, _> = [("k".to_owned(), format!("{marker}M"))].into();
    for (what, attributes) in [
        ("33 attributes", too_many),
        ("a 65-byte key", long_key),
        ("a 1025-byte value", long_value),
    ] {
        for i in 0..30 {
            // The attack: Begin/End cycles that each carry the attributes.
            let id = format!("job-{i}");
            let status = refusal(tasks.begin(request(&id, attributes.clone())).await);
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert!(
                status.message().contains("at most 32 attributes")
                    && status.message().contains("64 bytes")
                    && status.message().contains("1024 bytes"),
                "{what}: the refusal names the limits: {}",
                status.message()
            );
            assert!(status.message().len() < 512, "{what}: a short refusal");
            let _ = tasks.end(end(&id)).await;
        }
    }

    let grown = store_bytes(&db).saturating_sub(bytes_before);
    assert!(grown <= 8 * 1024, "the store grew by {grown} bytes");
    let audit = daemon.store().audit(&AuditQuery::default()).unwrap();
    assert_eq!(audit.len(), audited_before, "nothing was audited");
    assert!(
        !audit
            .iter()
            .any(|e| e.detail.to_string().contains(&marker[..64])),
        "no audit row carries the attributes"
    );
    // Within the limits, attributes are kept as before.
    let at_the_limit: HashMap<_, _> = (0..32)
        .map(|i| (format!("{i:064}"), marker.clone()))
        .collect();
    let task = tasks
        .begin(request("job-ok", at_the_limit))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.attributes.len(), 32);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_request_over_64_kib_is_refused_and_the_daemon_keeps_serving() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    let huge: HashMap<_, _> = [("k".to_owned(), "v".repeat(100 * 1024))].into();
    // serve() caps every message on the workload socket at 64 KiB
    // (max_decoding_message_size), so tonic refuses it before decoding.
    let status = refusal(tasks.begin(request("job-huge", huge)).await);
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "refused as too large before decoding: {status:?}"
    );
    assert!(status.message().len() < 512, "{}", status.message());
    // The same connection and a new one are served.
    tasks.begin(request("job-1", HashMap::new())).await.unwrap();
    let mut other = tasks_client(&daemon.socket).await;
    let listed = other
        .list(with_header(ListRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_id_over_128_bytes_is_refused_with_the_limit() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    let id = "a".repeat(129);
    let status = refusal(tasks.begin(request(&id, HashMap::new())).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("1 to 128 bytes") && status.message().contains("(129 bytes)"),
        "{}",
        status.message()
    );
    tasks
        .begin(request(&"a".repeat(128), HashMap::new()))
        .await
        .unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begins_beyond_the_entry_burst_are_refused_until_a_token_comes_back() {
    // Three at once, then one every 4 seconds.
    let daemon = TestDaemon::start_with(&config("begin_burst = 3\nbegin_per_second = 0.25")).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    // Churn: Begin/End as fast as the daemon answers.
    let mut begun = 0;
    let status = loop {
        let id = format!("job-{begun}");
        match tasks.begin(request(&id, HashMap::new())).await {
            Ok(_) => {
                begun += 1;
                tasks.end(end(&id)).await.unwrap();
            }
            Err(status) => break status,
        }
        assert!(begun <= 10, "the rate never refused a Begin");
    };
    assert_eq!(begun, 3, "refusals start right after the burst");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for part in [
        "\"tester\"",
        "tasks.begin_burst",
        "tasks.begin_per_second",
        "retry in",
    ] {
        assert!(
            status.message().contains(part),
            "{part:?}: {}",
            status.message()
        );
    }
    // A refused Begin writes nothing.
    let audited = daemon.store().audit(&AuditQuery::default()).unwrap().len();
    let again = refusal(tasks.begin(request("job-x", HashMap::new())).await);
    assert_eq!(again.code(), Code::ResourceExhausted);
    assert_eq!(
        daemon.store().audit(&AuditQuery::default()).unwrap().len(),
        audited
    );

    // One token comes back after 4 s: one Begin, then refused again.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    tasks
        .begin(request("job-later", HashMap::new()))
        .await
        .unwrap();
    let status = refusal(tasks.begin(request("job-later-2", HashMap::new())).await);
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Other calls are not limited.
    tasks.end(end("job-later")).await.unwrap();
    tasks.list(with_header(ListRequest {})).await.unwrap();
    let begins = daemon
        .store()
        .audit(&AuditQuery {
            kind: Some(AuditKind::TaskBegin),
            ..AuditQuery::default()
        })
        .unwrap();
    assert_eq!(begins.len(), 4);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_with_nanos_out_of_range_or_mixed_signs_is_refused() {
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    for (seconds, nanos, says) in [
        (60, 1_000_000_000, "nanos"),
        (60, i32::MAX, "nanos"),
        (60, -1_000_000_000, "nanos"),
        (60, -5, "different signs"),
        (-60, 5, "different signs"),
        (i64::MAX, 0, "out of range"),
    ] {
        let status = refusal(tasks.begin(with_ttl("job-1", seconds, nanos)).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{seconds}s {nanos}ns");
        assert!(status.message().contains(says), "{}", status.message());
    }
    let listed = tasks
        .list(with_header(ListRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tasks.is_empty(), "no task began");
    let task = tasks
        .begin(with_ttl("job-1", 60, 999_999_999))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let (start, expiry) = (task.started_at.unwrap(), task.expires_at.unwrap());
    assert!(expiry.seconds - start.seconds >= 60);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_kb_task_id_gets_a_short_refusal_and_a_short_log_line() {
    let logs = captured_logs();
    let daemon = TestDaemon::start_with(&config("")).await;
    let mut tasks = tasks_client(&daemon.socket).await;
    let id = "x".repeat(60_000);

    let begin = refusal(tasks.begin(request(&id, HashMap::new())).await);
    assert_eq!(begin.code(), Code::InvalidArgument);
    let ended = refusal(tasks.end(end(&id)).await);
    assert_eq!(ended.code(), Code::NotFound);
    let key: HashMap<_, _> = [(id.clone(), String::new())].into();
    let attribute = refusal(tasks.begin(request("job-1", key)).await);
    assert_eq!(attribute.code(), Code::InvalidArgument);
    for status in [&begin, &ended, &attribute] {
        let message = status.message();
        assert!(message.len() < 512, "{} bytes: {message}", message.len());
        assert!(message.contains("60000 bytes"), "{message}");
    }
    assert!(begin.message().contains("\"… (60000 bytes)"));
    assert!(ended.message().contains("\"… (60000 bytes)"));
    daemon.stop().await;

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let refused: Vec<&str> = logs.lines().filter(|l| l.contains("refused")).collect();
    assert!(
        refused.iter().any(|l| l.contains("(60000 bytes)")),
        "the refusals were logged: {logs}"
    );
    for line in refused {
        assert!(line.len() < 1024, "a {}-byte refusal log line", line.len());
    }
}
