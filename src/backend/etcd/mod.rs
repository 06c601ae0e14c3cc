//! [`EtcdBackend`]: the [`Backend`] contract on a real etcd cluster, through `etcd-client`.
//!
//! # Authentication
//!
//! With authentication enabled on etcd, give each side a user whose role allows what it does
//! and nothing more ([`EtcdOptions::user`]). For services under the namespace `/services`:
//!
//! ```text
//! # Callers: read the service prefix (list and watch).
//! etcdctl role add registry-caller
//! etcdctl role grant-permission registry-caller --prefix=true read /services/
//! etcdctl user add caller --new-user-password='...' --interactive=false
//! etcdctl user grant-role caller registry-caller
//!
//! # Providers: write their keys (a put with a lease, a delete) and read them back.
//! # Leases (grant, keep-alive, revoke) need no permission of their own in etcd.
//! etcdctl role add registry-provider
//! etcdctl role grant-permission registry-provider --prefix=true readwrite /services/user/
//! etcdctl user add user-service --new-user-password='...' --interactive=false
//! etcdctl user grant-role user-service registry-provider
//! ```
//!
//! A provider role can be narrower still: `readwrite /services/user/` lets the `user`
//! service's instances register and nothing else. A caller whose role loses its permission
//! freezes with [`FreezeCause::Auth`](crate::FreezeCause::Auth) (keeping its instances) and
//! recovers by itself once the permission is granted again: a change of users or roles makes
//! etcd refuse older tokens, and the backend then authenticates again.
//!
//! # TLS
//!
//! With the `tls` feature, [`EtcdOptions::tls`] takes a [`TlsOptions`]: the CA, a client
//! certificate for mutual TLS, a server name. The endpoints are then `https://` ones.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp as EtcdTxnOp, TxnOpResponse,
    WatchOptions, WatchResponse,
};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::Mutex as AsyncMutex;

use super::{
    Backend, BackendError, BackendErrorKind, Header, KeyRevision, KeysAt, ListResponse,
    PutCondition, PutOutcome, Watch, WatchMessage,
};
use crate::Error;

mod auth;
mod channel;
mod connection;
mod convert;
mod diagnose;
mod endpoints;
mod error;
mod options;
#[cfg(feature = "tls")]
mod tls;

use connection::Connection;
use convert::{Progress, cancelled, header, key_value, message};
use error::{lease_not_found, map_error};
pub use options::EtcdOptions;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use tls::TlsOptions;

/// Keys per page of a list. Small enough that a page of large values still fits
/// [`MAX_RESPONSE_BYTES`], large enough that a big service lists in few round trips.
const LIST_PAGE: i64 = 1000;
/// The largest list page or watch response accepted. tonic's default is 4 MiB, which a watch
/// catching up after an outage can exceed (etcd batches many revisions into one response).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// The smallest key after every key that starts with `prefix` (etcd's range end for a prefix
/// read); `[0]` (the end of the keyspace) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A [`Backend`] on a real etcd cluster.
///
/// One `EtcdBackend` (one connection, balanced over the endpoints) serves every cache and
/// registration made from it; cloning it is cheap.
///
/// ```no_run
/// use etcd_registry::{Discovery, backend::{EtcdBackend, EtcdOptions}};
///
/// # async fn run() -> Result<(), etcd_registry::Error> {
/// let etcd = EtcdBackend::connect(["http://127.0.0.1:2379"], EtcdOptions::new()).await?;
/// let users = Discovery::with_backend(etcd).namespace("/services").build()?
///     .service("user").await?;
/// # let _ = users;
/// # Ok(()) }
/// ```
///
/// Its requests carry no timeout of their own: the caches and registrations made from it bound
/// each call by their own `request_timeout`. Code that calls the [`Backend`] methods directly
/// bounds them itself (with `tokio::time::timeout`, say).
#[derive(Clone)]
pub struct EtcdBackend {
    shared: Arc<Shared>,
}

struct Shared {
    /// The endpoints [`EtcdBackend::reload`] connects to again; empty for a backend made
    /// [`from_client`](EtcdBackend::from_client).
    endpoints: Vec<String>,
    /// The connection requests go through; [`EtcdBackend::reload`] replaces it.
    current: ArcSwap<Connection>,
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.shared.endpoints)
            .finish_non_exhaustive()
    }
}

