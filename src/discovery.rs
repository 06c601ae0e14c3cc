//! [`Discovery`]: the caller side's entry point, one per backend connection.

use crate::balance::health::{Balancing, sweeper};
use crate::{OutlierEjection, SlowStart};
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use crate::backend::{Backend, MemoryBackend};
use crate::backoff::BackoffConfig;
use crate::cache::{Handle, ServiceCache, Shared};
use crate::codec::{Codec, KeyLayout};
use crate::error::{Error, Result};
use crate::snapshot::FreezeCause;
use crate::sync::driver::{self, DriverConfig};
use crate::sync::machine::Machine;

/// Finds services: hands out one [`ServiceCache`] per service, all fed by one backend connection.
///
/// ```
/// use etcd_registry::{Discovery, MemoryBackend};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), etcd_registry::Error> {
/// let etcd = MemoryBackend::new();
/// etcd.put("/services/user/u1", r#"{"addr":"10.0.0.7:8080"}"#);
///
/// let discovery = Discovery::memory(etcd).namespace("/services").build()?;
/// let users = discovery.service("user").await?; // waits for the first list
/// assert_eq!(users.pick().map(|i| i.addr().to_owned()).as_deref(), Some("10.0.0.7:8080"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    config: Config,
    caches: Mutex<HashMap<String, Weak<Handle>>>,
}

#[derive(Debug, Clone)]
struct Config {
    namespace: String,
    layout: KeyLayout,
    max_value_size: usize,
    first_list_timeout: Duration,
    request_timeout: Duration,
    stall_timeout: Duration,
    backoff: BackoffConfig,
    jitter_seed: Option<u64>,
    ejection: OutlierEjection,
    slow_start: Option<SlowStart>,
}

impl Discovery {
    /// Starts building a discovery over any [`Backend`].
    pub fn with_backend(backend: impl Backend) -> DiscoveryBuilder {
        DiscoveryBuilder {
            backend: Arc::new(backend),
            config: Config {
                namespace: String::new(),
                layout: KeyLayout::Native,
                max_value_size: crate::codec::DEFAULT_MAX_VALUE_SIZE,
                first_list_timeout: Duration::from_secs(10),
                request_timeout: Duration::from_secs(5),
                stall_timeout: Duration::from_secs(10),
                backoff: BackoffConfig::default(),
                jitter_seed: None,
                ejection: OutlierEjection::default(),
                slow_start: None,
            },
        }
    }

    /// Starts building a discovery over an etcd client the application already has.
    ///
    /// Build that client with `ConnectOptions::with_require_leader(true)` and an HTTP/2
    /// keep-alive, or use [`EtcdBackend::connect`](crate::EtcdBackend::connect) with
    /// [`Discovery::with_backend`], which sets both: without a required leader, a member cut off
    /// from its cluster keeps the cache live on stale state.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = etcd_client::ConnectOptions::new().with_require_leader(true);
    /// let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], Some(options)).await?;
    /// let discovery = etcd_registry::Discovery::builder(client).namespace("/services").build()?;
    /// let users = discovery.service("user").await?;
    /// # let _ = users; Ok(()) }
    /// ```
    #[cfg(feature = "etcd")]
    #[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
    pub fn builder(client: etcd_client::Client) -> DiscoveryBuilder {
        Self::with_backend(crate::backend::EtcdBackend::from_client(client))
    }

    /// Starts building a discovery over the in-process [`MemoryBackend`] (tests, demos).
    pub fn memory(backend: MemoryBackend) -> DiscoveryBuilder {
        Self::with_backend(backend)
    }

