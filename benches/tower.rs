//! The per-request overhead of the tower integration, over in-process no-op services that
//! answer at once, so only the balancing and plumbing cost is measured. Every baseline runs in
//! the same process, on the same runtime shape.
//!
//! - `ours`: `etcd_registry::tower::Balanced` over 10 instances (p2c; each instance's no-op
//!   service made on its first request), the response's outcome reported from its head.
//! - `tower_buffer`: tower's `p2c::Balance` over 10 `PeakEwma` no-op services behind a
//!   `Buffer` of 1 024: how tonic's `balance_channel` is built.
//! - `single_buffered`: one no-op service behind a `Buffer` of 1 024, no balancing: the shape
//!   of one tonic `Channel`, what a client without balancing pays on top of its connection.
//!
//! One operation is `ready().await` then `call(request).await` of one `http::Request<()>`,
//! from tokio tasks: one task on a current-thread runtime for 1 thread, two tasks on a 2-worker
//! runtime for 2. Times are per request per task (the slower task's), printed as medians at
//! the end with the ratios.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use etcd_registry::tower::Balanced;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwma};
use tower::util::ServiceFn;
use tower::{Service, ServiceExt};

mod common;

/// Instances (and endpoints of the baselines).
const INSTANCES: usize = 10;
/// tonic's `DEFAULT_BUFFER_SIZE`.
const BUFFER: usize = 1_024;
const SAMPLES: usize = 40;

type Request = http::Request<()>;
type Response = http::Response<()>;
type Noop = ServiceFn<fn(Request) -> Ready<Result<Response, Infallible>>>;

fn noop_answer(_: Request) -> Ready<Result<Response, Infallible>> {
    ready(Ok(http::Response::new(())))
}

fn noop() -> Noop {
    let f: fn(Request) -> Ready<Result<Response, Infallible>> = noop_answer;
    tower::service_fn(f)
}

/// `threads` tasks each send `iters` requests through a clone of `service`, one at a time;
/// the slowest task's time.
fn run<S>(rt: &tokio::runtime::Runtime, service: &S, threads: usize, iters: u64) -> Duration
where
    S: Service<Request> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let barrier = Arc::new(tokio::sync::Barrier::new(threads));
        let tasks: Vec<_> = (0..threads)
            .map(|_| {
                let mut service = service.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let start = Instant::now();
                    for _ in 0..iters {
                        let response = service
                            .ready()
                            .await
                            .expect("ready")
                            .call(http::Request::new(()))
                            .await
                            .expect("answered");
                        black_box(response);
                    }
                    start.elapsed()
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for task in tasks {
            slowest = slowest.max(task.await.expect("caller task"));
        }
        slowest
    })
}

fn benches(c: &mut Criterion) {
    let record = common::Record::default();
    // The cache's own runtime (its sync task) stays apart from the callers' runtimes.
    let (_cache_rt, _etcd, users) = common::cache(INSTANCES);
    for threads in [1usize, 2] {
        let group_name = format!("tower/request/{threads}-thread");
        let mut group = c.benchmark_group(&group_name);
        let rt = common::runtime(threads);
        let ours = {
            let _entered = rt.enter();
            Balanced::new(&users, |_| noop())
        };
        let balance = {
            let _entered = rt.enter();
            let endpoints: Vec<PeakEwma<Noop>> = (0..INSTANCES)
                .map(|_| {
                    PeakEwma::new(
                        noop(),
                        Duration::from_millis(1),
                        10e9,
                        CompleteOnResponse::default(),
                    )
                })
                .collect();
            Buffer::new(Balance::new(ServiceList::new::<Request>(endpoints)), BUFFER)
        };
        let single = {
            let _entered = rt.enter();
            Buffer::new(noop(), BUFFER)
        };
        macro_rules! bench {
            ($name:literal, $service:expr) => {{
                let id = format!("{group_name}/{}", $name);
                group.bench_function($name, |b| {
                    b.iter_custom(|iters| {
                        let elapsed = run(&rt, &$service, threads, iters);
                        record.add(&id, elapsed, iters);
                        elapsed
                    })
                });
            }};
        }
        bench!("ours", ours);
        bench!("tower_buffer", balance);
        bench!("single_buffered", single);
        group.finish();
    }
    summary(&record);
}

fn summary(record: &common::Record) {
    let mut lines = vec!["tower: medians of this run, per request per task".to_owned()];
    for threads in [1, 2] {
        let id = |name: &str| format!("tower/request/{threads}-thread/{name}");
        let (Some(ours), Some(balance), Some(single)) = (
            record.median(&id("ours"), SAMPLES),
            record.median(&id("tower_buffer"), SAMPLES),
            record.median(&id("single_buffered"), SAMPLES),
        ) else {
            lines.push(format!(
                "  {threads}-thread: too few samples (as in --test mode)"
            ));
            continue;
        };
        lines.push(format!(
            "  {threads}-thread: ours {ours:.0} ns, tower_buffer {balance:.0} ns ({:.1}x ours), \
             single_buffered {single:.0} ns ({:.1}x ours)",
            balance / ours,
            single / ours
        ));
    }
    println!("{}", lines.join("\n"));
}

criterion_group! {
    name = tower_benches;
    config = Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(2_000));
    targets = benches
}
criterion_main!(tower_benches);
