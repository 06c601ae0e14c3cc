//! The outage drill, end to end: a real etcd, three real `greeter_server` processes, and two
//! clients side by side in this process, one call every 20 ms each:
//!
//! - **ours**: `GreeterClient::new(etcd_registry::tonic::channel(&cache))`;
//! - **balance_channel**: tonic's own `Channel::balance_channel`, fed from the same cache by
//!   `etcd_registry::tonic::feed_balance_channel`.
//!
//! Phases: all up (2 s); etcd SIGKILLed (3 s); a server SIGKILLed while etcd is still down
//! (6 s); etcd restarted (6 s once it is healthy, during which the dead server's 2 s lease runs
//! out and etcd removes it). Ours must not fail while the servers are all up, etcd or not, and
//! may fail at most 5 calls in all (the outlier-ejection threshold: the dead server gets no
//! more picks after 5 failures in a row). Nothing is asserted about tonic's balancer, the
//! comparison, beyond it having sent calls. Then the two servers left get SIGTERM: they must
//! deregister (gone from the cache at once) and exit 0.
//!
//! Everything runs on loopback; the harness ends its own etcd, and this test ends exactly the
//! server processes it spawned, through their `Child` handles.

#[path = "../../../tests/support/etcd.rs"]
mod etcd;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use etcd::EtcdCluster;
use etcd_registry::{BackoffConfig, Discovery, EtcdBackend, EtcdOptions, ServiceCache};
use etcd_registry_grpc_example::pb::HelloRequest;
use etcd_registry_grpc_example::pb::greeter_client::GreeterClient;
use etcd_registry_grpc_example::{NAMESPACE, SERVICE};
use tokio::time::MissedTickBehavior;
use tonic::transport::Channel;

/// The phases, in order, and how long each lasts (the last one from when etcd is healthy).
const PHASES: [(&str, Duration); 4] = [
    ("all up", Duration::from_secs(2)),
    ("etcd down", Duration::from_secs(3)),
    ("etcd down, one server killed", Duration::from_secs(6)),
    ("etcd back", Duration::from_secs(6)),
];
/// Index of the phase during which a server is dead but still known.
const SERVER_KILLED: usize = 2;
/// One call per client every this long.
const EVERY: Duration = Duration::from_millis(20);
/// The bound on one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound on the calls of one client: the drill lasts under 30 s.
const MAX_CALLS: usize = 30_000 / 20;
/// The servers' lease TTL, in seconds.
const SERVER_TTL: &str = "2";
/// Failures ours may have in all: outlier ejection's consecutive-failure threshold.
const OURS_MAX_FAILURES: u32 = 5;
/// How long a server may take to print its `listening` line.
const SERVER_START: Duration = Duration::from_secs(20);
/// Bound on the waits for the cache (instances seen, removed) and for exits.
const CONVERGE: Duration = Duration::from_secs(10);