    /// The cache of `service`, after its first list.
    ///
    /// Calls for the same service share one cache (and one watch) while any handle of it lives.
    /// If that cache's task has ended (the runtime it ran on shut down, or it panicked: its
    /// snapshot says [`TaskEnded`](crate::FreezeCause::TaskEnded)), this starts a new task on the
    /// current runtime for it, which every handle of the cache then follows; meanwhile the cache
    /// keeps its last instances, frozen.
    ///
    /// # Errors
    /// [`Error::FirstListTimeout`] when no list succeeded within the first-list timeout (etcd
    /// unreachable: the error carries the last failure), or [`Error::Tls`] when what failed was
    /// the TLS handshake; [`Error::Config`] when `service` cannot
    /// be a key segment.
    pub async fn service(&self, service: &str) -> Result<ServiceCache> {
        let cache = self.cache(service)?;
        let mut changes = cache.changes();
        let config = &self.inner.config;
        let listed = tokio::time::timeout(
            config.first_list_timeout,
            changes.wait_for(|snapshot| snapshot.freshness().is_live() || snapshot.revision() > 0),
        )
        .await;
        let shared = &cache.handle().shared;
        match listed {
            Ok(Ok(_)) => Ok(cache),
            Ok(Err(_)) => Err(Error::Shutdown),
            // Waiting longer would not have helped: say what is wrong instead.
            Err(_) if shared.last_failure_cause() == Some(FreezeCause::ResponseTooLarge) => {
                Err(Error::ResponseTooLarge {
                    service: service.to_owned(),
                    detail: shared
                        .last_error()
                        .unwrap_or_else(|| "no detail".to_owned()),
                })
            }
            Err(_) => match shared.last_failure_cause() {
                Some(FreezeCause::Tls(problem)) => Err(Error::Tls {
                    problem,
                    detail: shared
                        .last_error()
                        .unwrap_or_else(|| "no detail".to_owned()),
                }),
                _ => Err(Error::FirstListTimeout {
                    service: service.to_owned(),
                    after: config.first_list_timeout,
                    last_error: cache
                        .handle()
                        .shared
                        .last_error()
                        .unwrap_or_else(|| "no answer".to_owned()),
                }),
            },
        }
    }

    /// The cache of `service` right away, before its first list: it starts empty and
    /// [`Frozen`](crate::Freshness::Frozen) with cause
    /// [`NotListed`](crate::FreezeCause::NotListed) (then with the cause of the failures, if
    /// etcd cannot be listed), and fills in when etcd answers.
    ///
    /// # Errors
    /// [`Error::Config`] when `service` cannot be a key segment, or when called outside a tokio
    /// runtime (the cache runs a task).
    pub fn service_now(&self, service: &str) -> Result<ServiceCache> {
        self.cache(service)
    }

    fn cache(&self, service: &str) -> Result<ServiceCache> {
        crate::instance::check_segment("service", service)
            .map_err(|e| Error::Config(format!("service name {service:?}: {e}")))?;
        let mut caches = self
            .inner
            .caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = caches.get(service).and_then(Weak::upgrade) {
            if handle.shared.claim_task() {
                // Its task died (runtime shut down, or a panic): start another one for the same
                // cache, so every handle already out there comes back to life too. The claim is
                // given back if the start fails or panics (the application's subscriber or
                // recorder is called on the way): never a claim with no task behind it.
                let claim = Claim(&handle.shared);
                self.start(service, &handle)?;
                std::mem::forget(claim);
                tracing::info!(
                    service,
                    "restarted the sync task of a cache whose task ended"
                );
            }
            return Ok(ServiceCache::new(handle));
        }
        caches.retain(|_, weak| weak.strong_count() > 0);
        let handle = self.spawn(service)?;
        caches.insert(service.to_owned(), Arc::downgrade(&handle));
        Ok(ServiceCache::new(handle))
    }

    /// A new cache of `service` and its sync task.
    fn spawn(&self, service: &str) -> Result<Arc<Handle>> {
        let config = &self.inner.config;
        let balancing = Balancing::new(service.into(), config.ejection, config.slow_start);
        let machine = self.machine(service, &balancing);
        let shared = Arc::new(Shared::new(machine.published().clone()));
        let handle = Arc::new(Handle {
            shared,
            stop: tokio::sync::watch::Sender::new(()),
            balancing,
        });
        // A new cache: nothing else can have claimed its task, so this always grants.
        handle.shared.claim_task();
        self.run(machine, &handle)?;
        Ok(handle)
    }

    /// A new sync task for an existing cache. It goes on with the machine the ended task left:
    /// it lists again, and that list is a relist, checked against the revision and cluster
    /// applied before (a reset is counted, as by a running task). Until then the cache keeps
    /// the snapshot it has, frozen, and its counters and the health of its instances
    /// (ejections included) go on from where they were.
    fn start(&self, service: &str, handle: &Handle) -> Result<()> {
        // Checked before the parked machine is taken: a start that fails leaves it parked.
        driver::runtime()?;
        let mut machine = match handle.shared.take_parked() {
            Some(machine) => machine,
            None => {
                let mut machine = self.machine(service, &handle.balancing);
                machine.continue_stats(handle.shared.stats());
                machine
            }
        };
        machine.continue_from(handle.shared.snapshot(), handle.shared.stats());
        self.run(machine, handle)
    }

    /// Starts the sync task running `machine` for the cache of `handle`, with the cache's sweep
    /// timer beside it.
    fn run(&self, machine: Machine, handle: &Handle) -> Result<()> {
        let config = &self.inner.config;
        let prefix = machine.prefix();
        driver::spawn(
            self.inner.backend.clone(),
            machine,
            prefix,
            DriverConfig {
                request_timeout: config.request_timeout,
                stall_timeout: config.stall_timeout,
            },
            handle.shared.clone(),
            handle.stop.subscribe(),
            sweeper::run(handle.balancing.outliers()),
        )
    }

