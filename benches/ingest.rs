//! Ingest: watch events applied and published per second, with 10 000 instances cached.
//!
//! Each iteration writes a burst of puts into the memory backend (one revision each, like
//! separate provider registrations) and waits until the cache published a snapshot at the last
//! revision. Criterion reports the throughput in events per second.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use etcd_discovery::{Codec, Discovery, Instance, KeyLayout, MemoryBackend};

const CACHED: usize = 10_000;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let etcd = MemoryBackend::new();
    let codec = Codec::new(KeyLayout::Native, "/services");
    let make = |i: usize, port: u16| {
        Instance::builder(
            "user",
            format!("10.0.{}.{}:{port}", (i >> 8) & 255, i & 255),
        )
        .id(format!("u{i}"))
        .build()
        .expect("valid instance")
    };
    for i in 0..CACHED {
        let instance = make(i, 8080);
        etcd.put(codec.key(&instance, 0), codec.encode_value(&instance));
    }
    let users = rt.block_on(async {
        Discovery::memory(etcd.clone())
            .namespace("/services")
            .build()
            .expect("valid config")
            .service("user")
            .await
            .expect("first list")
    });
    assert_eq!(users.snapshot().len(), CACHED);

    let mut group = c.benchmark_group("ingest");
    for burst in [100usize, 1_000] {
        // Pre-encode two sets of writes that move the same instances to different ports, and
        // alternate them, so that every event really changes an instance.
        let writes: Vec<Vec<(String, Vec<u8>)>> = [9000u16, 9500]
            .iter()
            .map(|base| {
                (0..burst)
                    .map(|i| {
                        let instance = make(i * 7 % CACHED, base + (i % 500) as u16);
                        (codec.key(&instance, 0), codec.encode_value(&instance))
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
