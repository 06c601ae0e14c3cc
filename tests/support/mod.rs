//! Shared test helpers: writing instances, awaiting conditions with a bound, recording every
//! published snapshot.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_registry::{
    Codec, Discovery, FreezeCause, Freshness, Instance, KeyLayout, MemoryBackend, ServiceCache,
    Snapshot,
};

pub const NS: &str = "/svc";

pub fn codec() -> Codec {
    Codec::new(KeyLayout::Native, NS)
}

pub fn instance(service: &str, id: &str, port: u16) -> Instance {
    Instance::builder(service, format!("10.0.0.1:{port}"))
        .id(id)
        .build()
        .expect("valid instance")
}

/// Puts instance `id` of service `user` at `port`; returns the revision.
pub fn register(etcd: &MemoryBackend, id: &str, port: u16) -> i64 {
    let codec = codec();
    let i = instance("user", id, port);
    etcd.put(codec.key(&i, 0), codec.encode_value(&i))
}

/// The native value of instance `id` of service `user` at `port`, as etcdctl would put it.
pub fn value_of(id: &str, port: u16) -> String {
    String::from_utf8(codec().encode_value(&instance("user", id, port))).expect("utf-8")
}

pub fn user_key(id: &str) -> String {
    format!("{NS}/user/{id}")
}

/// `id@port` of every instance in the snapshot, sorted.
pub fn ids(snapshot: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = snapshot
        .instances()
        .iter()
        .map(|i| format!("{}@{}", i.id(), i.addr().rsplit(':').next().unwrap_or("")))
        .collect();
    v.sort();
    v
}

pub fn list(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Waits until the cache's snapshot satisfies `pred`, at most `within`; panics with the last
/// snapshot otherwise.
#[track_caller]
pub fn wait_for(
    cache: &ServiceCache,
    within: Duration,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> impl std::future::Future<Output = Arc<Snapshot>> {
    let mut changes = cache.changes();
    let what = what.to_owned();
    let cache = cache.clone();
    async move {
        let found = tokio::time::timeout(within, changes.wait_for(|s| pred(s))).await;
        match found {
            Ok(Ok(s)) => s.clone(),
            Ok(Err(_)) => panic!("cache closed while waiting for: {what}"),
            Err(_) => panic!(
                "not within {within:?}: {what}; last snapshot {:?}",
                cache.snapshot()
            ),
        }
    }
}

/// Records every snapshot the cache publishes from now on.
pub struct Recorder {
    seen: Arc<Mutex<Vec<Arc<Snapshot>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub fn start(cache: &ServiceCache) -> Self {
        let mut changes = cache.changes();
        let seen = Arc::new(Mutex::new(vec![changes.borrow_and_update().clone()]));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let s = changes.borrow_and_update().clone();
                sink.lock().unwrap().push(s);
            }
        });
        Self { seen, task }
    }

    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
pub mod alloc;
pub mod etcd;
pub mod pki;
pub mod proptest_config;
pub mod proxy;
pub mod recorder;
pub mod wait;

/// A live cache of service `user` under [`NS`] over `etcd`, after its first list; a silent
/// watch freezes it after 4 s.
pub async fn users(etcd: &MemoryBackend) -> ServiceCache {
    Discovery::memory(etcd.clone())
        .namespace(NS)
        .stall_timeout(Duration::from_secs(4))
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list")
}

/// A current-thread runtime on real time, for tests that end a cache's task by dropping the
/// runtime it runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Whether `freshness` says the cache's sync task ended (`FreezeCause::TaskEnded`).
pub fn task_ended(freshness: Freshness) -> bool {
    matches!(
        freshness,
        Freshness::Frozen {
            cause: FreezeCause::TaskEnded,
            ..
        }
    )
}

thread_local! {
    /// A runtime kept by its thread, dropped when the thread's locals are destroyed.
    static KEPT: std::cell::RefCell<Option<tokio::runtime::Runtime>> =
        const { std::cell::RefCell::new(None) };
}

/// The cache of `user` made on a current-thread runtime that a thread keeps in a thread-local
/// and that is dropped with the thread's locals when the thread ends (tokio supports that;
/// tokio's own thread-local context is gone by then). `etcd` is made unreachable first, so no
/// watch stream is open when the runtime goes (the memory backend's stream reads tokio's clock
/// in its destructor): the task is backing off.
pub fn cache_on_a_runtime_dropped_with_its_thread(
    discovery: &Discovery,
    etcd: &MemoryBackend,
) -> ServiceCache {
    std::thread::spawn({
        let discovery = discovery.clone();
        let etcd = etcd.clone();
        move || {
            // Registered before tokio's (and a subscriber's) thread locals: destroyed after.
            KEPT.with(|_| {});
            let rt = runtime();
            let users = rt.block_on(discovery.service("user")).expect("first list");
            assert!(users.freshness().is_live());
            etcd.set_reachable(false);
            rt.block_on(wait_for(&users, Duration::from_secs(10), "frozen", |s| {
                !s.freshness().is_live()
            }));
            KEPT.with(|kept| *kept.borrow_mut() = Some(rt));
            users
        }
    })
    .join()
    .expect("the thread")
}

/// Whether asking for `user` again (on a new runtime) brings the cache back live with `a@1`
/// and `b@2`, `b` registered meanwhile.
pub fn restarts(discovery: &Discovery, etcd: &MemoryBackend) -> bool {
    runtime().block_on(async {
        let again = discovery.service("user").await.expect("the service again");
        register(etcd, "b", 2);
        let mut changes = again.changes();
        tokio::time::timeout(
            Duration::from_secs(10),
            changes.wait_for(|s| s.freshness().is_live() && ids(s) == list(&["a@1", "b@2"])),
        )
        .await
        .is_ok_and(|found| found.is_ok())
    })
}
