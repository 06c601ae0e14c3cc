//! [`Balanced`]: a `tower::Service` that sends each request to one instance of a service,
//! through an inner service per instance.

mod error;
mod future;
mod pool;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use ::tower::{Service, ServiceExt};
use tokio::sync::oneshot;

pub use error::{NoInstance, NoInstanceReason};
pub use future::ResponseFuture;
use pool::Pool;

use super::BoxError;
use super::body::Observed;
use super::classify::{Classifier, Outcome, Verdict};
use super::route::Route;
use crate::balance::picked::{Call, Picked};
use crate::balance::select::Selection;
use crate::cache::ServiceCache;
use crate::instance::Instance;
use crate::snapshot::Snapshot;

type Connecting<S> = Pin<Box<dyn Future<Output = Result<S, BoxError>> + Send>>;
type Connector<S> = Box<dyn Fn(&Instance) -> Connecting<S> + Send + Sync>;

/// The error of a request that waited for a connection to its instance that failed: it goes
/// to another instance (the failure itself was counted by the request that made the attempt).
#[derive(Debug)]
struct ConnectionFailed;

impl fmt::Display for ConnectionFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the connection to the instance failed")
    }
}

impl std::error::Error for ConnectionFailed {}

/// Whether `error` says the connection broke: an I/O error (refused, reset, closed) anywhere
/// in its chain. A timeout or a protocol error does not.
fn is_connection_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<std::io::Error>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Where picks come from: a whole service, or a selection of it.
#[derive(Clone)]
enum Source {
    Cache(ServiceCache),
    Selection(Selection),
}

impl Source {
    fn cache(&self) -> &ServiceCache {
        match self {
            Source::Cache(cache) => cache,
            Source::Selection(selection) => selection.cache(),
        }
    }

    fn pick(&self) -> Option<Picked> {
        match self {
            Source::Cache(cache) => cache.pick(),
            Source::Selection(selection) => selection.pick(),
        }
    }

    fn pick_weighted(&self) -> Option<Picked> {
        match self {
            Source::Cache(cache) => cache.pick_weighted(),
            Source::Selection(selection) => selection.pick_weighted(),
        }
    }

    fn pick_by(&self, key: &[u8]) -> Option<Picked> {
        match self {
            Source::Cache(cache) => cache.pick_by(key),
            Source::Selection(selection) => selection.pick_by(key),
        }
    }

    fn pick_p2c(&self) -> Option<Call> {
        match self {
            Source::Cache(cache) => cache.pick_p2c(),
            Source::Selection(selection) => selection.pick_p2c(),
        }
    }

    /// The instances picks choose among (the selection's, for a selection): what the pool
    /// keeps services for.
    fn snapshot(&self) -> Arc<Snapshot> {
        match self {
            Source::Cache(cache) => cache.snapshot(),
            Source::Selection(selection) => selection.snapshot(),
        }
    }
}

/// Builds a [`Balanced`] service: the route, the outcome classifier, and how to make the
/// service of one instance.
#[must_use]
pub struct BalancedBuilder {
    source: Source,
    route: Route,
    classifier: Classifier,
}

impl BalancedBuilder {
    /// How each request picks its instance (default: [`Route::P2c`]).
    pub fn route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Which responses count as failures (default: [`Classifier::default`]).
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// The balanced service, with `make` building the service of an instance the first time a
    /// request goes to it (it must not block: build lazily connecting clients, such as tonic's
    /// `Endpoint::connect_lazy`).
    pub fn service<S, F>(self, make: F) -> Balanced<S>
    where
        S: Send + Sync + 'static,
        F: Fn(&Instance) -> S + Send + Sync + 'static,
    {
        self.connector(move |instance: &Instance| {
            std::future::ready(Ok::<_, BoxError>(make(instance)))
        })
    }

