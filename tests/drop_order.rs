//! Known, not yet fixed (so both tests are `#[ignore]`d; run them with `-- --ignored`): a
//! background task dropped mid-await drops some requests before its destructor tells the cache
//! or the registration. The driver's own request lives in its `op` field and drops after; but
//! a liveness probe or progress request awaited inside the loop's `wait`, and a registration's
//! own-key watch and keep-alive request, are locals of the task's `run`, dropped before its
//! `self`. Dropping one runs backend code and, through a real transport's logs, the
//! application's subscriber, before the cache or the status says `TaskEnded`. The end is still
//! told (unwinding from a panic there still reaches the destructor), only later; a subscriber
//! that panics at both would abort. The fix is to keep those requests in the driver's and the
//! keeper's fields, as `op` is.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_registry::backend::{BackendError, KeysAt, ListResponse, PutCondition, PutOutcome, Watch};
use etcd_registry::{Backend, Discovery, FreezeCause, Freshness, MemoryBackend, ServiceCache};
use futures_util::future::BoxFuture;
use support::*;

type Answer<'a, T> = BoxFuture<'a, Result<T, BackendError>>;

/// What the cache said when the probe's request was dropped.
#[derive(Default)]
struct Seen {
    cache: Mutex<Option<ServiceCache>>,
    probed: AtomicBool,
    at_drop: Mutex<Option<Freshness>>,
}

/// A request in flight; dropping it is backend code (a real transport logs here, through the
/// application's subscriber). It notes what the cache says at that moment.
struct InFlight(Arc<Seen>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let cache = self.0.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cache) = cache.as_ref() {
            *self
                .0
                .at_drop
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(cache.freshness());
        }
    }
}

/// The memory backend, with a liveness probe that never answers.
struct SlowProbe {
    inner: MemoryBackend,
    seen: Arc<Seen>,
}

impl Backend for SlowProbe {
    fn list(&self, prefix: &[u8]) -> Answer<'_, ListResponse> {
        self.inner.list(prefix)
    }
    fn watch(&self, prefix: &[u8], revision: i64) -> Answer<'_, Watch> {
        self.inner.watch(prefix, revision)
    }
    fn keys_at(&self, prefix: &[u8], revision: i64, values: bool) -> Answer<'_, KeysAt> {
        self.inner.keys_at(prefix, revision, values)
    }
    fn grant(&self, ttl: Duration) -> Answer<'_, i64> {
        Backend::grant(&self.inner, ttl)
    }
    fn keep_alive(&self, lease: i64) -> Answer<'_, Duration> {
        Backend::keep_alive(&self.inner, lease)
    }
    fn put(&self, key: &[u8], value: &[u8], lease: i64, c: PutCondition) -> Answer<'_, PutOutcome> {
        Backend::put(&self.inner, key, value, lease, c)
    }
    fn revoke(&self, lease: i64) -> Answer<'_, ()> {
        Backend::revoke(&self.inner, lease)
    }
    fn probe(&self, _prefix: &[u8]) -> Answer<'_, u64> {
        let guard = InFlight(self.seen.clone());
        self.seen.probed.store(true, Ordering::SeqCst);
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            unreachable!()
        })
    }
}

/// Found by review: 55ddfed made the driver's request a field (`op`) so that a task dropped
/// mid-await tells the cache (`Driver::drop` → `task_ended`) before any request is dropped:
/// dropping one runs backend code and, through the transport's logs, the application's
/// subscriber. But the liveness probe (and the progress request) of an idle watch are awaited
/// inside `follow`, a temporary of `run`'s `select!`, not in `op`: they drop with `run`'s
/// locals, before the `Driver` argument, so before the cache is told.
#[test]
#[ignore = "known: the liveness probe is a local of the driver's loop (see the module docs)"]
fn a_liveness_probe_in_flight_drops_after_the_cache_is_told() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    // Progress requests are taken and never answered (a gRPC proxy): an idle watch is probed
    // at three quarters of the stall bound.
    etcd.set_progress_answered(false);
    let seen = Arc::new(Seen::default());
    let discovery = Discovery::with_backend(SlowProbe {
        inner: etcd.clone(),
        seen: seen.clone(),
    })
    .namespace(NS)
    .stall_timeout(Duration::from_secs(4))
    .build()
    .expect("valid settings");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let users = rt.block_on(async {
        let users = discovery.service("user").await.expect("first list");
        *seen.cache.lock().unwrap_or_else(PoisonError::into_inner) = Some(users.clone());
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !seen.probed.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the idle watch was never probed");
        users
    });
    // The probe is in flight (the stall bound is a second away): the task goes with its runtime.
    drop(rt);
    let at_drop = seen
        .at_drop
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    seen.cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    assert!(
        matches!(
            users.freshness(),
            Freshness::Frozen {
                cause: FreezeCause::TaskEnded,
                ..
            }
        ),
        "the task ended: {:?}",
        users.freshness()
    );
    assert!(
        matches!(
            at_drop,
            Some(Freshness::Frozen {
                cause: FreezeCause::TaskEnded,
                ..
            })
        ),
        "the probe's request was dropped before the cache was told: the cache said {at_drop:?}"
    );
}

