//! The caller and provider sides against real etcd processes: SIGKILL, SIGSTOP, restarts,
//! compaction, a wiped etcd, one restored from an older backup, a leader killed mid-stream,
//! transactions and garbage. Each test names the ARCHITECTURE.md §4 invariant(s) it guards:
//! 1 freeze-never-clear, 2 no event lost/none twice, 3 atomic batches, 4 monotonic revision,
//! 5 compaction→relist, 6 history backwards detected, 7 bad data quarantined, 9 registrations
//! survive outages, 10 hung etcd detected.
//!
//! The clusters bind loopback ports only; the harness ends its own members by PID.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_registry::{
    BackoffConfig, Discovery, EtcdBackend, EtcdOptions, FreezeCause, Registration,
    RegistrationStatus, ServiceCache, Snapshot,
};
use support::etcd::EtcdCluster;
use support::wait::*;
use support::*;

const TTL: Duration = Duration::from_secs(2);
const STALL: Duration = Duration::from_secs(3);
/// The providers' re-registration backoff: capped at one second, the step the tests allow.
const REG_BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(1),
    reset_after: Duration::from_secs(30),
};
/// Bound on convergence after a fault is over (members restarting, elections, relists).
const LONG: Duration = Duration::from_secs(20);

fn fast_options() -> EtcdOptions {
    EtcdOptions::new()
        .keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
}

async fn connect(endpoints: &[String], options: EtcdOptions) -> EtcdBackend {
    EtcdBackend::connect(endpoints, options)
        .await
        .expect("connect to etcd")
}

async fn users(backend: &EtcdBackend) -> ServiceCache {
    Discovery::with_backend(backend.clone())
        .namespace(NS)
        .stall_timeout(STALL)
        .request_timeout(Duration::from_secs(2))
        .backoff(FAST_BACKOFF)
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list")
}

async fn register(backend: &EtcdBackend, id: &str, port: u16) -> Registration {
    Registration::with_backend(backend.clone(), instance("user", id, port))
        .namespace(NS)
        .ttl(TTL)
        .backoff(REG_BACKOFF)
        .request_timeout(Duration::from_secs(1))
        .register()
        .await
        .expect("registered")
}

/// Puts instance `id` of `user` at `port` through etcdctl (live members).
fn put(etcd: &EtcdCluster, id: &str, port: u16) {
    etcd.etcdctl(&["put", &user_key(id), &value_of(id, port)]);
}

fn del(etcd: &EtcdCluster, id: &str) {
    etcd.etcdctl(&["del", &user_key(id)]);
}

fn live(s: &Snapshot) -> bool {
    s.freshness().is_live()
}

fn cause(s: &Snapshot) -> Option<FreezeCause> {
    match s.freshness() {
        etcd_registry::Freshness::Frozen { cause, .. } => Some(cause),
        etcd_registry::Freshness::Live => None,
    }
}

