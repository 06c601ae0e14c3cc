//! The outage drill: what a caller sees when etcd falls over and comes back.
//!
//! Three providers register with leases they keep alive; a caller picks an instance for every
//! request. Then etcd goes away. The caller's snapshot freezes (it keeps routing to the three
//! known instances) while, behind its back, one provider crashes. When etcd is back, the caller
//! resumes its watch from the last revision it applied, learns that the provider is gone, and
//! routes to the other two; no request ever lacked an instance.
//!
//! ```text
//! cargo xtask demo                                        # real etcd when installed
//! cargo run --example outage_drill -- --etcd /usr/bin/etcd   # a real etcd it starts itself
//! cargo run --example outage_drill                        # the in-process etcd model
//! ```
//!
//! With `--etcd PATH`, the drill starts its own single-member etcd on free loopback ports in a
//! temporary directory, SIGKILLs it, and restarts it from its data directory; it ends that
//! process (by its PID) and removes the directory when done. Without it, the in-process model
//! cuts the caller off from etcd instead.

#[path = "../tests/support/etcd.rs"]
mod etcd_process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_registry::backend::{EtcdBackend, EtcdOptions};
use etcd_registry::{
    BackoffConfig, Codec, Discovery, Freshness, Instance, KeyLayout, MemoryBackend, Registration,
    ServiceCache,
};
use tokio::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;

const TTL: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(500);
const TICKS: u32 = 28;
/// A short cap so the drill recovers within a second of etcd's return; the default cap is
/// 10 s, and a caller then comes back within its current backoff step.
const BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(1),
    reset_after: Duration::from_secs(30),
};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mut etcd = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--etcd" => etcd = Some(PathBuf::from(args.next().ok_or("--etcd needs a path")?)),
            "-h" | "--help" => {
                println!("usage: outage_drill [--etcd PATH-TO-ETCD]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}; try --help").into()),
        }
    }
    match etcd {
        Some(path) => real_etcd(path).await,
        None => {
            println!("(no --etcd given: using the in-process etcd model)");
            in_memory().await
        }
    }
}

/// The drill on a real etcd process.
async fn real_etcd(path: PathBuf) -> Result<(), Error> {
    let path_var = std::env::var_os("PATH");
    let bins = etcd_process::try_find_binaries_with(Some(path.as_os_str()), path_var.as_deref())?;
    let bins: &'static etcd_process::Binaries = Box::leak(Box::new(bins));
    println!(
        "etcd-registry outage drill (real etcd: {})\n",
        bins.etcd.display()
    );
    let cluster = Arc::new(
        tokio::task::spawn_blocking(move || etcd_process::EtcdCluster::start_with(bins, 1)).await?,
    );
    let endpoints = cluster.endpoints();
    let options = EtcdOptions::new().connect_timeout(Duration::from_secs(1));
    let clock = Clock::new();
    clock.say(&format!("etcd started at {}", endpoints.join(",")));

    let mut providers = Vec::new();
    for n in 1..=3 {
        let backend = EtcdBackend::connect(&endpoints, options.clone()).await?;
        let instance = Instance::builder("user", format!("10.0.0.{n}:8080"))
            .id(format!("user-{n}"))
            .build()?;
        let registration = Registration::with_backend(backend, instance)
            .namespace("/services")
            .ttl(TTL)
            .backoff(BACKOFF)
            .register()
            .await?;
        providers.push(Some(registration));
        clock.say(&format!(
            "provider user-{n} registered at 10.0.0.{n}:8080 (lease TTL {TTL:?})"
        ));
    }

    let backend = EtcdBackend::connect(&endpoints, options).await?;
    let users = Discovery::with_backend(backend)
        .namespace("/services")
        .stall_timeout(Duration::from_secs(2))
        .backoff(BACKOFF)
        .build()?
        .service("user")
        .await?;
    clock.say(&format!(
        "caller discovered {} instances at revision {}",
        users.snapshot().len(),
        users.snapshot().revision()
    ));

    let outcome = drill(&clock, &users, async |tick| match tick {
        4 => {
            let cluster = cluster.clone();
            let _ = tokio::task::spawn_blocking(move || cluster.kill(0)).await;
            Some(">>> etcd killed (SIGKILL)".to_owned())
        }
        6 => {
            providers[1] = None;
            Some(">>> provider user-2 crashes (no deregister); its lease is left to expire".into())
        }
        14 => {
            let cluster = cluster.clone();
            let _ = tokio::task::spawn_blocking(move || cluster.restart(0)).await;
            Some(
                ">>> etcd restarted from its data directory (it gives every lease a fresh TTL, \
                 so user-2 lingers one more TTL)"
                    .into(),
            )
        }
        _ => None,
    })
    .await;
    drop(providers);
    let cluster = Arc::try_unwrap(cluster).ok();
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    outcome
}

/// The drill on the in-process model: the caller is cut off from etcd, providers are not.
async fn in_memory() -> Result<(), Error> {
    println!("etcd-registry outage drill (in-process etcd model)\n");
    let clock = Clock::new();
    let etcd = MemoryBackend::new();
    let codec = Codec::new(KeyLayout::Native, "/services");

    // Providers keep their leases through etcd's own API (the model's inherent methods), which
    // the caller's outage does not touch: they model providers that still reach etcd.
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
        clock.say(&format!(
            "provider user-{n} registered at 10.0.0.{n}:8080 (lease TTL {TTL:?})"
        ));
    }

    let users = Discovery::memory(etcd.clone())
        .namespace("/services")
        .stall_timeout(Duration::from_secs(2))
        .backoff(BACKOFF)
        .build()?
        .service("user")
        .await?;
    clock.say(&format!(
        "caller discovered {} instances at revision {}",
        users.snapshot().len(),
        users.snapshot().revision()
    ));

    drill(&clock, &users, async |tick| match tick {
        4 => {
            etcd.set_reachable(false);
            Some(
                ">>> etcd is unreachable for the caller (connections refused, watch broken)".into(),
            )
        }
        6 => {
            keepalives[1].abort();
            Some(
                ">>> provider user-2 crashes; its lease runs out while the caller is cut off"
                    .into(),
            )
        }
        14 => {
            etcd.set_reachable(true);
            Some(">>> etcd is reachable again".into())
        }
        _ => None,
    })
    .await
}

/// Routes 100 requests per tick, runs `at(tick)` for the scenario's events, prints a timeline,
/// and checks the end state.
async fn drill(
    clock: &Clock,
    users: &ServiceCache,
    mut at: impl AsyncFnMut(u32) -> Option<String>,
) -> Result<(), Error> {
    let mut failed_requests = 0u32;
    for tick in 0..TICKS {
        if let Some(event) = at(tick).await {
            clock.say(&event);
        }
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
        clock.say(&report(users, &served));
    }

    let stats = users.stats();
    println!();
    clock.say(&format!(
        "done: {failed_requests} requests found no instance; relists {}, watch restarts {}, events applied {}",
        stats.relists, stats.watch_restarts, stats.events_applied
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

fn report(users: &ServiceCache, served: &BTreeMap<String, u32>) -> String {
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
}

/// Prints lines stamped with the time since the drill started.
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        Self(Instant::now())
    }

    fn say(&self, what: &str) {
        println!("[{:>5.1}s] {what}", self.0.elapsed().as_secs_f64());
    }
}
