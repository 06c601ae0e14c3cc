//! Never wrong, never stuck (ARCHITECTURE.md §4, invariant 12), against real etcd processes:
//! a cache or a registration whose task is gone says so, and asking again starts a new task;
//! defaults that etcd accepts; one request timeout that means what it says.
//!
//! The clusters bind loopback ports only; the harness ends its own members by PID.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};

use etcd_registry::backend::{
    BackendError, KeysAt, ListResponse, PutCondition, PutOutcome, Watch, WatchMessage,
};
use etcd_registry::{
    Backend, Discovery, EtcdBackend, EtcdOptions, Registration, RegistrationStatus, ServiceCache,
};
use support::etcd::EtcdCluster;
use support::wait::*;
use support::*;

const LONG: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A user's backend with a bug: once armed, the next watch message it delivers panics the task
/// that reads it.
#[derive(Clone)]
struct Panicky {
    inner: EtcdBackend,
    armed: Arc<AtomicBool>,
}

impl Backend for Panicky {
    fn list(&self, prefix: &[u8]) -> BoxFuture<'_, Result<ListResponse, BackendError>> {
        self.inner.list(prefix)
    }

    fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
    ) -> BoxFuture<'_, Result<Watch, BackendError>> {
        let armed = self.armed.clone();
        self.inner
            .watch(prefix, from_revision)
            .map(move |watch| {
                watch.map(|mut watch| {
                    watch.stream = watch
                        .stream
                        .map(move |message: Result<WatchMessage, BackendError>| {
                            assert!(!armed.load(Ordering::SeqCst), "a bug in a user's backend");
                            message
                        })
                        .boxed();
                    watch
                })
            })
            .boxed()
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, BackendError>> {
        self.inner.grant(ttl)
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, BackendError>> {
        self.inner.keep_alive(lease)
    }

    fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        condition: PutCondition,
    ) -> BoxFuture<'_, Result<PutOutcome, BackendError>> {
        self.inner.put(key, value, lease, condition)
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), BackendError>> {
        self.inner.revoke(lease)
    }

    fn keys_at(
        &self,
        prefix: &[u8],
        revision: i64,
        with_values: bool,
    ) -> BoxFuture<'_, Result<KeysAt, BackendError>> {
        self.inner.keys_at(prefix, revision, with_values)
    }

    fn probe(&self, prefix: &[u8]) -> BoxFuture<'_, Result<u64, BackendError>> {
        self.inner.probe(prefix)
    }
}

/// Issue: a cache whose task panicked stayed `Live` for good, and `service()` handed the dead
/// cache out again. Now it freezes with `TaskEnded`, and asking again restarts the task for
/// every handle, old ones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_whose_task_panicked_says_so_and_comes_back_when_asked_again() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", &user_key("u1"), &value_of("u1", 1)]);
    let backend = Panicky {
        inner: EtcdBackend::connect(etcd.endpoints(), EtcdOptions::new())
            .await
            .expect("connect"),
        armed: Arc::new(AtomicBool::new(false)),
    };
    let discovery = discovery(backend.clone()).build().expect("valid config");
    let users = discovery.service("user").await.expect("first list");
    assert!(users.freshness().is_live());

    backend.armed.store(true, Ordering::SeqCst);
    etcd.etcdctl(&["put", &user_key("u2"), &value_of("u2", 2)]);
    let dead = wait_for(&users, LONG, "frozen: the task ended", |s| {
        task_ended(s.freshness())
    })
    .await;
    assert_eq!(ids(&dead), list(&["u1@1"]), "frozen, never cleared");
    let why = users.last_error().expect("the cache says why");
    assert!(why.contains("task ended"), "{why}");

    backend.armed.store(false, Ordering::SeqCst);
    let again = discovery.service("user").await.expect("the service again");
    for cache in [&again, &users] {
        wait_for(cache, LONG, "live again with both", |s| {
            s.freshness().is_live() && ids(s) == list(&["u1@1", "u2@2"])
        })
        .await;
    }
    report(
        "a_cache_whose_task_panicked_says_so_and_comes_back_when_asked_again",
        started,
    );
}