/// Invariant 1 over a recording: every frozen snapshot shows `kept`; and invariant 4: the
/// revision never goes down.
fn frozen_kept_and_monotonic(recorded: &[Arc<Snapshot>], kept: &[String]) {
    for s in recorded {
        if !live(s) {
            assert_eq!(&ids(s), kept, "a frozen snapshot changed: {s:?}");
        }
    }
    for pair in recorded.windows(2) {
        assert!(
            pair[1].revision() >= pair[0].revision(),
            "revision went down without a reset: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
}

/// Invariants 2 and 9, basic: providers registered over etcd are discovered; a deregistered one
/// disappears at once (its lease revoked), one dropped without deregistering only when its lease
/// expires, one TTL later, never before half of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_are_discovered_deregistered_and_expire() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let backend = connect(&etcd.endpoints(), fast_options()).await;
    let p1 = register(&backend, "p1", 8001).await;
    let p2 = register(&backend, "p2", 8002).await;
    let p3 = register(&backend, "p3", 8003).await;
    let users = users(&backend).await;
    assert_eq!(
        ids(&users.snapshot()),
        list(&["p1@8001", "p2@8002", "p3@8003"])
    );
    for (id, reg) in [("p1", &p1), ("p2", &p2), ("p3", &p3)] {
        let kv = get_key(&etcd, &user_key(id)).expect("key written");
        assert_ne!(kv.lease, 0, "{id} is under a lease");
        assert_eq!(Some(kv.lease), reg.status().borrow().lease(), "{id}");
    }

    let revoked = Instant::now();
    p1.deregister().await.expect("revoked");
    wait_for(&users, TTL / 2, "p1 gone at once: revoked", |s| {
        ids(s) == list(&["p2@8002", "p3@8003"])
    })
    .await;
    eprintln!("deregistered provider gone after {:?}", revoked.elapsed());
    assert!(get_key(&etcd, &user_key("p1")).is_none());

    // A crashed provider: no revoke, its lease runs out.
    let mut changes = users.changes();
    let dropped = Instant::now();
    drop(p2);
    let early = tokio::time::timeout(TTL / 2, changes.wait_for(|s| s.get("p2").is_none())).await;
    assert!(
        early.is_err(),
        "p2 vanished within TTL/2 of the drop: revoked, not expired"
    );
    wait_for(&users, TTL * 3, "p2 expired", |s| {
        ids(s) == list(&["p3@8003"])
    })
    .await;
    let expired_after = dropped.elapsed();
    eprintln!("dropped provider gone after {expired_after:?} (ttl {TTL:?})");
    assert!(get_key(&etcd, &user_key("p2")).is_none());

    // The survivor was kept alive all along, well past one TTL, under its first lease.
    let kv = get_key(&etcd, &user_key("p3")).expect("p3 kept alive");
    assert_eq!(
        *p3.status().borrow(),
        RegistrationStatus::Registered { lease: kv.lease }
    );
    assert!(started.elapsed() > TTL);
    report("providers_are_discovered_deregistered_and_expire", started);
}

/// Invariants 1, 2 and 4: a SIGKILLed single member freezes the snapshot (same instances, same
/// revision), and after the restart the watch resumes from the revision: live with the same
/// instances, no relist. With default connection and stall settings: a killed process closes its
/// sockets, so the freeze must not wait for a keep-alive or stall timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_etcd_freezes_and_resumes_without_relist() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    put(&etcd, "a", 1);
    let backend = connect(&etcd.endpoints(), EtcdOptions::new()).await;
    let users = Discovery::with_backend(backend)
        .namespace(NS)
        .backoff(FAST_BACKOFF)
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list");
    // Seen through the watch: the watch is established before the kill.
    put(&etcd, "b", 2);
    let before = wait_for(&users, LONG, "b", |s| ids(s) == list(&["a@1", "b@2"])).await;
    let recorder = Recorder::start(&users);

    let killed = Instant::now();
    etcd.kill(0);
    let s = wait_for(&users, LONG, "frozen", |s| !live(s)).await;
    let detected = killed.elapsed();
    eprintln!(
        "[detection] SIGKILL -> {:?} after {detected:?} (default keep-alive 3s/3s, default stall bound 10s)",
        s.freshness()
    );
    assert!(
        detected < Duration::from_secs(2),
        "a closed connection is noticed at once, not by a timer: {detected:?}"
    );
    assert_eq!(cause(&s), Some(FreezeCause::Unavailable));
    assert_eq!(ids(&s), ids(&before), "frozen, not cleared");
    assert_eq!(s.revision(), before.revision());

    etcd.restart(0);
    let s = wait_for(&users, LONG, "live again", live).await;
    assert_eq!(ids(&s), ids(&before));
    assert_eq!(s.revision(), before.revision());
    let stats = users.stats();
    assert_eq!((stats.relists, stats.resets), (0, 0), "{stats:?}");
    assert_eq!(stats.watch_restarts, 1, "{stats:?}");

    put(&etcd, "c", 3);
    wait_for(&users, LONG, "following again", |s| {
        ids(s) == list(&["a@1", "b@2", "c@3"])
    })
    .await;
    frozen_kept_and_monotonic(&recorder.snapshots(), &ids(&before));
    report("a_killed_etcd_freezes_and_resumes_without_relist", started);
}