    /// The balanced service, with `connect` connecting to an instance the first time a request
    /// goes to it, and again after its service failed. A connection that fails was never used
    /// to send the request: it counts as a failure of that instance, and the request goes to
    /// another instance (once).
    pub fn connector<S, F, Fut, E>(self, connect: F) -> Balanced<S>
    where
        S: Send + Sync + 'static,
        F: Fn(&Instance) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let connector: Connector<S> = Box::new(move |instance: &Instance| {
            let connecting = connect(instance);
            Box::pin(async move { connecting.await.map_err(Into::into) })
        });
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Handle::try_current().ok();
        let inner = Arc::new(Inner {
            pool: Pool::new(self.source.snapshot()),
            source: self.source,
            connect: connector,
            route: self.route,
            classifier: self.classifier,
            prune_on_requests: runtime.is_none(),
            _stop: stop,
        });
        if let Some(runtime) = runtime {
            spawn_pruner(&runtime, &inner, stopped);
        }
        Balanced { inner }
    }
}

impl fmt::Debug for BalancedBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancedBuilder")
            .field("service", &self.source.cache().service())
            .field("route", &self.route)
            .field("classifier", &self.classifier)
            .finish()
    }
}

/// Drops the services of removed instances as soon as the cache publishes their removal (the
/// one pruner: it sees the snapshots in the order they are published).
fn spawn_pruner<S: Send + Sync + 'static>(
    runtime: &tokio::runtime::Handle,
    inner: &Arc<Inner<S>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let weak = Arc::downgrade(inner);
    let mut changes = inner.source.cache().changes();
    runtime.spawn(async move {
        loop {
            tokio::select! {
                // The service is gone (its sender dropped with it).
                _ = &mut stopped => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let Some(inner) = weak.upgrade() else {
                return;
            };
            changes.borrow_and_update();
            inner.pool.prune(&inner.source.snapshot());
        }
    });
}

struct Inner<S> {
    source: Source,
    pool: Pool<S>,
    connect: Connector<S>,
    route: Route,
    classifier: Classifier,
    /// Built outside a runtime: no pruning task, so requests prune on their way.
    prune_on_requests: bool,
    /// Dropped with the service: stops the pruning task.
    _stop: oneshot::Sender<()>,
}

/// A `tower::Service` that sends each `http::Request` to one instance of a service: picked by
/// a [`Route`] (p2c by default), through that instance's own inner service (a tonic `Channel`,
/// a hyper client…) built the first time a request goes to it.
///
/// - **Outcomes feed passive health**: transport errors and the failure statuses of the
///   [`Classifier`] count as failures, the rest as successes, so an instance that keeps
///   failing is ejected (see [`OutlierEjection`](crate::OutlierEjection)) while the
///   snapshot is live or frozen.
/// - **Never waits for an instance**: with none to pick the call fails at once with
///   [`NoInstance`], saying why (none registered, all draining, selection empty).
/// - **A failed connection is retried elsewhere**: when an instance's connection (made by a
///   [`connector`](BalancedBuilder::connector)) or its inner service's readiness fails, the
///   request was never handed over, so it goes to another instance, once; requests that were
///   waiting for that same connection go elsewhere at once instead of trying it again. An
///   error returned by the inner service's `call` is not retried (the request is gone): an
///   inner service that connects inside `call` (hyper's client) gets no retry. An I/O error
///   in the error's chain (refused, reset, closed) drops the instance's service, so the next
///   request connects again before sending; other errors (a timeout) keep it.
/// - **`poll_ready` is always ready**: one instance down never makes the whole service
///   unavailable; each request waits for its own instance's readiness.
/// - **Services follow the snapshot**: an instance's service lives while the instance is in
///   the snapshot (draining or frozen included) and is dropped when etcd removes it, or when
///   it fails (the next request connects again).
///
/// Cheap to clone (clones share the services). The inner service must be `Clone + Send +
/// Sync` (each request clones the instance's service, as tonic's `Channel` and hyper's client
/// are meant to be used); wrap others in `tower::buffer::Buffer`, or box them as a
/// `BoxCloneSyncService`.
///
/// Built inside a tokio runtime, it spawns one small task that follows the cache and drops the
/// services of removed instances (it ends with the last clone); built outside one, requests do
/// that on their way. The latency p2c weighs runs from the moment the instance's service is
/// ready to the response's outcome: for a gRPC response that is the trailers, so a long
/// server stream counts as one long request in flight. A connector's attempt is bounded only
/// by the connector itself (tonic's [`channel`](crate::tonic::channel) sets a connect
/// timeout): give yours one.
///
/// ```
/// # use std::convert::Infallible;
/// # use etcd_registry::{Discovery, MemoryBackend};
/// use etcd_registry::tower::Balanced;
/// use tower::{service_fn, Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let etcd = MemoryBackend::new();
/// # etcd.put("user/u1", r#"{"addr":"10.0.0.1:80"}"#);
/// let users = Discovery::memory(etcd).build()?.service("user").await?;
/// // One inner service per instance; here one that answers with the instance's address.
/// let mut balanced = Balanced::new(&users, |instance| {
///     let addr = instance.addr().to_owned();
///     service_fn(move |_: http::Request<()>| {
///         let addr = addr.clone();
///         async move { Ok::<_, Infallible>(http::Response::new(addr)) }
///     })
/// });
/// let response = balanced.ready().await?.call(http::Request::new(())).await?;
/// assert_eq!(response.body().get_ref(), "10.0.0.1:80");
/// # Ok(()) }
/// ```
pub struct Balanced<S> {
    inner: Arc<Inner<S>>,
}

