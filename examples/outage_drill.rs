//! The outage drill: what a caller sees when etcd falls over and comes back.
//!
//! Three providers, each a small TCP server on a loopback port, register with leases they keep
//! alive; a caller sends them requests, picking round-robin (`pick`, or power of two choices
//! with `--picker p2c`) and reporting each outcome. Then etcd goes away. The caller's snapshot freezes (it keeps routing
//! to the three known instances) while, behind its back, one provider crashes. Its requests
//! fail; after five consecutive failures outlier ejection takes it out of the picks, so the
//! frozen list stays safe to route on. When etcd is back, the caller resumes its watch from the
//! last revision it applied, learns that the provider is gone, and routes to the other two; no
//! request ever lacked an instance.
//!
//! ```text
//! cargo xtask demo                                        # real etcd when installed
//! cargo run --example outage_drill -- --etcd /usr/bin/etcd   # a real etcd it starts itself
//! cargo run --example outage_drill                        # the in-process etcd model
//! cargo run --example outage_drill -- --picker p2c         # power of two choices
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;

const TTL: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(500);
const TICKS: u32 = 28;
/// Requests per tick (20 ms apart).
const REQUESTS: u32 = 25;
/// How long a request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(250);
/// Outlier ejection's default consecutive-failure threshold: the most requests the crashed
/// provider may receive before it is ejected.
const EJECT_AFTER: u32 = 5;
/// Pick with power of two choices instead of round-robin.
static P2C: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
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
            "--picker" => {
                let picker = args.next().ok_or("--picker needs round-robin or p2c")?;
                let p2c = match picker.as_str() {
                    "round-robin" => false,
                    "p2c" => true,
                    other => {
                        return Err(format!("unknown picker {other:?}: round-robin or p2c").into());
                    }
                };
                P2C.store(p2c, std::sync::atomic::Ordering::Relaxed);
            }
            "-h" | "--help" => {
                println!("usage: outage_drill [--etcd PATH-TO-ETCD] [--picker round-robin|p2c]");
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
    let mut servers = Vec::new();
    for n in 1..=3 {
        let backend = EtcdBackend::connect(&endpoints, options.clone()).await?;
        let server = Server::start().await?;
        let instance = Instance::builder("user", server.addr.clone())
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
            "provider user-{n} serving and registered at {} (lease TTL {TTL:?})",
            server.addr
        ));
        servers.push(server);
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
            servers[1].crash();
            Some(
                ">>> provider user-2 crashes (server gone, no deregister); its lease is left to expire"
                    .into(),
            )
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
    let mut servers = Vec::new();
    for n in 1..=3 {
        let server = Server::start().await?;
        let instance = Instance::builder("user", server.addr.clone())
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
            "provider user-{n} serving and registered at {} (lease TTL {TTL:?})",
            server.addr
        ));
        servers.push(server);
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
            servers[1].crash();
            Some(
                ">>> provider user-2 crashes (server gone); its lease runs out while the caller is cut off"
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

/// Sends [`REQUESTS`] requests per tick, reporting each outcome; runs
/// `at(tick)` for the scenario's events, prints a timeline, and checks the end state.
async fn drill(
    clock: &Clock,
    users: &ServiceCache,
    mut at: impl AsyncFnMut(u32) -> Option<String>,
) -> Result<(), Error> {
    let mut no_instance = 0u32;
    let mut failed = BTreeMap::<String, u32>::new();
    let mut frozen_failures = 0u32;
    for tick in 0..TICKS {
        if let Some(event) = at(tick).await {
            clock.say(&event);
        }
        let mut routed = BTreeMap::new();
        let mut failed_now = 0u32;
        for _ in 0..REQUESTS {
            let call = if P2C.load(std::sync::atomic::Ordering::Relaxed) {
                users.pick_p2c()
            } else {
                users.pick().map(|picked| picked.start())
            };
            let Some(call) = call else {
                no_instance += 1;
                continue;
            };
            let id = call.id().to_owned();
            *routed.entry(id.clone()).or_insert(0u32) += 1;
            if request(call.addr()).await {
                call.success();
            } else {
                call.failure();
                failed_now += 1;
                *failed.entry(id).or_insert(0) += 1;
                if !users.freshness().is_live() {
                    frozen_failures += 1;
                }
            }
            tokio::time::sleep(TICK / REQUESTS).await;
        }
        clock.say(&report(users, &routed, failed_now));
    }

    let stats = users.stats();
    println!();
    clock.say(&format!(
        "done: {no_instance} requests found no instance; failed requests per instance: {failed:?} \
         ({frozen_failures} while frozen); relists {}, watch restarts {}, events applied {}",
        stats.relists, stats.watch_restarts, stats.events_applied
    ));
    let live = users.freshness().is_live();
    let ids: Vec<String> = users
        .snapshot()
        .instances()
        .iter()
        .map(|i| i.id().to_owned())
        .collect();
    let to_crashed = failed.get("user-2").copied().unwrap_or(0);
    let only_crashed = failed.keys().all(|id| id == "user-2");
    if no_instance == 0
        && only_crashed
        && to_crashed <= EJECT_AFTER
        && live
        && ids == ["user-1", "user-3"]
        && stats.relists == 0
    {
        println!(
            "the snapshot stayed frozen through the outage and resumed without a relist; the \
             crashed provider got {to_crashed} requests, no more than outlier ejection's \
             threshold of {EJECT_AFTER} consecutive failures, before the caller routed around it."
        );
        Ok(())
    } else {
        Err(format!(
            "unexpected end state: live={live} ids={ids:?} no_instance={no_instance} \
             failed={failed:?} stats={stats:?}"
        )
        .into())
    }
}

/// One request: connect to `addr`, send a byte, read the byte back, within
/// [`REQUEST_TIMEOUT`]. `false` on any failure.
async fn request(addr: &str) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"?").await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer == *b"!")
    };
    matches!(
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await,
        Ok(Ok(true))
    )
}

/// A provider's server: answers `!` to every byte, on a loopback port of its own.
struct Server {
    addr: String,
    task: JoinHandle<()>,
}

impl Server {
    async fn start() -> Result<Self, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut byte = [0u8; 1];
                    if stream.read_exact(&mut byte).await.is_ok() {
                        let _ = stream.write_all(b"!").await;
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// Stops accepting: the listener closes, so connections are refused from now on.
    fn crash(&self) {
        self.task.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn report(users: &ServiceCache, routed: &BTreeMap<String, u32>, failed: u32) -> String {
    let snapshot = users.snapshot();
    let freshness = match snapshot.freshness() {
        Freshness::Live => "LIVE  ".to_owned(),
        Freshness::Frozen { since, cause } => {
            format!("FROZEN for {:.1}s ({cause})", since.elapsed().as_secs_f64())
        }
    };
    let counts: Vec<String> = routed.iter().map(|(id, n)| format!("{id}:{n}")).collect();
    let ejected: Vec<String> = users
        .health()
        .iter()
        .filter(|h| h.ejected_until.is_some())
        .map(|h| h.instance.id().to_owned())
        .collect();
    let ejected = if ejected.is_empty() {
        String::new()
    } else {
        format!(" | ejected: {}", ejected.join(" "))
    };
    format!(
        "{freshness} rev {:>3}, {} instances | routed: {} | failed: {failed}{ejected}",
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