/// Invariants 1 and 2: a client cut off from the cluster (pinned to one member that is killed)
/// stays frozen while the rest of the cluster takes writes, and when its member is back it
/// resumes the watch from its revision: every change arrives, nothing is relisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_cut_off_arrive_without_relist() {
    let started = Instant::now();
    let etcd = EtcdCluster::start(3);
    put(&etcd, "a", 1);
    let backend = connect(&[etcd.endpoint(0)], fast_options()).await;
    let users = users(&backend).await;
    // Seen through the watch: the watch is established before the kill.
    put(&etcd, "b", 2);
    let before = wait_for(&users, LONG, "b", |s| ids(s) == list(&["a@1", "b@2"])).await;
    let recorder = Recorder::start(&users);

    etcd.kill(0);
    wait_for(&users, LONG, "frozen", |s| !live(s)).await;
    // A write forwarded to a dead leader is lost until its deadline: let the others elect one.
    etcd.leader();
    // The two other members keep a quorum and take writes the client cannot see.
    put(&etcd, "c", 3);
    del(&etcd, "a");
    put(&etcd, "b", 22);
    let (rev, want) = etcd_ids(&etcd, &codec(), "user");
    assert_eq!(want, list(&["b@22", "c@3"]));
    assert_eq!(ids(&users.snapshot()), ids(&before), "frozen, not cleared");

    etcd.restart(0);
    let s = wait_for(&users, LONG, "live with the changes", |s| {
        live(s) && s.revision() == rev
    })
    .await;
    assert_eq!(ids(&s), want);
    let stats = users.stats();
    assert_eq!((stats.relists, stats.resets), (0, 0), "{stats:?}");
    assert_eq!(stats.events_applied, 4, "each change once: {stats:?}");
    assert_eq!(stats.watch_restarts, 1, "{stats:?}");
    frozen_kept_and_monotonic(&recorder.snapshots(), &ids(&before));
    report("changes_made_while_cut_off_arrive_without_relist", started);
}

/// A SIGSTOPped etcd (sockets open, nothing answered) is detected within the stall bound, the
/// snapshot frozen as it was; after SIGCONT the cache is live again and follows changes. An idle
/// but healthy watch is not mistaken for a hung one. Returns the freeze's cause.
async fn a_hung_etcd_is_detected(options: EtcdOptions, setting: &str) -> FreezeCause {
    let etcd = EtcdCluster::single();
    put(&etcd, "a", 1);
    let backend = connect(&etcd.endpoints(), options).await;
    let users = users(&backend).await;
    let recorder = Recorder::start(&users);

    // Quiet for longer than the stall bound: a healthy etcd answers progress requests.
    let mut changes = users.changes();
    let quiet = tokio::time::timeout(STALL * 3 / 2, changes.wait_for(|s| !live(s))).await;
    assert!(quiet.is_err(), "an idle healthy watch froze: {quiet:?}");

    // Stop right after the watch delivered something: the stall timer then starts from a fresh
    // message, the worst case for the bound (idle watches are probed every half bound).
    put(&etcd, "b", 2);
    wait_for(&users, LONG, "b", |s| ids(s) == list(&["a@1", "b@2"])).await;
    let stopped = Instant::now();
    etcd.stop(0);
    let s = wait_for(&users, STALL * 2, "frozen", |s| !live(s)).await;
    let detected = stopped.elapsed();
    eprintln!(
        "[detection] SIGSTOP -> {:?} after {detected:?} (stall bound {STALL:?}, {setting})",
        s.freshness()
    );
    assert!(
        detected <= STALL * 11 / 10,
        "detected after {detected:?}, bound {STALL:?} + 10%"
    );
    assert_eq!(ids(&s), list(&["a@1", "b@2"]), "frozen, not cleared");

    etcd.cont(0);
    let resumed = Instant::now();
    wait_for(&users, LONG, "live again", live).await;
    eprintln!("SIGCONT -> live after {:?}", resumed.elapsed());
    put(&etcd, "c", 3);
    wait_for(&users, LONG, "following again", |s| {
        ids(s) == list(&["a@1", "b@2", "c@3"])
    })
    .await;
    assert_eq!(users.stats().resets, 0);
    frozen_kept_and_monotonic(&recorder.snapshots(), &list(&["a@1", "b@2"]));
    cause(&s).expect("frozen")
}