/// A cache of `user` (holding `u1`) whose task ended: listed on a runtime that was then shut
/// down. The etcd connection lives on a runtime of its own (returned), as an application's
/// would.
fn cache_whose_runtime_shut_down(
    etcd: &EtcdCluster,
) -> (tokio::runtime::Runtime, Discovery, ServiceCache) {
    etcd.etcdctl(&["put", &user_key("u1"), &value_of("u1", 1)]);
    let connection = runtime();
    let backend = connection
        .block_on(EtcdBackend::connect(etcd.endpoints(), EtcdOptions::new()))
        .expect("connect");
    let discovery = discovery(backend).build().expect("valid config");
    let first = runtime();
    let users: ServiceCache = first
        .block_on(discovery.service("user"))
        .expect("first list");
    assert!(users.freshness().is_live());
    drop(first);
    assert!(
        task_ended(users.freshness()),
        "the runtime is gone, yet the cache says {:?}",
        users.freshness()
    );
    (connection, discovery, users)
}

/// Issue: a `Discovery` made on one runtime (a start-up `block_on`, another test) kept a
/// `Live` cache after that runtime shut down. The etcd connection lives on a runtime of its
/// own here, as an application's would.
#[test]
fn a_cache_whose_runtime_shut_down_says_so_and_comes_back_when_asked_again() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let (connection, discovery, users) = cache_whose_runtime_shut_down(&etcd);
    assert_eq!(ids(&users.snapshot()), list(&["u1@1"]), "never cleared");

    let second = runtime();
    second.block_on(async {
        let again = discovery.service("user").await.expect("the service again");
        etcd.etcdctl(&["put", &user_key("u2"), &value_of("u2", 2)]);
        for cache in [&again, &users] {
            wait_for(cache, LONG, "live again with both", |s| {
                s.freshness().is_live() && ids(s) == list(&["u1@1", "u2@2"])
            })
            .await;
        }
    });
    drop(connection);
    report(
        "a_cache_whose_runtime_shut_down_says_so_and_comes_back_when_asked_again",
        started,
    );
}

/// Issue (review): a cache whose task ended, asked for again while etcd was down, lost its
/// instances: the new task's first list failed and it published its own empty starting
/// snapshot, frozen. The restarted task now starts from the cache's snapshot, so the cache
/// stays frozen with what it had until a list succeeds.
#[test]
fn a_cache_restarted_while_etcd_is_down_keeps_its_instances() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let (connection, discovery, users) = cache_whose_runtime_shut_down(&etcd);
    let revision = users.snapshot().revision();
    etcd.kill(0);

    let second = runtime();
    second.block_on(async {
        let again = discovery
            .service("user")
            .await
            .expect("a cache that has listed is handed out while etcd is down");
        // The new task has tried to list and failed: its freeze cause replaces `TaskEnded`.
        let frozen = wait_for(&again, LONG, "the new task's freeze", |s| {
            !s.freshness().is_live() && !task_ended(s.freshness())
        })
        .await;
        assert_eq!(ids(&frozen), list(&["u1@1"]), "frozen, never cleared");
        assert_eq!(frozen.revision(), revision, "the revision goes on");
        assert_eq!(
            ids(&users.snapshot()),
            list(&["u1@1"]),
            "the old handle too"
        );

        etcd.restart(0);
        etcd.etcdctl(&["put", &user_key("u2"), &value_of("u2", 2)]);
        for cache in [&again, &users] {
            wait_for(cache, LONG, "live again with both", |s| {
                s.freshness().is_live() && ids(s) == list(&["u1@1", "u2@2"])
            })
            .await;
        }
    });
    drop(connection);
    report(
        "a_cache_restarted_while_etcd_is_down_keeps_its_instances",
        started,
    );
}

/// Issue (review): a cache whose task ended, restarted after etcd was restored from an older
/// backup, followed the restored etcd without counting a reset: the new task's machine had
/// applied nothing to compare its first list with. The restarted task now goes on with the
/// machine the ended one parked, so that list is a relist, checked like a running task's.
#[test]
fn a_cache_restarted_after_etcd_went_back_in_time_counts_a_reset() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", &user_key("u0"), &value_of("u0", 3)]);
    let backup = etcd.backup();
    let (connection, discovery, users) = cache_whose_runtime_shut_down(&etcd);
    assert_eq!(ids(&users.snapshot()), list(&["u0@3", "u1@1"]));
    let high = users.snapshot().revision();
    let before = users.stats();
    etcd.restore_from(&backup);

    runtime().block_on(async {
        let again = discovery.service("user").await.expect("the service again");
        let s = wait_for(&again, LONG, "live on the restored etcd", |s| {
            s.freshness().is_live() && ids(s) == list(&["u0@3"])
        })
        .await;
        assert_eq!(s.revision(), backup.revision);
        assert!(s.revision() < high, "went back with etcd");
        let stats = again.stats();
        assert_eq!(stats.resets, before.resets + 1, "{stats:?}");
        assert_eq!(stats.relists, before.relists + 1, "{stats:?}");
    });
    drop(connection);
    report(
        "a_cache_restarted_after_etcd_went_back_in_time_counts_a_reset",
        started,
    );
}

