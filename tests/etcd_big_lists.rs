//! A service larger than the gRPC message limit (tonic's default is 4 MiB), against a real
//! etcd: the first list, a relist after compaction, and a watch catching up on more than the
//! limit after an outage all succeed (ARCHITECTURE.md §4, invariant 12).
//!
//! `BIG_LIST_INSTANCES` sets the size (default 40 000, about 4.6 MB of keys and values); the
//! test prints the first list's time and the process's resident memory around it.

mod support;

use std::time::{Duration, Instant};

use etcd_client::{Client, Txn, TxnOp};
use etcd_registry::{EtcdBackend, EtcdOptions};
use support::etcd::EtcdCluster;
use support::proxy::Proxy;
use support::wait::{discovery, report};
use support::*;

const LONG: Duration = Duration::from_secs(60);
/// etcd's default limit on operations in one transaction.
const TXN_OPS: usize = 128;

fn key(n: usize) -> String {
    format!("{NS}/big/i{n:06}")
}

/// An 85-byte native value, as a service with a little metadata writes it.
fn value(n: usize, pool: usize) -> String {
    format!(
        r#"{{"addr":"10.{}.{}.{}:8080","meta":{{"zone":"eu-central-1a","pool":"p{pool:07}"}},"weight":1}}"#,
        n / 65536 % 256,
        n / 256 % 256,
        n % 256
    )
}

async fn put_all(client: &mut Client, count: usize, pool: usize) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(TXN_OPS) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|&n| TxnOp::put(key(n), value(n, pool), None))
            .collect();
        client
            .txn(Txn::new().and_then(ops))
            .await
            .expect("a batch of puts");
    }
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_over_the_grpc_message_limit_lists_relists_and_catches_up() {
    let started = Instant::now();
    let count: usize = std::env::var("BIG_LIST_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000);
    let etcd = EtcdCluster::single();
    let mut writer = Client::connect(etcd.endpoints(), None)
        .await
        .expect("connect a writer");
    put_all(&mut writer, count, 1).await;
    let bytes: usize = (0..count).map(|n| key(n).len() + value(n, 1).len()).sum();

    let proxy = Proxy::start(etcd.client_port(0));
    let backend = EtcdBackend::connect([proxy.endpoint()], EtcdOptions::new())
        .await
        .expect("connect");
    let checker = EtcdBackend::connect(etcd.endpoints(), EtcdOptions::new())
        .await
        .expect("connect a second client");
    let discovery = discovery(backend)
        .first_list_timeout(LONG)
        // The whole paged list is one request: give a slow machine room.
        .request_timeout(Duration::from_secs(30))
        .build()
        .expect("valid config");

    let (rss_before, _) = memory_mib();
    let listing = Instant::now();
    let big = discovery.service("big").await.expect("the first list");
    let listed_in = listing.elapsed();
    let (rss_after, peak) = memory_mib();
    assert_eq!(big.snapshot().len(), count);
    eprintln!(
        "{count} instances ({:.1} MB of keys and values): first list {listed_in:?}; \
         RSS {rss_before:.0} MiB before, {rss_after:.0} MiB after, peak {peak:.0} MiB",
        bytes as f64 / 1e6
    );

    // What the history check before a resumed watch costs at this size: one keys-only read.
    let checking = Instant::now();
    let keys = etcd_registry::Backend::keys_at(
        &checker,
        format!("{NS}/big/").as_bytes(),
        big.snapshot().revision(),
        false,
    )
    .await
    .expect("keys at the applied revision");
    eprintln!(
        "history check of {} keys: {:?}",
        keys.keys.len(),
        checking.elapsed()
    );
    assert_eq!(keys.keys.len(), count);

    // Cut off while every instance changes (more than the limit of events to catch up on),
    // then heal: the resumed watch delivers them all.
    proxy.cut();
    wait_for(&big, LONG, "frozen while cut off", |s| {
        !s.freshness().is_live()
    })
    .await;
    put_all(&mut writer, count, 2).await;
    proxy.heal();
    wait_for(&big, LONG, "caught up on every change", |s| {
        s.freshness().is_live()
            && s.len() == count
            && s.instances()
                .iter()
                .all(|i| i.meta("pool") == Some("p0000002"))
    })
    .await;
    assert_eq!(big.stats().relists, 0, "{:?}", big.stats());

    // Cut off again across a compaction: the relist of the whole service succeeds.
    proxy.cut();
    wait_for(&big, LONG, "frozen while cut off", |s| {
        !s.freshness().is_live()
    })
    .await;
    put_all(&mut writer, 10, 3).await;
    let revision = etcd.revision();
    etcd.compact(revision);
    proxy.heal();
    wait_for(&big, LONG, "relisted after the compaction", |s| {
        s.freshness().is_live() && s.revision() == revision && s.len() == count
    })
    .await;
    assert_eq!(big.stats().relists, 1, "{:?}", big.stats());
    report(
        "a_service_over_the_grpc_message_limit_lists_relists_and_catches_up",
        started,
    );
}
