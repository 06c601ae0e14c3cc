//! tonic integration (feature `tonic`): a balanced gRPC client over the instances of a cache,
//! with one tonic [`Channel`] per instance built from an [`Endpoint`] template.
//!
//! ```no_run
//! # mod greeter { #[derive(Clone)] pub struct GreeterClient<T>(T);
//! #   impl<T> GreeterClient<T> { pub fn new(t: T) -> Self { Self(t) } } }
//! # use greeter::GreeterClient;
//! # async fn run(discovery: etcd_registry::Discovery) -> Result<(), etcd_registry::Error> {
//! let greeters = discovery.service("greeter").await?;
//! let channel = etcd_registry::tonic::channel(&greeters);
//! let client = GreeterClient::new(channel);
//! # Ok(()) }
//! ```
//!
//! Each instance gets its own `Channel`, connected the first time a request goes to it
//! (eagerly, so that an instance that refuses the connection was never sent the request: the
//! request goes to another instance and the refusal counts as a failure), dropped when etcd
//! removes the instance, and connected again after a transport error. Requests are balanced by
//! p2c and their outcomes (transport errors, gRPC statuses) feed outlier ejection: see
//! [`Balanced`].
//!
//! For tonic's own balancer, [`feed_balance_channel`] feeds `Channel::balance_channel` from
//! the cache; it has tonic's limits (below), which [`channel`] does not.
//!
//! TLS to the instances: this crate's `tonic` feature turns on none of tonic's TLS features;
//! enable one in your own `Cargo.toml` (`tonic = { version = "0.14", features =
//! ["tls-ring"] }`, say), set `tls_config` in the template, and give the instances `https`
//! URIs: registered with the metadata entry `scheme` = `https` (or `grpcs`), or, when the
//! registrations name no scheme, through [`channel_from`] with
//! [`Instance::uri_with_default_scheme`]`("https")`. tonic uses TLS only for `https` URIs.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

use crate::cache::ServiceCache;
use crate::instance::Instance;
use crate::tower::discover::Membership;
use crate::tower::{Balanced, BalancedBuilder, BoxError};