/// Invariant 10 (and 1), with an HTTP/2 keep-alive tighter than the stall bound (1 s/1 s): the
/// unanswered ping drops the connection first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_etcd_is_detected_by_the_keep_alive() {
    let started = Instant::now();
    let cause = a_hung_etcd_is_detected(fast_options(), "keep-alive 1s/1s").await;
    assert_eq!(cause, FreezeCause::Unavailable, "the dropped connection");
    report("a_hung_etcd_is_detected_by_the_keep_alive", started);
}

/// Invariant 10 (and 1), with the keep-alive far beyond the stall bound: the cache's own stall
/// detection (progress request at half the bound, unanswered) is what notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_etcd_is_detected_by_the_stall_bound() {
    let started = Instant::now();
    let options = fast_options().keep_alive(Duration::from_secs(60), Duration::from_secs(60));
    let cause = a_hung_etcd_is_detected(options, "keep-alive 60s/60s").await;
    assert_eq!(cause, FreezeCause::Stalled);
    report("a_hung_etcd_is_detected_by_the_stall_bound", started);
}

/// Invariant 10 with every setting at its default (HTTP/2 keep-alive 3 s/3 s, stall bound
/// 10 s): a hung etcd is detected within the default bound of 10 s, plus 10%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_etcd_is_detected_within_the_default_bound() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    put(&etcd, "a", 1);
    let backend = connect(&etcd.endpoints(), EtcdOptions::new()).await;
    let users = Discovery::with_backend(backend)
        .namespace(NS)
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list");
    put(&etcd, "b", 2);
    wait_for(&users, LONG, "b", |s| ids(s) == list(&["a@1", "b@2"])).await;
    let stopped = Instant::now();
    etcd.stop(0);
    let bound = Duration::from_secs(10);
    let s = wait_for(&users, bound * 2, "frozen", |s| !live(s)).await;
    let detected = stopped.elapsed();
    eprintln!(
        "[detection] SIGSTOP -> {:?} after {detected:?} (default settings)",
        s.freshness()
    );
    assert!(detected <= bound * 11 / 10, "detected after {detected:?}");
    assert_eq!(ids(&s), list(&["a@1", "b@2"]), "frozen, not cleared");
    etcd.cont(0);
    wait_for(&users, LONG, "live again", live).await;
    report("a_hung_etcd_is_detected_within_the_default_bound", started);
}

/// Invariant 5 (and 1, 3): history compacted past the revision of a cut-off client makes it
/// relist exactly once, and the difference shows up as one snapshot: nothing between the old
/// state and etcd's current one is ever published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_cut_off_relists_exactly_once() {
    let started = Instant::now();
    let etcd = EtcdCluster::start(3);
    put(&etcd, "a", 1);
    put(&etcd, "b", 2);
    let backend = connect(&[etcd.endpoint(0)], fast_options()).await;
    let users = users(&backend).await;
    let before = ids(&users.snapshot());
    assert_eq!(before, list(&["a@1", "b@2"]));
    let recorder = Recorder::start(&users);

    etcd.kill(0);
    wait_for(&users, LONG, "frozen", |s| !live(s)).await;
    etcd.leader();
    put(&etcd, "c", 3);
    del(&etcd, "a");
    put(&etcd, "b", 22);
    let rev = etcd.revision();
    etcd.compact(rev);
    etcd.restart(0);

    let after = list(&["b@22", "c@3"]);
    let s = wait_for(&users, LONG, "relisted", |s| live(s) && ids(s) == after).await;
    assert_eq!(s.revision(), rev);
    assert_eq!(etcd_ids(&etcd, &codec(), "user").1, after);
    let stats = users.stats();
    assert_eq!((stats.relists, stats.resets), (1, 0), "{stats:?}");
    let recorded = recorder.snapshots();
    for s in &recorded {
        let got = ids(s);
        assert!(
            got == before || got == after,
            "half-applied relist published: {got:?}"
        );
    }
    frozen_kept_and_monotonic(&recorded, &before);
    report("compaction_while_cut_off_relists_exactly_once", started);
}

