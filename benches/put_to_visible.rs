//! Put in etcd → visible in the snapshot, against a raw etcd-client watch, on a real etcd.
//!
//! The bench starts its own single-member etcd on loopback (the tests' harness: `ETCD_BIN` or
//! `etcd` on `PATH`) and holds two readers of the prefix `/services/user/` at once: a bare
//! etcd-client watch, and a `ServiceCache`. Each has a task that timestamps what it sees: the
//! watch task when a response arrives, the cache task when a snapshot is published. Every round
//! puts one key and waits until both saw its revision, so each round yields one paired sample:
//! the time from the put's start to the raw watch, and to the cache. Criterion times both; the
//! p50/p99 of the pairs, and the gap between the p99s (ARCHITECTURE.md §6: within 1 ms), are printed
//! at the end.

#[path = "../tests/support/etcd.rs"]
mod etcd_process;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use etcd_client::{Client, WatchOptions};
use etcd_registry::{Discovery, EtcdBackend, EtcdOptions, ServiceCache};
use tokio::sync::watch;

const PREFIX: &str = "/services/user/";

/// Everything one round needs, alive for the whole bench.
struct Rig {
    rt: tokio::runtime::Runtime,
    writer: Client,
    /// The last revision the raw watch saw, and when.
    raw: watch::Receiver<(i64, Instant)>,
    /// The last revision the cache published, and when.
    cached: watch::Receiver<(i64, Instant)>,
    /// Keeps the cache (and its sync task) alive.
    _users: ServiceCache,
    /// Paired samples of every round: (raw watch, cache).
    samples: Arc<Mutex<Vec<(Duration, Duration)>>>,
    round: u64,
    _etcd: etcd_process::EtcdCluster,
}

impl Rig {
    fn start() -> Self {
        let etcd = etcd_process::EtcdCluster::single();
        let endpoints = etcd.endpoints();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (writer, raw, cached, users) = rt.block_on(async {
            let writer = Client::connect(&endpoints, None)
                .await
                .expect("writer client");

            let mut watcher = Client::connect(&endpoints, None).await.expect("raw client");
            let mut stream = watcher
                .watch(PREFIX, Some(WatchOptions::new().with_prefix()))
                .await
                .expect("raw watch");
            let (raw_tx, raw) = watch::channel((0, Instant::now()));
            tokio::spawn(async move {
                // The client stays alive as long as its stream.
                let _watcher = watcher;
                while let Ok(Some(response)) = stream.message().await {
                    let at = Instant::now();
                    if let Some(event) = response.events().last()
                        && let Some(kv) = event.kv()
                    {
                        let _ = raw_tx.send((kv.mod_revision(), at));
                    }
                }
            });

            let backend = EtcdBackend::connect(&endpoints, EtcdOptions::new())
                .await
                .expect("cache backend");
            let users = Discovery::with_backend(backend)
                .namespace("/services")
                .build()
                .expect("valid config")
                .service("user")
                .await
                .expect("first list");
            let mut changes = users.changes();
            let (cached_tx, cached) = watch::channel((0, Instant::now()));
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let at = Instant::now();
                    let revision = changes.borrow_and_update().revision();
                    let _ = cached_tx.send((revision, at));
                }
            });
            (writer, raw, cached, users)
        });
        Self {
            rt,
            writer,
            raw,
            cached,
            _users: users,
            samples: Arc::default(),
            round: 0,
            _etcd: etcd,
        }
    }

    /// One put, waited for on both paths; returns (raw watch, cache) latencies.
    fn round(&mut self) -> (Duration, Duration) {
        self.round += 1;
        let id = self.round % 100;
        let value = format!(
            r#"{{"addr":"10.0.{}.{}:{}"}}"#,
            id / 250,
            id % 250,
            8000 + self.round % 1000
        );
        let (raw, cached) = self.rt.block_on(async {
            let start = Instant::now();
            let response = self
                .writer
                .put(format!("{PREFIX}u{id}"), value, None)
                .await
                .expect("put");
            let revision = response.header().map_or(0, |h| h.revision());
            let wait = Duration::from_secs(10);
            let raw = tokio::time::timeout(wait, self.raw.wait_for(|(r, _)| *r >= revision))
                .await
                .expect("raw watch saw the put within 10 s")
                .expect("raw watch task alive")
                .1;
            let cached = tokio::time::timeout(wait, self.cached.wait_for(|(r, _)| *r >= revision))
                .await
                .expect("cache saw the put within 10 s")
                .expect("cache task alive")
                .1;
            (raw - start, cached - start)
        });
        self.samples
            .lock()
            .expect("not poisoned")
            .push((raw, cached));
        (raw, cached)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(samples: &[(Duration, Duration)]) {
    if samples.is_empty() {
        return;
    }
    let mut raw: Vec<_> = samples.iter().map(|s| s.0).collect();
    let mut cached: Vec<_> = samples.iter().map(|s| s.1).collect();
    raw.sort();
    cached.sort();
    let (raw99, cached99) = (percentile(&raw, 0.99), percentile(&cached, 0.99));
    println!(
        "put_to_visible over {} puts: raw watch p50 {:?} p99 {:?}; cache p50 {:?} p99 {:?}; \
         p99 gap {:?} (target <= 1 ms)",
        samples.len(),
        percentile(&raw, 0.5),
        raw99,
        percentile(&cached, 0.5),
        cached99,
        cached99.saturating_sub(raw99),
    );
}

fn bench(c: &mut Criterion) {
    let mut rig = Rig::start();
    let mut group = c.benchmark_group("put_to_visible");
    group.bench_function("raw_watch", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.round().0).sum())
    });
    group.bench_function("cache", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.round().1).sum())
    });
    group.finish();
    let samples = rig.samples.lock().expect("not poisoned").clone();
    report(&samples);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .sample_size(30);
    targets = bench
}
criterion_main!(benches);