impl EtcdBackend {
    /// Connects to the cluster at `endpoints` (like `http://10.0.0.1:2379`, or `https://...`
    /// with [`EtcdOptions::tls`]).
    ///
    /// An entry that cannot work (a malformed URL, no port, a scheme that does not match the
    /// TLS settings) is left out with a warning, so one typo does not take the others down.
    /// Members that are down are no error either: requests go to the ones that answer.
    ///
    /// The connection is made lazily, so this succeeds while etcd is down and caches start
    /// frozen until etcd answers. When etcd answers within the connect timeout, this checks
    /// the credentials and the TLS handshake, and fails on them.
    ///
    /// # Errors
    /// - [`Error::Config`] when no entry of `endpoints` is usable (each is named with its
    ///   problem);
    /// - [`Error::Auth`] when etcd refuses the user's credentials;
    /// - [`Error::Tls`] when the TLS handshake fails (an untrusted, expired or wrong-host
    ///   certificate, a missing client certificate, TLS on one side only).
    pub async fn connect<E: AsRef<str>>(
        endpoints: impl IntoIterator<Item = E>,
        options: EtcdOptions,
    ) -> Result<Self, Error> {
        let endpoints = endpoints::usable(endpoints, options.uses_tls())?;
        let connection = Connection::open(&endpoints, &options).await?;
        connection.verify(&options).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                endpoints,
                current: ArcSwap::from_pointee(connection),
            }),
        })
    }

    /// Uses a client the application already has. Its own options apply, and its own
    /// authentication.
    ///
    /// Build that client with `ConnectOptions::with_require_leader(true)` (and an HTTP/2
    /// keep-alive): without it, a member cut off from the rest of its cluster keeps answering
    /// from its stale state, and the cache stays live on it instead of freezing.
    /// [`connect`](Self::connect) sets both.
    pub fn from_client(client: Client) -> Self {
        Self {
            shared: Arc::new(Shared {
                endpoints: Vec::new(),
                current: ArcSwap::from_pointee(Connection::new(client, None, Vec::new())),
            }),
        }
    }

    /// Connects again to the same endpoints with new `options`, typically with TLS
    /// certificates read again from disk after they rotated (see
    /// [`TlsOptions`]), or a new password. Every request from then on goes
    /// through the new connection; watches and lease keep-alives already open keep theirs
    /// until it breaks. Caches and registrations need no restart.
    ///
    /// The new connection is checked like [`connect`](Self::connect) checks it; when etcd
    /// refuses it, the old one stays in use.
    ///
    /// # Errors
    /// As for [`connect`](Self::connect); [`Error::Config`] for a backend made
    /// [`from_client`](Self::from_client), which has no endpoints of its own.
    pub async fn reload(&self, options: EtcdOptions) -> Result<(), Error> {
        if self.shared.endpoints.is_empty() {
            return Err(Error::Config(
                "EtcdBackend::reload: this backend was made from a client; build a new one".into(),
            ));
        }
        let endpoints = endpoints::usable(&self.shared.endpoints, options.uses_tls())?;
        let connection = Connection::open(&endpoints, &options).await?;
        connection.verify(&options).await?;
        self.shared.current.store(Arc::new(connection));
        tracing::info!("etcd connection reloaded");
        Ok(())
    }

    /// The etcd-client handle requests currently go through.
    pub fn client(&self) -> Client {
        self.shared.current.load().client.clone()
    }

    /// Runs `op` on the current connection, and once more with a new token when etcd refused
    /// the token (expired, or older than the last change of users and roles: etcd-client
    /// renews only expired ones, and never for a stream).
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let connection = self.shared.current.load_full();
        // The token the request goes out with, read once authentication is done.
        let mut generation = 0;
        let result = match &connection.auth {
            Some(auth) => match auth.ensure(&connection.client).await {
                Ok(()) => {
                    generation = auth.generation();
                    op(Arc::clone(&connection)).await
                }
                Err(error) => Err(error),
            },
            None => op(Arc::clone(&connection)).await,
        };
        let result = match (result, &connection.auth) {
            (Err(error), Some(auth)) if auth::token_refused(&error) => {
                tracing::debug!(%error, "etcd refused the token: authenticating again");
                match auth.refresh(&connection.client, generation).await {
                    Ok(()) => op(Arc::clone(&connection)).await,
                    Err(error) => Err(error),
                }
            }
            (result, _) => result,
        };
        match result {
            Err(error) => Err(connection.explain(error).await),
            ok => ok,
        }
    }
}