/// Invariants 6 and 4: an etcd wiped and restarted empty (history back at revision 1, a new
/// cluster id) is detected as a reset, relisted, and the cache then equals etcd's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_wiped_empty_is_detected_and_relisted() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    for n in 0..5 {
        put(&etcd, &format!("i{n}"), 100 + n);
    }
    let backend = connect(&etcd.endpoints(), fast_options()).await;
    let users = users(&backend).await;
    let before = users.snapshot();
    assert_eq!(before.len(), 5);
    let cluster = etcd.cluster_id();
    let recorder = Recorder::start(&users);

    etcd.wipe_and_restart_empty();
    assert_ne!(etcd.cluster_id(), cluster, "a new cluster");
    put(&etcd, "z", 9);
    let (rev, want) = etcd_ids(&etcd, &codec(), "user");
    assert_eq!(want, list(&["z@9"]));
    let s = wait_for(&users, LONG, "reset to the new etcd", |s| {
        live(s) && s.revision() == rev
    })
    .await;
    assert_eq!(ids(&s), want);
    assert!(s.revision() < before.revision(), "went back with etcd");
    let stats = users.stats();
    assert!(stats.resets >= 1 && stats.relists >= 1, "{stats:?}");
    for s in recorder.snapshots() {
        let got = ids(&s);
        assert!(
            got == ids(&before) || got.is_empty() || got == want,
            "a snapshot neither etcd ever had: {got:?}"
        );
        if !live(&s) {
            assert_eq!(got, ids(&before), "a frozen snapshot changed");
        }
    }
    report("an_etcd_wiped_empty_is_detected_and_relisted", started);
}

/// Invariants 6 and 4: an etcd restored from an older backup (lower revision, new cluster id)
/// is detected as a reset; the cache relists to the backup's state, then keeps following.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restored_from_an_older_backup_is_detected_and_relisted() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    put(&etcd, "a", 1);
    let backup = etcd.backup();
    put(&etcd, "b", 2);
    put(&etcd, "c", 3);
    del(&etcd, "a");
    let backend = connect(&etcd.endpoints(), fast_options()).await;
    let users = users(&backend).await;
    let high = users.snapshot();
    assert_eq!(ids(&high), list(&["b@2", "c@3"]));

    etcd.restore_from(&backup);
    let s = wait_for(&users, LONG, "reset to the backup", |s| {
        live(s) && ids(s) == list(&["a@1"])
    })
    .await;
    assert_eq!(s.revision(), backup.revision);
    assert!(s.revision() < high.revision(), "went back with etcd");
    let stats = users.stats();
    assert!(stats.resets >= 1 && stats.relists >= 1, "{stats:?}");

    put(&etcd, "d", 4);
    let (rev, want) = etcd_ids(&etcd, &codec(), "user");
    let s = wait_for(&users, LONG, "following the restored etcd", |s| {
        s.revision() == rev
    })
    .await;
    assert_eq!(ids(&s), want);
    assert_eq!(want, list(&["a@1", "d@4"]));
    report(
        "an_etcd_restored_from_an_older_backup_is_detected_and_relisted",
        started,
    );
}

/// Invariant 9 (and 1): a provider cut off for longer than its TTL (single member killed)
/// considers its lease lost; when etcd is back (it restores the old lease with a fresh TTL) the
/// provider registers again under a new lease within one backoff step, same instance, and no
/// caller ever saw it disappear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_outlives_an_outage_longer_than_its_ttl() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let backend = connect(&etcd.endpoints(), fast_options()).await;
    let p = register(&backend, "p", 8001).await;
    let old = p.status().borrow().lease().expect("registered");
    let users = users(&backend).await;
    let recorder = Recorder::start(&users);
    let mut status = p.status();

    etcd.kill(0);
    status_becomes(
        &mut status,
        TTL * 2,
        "lost after a TTL without keep-alive",
        |s| *s == RegistrationStatus::Lost,
    )
    .await;
    etcd.restart(0);
    let up = Instant::now();
    let back = status_becomes(
        &mut status,
        REG_BACKOFF.max + Duration::from_millis(500),
        "registered again within one backoff step",
        |s| matches!(s.lease(), Some(l) if l != old),
    )
    .await;
    eprintln!(
        "provider registered again {:?} after etcd was back",
        up.elapsed()
    );
    let lease = back.lease().expect("a lease");
    let kv = get_key(&etcd, &user_key("p")).expect("back in etcd");
    assert_eq!(kv.lease, lease, "under the new lease");
    assert_eq!(kv.value_str(), value_of("p", 8001), "the same instance");

    wait_for(&users, LONG, "live with p", |s| {
        live(s) && ids(s) == list(&["p@8001"])
    })
    .await;
    for s in recorder.snapshots() {
        assert_eq!(ids(&s), list(&["p@8001"]), "a caller saw p go: {s:?}");
    }
    report(
        "a_registration_outlives_an_outage_longer_than_its_ttl",
        started,
    );
}