/// How long [`channel`] waits for a connection to an instance by default, before the
/// template applies: an instance that does not answer must not hold a request for the
/// operating system's TCP timeout (minutes).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The tonic [`Endpoint`] of `instance` (its [`uri`](Instance::uri)), with `template` applied
/// (timeouts, HTTP/2 keep-alive, TLS, user agent…).
///
/// # Errors
///
/// When the instance's address does not make a valid URI.
pub fn endpoint(
    instance: &Instance,
    template: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Endpoint, http::uri::InvalidUri> {
    let uri = instance.uri()?;
    Ok(template(
        Endpoint::from(uri).connect_timeout(DEFAULT_CONNECT_TIMEOUT),
    ))
}

/// A balanced client channel over the instances of `cache`: p2c, one `Channel` per instance,
/// default endpoint settings (and [`DEFAULT_CONNECT_TIMEOUT`]). Pass it to any generated tonic
/// client.
pub fn channel(cache: &ServiceCache) -> Balanced<Channel> {
    channel_with(Balanced::builder(cache), |endpoint| endpoint)
}

/// [`channel`] with a route, classifier or selection from `builder`, and `template` applied to
/// each instance's endpoint.
///
/// ```no_run
/// # async fn run(greeters: etcd_registry::ServiceCache) {
/// use std::time::Duration;
/// use etcd_registry::tower::{Balanced, Route};
///
/// let channel = etcd_registry::tonic::channel_with(
///     Balanced::builder(&greeters).route(Route::RoundRobin),
///     |endpoint| endpoint.timeout(Duration::from_secs(2)).http2_keep_alive_interval(Duration::from_secs(30)),
/// );
/// # }
/// ```
pub fn channel_with<F>(builder: BalancedBuilder, template: F) -> Balanced<Channel>
where
    F: Fn(Endpoint) -> Endpoint + Send + Sync + 'static,
{
    channel_from(builder, move |instance: &Instance| {
        endpoint(instance, &template)
    })
}

/// [`channel`] with each instance's endpoint made by `endpoint`, for what a template cannot
/// change: the URI (a TLS fleet whose registrations name no scheme), or settings that depend
/// on the instance (its metadata). An instance whose endpoint cannot be made counts as a
/// failed connection: the request goes to another instance.
///
/// ```no_run
/// # async fn run(greeters: etcd_registry::ServiceCache) {
/// use std::time::Duration;
/// use etcd_registry::tower::{Balanced, BoxError};
/// use tonic::transport::Endpoint;
///
/// let channel = etcd_registry::tonic::channel_from(Balanced::builder(&greeters), |instance| {
///     // A TLS fleet: add `.tls_config(…)` (tonic's TLS features) to the endpoint.
///     let uri = instance.uri_with_default_scheme("https")?;
///     Ok::<_, BoxError>(Endpoint::from(uri).timeout(Duration::from_secs(2)))
/// });
/// # }
/// ```
pub fn channel_from<F, E>(builder: BalancedBuilder, endpoint: F) -> Balanced<Channel>
where
    F: Fn(&Instance) -> Result<Endpoint, E> + Send + Sync + 'static,
    E: Into<BoxError>,
{
    builder.connector(move |instance: &Instance| {
        let endpoint = endpoint(instance).map_err(Into::into);
        async move {
            let channel = endpoint?.connect().await?;
            Ok::<_, BoxError>(channel)
        }
    })
}

/// Feeds tonic's own balancer (`Channel::balance_channel`) with the instances of `cache`,
/// until the channel is dropped (this future then ends at once): `Change::Insert` of each instance up (keyed by instance id,
/// with `template` applied to its endpoint), `Change::Remove` when it drains or etcd removes
/// it. Nothing is removed while the cache is frozen.
///
/// tonic's balancer keeps its limits: its endpoints report no load, so p2c is random; a dead
/// endpoint that connects lazily stays ready and keeps being picked (tonic issues #643, #1147,
/// #2839); calls wait (not fail) while it has no endpoint; and it learns of changes only while
/// it is polled, so with little traffic they wait (#1581). [`channel`] has none of these.
///
/// ```no_run
/// # async fn run(greeters: etcd_registry::ServiceCache) {
/// let (channel, sender) = tonic::transport::Channel::balance_channel::<String>(64);
/// tokio::spawn(etcd_registry::tonic::feed_balance_channel(greeters, |e| e, sender));
/// # let _ = channel;
/// # }
/// ```
pub async fn feed_balance_channel<F>(
    cache: ServiceCache,
    template: F,
    sender: mpsc::Sender<Change<String, Endpoint>>,
) where
    F: Fn(Endpoint) -> Endpoint + Send + Sync + 'static,
{
    let mut diffs = cache.diffs();
    let mut membership = Membership::default();
    loop {
        // Ends as soon as the channel is dropped, not at the next change (which may never
        // come): the diffs hold the cache, which would otherwise keep syncing for nobody.
        let diff = tokio::select! {
            () = sender.closed() => return,
            diff = diffs.next() => diff,
        };
        let Some(diff) = diff else {
            return;
        };
        let mut changes = Vec::new();
        membership.apply(
            &diff,
            |instance| match endpoint(instance, &template) {
                Ok(endpoint) => Some(endpoint),
                Err(error) => {
                    // Left out; its previous endpoint, if any, is no longer where it is.
                    tracing::warn!(
                        service = %cache.service(),
                        addr = %instance.addr(),
                        %error,
                        "an instance's address is not a valid URI; it is left out"
                    );
                    None
                }
            },
            |change| changes.push(change),
        );
        for change in changes {
            let change = match change {
                tower::discover::Change::Insert(id, endpoint) => Change::Insert(id, endpoint),
                tower::discover::Change::Remove(id) => Change::Remove(id),
            };
            if sender.send(change).await.is_err() {
                return;
            }
        }
    }
}