    fn machine(&self, service: &str, balancing: &Arc<Balancing>) -> Machine {
        let config = &self.inner.config;
        let codec = Codec::new(config.layout, config.namespace.clone())
            .with_max_value_size(config.max_value_size);
        let seed = config
            .jitter_seed
            .unwrap_or_else(|| RandomState::new().hash_one(service));
        Machine::new(
            service,
            codec,
            config.backoff,
            seed,
            tokio::time::Instant::now().into_std(),
        )
        .with_balancing(balancing.clone())
    }
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Configures a [`Discovery`]; every setting has a default that suits production.
#[must_use = "a builder does nothing until .build() is called"]
pub struct DiscoveryBuilder {
    backend: Arc<dyn Backend>,
    config: Config,
}

impl DiscoveryBuilder {
    /// The key namespace services live under, like `/services` (default: none, so service `s`
    /// is watched at `s/`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.namespace = namespace.into();
        self
    }

    /// The key layout (default [`KeyLayout::Native`]); use [`KeyLayout::GoZero`] or
    /// [`KeyLayout::EtcdNaming`] to discover services registered by those Go libraries.
    pub fn layout(mut self, layout: KeyLayout) -> Self {
        self.config.layout = layout;
        self
    }

    /// Values larger than this are skipped as undecodable before being parsed (default 64 KiB).
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.config.max_value_size = bytes;
        self
    }

    /// How long [`Discovery::service`] waits for the first list (default 10 s).
    pub fn first_list_timeout(mut self, timeout: Duration) -> Self {
        self.config.first_list_timeout = timeout;
        self
    }

    /// Bound on one list or one watch creation (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// How long a watch may stay silent before the cache freezes with cause
    /// [`Stalled`](crate::FreezeCause::Stalled) (default 10 s). After half of it without a
    /// message, the cache asks etcd for a progress notification; a healthy etcd answers at once,
    /// a hung one does not. This is the bound on detecting a hung etcd.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.config.stall_timeout = timeout;
        self
    }

    /// Reconnection backoff: exponential from `initial` up to `max`, with full jitter, reset
    /// after a watch stayed healthy for `reset_after` (defaults 100 ms, 10 s, 30 s).
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Seeds the backoff jitter (default: random per process and service). Only for
    /// reproducible tests: processes that share a seed retry in lockstep after an outage.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.config.jitter_seed = Some(seed);
        self
    }

    /// Outlier ejection settings (default [`OutlierEjection::default`]: 5 consecutive failures,
    /// 30 s growing to 300 s, 10 % of the instances but at least one, panic below 50 %
    /// healthy, ended ejections swept by a timer at the latest 10 s after their end). Ejection
    /// only acts on outcomes callers report.
    pub fn outlier_ejection(mut self, ejection: OutlierEjection) -> Self {
        self.config.ejection = ejection;
        self
    }

    /// Slow start for instances that appear after the first list (default: off).
    pub fn slow_start(mut self, slow_start: SlowStart) -> Self {
        self.config.slow_start = Some(slow_start);
        self
    }

    /// Checks the settings and builds the discovery.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting that is out of range.
    pub fn build(self) -> Result<Discovery> {
        let c = &self.config;
        let positive = [
            ("first_list_timeout", c.first_list_timeout),
            ("request_timeout", c.request_timeout),
            ("stall_timeout", c.stall_timeout),
        ];
        for (name, value) in positive {
            crate::backoff::check_setting(name, value).map_err(Error::Config)?;
        }
        c.backoff.validate().map_err(Error::Config)?;
        c.ejection.validate().map_err(Error::Config)?;
        if let Some(slow_start) = &c.slow_start {
            slow_start.validate().map_err(Error::Config)?;
        }
        if c.max_value_size == 0 {
            return Err(Error::Config(
                "max_value_size must be greater than zero".into(),
            ));
        }
        if c.namespace.chars().any(char::is_control) {
            return Err(Error::Config(format!(
                "namespace {:?} contains a control character",
                c.namespace
            )));
        }
        Ok(Discovery {
            inner: Arc::new(Inner {
                backend: self.backend,
                config: self.config,
                caches: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl fmt::Debug for DiscoveryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A claimed restart of a cache's sync task ([`Shared::claim_task`](crate::cache::Shared)),
/// given back when dropped: on an error or a panic before the task is running. Forgotten once
/// the task runs; from then on the task's own destructor gives the claim back when it ends.
struct Claim<'a>(&'a crate::cache::Shared);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.release_task();
    }
}