/// Invariant 9: a provider pinned to one member whose lease really ends while it is cut off
/// (revoked through the other members: its key is gone) is back in etcd, same instance, new
/// lease, within one backoff step of its member being reachable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_during_an_outage_is_replaced() {
    let started = Instant::now();
    let etcd = EtcdCluster::start(3);
    let backend = connect(&[etcd.endpoint(0)], fast_options()).await;
    let p = register(&backend, "p", 8001).await;
    let old = p.status().borrow().lease().expect("registered");
    let mut status = p.status();
    let key = user_key("p");

    etcd.kill(0);
    etcd.leader();
    etcd.etcdctl(&["lease", "revoke", &format!("{old:x}")]);
    assert!(get_key(&etcd, &key).is_none(), "the revoke deleted the key");
    status_becomes(
        &mut status,
        TTL * 2,
        "lost after a TTL without keep-alive",
        |s| *s == RegistrationStatus::Lost,
    )
    .await;
    etcd.restart(0);
    let up = Instant::now();
    let kv = eventually(
        REG_BACKOFF.max + Duration::from_millis(500),
        "the key is back",
        || get_key(&etcd, &key),
    )
    .await;
    eprintln!(
        "revoked provider back in etcd {:?} after its member",
        up.elapsed()
    );
    assert_ne!(kv.lease, old, "a new lease");
    assert_eq!(kv.value_str(), value_of("p", 8001), "the same instance");
    status_becomes(&mut status, TTL, "registered under the new lease", |s| {
        s.lease() == Some(kv.lease)
    })
    .await;
    report("a_lease_revoked_during_an_outage_is_replaced", started);
}

