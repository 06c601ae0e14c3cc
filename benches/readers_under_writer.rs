//! Readers while a writer publishes 10 000 snapshots a second: does `pick()` notice?
//!
//! A cache of 10 and one of 1 000 instances over the memory backend. The reader is criterion's
//! thread, calling `pick()`; the writer is a second thread that drives the caches' runtime: every
//! 100 µs on average (tokio's timer wakes it once a millisecond for a run of ten) it writes one
//! instance with a new port and waits until the cache published that revision, so every write is
//! its own snapshot. The reader runs three times in the same process:
//! - `idle`: the writer stopped;
//! - `writer_10k_other_service`: the control, the writer publishing to another service's cache of
//!   the same size; what changes for the reader is only that the machine is busy;
//! - `writer_10k`: the writer publishing to the reader's own cache.
//!
//! Besides criterion's mean, every run of 16 picks is timed on its own and put in a histogram;
//! the per-pick p50 and p99 of those runs, and the publish rate the writer reached, are printed
//! at the end. ARCHITECTURE.md §6: reader p99 within 10% of idle.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use etcd_registry::{MemoryBackend, ServiceCache};

mod common;

/// Cache sizes: a typical service, and a large one.
const SIZES: [usize; 2] = [10, 1_000];
/// The writer's pace: one publish per period, 10 000 a second.
const PERIOD: Duration = Duration::from_micros(100);
/// Picks per timed run (one `Instant::now()` pair costs about as much as a few picks).
const RUN: u64 = 16;
/// Histogram resolution: 1 ns buckets for runs up to this long; longer ones land in the last.
const BUCKETS: usize = 50_000;

/// Run times of `RUN` picks, in nanoseconds.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }

    fn record(&mut self, run: Duration) {
        let ns = usize::try_from(run.as_nanos()).unwrap_or(usize::MAX);
        self.counts[ns.min(BUCKETS - 1)] += 1;
        self.total += 1;
    }

    /// The per-pick time at quantile `q` (run time divided by `RUN`).
    fn per_pick(&self, q: f64) -> f64 {
        let target = (self.total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (ns, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= target.max(1) {
                return ns as f64 / RUN as f64;
            }
        }
        (BUCKETS - 1) as f64 / RUN as f64
    }
}

/// `iters` picks in runs of `RUN`, each full run recorded; returns the total time.
fn picks(users: &ServiceCache, iters: u64, histogram: &mut Histogram) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(RUN);
        let start = Instant::now();
        for _ in 0..n {
            let picked = users.pick();
            black_box(picked.as_ref().map(|i| i.addr().len()));
        }
        let run = start.elapsed();
        if n == RUN {
            histogram.record(run);
        }
        total += run;
        left -= n;
    }
    total
}

/// The writer thread: drives the cache's runtime, one write and one publish per `PERIOD`.
struct Writer {
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    started: Instant,
    thread: JoinHandle<()>,
}

impl Writer {
    /// Starts writing instances of `cache`'s service at the pace.
    fn start(
        rt: Arc<tokio::runtime::Runtime>,
        etcd: MemoryBackend,
        cache: ServiceCache,
        instances: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, published) = (stop.clone(), published.clone());
            std::thread::spawn(move || {
                rt.block_on(async {
                    let mut changes = cache.changes();
                    let mut next = Instant::now();
                    let mut round = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        round += 1;
                        let port = 9000 + (round / instances % 2) as u16;
                        let instance =
                            common::instance_of(cache.service(), round % instances, port);
                        let (key, value) = common::encoded(&instance);
                        let revision = etcd.put(key, value);
                        changes
                            .wait_for(|s| s.revision() >= revision)
                            .await
                            .expect("cache alive");
                        published.fetch_add(1, Ordering::Relaxed);
                        next += PERIOD;
                        let now = Instant::now();
                        if now > next + Duration::from_millis(5) {
                            // Fell behind (descheduled): go on at the pace, not in a burst.
                            next = now;
                        }
                        if next > now {
                            // Sleep rather than spin: a spinning writer would take the reader's
                            // core share (two vCPUs may be one physical core), which is not what
                            // the bench asks. tokio's timer wakes at 1 ms granularity, so the
                            // writes come in runs of ~10, each still its own publish.
                            tokio::time::sleep_until(next.into()).await;
                        }
                    }
                })
            })
        };
        Self {
            stop,
            published,
            started: Instant::now(),
            thread,
        }
    }

    /// Stops the writer; returns the publish rate it reached, per second.
    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        self.thread.join().expect("writer thread");
        self.published.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
    }
}

fn bench(c: &mut Criterion) {
    let mut summary = Vec::new();
    for n in SIZES {
        let (rt, etcd, users) = common::cache(n);
        // The control: a second cache, of another service, that the writer keeps as busy.
        for i in 0..n {
            let (key, value) = common::encoded(&common::instance_of("order", i, 8080));
            etcd.put(key, value);
        }
        let orders = rt.block_on(common::discover(&etcd, "order"));
        let rt = Arc::new(rt);
        let mut idle = Histogram::new();
        let mut other = Histogram::new();
        let mut busy = Histogram::new();

        let mut group = c.benchmark_group("readers_under_writer");
        group.bench_with_input(BenchmarkId::new("idle", n), &n, |b, _| {
            b.iter_custom(|iters| picks(&users, iters, &mut idle))
        });
        let writer = Writer::start(rt.clone(), etcd.clone(), orders.clone(), n);
        group.bench_with_input(
            BenchmarkId::new("writer_10k_other_service", n),
            &n,
            |b, _| b.iter_custom(|iters| picks(&users, iters, &mut other)),
        );
        let other_rate = writer.stop();
        let writer = Writer::start(rt.clone(), etcd.clone(), users.clone(), n);
        group.bench_with_input(BenchmarkId::new("writer_10k", n), &n, |b, _| {
            b.iter_custom(|iters| picks(&users, iters, &mut busy))
        });
        let rate = writer.stop();
        group.finish();

        summary.push(format!(
            "{n} instances; the writer published {rate:.0} snapshots/s to the reader's cache, \
             {other_rate:.0}/s to another service's in the control"
        ));
        if [&idle, &other, &busy].iter().any(|h| h.total == 0) {
            summary.push("  (too few picks for percentiles, as in --test mode)".to_owned());
            continue;
        }
        for (name, h) in [
            ("idle", &idle),
            ("writer, other service", &other),
            ("writer, same cache", &busy),
        ] {
            summary.push(format!(
                "  pick {name:<22} p50 {:>5.1} ns  p99 {:>5.1} ns ({:+.0}% vs idle)",
                h.per_pick(0.5),
                h.per_pick(0.99),
                (h.per_pick(0.99) / idle.per_pick(0.99) - 1.0) * 100.0,
            ));
        }
    }
    println!("readers_under_writer (per pick, runs of {RUN}):");
    for line in summary {
        println!("{line}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