impl Balanced<()> {
    /// A builder of a balanced service over the instances of `cache`.
    pub fn builder(cache: &ServiceCache) -> BalancedBuilder {
        BalancedBuilder {
            source: Source::Cache(cache.clone()),
            route: Route::default(),
            classifier: Classifier::default(),
        }
    }

    /// A builder of a balanced service over the instances of `selection`.
    pub fn builder_for(selection: &Selection) -> BalancedBuilder {
        BalancedBuilder {
            source: Source::Selection(selection.clone()),
            route: Route::default(),
            classifier: Classifier::default(),
        }
    }
}

impl<S: Send + Sync + 'static> Balanced<S> {
    /// A balanced service over the instances of `cache`, by p2c, with `make` building each
    /// instance's service; see [`BalancedBuilder::service`].
    pub fn new<F>(cache: &ServiceCache, make: F) -> Self
    where
        F: Fn(&Instance) -> S + Send + Sync + 'static,
    {
        Balanced::builder(cache).service(make)
    }

    /// How many instances have a service now (connected or connecting).
    pub fn services(&self) -> usize {
        self.inner.pool.len()
    }
}

impl<S> Clone for Balanced<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> fmt::Debug for Balanced<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balanced")
            .field("service", &self.inner.source.cache().service())
            .field("route", &self.inner.route)
            .field("services", &self.inner.pool.len())
            .finish()
    }
}

impl<S, B, R> Service<http::Request<B>> for Balanced<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<Observed<R>>;
    type Error = BoxError;
    type Future = ResponseFuture<R>;

    /// Always ready: each request waits for the readiness of its own instance's service.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        ResponseFuture::new(async move { inner.send(request).await })
    }
}