/// Invariants 1, 2, 4 and 9: the leader of a 3-member cluster is killed in the middle of a
/// stream of writes. The cache (given all endpoints) ends equal to etcd's final state at
/// etcd's revision; without a relist it applied exactly one event per revision (none lost,
/// none twice); no snapshot ever dropped the instances that stayed in etcd throughout; the
/// revision never went down; and a provider's lease was kept alive across the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_stream_loses_nothing_and_clears_nothing() {
    let started = Instant::now();
    let etcd = Arc::new(EtcdCluster::start(3));
    put(&etcd, "s1", 1);
    let backend = connect(&etcd.endpoints(), fast_options()).await;
    let users = users(&backend).await;
    // Seen through the watch: the watch is established.
    put(&etcd, "s2", 2);
    wait_for(&users, LONG, "s2", |s| ids(s) == list(&["s1@1", "s2@2"])).await;
    // Make the member that serves the cache's watch (the only watcher so far) the leader, so
    // that killing the leader breaks the watch: the resume is what this test is about.
    let watching = eventually(LONG, "one member serves the watch", || {
        let counts: Vec<u64> = (0..3)
            .map(|i| watchers(etcd.client_port(i)).unwrap_or(u64::MAX))
            .collect();
        let serving: Vec<usize> = (0..3).filter(|&i| counts[i] == 1).collect();
        (serving.len() == 1 && counts.iter().sum::<u64>() == 1).then(|| serving[0])
    })
    .await;
    let leader = etcd.leader();
    if leader != watching {
        let id = format!("{:x}", etcd.status(watching).member_id);
        etcd.etcdctl_at(leader, &["move-leader", &id]);
        eventually(LONG, "leadership moved", || {
            (etcd.leader() == watching).then_some(())
        })
        .await;
    }
    let provider_backend = connect(&etcd.endpoints(), fast_options()).await;
    let p = register(&provider_backend, "p", 8001).await;
    let start_rev = etcd.revision();
    let s = wait_for(&users, LONG, "p", |s| s.revision() == start_rev).await;
    assert_eq!(ids(&s), list(&["p@8001", "s1@1", "s2@2"]));
    let applied_before = users.stats().events_applied;
    let recorder = Recorder::start(&users);
    let statuses = Arc::new(Mutex::new(vec![*p.status().borrow()]));
    let status_task = {
        let mut status = p.status();
        let statuses = statuses.clone();
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                let s = *status.borrow_and_update();
                statuses.lock().unwrap().push(s);
            }
        })
    };

    let writer = {
        let etcd = etcd.clone();
        tokio::task::spawn_blocking(move || {
            let mut killed = None;
            for n in 0..50u16 {
                if n == 20 {
                    let leader = etcd.leader();
                    etcd.kill(leader);
                    killed = Some((leader, Instant::now()));
                }
                let id = format!("w{}", if n % 5 == 4 { (n * 3) % 10 } else { n % 10 });
                let key = user_key(&id);
                let value = value_of(&id, 2000 + n);
                let args: Vec<&str> = if n % 5 == 4 {
                    vec!["del", &key]
                } else {
                    vec!["put", &key, &value]
                };
                // During the election a write may fail; retrying gives the same final state.
                let mut attempt = 0;
                while let Err(e) = etcd.try_etcdctl(&args) {
                    attempt += 1;
                    assert!(attempt < 20, "write {n} kept failing: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            killed.expect("the leader was killed")
        })
    };
    let (leader, killed_at) = writer.await.expect("writer");

    let (rev, want) = etcd_ids(&etcd, &codec(), "user");
    let s = wait_for(&users, LONG, "converged on etcd's final state", |s| {
        live(s) && s.revision() == rev
    })
    .await;
    assert_eq!(ids(&s), want, "the cache equals etcd");
    let stats = users.stats();
    eprintln!("killed leader m{leader} (the cache watched m{watching}); cache stats {stats:?}");
    assert_eq!(
        leader, watching,
        "leadership moved on its own before the kill"
    );
    assert!(
        stats.watch_restarts >= 1,
        "the watch was broken and resumed: {stats:?}"
    );
    assert_eq!(stats.resets, 0, "{stats:?}");
    if stats.relists == 0 {
        assert_eq!(
            (stats.events_applied - applied_before) as i64,
            rev - start_rev,
            "one event per revision: none lost, none twice ({stats:?})"
        );
    }

    // The provider: keep-alives go on across the election; a whole two TTLs after the kill its
    // key is still there, under the lease its status names.
    let alive_until = killed_at + TTL * 2;
    tokio::time::sleep(alive_until.saturating_duration_since(Instant::now())).await;
    let now = *p.status().borrow();
    let kv = get_key(&etcd, &user_key("p")).expect("the provider is still registered");
    assert_eq!(now.lease(), Some(kv.lease), "status {now:?}");
    status_task.abort();
    let statuses = statuses.lock().unwrap().clone();
    let lost = statuses.contains(&RegistrationStatus::Lost);
    eprintln!("provider statuses: {statuses:?}");

    // Never cleared: every snapshot kept what stayed in etcd throughout.
    let recorded = recorder.snapshots();
    for s in &recorded {
        let got = ids(s);
        for stayed in ["s1@1", "s2@2"] {
            assert!(got.iter().any(|g| g == stayed), "{stayed} dropped: {s:?}");
        }
        if !lost {
            assert!(got.iter().any(|g| g == "p@8001"), "p dropped: {s:?}");
        }
    }
    for pair in recorded.windows(2) {
        assert!(pair[1].revision() >= pair[0].revision(), "{pair:?}");
        if !live(&pair[1]) {
            assert_eq!(ids(&pair[1]), ids(&pair[0]), "changed while frozen");
        }
    }
    report(
        "a_leader_killed_mid_stream_loses_nothing_and_clears_nothing",
        started,
    );
}

/// Invariant 3: instances moved by etcd transactions (three deletes and three puts in one
/// transaction, repeatedly) are never seen half moved: every published snapshot is one whole
/// generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_never_seen_half_done() {
    use etcd_client::{Txn, TxnOp};
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let generation = |g: u16| -> Vec<String> {
        list(
            &(0..3)
                .map(|k| format!("g{g}k{k}@{}", 1000 + 10 * g + k))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    };
    for k in 0..3 {
        put(&etcd, &format!("g0k{k}"), 1000 + k);
    }
    let backend = connect(&etcd.endpoints(), fast_options()).await;
    let users = users(&backend).await;
    assert_eq!(ids(&users.snapshot()), generation(0));
    let recorder = Recorder::start(&users);
    let mut client = backend.client().clone();
    for g in 1..=10u16 {
        let mut ops = Vec::new();
        for k in 0..3 {
            ops.push(TxnOp::delete(user_key(&format!("g{}k{k}", g - 1)), None));
            let id = format!("g{g}k{k}");
            ops.push(TxnOp::put(
                user_key(&id),
                value_of(&id, 1000 + 10 * g + k),
                None,
            ));
        }
        client
            .txn(Txn::new().and_then(ops))
            .await
            .expect("transaction");
    }
    wait_for(&users, LONG, "the last generation", |s| {
        ids(s) == generation(10)
    })
    .await;
    let recorded = recorder.snapshots();
    for s in &recorded {
        let got = ids(s);
        assert!(
            (0..=10).any(|g| got == generation(g)),
            "half-applied transaction published: {got:?}"
        );
    }
    assert_eq!(users.stats().events_applied, 60);
    report("a_transaction_is_never_seen_half_done", started);
}

/// Invariant 7: undecodable entries written by etcdctl (invalid JSON, a value over 64 KiB, an
/// invalid address, keys nested below the service's prefix) are skipped and counted, in the
/// first list and in the watch; a key overwritten with garbage goes; the neighbours stay and a
/// sibling service's keys are not even looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_skipped_and_counted_neighbours_unaffected() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    // Well-formed JSON with a valid address, but past the 64 KiB bound: rejected by size alone.
    let big = format!(
        r#"{{"addr":"10.0.0.1:7","meta":{{"pad":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    put(&etcd, "a", 1);
    etcd.etcdctl(&["put", &user_key("bad1"), "{not json"]);
    etcd.etcdctl(&["put", &user_key("big1"), &big]);
    etcd.etcdctl(&["put", &user_key("x/y"), &value_of("y", 5)]);
    etcd.etcdctl(&["put", "/svc/userx/z", &value_of("z", 6)]);
    let backend = connect(&etcd.endpoints(), fast_options()).await;
    let users = users(&backend).await;
    assert_eq!(ids(&users.snapshot()), list(&["a@1"]));
    assert_eq!(users.stats().decode_errors, 3, "{:?}", users.stats());

    etcd.etcdctl(&["put", &user_key("bad2"), r#"{"addr":"no port"}"#]);
    etcd.etcdctl(&["put", &user_key("big2"), &big]);
    etcd.etcdctl(&["put", &user_key("x/z"), &value_of("z", 7)]);
    etcd.etcdctl(&["put", "/svc/userx/w", &value_of("w", 8)]);
    put(&etcd, "b", 2);
    wait_for(&users, LONG, "b", |s| ids(s) == list(&["a@1", "b@2"])).await;
    assert_eq!(users.stats().decode_errors, 6, "{:?}", users.stats());

    // An instance overwritten with garbage no longer describes anything reachable.
    etcd.etcdctl(&["put", &user_key("a"), "\u{1}garbage"]);
    wait_for(&users, LONG, "a gone", |s| ids(s) == list(&["b@2"])).await;
    assert_eq!(users.stats().decode_errors, 7, "{:?}", users.stats());
    put(&etcd, "a", 11);
    wait_for(&users, LONG, "a back", |s| ids(s) == list(&["a@11", "b@2"])).await;
    let stats = users.stats();
    assert_eq!((stats.decode_errors, stats.relists), (7, 0), "{stats:?}");
    assert!(users.freshness().is_live());
    report(
        "garbage_is_skipped_and_counted_neighbours_unaffected",
        started,
    );
}