/// What a registration's status said when its own-key watch was dropped.
#[derive(Default)]
struct SeenReg {
    status: Mutex<Option<tokio::sync::watch::Receiver<etcd_registry::RegistrationStatus>>>,
    at_drop: Mutex<Option<etcd_registry::RegistrationStatus>>,
}

/// A watch stream whose drop (backend code: a real transport logs here) notes the status.
struct NotingStream {
    inner: etcd_registry::backend::WatchStream,
    seen: Arc<SeenReg>,
}

impl futures_util::Stream for NotingStream {
    type Item = Result<etcd_registry::backend::WatchMessage, BackendError>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl Drop for NotingStream {
    fn drop(&mut self) {
        let status = self
            .seen
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(status) = status.as_ref() {
            *self
                .seen
                .at_drop
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(*status.borrow());
        }
    }
}

/// The memory backend, with watch streams that note the registration's status when dropped.
struct NotingWatches {
    inner: MemoryBackend,
    seen: Arc<SeenReg>,
}

impl Backend for NotingWatches {
    fn list(&self, prefix: &[u8]) -> Answer<'_, ListResponse> {
        self.inner.list(prefix)
    }
    fn watch(&self, prefix: &[u8], revision: i64) -> Answer<'_, Watch> {
        let seen = self.seen.clone();
        let watch = self.inner.watch(prefix, revision);
        Box::pin(async move {
            let mut watch = watch.await?;
            let inner =
                std::mem::replace(&mut watch.stream, Box::pin(futures_util::stream::empty()));
            watch.stream = Box::pin(NotingStream { inner, seen });
            Ok(watch)
        })
    }
    fn keys_at(&self, prefix: &[u8], revision: i64, values: bool) -> Answer<'_, KeysAt> {
        self.inner.keys_at(prefix, revision, values)
    }
    fn grant(&self, ttl: Duration) -> Answer<'_, i64> {
        Backend::grant(&self.inner, ttl)
    }
    fn keep_alive(&self, lease: i64) -> Answer<'_, Duration> {
        Backend::keep_alive(&self.inner, lease)
    }
    fn put(&self, key: &[u8], value: &[u8], lease: i64, c: PutCondition) -> Answer<'_, PutOutcome> {
        Backend::put(&self.inner, key, value, lease, c)
    }
    fn revoke(&self, lease: i64) -> Answer<'_, ()> {
        Backend::revoke(&self.inner, lease)
    }
    fn probe(&self, prefix: &[u8]) -> Answer<'_, u64> {
        self.inner.probe(prefix)
    }
}

/// Found by review: the same order in a registration's task. ARCHITECTURE.md (`in_span`) says
/// the task's destructor tells the registration before any subscriber runs, but the keeper's
/// own-key watch stream (`own_key`, a local of `keep_alive`, live across every await of the
/// keep-alive loop) and any keep-alive request in flight are locals of `run`: they drop before
/// the `Keeper` argument, so before `TaskEnded` reaches the status.
#[test]
#[ignore = "known: the own-key watch is a local of the keeper's loop (see the module docs)"]
fn a_registration_s_own_key_watch_drops_after_its_status_is_told() {
    let etcd = MemoryBackend::new();
    let seen = Arc::new(SeenReg::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let registration = rt
        .block_on(async {
            let registration = etcd_registry::Registration::with_backend(
                NotingWatches {
                    inner: etcd.clone(),
                    seen: seen.clone(),
                },
                instance("user", "p", 7),
            )
            .namespace(NS)
            .register()
            .await;
            // Let the task open its own-key watch.
            tokio::time::sleep(Duration::from_millis(300)).await;
            registration
        })
        .expect("registered");
    *seen.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(registration.status());
    drop(rt);
    let status = *registration.status().borrow();
    assert_eq!(status, etcd_registry::RegistrationStatus::TaskEnded);
    let at_drop = seen
        .at_drop
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    assert_eq!(
        at_drop,
        Some(etcd_registry::RegistrationStatus::TaskEnded),
        "the own-key watch was dropped before the registration's status was told"
    );
}