impl EtcdBackend {
    /// For a backend that authenticates: an endless stream that reads `prefix` (one key, no
    /// value) every [`EtcdOptions::permission_check_interval`] and yields the error when etcd
    /// refuses it. etcd checks a watch's permission only when it is created, and keeps a watch
    /// open after its user lost the right to read the prefix; this makes that watch end, and
    /// its cache freeze with [`FreezeCause::Auth`](crate::FreezeCause::Auth). Without a user,
    /// a stream that never yields.
    fn permission_checks(
        &self,
        prefix: &[u8],
    ) -> futures_util::stream::BoxStream<'static, Result<WatchMessage, BackendError>> {
        let connection = self.shared.current.load();
        let every = match &connection.auth {
            Some(_) => connection.permission_check_interval,
            None => return futures_util::stream::pending().boxed(),
        };
        let (backend, prefix) = (self.clone(), prefix.to_vec());
        futures_util::stream::unfold((), move |()| {
            let (backend, prefix) = (backend.clone(), prefix.clone());
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    match backend.probe(&prefix).await {
                        Err(error) if error.kind == BackendErrorKind::Auth => {
                            return Some((Err(error), ()));
                        }
                        // Anything else is for the watch itself to notice.
                        _ => continue,
                    }
                }
            }
        })
        .boxed()
    }
}

/// Opens a watch and waits for etcd's answer to its creation.
async fn create_watch(
    connection: &Connection,
    prefix: &[u8],
    options: &WatchOptions,
) -> Result<
    (
        etcd_client::WatchRequestSender,
        etcd_client::WatchResponseStream,
        WatchResponse,
    ),
    BackendError,
> {
    let mut client = connection.watch.clone();
    let stream = client
        .watch(prefix.to_vec(), Some(options.clone()))
        .await
        .map_err(map_error)?;
    let (sender, mut responses) = stream.split();
    let first = responses.message().await.map_err(map_error)?;
    let created = first.ok_or_else(|| BackendError::unavailable("watch closed at once"))?;
    if created.canceled() {
        return Err(cancelled(&created));
    }
    Ok((sender, responses, created))
}

impl Backend for EtcdBackend {
    /// Lists in pages of 1,000 keys, every page read at the revision of the first, so
    /// the result is one consistent state however large the prefix is: no single response has
    /// to fit the gRPC message limit. (kube-apiserver pages its etcd lists the same way.)
    fn list(&self, prefix: &[u8]) -> BoxFuture<'_, Result<ListResponse, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(self.call(move |connection| list_pages(connection, prefix.clone())))
    }

    fn probe(&self, prefix: &[u8]) -> BoxFuture<'_, Result<u64, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(self.call(move |connection| {
            let prefix = prefix.clone();
            async move {
                let options = GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_limit(1);
                let response = connection
                    .kv
                    .clone()
                    .get(prefix, Some(options))
                    .await
                    .map_err(map_error)?;
                Ok(response.header().map_or(0, |h| h.member_id()))
            }
        }))
    }

    fn keys_at(
        &self,
        prefix: &[u8],
        revision: i64,
        with_values: bool,
    ) -> BoxFuture<'_, Result<KeysAt, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(self.call(move |connection| {
            let prefix = prefix.clone();
            async move {
                let mut options = GetOptions::new().with_prefix().with_revision(revision);
                if !with_values {
                    options = options.with_keys_only();
                }
                let response = connection
                    .kv
                    .clone()
                    .get(prefix, Some(options))
                    .await
                    .map_err(map_error)?;
                Ok(KeysAt {
                    header: header(response.header())?,
                    keys: response
                        .kvs()
                        .iter()
                        .map(|kv| KeyRevision {
                            key: kv.key().to_vec(),
                            mod_revision: kv.mod_revision(),
                            create_revision: kv.create_revision(),
                            lease: kv.lease(),
                            value: with_values.then(|| kv.value().to_vec()),
                        })
                        .collect(),
                })
            }
        }))
    }

    fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
    ) -> BoxFuture<'_, Result<Watch, BackendError>> {
        let prefix = prefix.to_vec();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision.max(0))
            .with_progress_notify();
        Box::pin(async move {
            let (sender, responses, created) = self
                .call(|connection| {
                    let (prefix, options) = (prefix.clone(), options.clone());
                    async move { create_watch(&connection, &prefix, &options).await }
                })
                .await?;
            let header = header(created.header())?;
            let member_id = created.header().map_or(0, |h| h.member_id());
            let messages = responses
                .map(|item| match item {
                    Ok(response) => message(response),
                    Err(error) => Some(Err(map_error(error))),
                })
                .filter_map(std::future::ready);
            let stream = futures_util::stream::select(messages, self.permission_checks(&prefix))
                // After an error or a cancellation the watch is over: end the stream there.
                .scan(false, |done, item| {
                    if *done {
                        return std::future::ready(None);
                    }
                    *done = matches!(item, Err(_) | Ok(WatchMessage::Compacted { .. }));
                    std::future::ready(Some(item))
                });
            Ok(Watch {
                header,
                stream: Box::pin(stream),
                progress: Arc::new(Progress {
                    sender: AsyncMutex::new(sender),
                }),
                member_id,
            })
        })
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, BackendError>> {
        let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
        Box::pin(self.call(move |connection| async move {
            let response = connection
                .client
                .clone()
                .lease_grant(seconds, None)
                .await
                .map_err(map_error)?;
            Ok(response.id())
        }))
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, BackendError>> {
        Box::pin(self.call(move |connection| async move {
            let mut client = connection.client.clone();
            let renew = async {
                let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                responses.message().await
            };
            // The stream sends one request when it opens; its first answer is the renewal.
            match renew.await {
                Ok(Some(response)) => Ok(Duration::from_secs(response.ttl().max(0) as u64)),
                Ok(None) => Err(BackendError::unavailable("keep-alive stream closed")),
                // etcd-client reads the first answer itself and reports an unknown lease as an
                // error; the contract says a lease that no longer exists renews to zero.
                Err(error) if lease_not_found(&error) => Ok(Duration::ZERO),
                Err(error) => Err(map_error(error)),
            }
        }))
    }

    fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        condition: PutCondition,
    ) -> BoxFuture<'_, Result<PutOutcome, BackendError>> {
        let (key, value) = (key.to_vec(), value.to_vec());
        Box::pin(self.call(move |connection| {
            let txn = put_txn(&key, &value, lease, condition);
            async move {
                let response = connection
                    .client
                    .clone()
                    .txn(txn)
                    .await
                    .map_err(map_error)?;
                if response.succeeded() {
                    return Ok(PutOutcome::Written {
                        revision: header(response.header())?.revision,
                    });
                }
                let current = response.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().map(key_value),
                    _ => None,
                });
                Ok(PutOutcome::Refused { current })
            }
        }))
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.call(move |connection| async move {
            match connection
                .client
                .clone()
                .lease_revoke(lease)
                .await
                .map_err(map_error)
            {
                Ok(_) => Ok(()),
                // Already gone (expired or revoked): what revoking wanted.
                Err(e) if e.kind == BackendErrorKind::Rejected => Ok(()),
                Err(e) => Err(e),
            }
        }))
    }
}

