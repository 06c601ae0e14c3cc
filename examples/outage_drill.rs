//! The outage drill: what a caller sees when etcd falls over and comes back.
//!
//! Three providers register with leases they keep alive; a caller picks an instance for every
//! request in a loop. Then etcd becomes unreachable for the caller. The caller's snapshot freezes
//! — it keeps routing to the three known instances — while, behind its back, one provider shuts
//! down and its lease runs out. When etcd comes back, the caller resumes its watch from the last
//! revision it applied, learns that the provider is gone, and routes to the other two.
//!
//! Run it with `cargo xtask demo` (or `cargo run --example outage_drill`).

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_discovery::{
    BackoffConfig, Codec, Discovery, Freshness, Instance, KeyLayout, MemoryBackend,
};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(500);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let say = |what: &str| println!("[{:>5.1}s] {what}", start.elapsed().as_secs_f64());

    println!("etcd-discovery outage drill (in-process etcd model)\n");
    let etcd = MemoryBackend::new();
    let codec = Codec::new(KeyLayout::Native, "/services");

    // Providers: a lease each, kept alive every TTL/3 until the provider stops.
    let mut keepalives = Vec::new();
    for n in 1..=3 {
        let instance = Instance::builder("user", format!("10.0.0.{n}:8080"))
            .id(format!("user-{n}"))
            .build()?;
        let lease = etcd.grant(TTL);
        etcd.put_with_lease(
            codec.key(&instance, lease),
            codec.encode_value(&instance),
            lease,
        )?;
        let etcd = etcd.clone();
        keepalives.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(TTL / 3);
            loop {
                tick.tick().await;
                if etcd.keep_alive(lease).is_err() {
                    break;
                }
            }
        }));
        say(&format!(
            "provider user-{n} registered at 10.0.0.{n}:8080 (lease TTL {TTL:?})"
        ));
    }

    let discovery = Discovery::memory(etcd.clone())
        .namespace("/services")
        .stall_timeout(Duration::from_secs(2))
        // A short cap so the drill recovers within a second of etcd's return; the default cap is
        // 10 s, and the caller then comes back within its current backoff step.
        .backoff(BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            reset_after: Duration::from_secs(30),
        })
        .build()?;
    let users = discovery.service("user").await?;
    say(&format!(
        "caller discovered {} instances at revision {}",
        users.snapshot().len(),
        users.snapshot().revision()
    ));

    let report = |users: &etcd_discovery::ServiceCache, served: &BTreeMap<String, u32>| {
        let snapshot = users.snapshot();
        let freshness = match snapshot.freshness() {
            Freshness::Live => "LIVE  ".to_owned(),
            Freshness::Frozen { since, cause } => {
                format!("FROZEN for {:.1}s ({cause})", since.elapsed().as_secs_f64())
            }
        };
        let counts: Vec<String> = served.iter().map(|(id, n)| format!("{id}:{n}")).collect();
        format!(
            "{freshness} rev {:>3}, {} instances | requests routed: {}",
            snapshot.revision(),
            snapshot.len(),
            counts.join(" ")
        )
    };

    let mut failed_requests = 0u32;
    for tick in 0..24u32 {
        match tick {
            4 => {
                etcd.set_reachable(false);
                say(">>> etcd is down for the caller (connections refused, watch broken)");
            }
            6 => {
                keepalives[1].abort();
                say(">>> provider user-2 crashes; its lease will run out while etcd is away");
            }
            14 => {
                etcd.set_reachable(true);
                say(">>> etcd is back");
            }
            _ => {}
        }
        // One tick: 100 requests spread over it, each routed to a picked instance.
        let mut served = BTreeMap::new();
        for _ in 0..10 {
            for _ in 0..10 {
                match users.pick() {
                    Some(target) => *served.entry(target.id().to_owned()).or_insert(0) += 1,
                    None => failed_requests += 1,
                }
            }
            tokio::time::sleep(TICK / 10).await;
        }
        say(&report(&users, &served));
    }

    let stats = users.stats();
    println!();
    say(&format!(
        "done: {} requests failed for lack of an instance; relists {}, watch restarts {}, events applied {}",
        failed_requests, stats.relists, stats.watch_restarts, stats.events_applied
    ));
    let live = users.freshness().is_live();
    let ids: Vec<String> = users
        .snapshot()
        .instances()
        .iter()
        .map(|i| i.id().to_owned())
        .collect();
    if failed_requests == 0 && live && ids == ["user-1", "user-3"] && stats.relists == 0 {
        println!("the snapshot stayed frozen through the outage and resumed without a relist.");
        Ok(())
    } else {
        Err(format!(
            "unexpected end state: live={live} ids={ids:?} failed={failed_requests} stats={stats:?}"
        )
        .into())
    }
}