/// Issue: a registration whose runtime shut down kept saying `Registered` while nothing kept
/// its lease alive. Now it says `TaskEnded`, and the key expires within one TTL.
#[test]
fn a_registration_whose_runtime_shut_down_says_so() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let connection = runtime();
    let backend = connection
        .block_on(EtcdBackend::connect(etcd.endpoints(), EtcdOptions::new()))
        .expect("connect");
    let ttl = Duration::from_secs(2);

    let provider = runtime();
    let registration = provider
        .block_on(
            Registration::with_backend(backend, instance("user", "u1", 1))
                .namespace(NS)
                .ttl(ttl)
                .register(),
        )
        .expect("registered");
    let status = registration.status();
    assert!(matches!(
        *status.borrow(),
        RegistrationStatus::Registered { .. }
    ));
    drop(provider);
    assert_eq!(*status.borrow(), RegistrationStatus::TaskEnded);

    connection.block_on(eventually(ttl * 3, "the key expires", || {
        get_key(&etcd, &user_key("u1")).is_none().then_some(())
    }));
    report("a_registration_whose_runtime_shut_down_says_so", started);
}

/// Issue: the default HTTP/2 keep-alive pinged every 3 s, faster than a default etcd accepts
/// (`--grpc-keepalive-min-time` 5 s): etcd answered with GOAWAY and every watch broke about
/// every 15 s. With the defaults, an idle watch on a default etcd stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_keep_alive_is_one_a_default_etcd_accepts() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", &user_key("u1"), &value_of("u1", 1)]);
    let backend = EtcdBackend::connect(etcd.endpoints(), EtcdOptions::new())
        .await
        .expect("connect");
    let users = Discovery::with_backend(backend)
        .namespace(NS)
        // Longer than the observation: no progress request, so only pings cross the idle
        // connection, as in a quiet production cache with a long stall bound.
        .stall_timeout(Duration::from_secs(60))
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list");
    let recorder = Recorder::start(&users);
    // etcd closes a connection after its third ping strike: 3 s pings were gone within ~12 s.
    tokio::time::sleep(Duration::from_secs(20)).await;
    etcd.etcdctl(&["put", &user_key("u2"), &value_of("u2", 2)]);
    wait_for(&users, LONG, "the put arrives", |s| s.len() == 2).await;
    assert_eq!(
        users.stats().watch_restarts,
        0,
        "the watch broke while idle"
    );
    assert_eq!(users.stats().failures, 0, "{:?}", users.last_error());
    assert!(
        recorder.snapshots().iter().all(|s| s.freshness().is_live()),
        "froze while idle"
    );
    report(
        "the_default_keep_alive_is_one_a_default_etcd_accepts",
        started,
    );
}

/// Issue: `request_timeout` on the cache and on the registration had no effect above 5 s,
/// because the etcd backend cut every call at its own 5 s. An etcd that takes 6.5 s to answer
/// (stopped, then continued) is now waited for when the setting says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_is_the_one_bound_on_a_request() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", &user_key("u1"), &value_of("u1", 1)]);
    let backend = EtcdBackend::connect(etcd.endpoints(), EtcdOptions::new())
        .await
        .expect("connect");
    let discovery = Discovery::with_backend(backend.clone())
        .namespace(NS)
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("valid config");
    // Connected before etcd stops: what is measured is the request, not the dial.
    discovery.service("warm-up").await.expect("first list");

    etcd.stop(0);
    let users = discovery.service_now("user").expect("a cache");
    let registering = tokio::spawn(
        Registration::with_backend(backend, instance("order", "o1", 1))
            .namespace(NS)
            .request_timeout(Duration::from_secs(10))
            .register(),
    );
    tokio::time::sleep(Duration::from_millis(6500)).await;
    etcd.cont(0);

    wait_for(&users, LONG, "listed once etcd answers", |s| {
        s.freshness().is_live() && ids(s) == list(&["u1@1"])
    })
    .await;
    assert_eq!(
        users.stats().failures,
        0,
        "the list was cut short: {:?}",
        users.last_error()
    );
    let registration = registering.await.expect("no panic");
    assert!(
        registration.is_ok(),
        "the registration was cut short: {registration:?}"
    );
    report("request_timeout_is_the_one_bound_on_a_request", started);
}

