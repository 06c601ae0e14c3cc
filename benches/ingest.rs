//! Ingest: watch events applied and published per second, with 10 000 instances cached.
//!
//! Each iteration writes a burst of puts into the memory backend (one revision each, like
//! separate provider registrations) and waits until the cache published a snapshot at the last
//! revision. Criterion reports the throughput in events per second.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
mod common;

const CACHED: usize = 10_000;

fn bench(c: &mut Criterion) {
    let (rt, etcd, users) = common::cache(CACHED);

    let mut group = c.benchmark_group("ingest");
    for burst in [100usize, 1_000] {
        // Pre-encode two sets of writes that move the same instances to different ports, and
        // alternate them, so that every event really changes an instance.
        let writes: Vec<Vec<(String, Vec<u8>)>> = [9000u16, 9500]
            .iter()
            .map(|base| {
                (0..burst)
                    .map(|i| {
                        common::encoded(&common::instance(i * 7 % CACHED, base + (i % 500) as u16))
                    })
                    .collect()
            })
            .collect();
        group.throughput(Throughput::Elements(burst as u64));
        group.bench_with_input(BenchmarkId::new("events", burst), &burst, |b, _| {
            let mut changes = users.changes();
            let mut round = 0usize;
            b.iter(|| {
                round += 1;
                let mut last = 0;
                for (key, value) in &writes[round % 2] {
                    last = etcd.put(key, value);
                }
                rt.block_on(async {
                    changes
                        .wait_for(|s| s.revision() >= last)
                        .await
                        .expect("cache alive");
                });
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