impl<S: Send + Sync + 'static> Inner<S> {
    async fn send<B, R>(
        &self,
        request: http::Request<B>,
    ) -> Result<http::Response<Observed<R>>, BoxError>
    where
        S: Service<http::Request<B>, Response = http::Response<R>> + Clone,
        S::Error: Into<BoxError>,
    {
        if self.prune_on_requests {
            // Cheap when the instances did not change.
            self.pool.prune(&self.source.snapshot());
        }
        let key = self.route.key(&request);
        let mut call = self.pick(key.as_deref())?;
        let mut retried = false;
        loop {
            let entry = self.pool.entry(call.instance());
            let connected = entry
                .service
                .get_or_try_init(|| {
                    // A request that waited for an attempt that failed does not try again.
                    let connecting = (!entry.failed.load(Ordering::Acquire))
                        .then(|| (self.connect)(call.instance()));
                    async move {
                        match connecting {
                            Some(connecting) => connecting.await,
                            None => Err(BoxError::from(ConnectionFailed)),
                        }
                    }
                })
                .await;
            if connected.is_err() {
                entry.failed.store(true, Ordering::Release);
            }
            let ready = match connected {
                Ok(service) => {
                    let mut service = service.clone();
                    match service.ready().await {
                        Ok(_) => Ok(service),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(e),
            };
            match ready {
                Ok(mut service) => {
                    // The latency that p2c weighs is the request's, not the connection set-up's
                    // (a first request that connected would otherwise look slow for seconds).
                    call.restart_clock();
                    return match service.call(request).await {
                        Ok(response) => Ok(self.observe(response, call)),
                        Err(e) => {
                            let e: BoxError = e.into();
                            // A broken connection (an I/O error in the chain): the next
                            // request to this instance connects again, before sending. Other
                            // errors (a timeout, a protocol error) keep the connection.
                            if is_connection_error(&*e) {
                                self.pool.forget(&entry);
                            }
                            call.failure();
                            Err(e)
                        }
                    };
                }
                Err(e) => {
                    // Never sent: the instance failed, and the request may go elsewhere once.
                    self.pool.forget(&entry);
                    let failed = Arc::clone(call.instance());
                    call.failure();
                    if retried {
                        return Err(e);
                    }
                    retried = true;
                    match self.pick_other(&failed) {
                        Some(next) => call = next,
                        None => return Err(e),
                    }
                }
            }
        }
    }

    /// The pick of the route.
    fn pick(&self, key: Option<&[u8]>) -> Result<Call, NoInstance> {
        let call = match (&self.route, key) {
            (Route::RoundRobin, _) => self.source.pick().map(Picked::start),
            (Route::Weighted, _) => self.source.pick_weighted().map(Picked::start),
            (Route::Hash { .. }, Some(key)) => self.source.pick_by(key).map(Picked::start),
            (Route::P2c | Route::Hash { .. }, _) => self.source.pick_p2c(),
        };
        call.ok_or_else(|| self.no_instance())
    }

    /// Another instance than `failed`, round-robin (at most one lap); `None` if there is none.
    fn pick_other(&self, failed: &Instance) -> Option<Call> {
        let up = self.source.snapshot().up().count();
        (0..up)
            .filter_map(|_| self.source.pick())
            .find(|picked| picked.id() != failed.id())
            .map(Picked::start)
    }

    /// Why nothing could be picked.
    fn no_instance(&self) -> NoInstance {
        let all = self.source.cache().snapshot();
        // Before its first list a cache is frozen at revision 0 (with `NotListed`, or the
        // cause of the failures since); every list answers with etcd's revision, at least 1.
        let never_listed = !all.freshness().is_live() && all.revision() == 0;
        let reason = if all.is_empty() && never_listed {
            NoInstanceReason::NotListed
        } else if all.is_empty() {
            NoInstanceReason::NoneRegistered
        } else if matches!(self.source, Source::Selection(_)) && self.source.snapshot().is_empty() {
            NoInstanceReason::SelectionEmpty
        } else {
            NoInstanceReason::AllDraining
        };
        NoInstance {
            service: self.source.cache().service().to_owned(),
            reason,
        }
    }

    /// Reports the outcome a response head tells, or leaves it to the body's trailers.
    fn observe<R>(&self, response: http::Response<R>, call: Call) -> http::Response<Observed<R>> {
        match self.classifier.head(&response) {
            Verdict::Now(Outcome::Success) => {
                call.success();
                response.map(Observed::reported)
            }
            Verdict::Now(Outcome::Failure) => {
                call.failure();
                response.map(Observed::reported)
            }
            Verdict::AtTrailers => {
                let classifier = self.classifier;
                response.map(|body| Observed::at_trailers(body, call, classifier))
            }
        }
    }
}
