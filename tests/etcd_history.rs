//! History rewritten under the same identity (ARCHITECTURE.md §4, invariant 11), against real
//! etcd processes: an etcd wiped and restarted with unchanged flags keeps its cluster id, and
//! once its new history passes the revision a cut-off caller had applied, only what etcd holds
//! at that revision tells the two histories apart.
//!
//! The caller reaches etcd through a loopback proxy the test cuts and heals; etcd itself stays
//! reachable to etcdctl. The harness ends its own members by PID.

mod support;

use std::time::{Duration, Instant};

use etcd_registry::{EtcdBackend, EtcdOptions, ServiceCache};
use support::etcd::EtcdCluster;
use support::proxy::Proxy;
use support::wait::*;
use support::*;

const LONG: Duration = Duration::from_secs(20);

async fn users_through(proxy: &Proxy) -> ServiceCache {
    let backend = EtcdBackend::connect([proxy.endpoint()], EtcdOptions::new())
        .await
        .expect("connect");
    discovery(backend)
        .request_timeout(Duration::from_secs(2))
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list")
}

/// The sequence from the issue. Before the fix the caller came back live at revision 3 with
/// {u1, u2} (never in the new history), then {u1, u2, u4}, with no relist and no reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_rewritten_under_the_same_cluster_id_is_relisted() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let proxy = Proxy::start(etcd.client_port(0));
    etcd.etcdctl(&["put", &user_key("u1"), &value_of("u1", 1)]); // rev 2
    etcd.etcdctl(&["put", &user_key("u2"), &value_of("u2", 2)]); // rev 3
    let cluster = etcd.cluster_id();

    let users = users_through(&proxy).await;
    let before = wait_for(&users, LONG, "u1 and u2 at revision 3", |s| {
        s.revision() == 3 && ids(s) == list(&["u1@1", "u2@2"])
    })
    .await;
    assert!(before.freshness().is_live());

    proxy.cut();
    wait_for(&users, LONG, "frozen while cut off", |s| {
        !s.freshness().is_live()
    })
    .await;
    etcd.wipe_and_restart_same_identity();
    assert_eq!(etcd.cluster_id(), cluster, "same flags, same cluster id");
    etcd.etcdctl(&["put", &user_key("u3"), &value_of("u3", 3)]); // rev 2 of the new history
    etcd.etcdctl(&["put", "/x", "1"]); // rev 3
    etcd.etcdctl(&["put", "/x", "2"]); // rev 4
    assert_eq!(
        ids(&users.snapshot()),
        list(&["u1@1", "u2@2"]),
        "frozen, never cleared"
    );

    let healed = Instant::now();
    proxy.heal();
    let after = wait_for(&users, LONG, "live with the new history's u3", |s| {
        s.freshness().is_live() && ids(s) == list(&["u3@3"])
    })
    .await;
    let to_live = healed.elapsed();
    assert_eq!(after.revision(), 4);
    etcd.etcdctl(&["put", &user_key("u4"), &value_of("u4", 4)]); // rev 5
    wait_for(&users, LONG, "u3 and u4 at revision 5", |s| {
        s.revision() == 5 && ids(s) == list(&["u3@3", "u4@4"])
    })
    .await;
    let stats = users.stats();
    assert_eq!((stats.relists, stats.resets), (1, 1), "{stats:?}");
    eprintln!(
        "heal -> live: {to_live:?}; history checks: {}; watch restarts: {}",
        stats.verifications, stats.watch_restarts
    );
    report(
        "a_history_rewritten_under_the_same_cluster_id_is_relisted",
        started,
    );
}

/// The cost when nothing went wrong: after an outage on the same history the cache checks
/// etcd's keys at its revision (one keys-only read per reconnect attempt; the attempts while
/// cut off fail at once) and resumes its watch: no relist, no reset, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_on_the_same_history_resumes_after_one_check() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let proxy = Proxy::start(etcd.client_port(0));
    for n in 1..=3u16 {
        etcd.etcdctl(&[
            "put",
            &user_key(&format!("u{n}")),
            &value_of(&format!("u{n}"), n),
        ]);
    }
    let users = users_through(&proxy).await;
    let checks_before = users.stats().verifications;

    proxy.cut();
    wait_for(&users, LONG, "frozen while cut off", |s| {
        !s.freshness().is_live()
    })
    .await;
    etcd.etcdctl(&["del", &user_key("u1")]);
    etcd.etcdctl(&["put", &user_key("u4"), &value_of("u4", 4)]);
    let healed = Instant::now();
    proxy.heal();
    wait_for(&users, LONG, "live with what changed meanwhile", |s| {
        s.freshness().is_live() && ids(s) == list(&["u2@2", "u3@3", "u4@4"])
    })
    .await;
    let to_live = healed.elapsed();
    let stats = users.stats();
    assert_eq!((stats.relists, stats.resets), (0, 0), "{stats:?}");
    assert!(stats.verifications > checks_before, "{stats:?}");
    eprintln!(
        "heal -> live: {to_live:?}; history check attempts during the outage: {}",
        stats.verifications - checks_before
    );
    report(
        "an_outage_on_the_same_history_resumes_after_one_check",
        started,
    );
}
