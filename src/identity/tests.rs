//! Tests of the manager, the registry and the instance actor together,
//! through the seams: a real store in a temp directory, the real attestor
//! on this test process, and a [`Mint`] that can be held or made to fail.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Error, IdentityManager, InstanceState, Mint, Parts};
use crate::attest::{Attestor, PeerCred};
use crate::ca::{self, Ca, Svid, SvidRequest};
use crate::config::{Config, Overrides};
use crate::store::{EndReason, Store};

/// Signs with a real CA, counting, and optionally waiting for a go signal
/// first (so a test can act while a mint is in progress).
struct TestMint {
    ca: Arc<Ca>,
    minted: AtomicUsize,
    gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    started: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl Mint for TestMint {
    fn mint(&self, req: &SvidRequest) -> Result<Svid, ca::Error> {
        if let Some(started) = self.started.lock().unwrap().take() {
            let _ = started.send(());
        }
        if let Some(gate) = self.gate.lock().unwrap().take() {
            let _ = gate.recv();
        }
        self.minted.fetch_add(1, Ordering::SeqCst);
        self.ca.sign_svid(req)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    manager: IdentityManager,
    store: Arc<Store>,
    mint: Arc<TestMint>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

fn fixture(instance_ttl: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    let text = format!(
        "trust_domain = \"example.org\"\n[svid]\ninstance_ttl = \"{instance_ttl}\"\n[[entry]]\nname = \"tester\"\nselectors = [\"unix:uid:{uid}\"]\n"
    );
    let overrides = Overrides {
        socket: Some(dir.path().join("sock")),
        state_dir: Some(dir.path().join("state")),
        admin_socket: None,
    };
    let config = Config::parse(&text, "test", &overrides).unwrap();
    let ca = Arc::new(Ca::load_or_create(&config.state_dir, &config.trust_domain).unwrap());
    let store = Arc::new(Store::open(&config.state_dir).unwrap());
    let mint = Arc::new(TestMint {
        ca: ca.clone(),
        minted: AtomicUsize::new(0),
        gate: Mutex::new(None),
        started: Mutex::new(None),
    });
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let parts = Parts::from_config(&config, Attestor::new().unwrap(), ca, store.clone());
    let manager =
        IdentityManager::with_mint(parts, mint.clone(), shutdown.clone(), tracker.clone());
    Fixture {
        _dir: dir,
        manager,
        store,
        mint,
        shutdown,
        tracker,
    }
}

/// This test process, as a connecting peer.
fn me() -> PeerCred {
    PeerCred::this_process()
}

fn my_instance_id() -> String {
    Attestor::new()
        .unwrap()
        .attest(&me())
        .unwrap()
        .instance_id
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_of_one_process_mint_once_and_share_the_svids() {
    let f = fixture("1h");
    let mut calls = Vec::new();
    for _ in 0..20 {
        let manager = f.manager.clone();
        calls.push(tokio::spawn(async move { manager.subscribe(me()).await }));
    }
    let mut serials = std::collections::BTreeSet::new();
    for call in calls {
        let state = call.await.unwrap().unwrap();
        let InstanceState::Active(set) = &*state.borrow() else {
            panic!("live instance");
        };
        serials.insert(set.svids[0].serial.clone());
    }
    assert_eq!(serials.len(), 1, "every stream sees the same SVID");
    assert_eq!(f.mint.minted.load(Ordering::SeqCst), 1, "minted once");
    let stored = f.store.svids_of(&my_instance_id()).unwrap();
    assert_eq!(stored.len(), 1, "one SVID on record");
    f.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_that_lands_during_the_mint_wins_and_nothing_is_handed_out() {
    let f = fixture("1h");
    let (call, go) = subscribe_held_in_mint(&f).await;
    // While the SVID is being signed, an operator's revocation of this very
    // instance is committed.
    let record = my_record();
    let id = record.instance_id.clone();
    let revoke_id = id.clone();
    f.store
        .write_async(move |tx| {
            tx.upsert_instance(&record)?;
            let by = EndReason::Revoked {
                by: "operator".to_owned(),
            };
            tx.end_instance(&revoke_id, std::time::SystemTime::now(), &by)
        })
        .await
        .unwrap();
    go.send(()).unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Revoked(_)), "{err}");
    assert!(
        f.store.svids_of(&id).unwrap().is_empty(),
        "the SVID signed meanwhile was never recorded, so never handed out"
    );
    // And it stays refused, without signing again.
    let err = f.manager.subscribe(me()).await.unwrap_err();
    assert!(matches!(err, Error::Revoked(_)), "{err}");
    assert_eq!(f.mint.minted.load(Ordering::SeqCst), 1);
    assert!(f.manager.instances().is_empty());
    f.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_waiting_to_retry_a_failed_rotation_stops_at_once_on_shutdown() {
    let f = fixture("2s");
    let state = f.manager.subscribe(me()).await.unwrap();
    assert!(matches!(&*state.borrow(), InstanceState::Active(_)));
    // A full disk: the rotation due within 1.6 s fails, and the actor
    // waits to retry.
    let pages = f.store.page_count().unwrap();
    f.store.limit_pages(pages).unwrap();
    fill(&f.store);
    f.tracker.close();
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let stopping = Instant::now();
    f.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), f.tracker.wait())
        .await
        .expect("the actor stops");
    assert!(
        stopping.elapsed() < super::instance::RETRY_AFTER_FAILURE / 2,
        "stopped after {:?}, not after the retry pause",
        stopping.elapsed()
    );
}

/// Starts this process's first request and returns once its SVID is being
/// signed: the mint waits until the returned sender is sent `()`.
async fn subscribe_held_in_mint(
    f: &Fixture,
) -> (
    tokio::task::JoinHandle<Result<tokio::sync::watch::Receiver<InstanceState>, Error>>,
    std::sync::mpsc::Sender<()>,
) {
    let (go, gate) = std::sync::mpsc::channel();
    let (started_tx, started) = std::sync::mpsc::channel();
    *f.mint.gate.lock().unwrap() = Some(gate);
    *f.mint.started.lock().unwrap() = Some(started_tx);
    let manager = f.manager.clone();
    let call = tokio::spawn(async move { manager.subscribe(me()).await });
    tokio::task::spawn_blocking(move || started.recv().unwrap())
        .await
        .unwrap();
    (call, go)
}

/// The store row of this process's instance, as an earlier run left it.
fn my_record() -> crate::store::InstanceRecord {
    let attested = Attestor::new().unwrap().attest(&me()).unwrap();
    crate::store::InstanceRecord {
        instance_id: attested.instance_id.to_string(),
        pid: attested.facts.pid,
        start_time: attested.facts.start_time,
        boot_id: "boot".to_owned(),
        uid: attested.facts.uid,
        selectors: Vec::new(),
        first_seen: std::time::SystemTime::now(),
        last_seen: std::time::SystemTime::now(),
        ended_at: None,
        end_reason: None,
        entries: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_sticks_even_for_a_process_whose_earlier_instance_ended_otherwise() {
    let f = fixture("1h");
    // This very process had an instance that ended without being revoked
    // (it stopped matching its entries for a moment).
    let record = my_record();
    let id = record.instance_id.clone();
    let ended = id.clone();
    f.store
        .write_async(move |tx| {
            tx.upsert_instance(&record)?;
            let why = "a gid changed".to_owned();
            tx.end_instance(
                &ended,
                std::time::SystemTime::now(),
                &EndReason::NoLongerMatches { why },
            )
        })
        .await
        .unwrap();
    // It matches again and gets an identity; then an operator revokes it.
    f.manager.subscribe(me()).await.unwrap();
    let instance: crate::ids::InstanceId = f.manager.instances()[0].instance_id.clone();
    f.manager
        .revoke_instance(&instance, "operator".to_owned())
        .await
        .unwrap();
    let err = f.manager.subscribe(me()).await.unwrap_err();
    assert!(matches!(err, Error::Revoked(_)), "{err}");
    let stored = f.store.instance(&id).unwrap().unwrap();
    assert!(
        stored.end_reason.as_ref().is_some_and(EndReason::is_sticky),
        "{:?}",
        stored.end_reason
    );
    f.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_revokes_an_instance_the_store_holds_but_no_actor_runs() {
    let f = fixture("1h");
    // Live in the store (say, not restorable at start-up), not in memory.
    let record = my_record();
    let id = record.instance_id.clone();
    f.store
        .write_async(move |tx| tx.upsert_instance(&record))
        .await
        .unwrap();
    let instance = crate::ids::InstanceId::parse(&id).unwrap();
    f.manager
        .revoke_instance(&instance, "operator".to_owned())
        .await
        .unwrap();
    let err = f.manager.subscribe(me()).await.unwrap_err();
    assert!(matches!(err, Error::Revoked(_)), "{err}");
    assert_eq!(f.mint.minted.load(Ordering::SeqCst), 0, "nothing signed");
    let unknown = crate::ids::InstanceId::parse(&"0".repeat(id.len())).unwrap();
    let err = f
        .manager
        .revoke_instance(&unknown, "operator".to_owned())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownInstance(_)), "{err}");
    f.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_caller_hangs_up_still_goes_live_and_is_watched() {
    let f = fixture("1h");
    let (call, go) = subscribe_held_in_mint(&f).await;
    call.abort(); // the client went away while its SVID was being signed
    go.send(()).unwrap();
    let _ = call.await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.manager.instances().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the SVIDs were recorded, so an actor must own the instance"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.store.svids_of(&my_instance_id()).unwrap().len(), 1);
    f.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_path_attests_but_mints_nothing() {
    let f = fixture("1h");
    f.manager.authorize(me()).await.unwrap();
    assert_eq!(f.mint.minted.load(Ordering::SeqCst), 0);
    assert!(f.manager.instances().is_empty());
    assert!(f.store.live_instances().unwrap().is_empty());
    f.shutdown.cancel();
}

/// Writes audit rows until the page cap refuses one: a full disk.
fn fill(store: &Store) {
    for size in [16 * 1024, 1024, 64, 1] {
        for _ in 0..10_000 {
            let event = crate::store::AuditEvent {
                seq: 0,
                at: std::time::SystemTime::now(),
                kind: crate::store::AuditKind::Admin,
                actor: "test filling the disk".to_owned(),
                instance_id: None,
                task_id: None,
                spiffe_id: None,
                serial: None,
                detail: serde_json::json!({ "padding": "x".repeat(size) }),
                hash: None,
            };
            if store.write(move |tx| tx.append_audit(&event)).is_err() {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_goes_live_after_an_entry_change_is_reconciled_at_once() {
    let f = fixture("1h");
    let (call, go) = subscribe_held_in_mint(&f).await;
    // While the instance is being started under entry "tester", the config
    // replaces "tester" with "renamed"; the live instances are reconciled
    // before this one is live.
    let mut renamed = f.manager.entry_defs().await[0].entry.as_ref().clone();
    renamed.name = "renamed".into();
    let (diff, reconciled) = f
        .manager
        .reload_config_entries(vec![renamed], "test")
        .await
        .unwrap();
    assert_eq!(
        (diff.added, diff.removed),
        (vec!["renamed".to_owned()], vec!["tester".to_owned()])
    );
    assert!(
        reconciled.is_empty(),
        "the starting instance is not live yet"
    );
    go.send(()).unwrap();
    let mut state = call.await.unwrap().unwrap();
    let first = match &*state.borrow() {
        InstanceState::Active(set) => set.svids[0].serial.clone(),
        InstanceState::Ended(e) => panic!("ended: {e}"),
    };
    // Once live, it sees the change and is reissued under "renamed"; the
    // SVID of the removed entry is revoked.
    let reissued = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let InstanceState::Active(set) = &*state.borrow_and_update()
                && set.entries.iter().any(|e| e.name == "renamed")
            {
                return set.svids[0].serial.clone();
            }
            state.changed().await.unwrap();
        }
    })
    .await
    .expect("reissued within 5 s");
    assert_ne!(reissued, first);
    let old = f.store.svid(&first).unwrap().unwrap();
    assert!(
        old.revoked_at.is_some(),
        "the removed entry's SVID is revoked"
    );
    f.shutdown.cancel();
}

// ---- Entry changes against starts, tasks and cancelled callers ----

/// Entries parsed like `[[entry]]` tables, all admitting this test's uid.
fn entries_named(names: &[&str]) -> Vec<crate::policy::Entry> {
    let dir = tempfile::tempdir().unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    let mut text = "trust_domain = \"example.org\"\n".to_owned();
    for name in names {
        text.push_str(&format!(
            "[[entry]]\nname = \"{name}\"\nselectors = [\"unix:uid:{uid}\"]\n"
        ));
    }
    let overrides = Overrides {
        socket: Some(dir.path().join("sock")),
        state_dir: Some(dir.path().join("state")),
        admin_socket: None,
    };
    Config::parse(&text, "test", &overrides).unwrap().entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_in_flight_during_an_entry_removal_ends_and_its_svid_is_revoked() {
    let f = fixture("1h");
    let (call, go) = subscribe_held_in_mint(&f).await;
    // SIGHUP removes the only entry while this process's first SVID is
    // being signed (the start already matched it).
    let (diff, reconciled) = f
        .manager
        .reload_config_entries(Vec::new(), "test")
        .await
        .unwrap();
    assert_eq!(diff.removed, ["tester"]);
    assert!(
        reconciled.is_empty(),
        "the starting instance is not reconciled"
    );
    go.send(()).unwrap();
    let state = call.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let active = matches!(&*state.borrow(), InstanceState::Active(_));
    let svids = f.store.svids_of(&my_instance_id()).unwrap();
    f.shutdown.cancel();
    assert!(
        !active && svids.iter().all(|s| s.revoked_at.is_some()),
        "the instance is live (active={active}) holding an unrevoked SVID of the removed entry: {:?}",
        svids
            .iter()
            .map(|s| (&s.spiffe_id, s.revoked_at))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tasks_of_an_instance_whose_default_entry_is_removed_end_and_are_revoked() {
    let f = fixture("1h");
    let state = f.manager.subscribe(me()).await.unwrap();
    let id = match &*state.borrow() {
        InstanceState::Active(set) => set.instance_id.clone(),
        InstanceState::Ended(_) => panic!("live"),
    };
    let task = f
        .manager
        .begin_task(
            &id,
            super::BeginTask {
                task_id: Some("t1".to_owned()),
                ttl: None,
                attributes: Default::default(),
            },
            "operator".to_owned(),
        )
        .await
        .unwrap();
    assert!(task.spiffe_id.to_string().contains("/agent/tester/"));
    // SIGHUP: "tester" removed, "second" (same selectors) added.
    let (_, reconciled) = f
        .manager
        .reload_config_entries(entries_named(&["second"]), "test")
        .await
        .unwrap();
    assert!(
        matches!(reconciled[0].outcome, super::Reconciled::Reissued { .. }),
        "{reconciled:?}"
    );
    let svids = f.store.svids_of(id.as_str()).unwrap();
    f.shutdown.cancel();
    let unrevoked_task: Vec<_> = svids
        .iter()
        .filter(|s| s.task_id.is_some() && s.revoked_at.is_none())
        .map(|s| s.spiffe_id.clone())
        .collect();
    assert!(
        unrevoked_task.is_empty(),
        "task SVIDs of the removed entry stay valid: {unrevoked_task:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_entry_whose_caller_goes_away_still_takes_the_entry_out_of_force() {
    let f = fixture("1h");
    let mut split = Vec::new();
    for i in 0..100u64 {
        let name = format!("e{i}");
        let entry = entries_named(&[name.as_str()]).remove(0);
        f.manager
            .create_entry(entry, "{}".to_owned(), "test")
            .await
            .unwrap();
        let cancelled = tokio::time::timeout(
            Duration::from_micros(50 * i),
            f.manager.delete_entry(&name, "test"),
        )
        .await
        .is_err();
        if cancelled {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let stored = f.store.stored_entries().unwrap();
            let in_store = stored.iter().any(|s| s.name == name);
            let in_force = f.manager.entry_def(&name).await.is_ok();
            if in_force && !in_store {
                split.push(name);
            }
        }
    }
    f.shutdown.cancel();
    assert!(
        split.is_empty(),
        "deleted in the store (and audited) but still in force: {split:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_added_for_a_live_instance_adds_its_svid_and_keeps_the_default_one() {
    let f = fixture("1h");
    let state = f.manager.subscribe(me()).await.unwrap();
    let (id, default) = match &*state.borrow() {
        InstanceState::Active(set) => (set.instance_id.clone(), set.svids[0].serial.clone()),
        InstanceState::Ended(_) => panic!("live"),
    };
    let extra = entries_named(&["extra"]).remove(0);
    let (_, reconciled) = f
        .manager
        .create_entry(extra, "{}".to_owned(), "test")
        .await
        .unwrap();
    assert_eq!(
        reconciled[0].outcome,
        super::Reconciled::Reissued { revoked: vec![] },
        "nothing revoked: the default SVID's entry is unchanged"
    );
    let set = match &*state.borrow() {
        InstanceState::Active(set) => set.clone(),
        InstanceState::Ended(_) => panic!("live"),
    };
    assert_eq!(set.svids.len(), 2);
    assert_eq!(set.svids[0].serial, default, "the default SVID is kept");
    assert!(set.svids[1].spiffe_id.path().contains("/agent/extra/"));
    let svids = f.store.svids_of(id.as_str()).unwrap();
    assert!(svids.iter().all(|s| s.revoked_at.is_none()), "{svids:?}");
    f.shutdown.cancel();
}