/// A `greeter_server` child of this test. Dropping it SIGKILLs it if it still runs (that PID
/// only, through its handle) and reaps it.
struct Server {
    id: String,
    addr: String,
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts a server; its stderr lines are kept, stamped with the time since `epoch`.
    fn spawn(etcd_endpoint: &str, id: &str, epoch: Instant) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_greeter_server"))
            .env("GREETER_ETCD", etcd_endpoint)
            .env("GREETER_ID", id)
            .env("GREETER_ADDR", "127.0.0.1:0")
            .env("GREETER_TTL", SERVER_TTL)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn greeter_server");
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (lines, stdout) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        // Both pipes are read to their end, so the child never blocks on a full one.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let log = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let at = epoch.elapsed().as_secs_f64();
                let line = format!("[{at:6.2}s] {line}");
                log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Server {
            id: id.to_owned(),
            addr: String::new(),
            child,
            stderr,
            stdout,
        }
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Waits, until `deadline`, for the `listening ADDR id ID` line; panics with the server's
    /// stderr if it exits or stays silent.
    fn wait_listening(&mut self, deadline: Instant) {
        loop {
            match self.stdout.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let Some(rest) = line.strip_prefix("listening ") else {
                        continue;
                    };
                    let (addr, id) = rest.split_once(" id ").expect("listening ADDR id ID");
                    assert_eq!(id, self.id, "the server reports the id it was given");
                    self.addr = addr.to_owned();
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait");
                    panic!(
                        "{} exited ({status}) before listening:\n{}",
                        self.id,
                        self.stderr()
                    );
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening:\n{}",
                    self.id,
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} printed no `listening` line within {SERVER_START:?}:\n{}",
                self.id,
                self.stderr()
            );
        }
    }

    /// SIGTERM to this child (by its own PID).
    fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        let result = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(result, 0, "kill({pid}, SIGTERM)");
    }

    /// Waits up to `bound` for the child to exit.
    fn wait_exit(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The calls of one client during one phase.
#[derive(Default)]
struct Tally {
    total: u32,
    failed: u32,
    /// Failures by kind (gRPC code and message).
    errors: BTreeMap<String, u32>,
    /// Replies by the id of the server that answered.
    answered_by: BTreeMap<String, u32>,
    /// When each failure ended, in ms since the test started.
    failed_at_ms: Vec<u128>,
}

/// The drill's clock: when the test started and which phase the drill is in (`PHASES.len()`
/// once over).
struct Clock {
    start: Instant,
    phase: AtomicUsize,
}

impl Clock {
    fn phase(&self) -> usize {
        self.phase.load(Ordering::SeqCst)
    }

    /// Enters `phase`; returns when, in seconds since the test started.
    fn enter(&self, phase: usize) -> f64 {
        self.phase.store(phase, Ordering::SeqCst);
        self.start.elapsed().as_secs_f64()
    }
}

/// Records every change of the cache's instances or freshness, stamped with the time since
/// `epoch`, as one line each (at most 10 000), into `history`.
fn record_history(
    cache: &ServiceCache,
    epoch: Instant,
    history: Arc<Mutex<Vec<String>>>,
) -> impl Future<Output = ()> + use<> {
    let mut changes = cache.changes();
    async move {
        let mut last = String::new();
        for _ in 0..10_000 {
            let line = {
                let snapshot = changes.borrow_and_update();
                let mut instances: Vec<String> = snapshot
                    .instances()
                    .iter()
                    .map(|i| {
                        if i.is_up() {
                            i.id().to_owned()
                        } else {
                            format!("{} ({})", i.id(), i.state())
                        }
                    })
                    .collect();
                instances.sort();
                let freshness = if snapshot.freshness().is_live() {
                    "live"
                } else {
                    "frozen"
                };
                format!("{freshness} {instances:?}")
            };
            if line != last {
                let at = epoch.elapsed().as_secs_f64();
                history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("[{at:6.2}s] {line}"));
                last = line;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Calls `say_hello` every [`EVERY`] until the drill is over, one call at a time, each bounded
/// by [`CALL_TIMEOUT`]. A call counts in the later of the phases it started and ended in, so a
/// call in flight when a fault is injected counts in the fault's phase.
async fn drive<F, Fut>(mut say_hello: F, clock: Arc<Clock>) -> Vec<Tally>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<String, tonic::Status>>,
{
    let mut tallies: Vec<Tally> = PHASES.iter().map(|_| Tally::default()).collect();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for _ in 0..MAX_CALLS {
        tick.tick().await;
        let started_in = clock.phase();
        if started_in >= PHASES.len() {
            break;
        }
        let outcome = tokio::time::timeout(CALL_TIMEOUT, say_hello()).await;
        let phase = clock.phase().max(started_in).min(PHASES.len() - 1);
        let tally = &mut tallies[phase];
        tally.total += 1;
        let error = match outcome {
            Ok(Ok(message)) => {
                let from = message.rsplit(' ').next().unwrap_or_default().to_owned();
                *tally.answered_by.entry(from).or_default() += 1;
                continue;
            }
            Ok(Err(status)) => {
                let text = format!("{:?}: {}", status.code(), status.message());
                text.chars().take(200).collect()
            }
            Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
        };
        tally.failed += 1;
        *tally.errors.entry(error).or_default() += 1;
        tally.failed_at_ms.push(clock.start.elapsed().as_millis());
    }
    tallies
}

/// Waits up to [`CONVERGE`] until the cache's snapshot satisfies `done`.
async fn wait_cache(cache: &ServiceCache, what: &str, done: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let ids = ids(cache);
        if done(&ids) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {CONVERGE:?}; the cache has {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(cache: &ServiceCache) -> Vec<String> {
    let mut ids: Vec<String> = cache
        .snapshot()
        .instances()
        .iter()
        .map(|i| i.id().to_owned())
        .collect();
    ids.sort();
    ids
}

fn report(ours: &[Tally], theirs: &[Tally]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<30} | {:>16} | {:>22}",
        "phase", "ours failed/total", "balance_channel f/t"
    );
    let _ = writeln!(out, "{}", "-".repeat(76));
    for (i, (name, _)) in PHASES.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name:<30} | {:>16} | {:>22}",
            format!("{}/{}", ours[i].failed, ours[i].total),
            format!("{}/{}", theirs[i].failed, theirs[i].total),
        );
    }
    for (client, tallies) in [("ours", ours), ("balance_channel", theirs)] {
        for (i, (name, _)) in PHASES.iter().enumerate() {
            let t = &tallies[i];
            let _ = writeln!(
                out,
                "{client} / {name}: answered by {:?}; errors {:?}; failures at ms {:?}",
                t.answered_by, t.errors, t.failed_at_ms
            );
        }
    }
    out
}

#[test]
fn outage_drill_ours_versus_balance_channel() {
    let began = Instant::now();
    let etcd = EtcdCluster::single();
    let endpoint = etcd.endpoint(0);
    let mut servers: Vec<Server> = ["g1", "g2", "g3"]
        .iter()
        .map(|id| Server::spawn(&endpoint, id, began))
        .collect();
    let deadline = Instant::now() + SERVER_START;
    for server in &mut servers {
        server.wait_listening(deadline);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cache = runtime.block_on(async {
        let backend = EtcdBackend::connect(
            etcd.endpoints(),
            EtcdOptions::new()
                .connect_timeout(Duration::from_secs(1))
                .keep_alive(Duration::from_secs(1), Duration::from_secs(1)),
        )
        .await
        .expect("connect to etcd");
        let cache = Discovery::with_backend(backend)
            .namespace(NAMESPACE)
            .request_timeout(Duration::from_secs(2))
            .stall_timeout(Duration::from_secs(3))
            .backoff(BackoffConfig {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(500),
                reset_after: Duration::from_secs(30),
            })
            .build()
            .expect("valid discovery")
            .service(SERVICE)
            .await
            .expect("first list");
        wait_cache(&cache, "the three servers are seen", |ids| ids.len() == 3).await;
        cache
    });

    let history = Arc::new(Mutex::new(Vec::new()));
    runtime.spawn(record_history(&cache, began, Arc::clone(&history)));
    let clock = Arc::new(Clock {
        start: began,
        phase: AtomicUsize::new(0),
    });
    let (ours, theirs) = {
        let _runtime = runtime.enter();
        let ours = GreeterClient::new(etcd_registry::tonic::channel(&cache));
        let (channel, sender) = Channel::balance_channel::<String>(64);
        runtime.spawn(etcd_registry::tonic::feed_balance_channel(
            cache.clone(),
            |e| e,
            sender,
        ));
        let theirs = GreeterClient::new(channel);
        let ours = runtime.spawn(drive(
            move || {
                let mut client = ours.clone();
                async move {
                    let request = HelloRequest {
                        name: "ours".into(),
                    };
                    Ok(client.say_hello(request).await?.into_inner().message)
                }
            },
            Arc::clone(&clock),
        ));
        let theirs = runtime.spawn(drive(
            move || {
                let mut client = theirs.clone();
                async move {
                    let request = HelloRequest {
                        name: "theirs".into(),
                    };
                    Ok(client.say_hello(request).await?.into_inner().message)
                }
            },
            Arc::clone(&clock),
        ));
        (ours, theirs)
    };

    // Phase 0: all up.
    let mut entered = vec![clock.start.elapsed().as_secs_f64()];
    std::thread::sleep(PHASES[0].1);
    // Phase 1: etcd down.
    entered.push(clock.enter(1));
    etcd.kill(0);
    std::thread::sleep(PHASES[1].1);
    // Phase 2: one server killed while etcd is down.
    entered.push(clock.enter(SERVER_KILLED));
    let killed = servers.remove(1);
    let killed_id = killed.id.clone();
    drop(killed); // SIGKILL to that child, reaped
    std::thread::sleep(PHASES[SERVER_KILLED].1);
    assert!(
        ids(&cache).contains(&killed_id),
        "frozen, never cleared: the dead server is still listed while etcd is down"
    );
    // Phase 3: etcd back; the dead server's lease runs out and etcd removes it.
    entered.push(clock.enter(3));
    let restarting = Instant::now();
    etcd.restart(0);
    let healthy = restarting.elapsed();
    let back = Instant::now();
    let mut removed_after = None;
    while back.elapsed() < PHASES[3].1 {
        if removed_after.is_none() && !ids(&cache).contains(&killed_id) {
            removed_after = Some(back.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    entered.push(clock.enter(PHASES.len()));

    let ours = runtime.block_on(ours).expect("ours' task");
    let theirs = runtime.block_on(theirs).expect("balance_channel's task");
    let table = report(&ours, &theirs);
    println!("{table}");
    println!("phases entered at {entered:.2?} s; the cache over time:");
    for line in history.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("  {line}");
    }
    println!(
        "etcd healthy {healthy:?} after the restart began; {killed_id} removed from the cache {removed_after:?} after that"
    );

    for server in &servers {
        println!(
            "--- {} ({}) stderr so far ---\n{}",
            server.id,
            server.addr,
            server.stderr()
        );
    }

    let failed = |tallies: &[Tally]| tallies.iter().map(|t| t.failed).sum::<u32>();
    for (i, (name, _)) in PHASES.iter().enumerate() {
        assert!(
            ours[i].total > 0,
            "ours sent nothing in phase {name:?}\n{table}"
        );
    }
    assert_eq!(ours[0].failed, 0, "ours failed with all up\n{table}");
    assert_eq!(ours[1].failed, 0, "ours failed with etcd down\n{table}");
    assert!(
        failed(&ours) <= OURS_MAX_FAILURES,
        "ours failed more than the ejection threshold ({OURS_MAX_FAILURES})\n{table}"
    );
    assert!(
        theirs.iter().map(|t| t.total).sum::<u32>() > 0,
        "balance_channel sent nothing\n{table}"
    );
    assert!(
        removed_after.is_some(),
        "{killed_id}'s lease ran out {:?} after etcd came back, yet it is still listed\n{table}",
        PHASES[3].1
    );

    // The servers left: SIGTERM, drained and deregistered (gone from the cache at once), exit 0.
    let left: Vec<String> = servers.iter().map(|s| s.id.clone()).collect();
    runtime.block_on(wait_cache(
        &cache,
        "the live servers are listed again",
        |ids| left.iter().all(|id| ids.contains(id)),
    ));
    for server in &servers {
        server.terminate();
    }
    for server in &mut servers {
        let status = server.wait_exit(CONVERGE);
        assert!(
            status.is_some_and(|s| s.success()),
            "{} on SIGTERM: {status:?}\n{}",
            server.id,
            server.stderr()
        );
    }
    runtime.block_on(wait_cache(&cache, "deregistered servers are gone", |ids| {
        ids.is_empty()
    }));
    println!("drill took {:?} in all", began.elapsed());
}