const ROOT_PASSWORD: &str = "root-pw";

/// etcd with authentication on and tokens that expire after `ttl_secs` of disuse, a root user,
/// and a writer client authenticated as root.
async fn etcd_with_auth(ttl_secs: u32) -> (EtcdCluster, etcd_client::Client) {
    let etcd = EtcdCluster::single_with_flags(&["--auth-token-ttl", &ttl_secs.to_string()]);
    etcd.etcdctl(&["user", "add", &format!("root:{ROOT_PASSWORD}")]);
    etcd.etcdctl(&["auth", "enable"]);
    let writer = etcd_client::Client::connect(
        etcd.endpoints(),
        Some(
            etcd_client::ConnectOptions::new()
                .with_user("root", ROOT_PASSWORD)
                .with_auto_token_refresh(true),
        ),
    )
    .await
    .expect("connect as root");
    (etcd, writer)
}

/// Issue: etcd-client refreshes an expired token only when a unary call fails. A watch that
/// broke after the token expired was refused (created, then cancelled) for good, and the cache
/// stayed frozen. Now a refused watch refreshes the token, and a cache comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_broken_after_the_auth_token_expired_comes_back() {
    let started = Instant::now();
    let (etcd, mut writer) = etcd_with_auth(2).await;
    writer
        .put(user_key("u1"), value_of("u1", 1), None)
        .await
        .expect("put u1");
    let options = EtcdOptions::new().user("root", ROOT_PASSWORD);
    let backend = EtcdBackend::connect(etcd.endpoints(), options)
        .await
        .expect("connect as root");
    let users = discovery(backend)
        .stall_timeout(Duration::from_secs(2))
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list");

    // Quiet past the token's TTL (no request from the cache: its stall bound is 2 s, so it
    // asks for progress on its watch only; that goes over the open stream, not a new call).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Then the watch breaks: etcd stops answering past the stall bound, and comes back.
    etcd.stop(0);
    wait_for(&users, LONG, "frozen while etcd is stopped", |s| {
        !s.freshness().is_live()
    })
    .await;
    etcd.cont(0);
    writer
        .put(user_key("u2"), value_of("u2", 2), None)
        .await
        .expect("put u2");
    wait_for(&users, LONG, "live again with u2", |s| {
        s.freshness().is_live() && ids(s) == list(&["u1@1", "u2@2"])
    })
    .await;
    report(
        "a_watch_broken_after_the_auth_token_expired_comes_back",
        started,
    );
}

/// Issue: `etcd grpc-proxy` does not answer watch progress requests, so every idle watch
/// behind it was declared stalled (8 false freezes and 8 watch restarts in 40 s with a 4 s
/// bound). Behind the proxy an idle cache now stays live, and a hung etcd is still detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_grpc_proxy_an_idle_cache_stays_live_and_a_hung_etcd_is_detected() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", &user_key("u1"), &value_of("u1", 1)]);
    let proxy = etcd.grpc_proxy();
    let stall = Duration::from_secs(4);
    let backend = EtcdBackend::connect([proxy.endpoint()], EtcdOptions::new())
        .await
        .expect("connect through the proxy");
    let users = discovery(backend)
        .stall_timeout(stall)
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list");
    let recorder = Recorder::start(&users);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        recorder.snapshots().iter().all(|s| s.freshness().is_live()),
        "froze while etcd was healthy: {:?}; proxy log:\n{}",
        users.last_error(),
        proxy.log_tail(10)
    );
    let stats = users.stats();
    assert_eq!((stats.failures, stats.watch_restarts), (0, 0), "{stats:?}");

    // Still a live watch: a put arrives.
    etcd.etcdctl(&["put", &user_key("u2"), &value_of("u2", 2)]);
    wait_for(&users, LONG, "u2 arrives", |s| s.len() == 2).await;

    // A hung etcd behind the proxy is reported within the bound (+10%).
    let hung = Instant::now();
    etcd.stop(0);
    wait_for(&users, stall * 2, "frozen", |s| !s.freshness().is_live()).await;
    let took = hung.elapsed();
    etcd.cont(0);
    assert!(
        took <= stall + stall / 10,
        "hung etcd noticed after {took:?}"
    );
    report(
        "behind_the_grpc_proxy_an_idle_cache_stays_live_and_a_hung_etcd_is_detected",
        started,
    );
}