/// Reads `prefix` in pages of [`LIST_PAGE`] keys, all at the revision of the first page.
async fn list_pages(
    connection: Arc<Connection>,
    prefix: Vec<u8>,
) -> Result<ListResponse, BackendError> {
    let mut kv = connection.kv.clone();
    let end = prefix_end(&prefix);
    let mut from = prefix;
    let mut first: Option<Header> = None;
    let mut kvs = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE);
        if let Some(first) = first {
            options = options.with_revision(first.revision);
        }
        let mut page = kv
            .get(from.clone(), Some(options))
            .await
            .map_err(map_error)?;
        let page_header = header(page.header())?;
        let more = page.more();
        let page_kvs = page.take_kvs();
        if let Some(last) = page_kvs.last() {
            // The next page starts right after the last key: the key plus a zero byte.
            from = last.key().to_vec();
            from.push(0);
        }
        kvs.extend(page_kvs.iter().map(key_value));
        let first = *first.get_or_insert(page_header);
        if page_header.cluster_id != first.cluster_id {
            return Err(BackendError::unavailable(
                "the cluster changed between the pages of one list",
            ));
        }
        if !more || page_kvs.is_empty() {
            return Ok(ListResponse { header: first, kvs });
        }
    }
}

/// The transaction of a conditional put: the put when `condition` holds, else a read of the
/// key's current value.
fn put_txn(key: &[u8], value: &[u8], lease: i64, condition: PutCondition) -> Txn {
    let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
    let compare = match condition {
        PutCondition::Absent => Some(Compare::create_revision(key, CompareOp::Equal, 0)),
        PutCondition::ModRevision(revision) => {
            Some(Compare::mod_revision(key, CompareOp::Equal, revision))
        }
        PutCondition::Always => None,
    };
    let mut txn = Txn::new();
    if let Some(compare) = compare {
        txn = txn.when([compare]);
    }
    txn.and_then([EtcdTxnOp::put(key, value, options)])
        .or_else([EtcdTxnOp::get(key, None)])
}
