//! [`EtcdBackend`]: the [`Backend`] contract on a real etcd cluster, through `etcd-client`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient, PutOptions, Txn,
    TxnOp as EtcdTxnOp, TxnOpResponse, WatchClient, WatchOptions, WatchResponse,
};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::Mutex as AsyncMutex;

use super::{
    Backend, BackendError, BackendErrorKind, Event, EventKind, Header, KeyRevision, KeyValue,
    KeysAt, ListResponse, ProgressRequester, PutCondition, PutOutcome, Watch, WatchMessage,
};

/// How to connect to etcd. Every setting has a default suited to production and accepted by
/// etcd's own defaults.
///
/// There is no request timeout here: whoever makes a request bounds it, so one setting has one
/// meaning. A cache bounds its lists and watch creations by
/// [`DiscoveryBuilder::request_timeout`](crate::DiscoveryBuilder::request_timeout), a
/// registration its calls by
/// [`RegistrationBuilder::request_timeout`](crate::RegistrationBuilder::request_timeout).
///
/// ```
/// use std::time::Duration;
/// use etcd_registry::backend::EtcdOptions;
///
/// let options = EtcdOptions::new()
///     .connect_timeout(Duration::from_secs(2))
///     .keep_alive(Duration::from_secs(10), Duration::from_secs(5))
///     .user("discovery", "secret");
/// # let _ = options;
/// ```
#[derive(Clone)]
pub struct EtcdOptions {
    connect_timeout: Duration,
    keep_alive_interval: Duration,
    keep_alive_timeout: Duration,
    require_leader: bool,
    user: Option<(String, String)>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: DEFAULT_KEEP_ALIVE_INTERVAL,
            keep_alive_timeout: DEFAULT_KEEP_ALIVE_TIMEOUT,
            require_leader: true,
            user: None,
        }
    }
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("keep_alive_interval", &self.keep_alive_interval)
            .field("keep_alive_timeout", &self.keep_alive_timeout)
            .field("require_leader", &self.require_leader)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl EtcdOptions {
    /// The defaults: connect timeout 5 s, HTTP/2 keep-alive every 10 s with a 5 s timeout on
    /// connections with an open stream, leader required, no authentication.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bound on establishing a connection to one endpoint (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive: a ping every `interval` while a stream (a watch, a lease keep-alive)
    /// is open, the connection dropped when one is not answered within `timeout` (defaults 10 s
    /// and 5 s). This notices a hung member (or a network path that went dark) even while
    /// nothing else is sent. A member cut off from the rest of its cluster still answers pings:
    /// [`require_leader`](Self::require_leader) is what notices that.
    ///
    /// **etcd refuses pings more often than its `--grpc-keepalive-min-time` (default 5 s)**: it
    /// answers a client that pings faster with a GOAWAY (`too_many_pings`), which breaks every
    /// watch on the connection about every 15 s. Keep `interval` at or above that setting of your
    /// etcd; the default leaves room for timer jitter. A hung etcd is caught sooner by the
    /// cache's stall bound ([`DiscoveryBuilder::stall_timeout`](crate::DiscoveryBuilder::stall_timeout),
    /// 10 s by default) than by a shorter ping interval.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive_interval = interval;
        self.keep_alive_timeout = timeout;
        self
    }

    /// Whether requests and watches are refused by a member that has no leader (default true):
    /// such a member cannot answer authoritatively, so the cache freezes with
    /// [`NoLeader`](crate::FreezeCause::NoLeader) and tries another member.
    pub fn require_leader(mut self, require: bool) -> Self {
        self.require_leader = require;
        self
    }

    /// Authenticates as `name` with `password`.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.keep_alive_interval, self.keep_alive_timeout)
            // A connection with no open stream has no watch to watch over, and etcd does not
            // accept pings on one (its enforcement policy does not permit them without streams).
            .with_keep_alive_while_idle(false)
            .with_require_leader(self.require_leader);
        if let Some((name, password)) = &self.user {
            options = options
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        options
    }
}

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

/// HTTP/2 keep-alive ping interval: above etcd's default `--grpc-keepalive-min-time` (5 s).
const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long an unanswered ping may take before the connection is dropped.
const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

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
    client: Client,
    /// `client`'s key-value and watch clients, with the response size limit raised.
    kv: KvClient,
    watch: WatchClient,
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend").finish_non_exhaustive()
    }
}

impl EtcdBackend {
    /// Connects to the cluster at `endpoints` (like `http://10.0.0.1:2379`).
    ///
    /// The connection is made lazily: this succeeds while etcd is down (unless credentials must
    /// be checked), and caches start frozen until etcd answers.
    ///
    /// # Errors
    /// A [`BackendError`] for an empty or malformed endpoint list, or refused credentials.
    pub async fn connect<E: AsRef<str>>(
        endpoints: impl IntoIterator<Item = E>,
        options: EtcdOptions,
    ) -> Result<Self, BackendError> {
        let endpoints: Vec<String> = endpoints
            .into_iter()
            .map(|e| e.as_ref().to_owned())
            .collect();
        if endpoints.is_empty() {
            return Err(BackendError::new(
                BackendErrorKind::Rejected,
                "no etcd endpoint given",
            ));
        }
        // Lazy, unless credentials are checked: then this authenticates, bounded like a dial.
        let connect = Client::connect(endpoints, Some(options.connect_options()));
        let client = tokio::time::timeout(options.connect_timeout, connect)
            .await
            .map_err(|_| BackendError::new(BackendErrorKind::Timeout, "connecting to etcd"))?
            .map_err(map_error)?;
        Ok(Self::from_client(client))
    }

    /// Uses a client the application already has. Its own options apply.
    ///
    /// Build that client with `ConnectOptions::with_require_leader(true)` (and an HTTP/2
    /// keep-alive): without it, a member cut off from the rest of its cluster keeps answering
    /// from its stale state, and the cache stays live on it instead of freezing.
    /// [`connect`](Self::connect) sets both.
    pub fn from_client(client: Client) -> Self {
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let watch = client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        Self { client, kv, watch }
    }

    /// The underlying etcd-client handle.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl EtcdBackend {
    /// Opens a watch and waits for etcd's answer to its creation.
    async fn create_watch(
        &self,
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
        let mut client = self.watch.clone();
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
}

impl Backend for EtcdBackend {
    /// Lists in pages of 1,000 keys, every page read at the revision of the first, so
    /// the result is one consistent state however large the prefix is: no single response has
    /// to fit the gRPC message limit. (kube-apiserver pages its etcd lists the same way.)
    fn list(&self, prefix: &[u8]) -> BoxFuture<'_, Result<ListResponse, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(async move {
            let mut kv = self.kv.clone();
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
        })
    }

    fn probe(&self, prefix: &[u8]) -> BoxFuture<'_, Result<u64, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(async move {
            let mut client = self.kv.clone();
            let options = GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_limit(1);
            let response = client.get(prefix, Some(options)).await.map_err(map_error)?;
            Ok(response.header().map_or(0, |h| h.member_id()))
        })
    }

    fn keys_at(
        &self,
        prefix: &[u8],
        revision: i64,
        with_values: bool,
    ) -> BoxFuture<'_, Result<KeysAt, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(async move {
            let mut client = self.kv.clone();
            let mut options = GetOptions::new().with_prefix().with_revision(revision);
            if !with_values {
                options = options.with_keys_only();
            }
            let response = client.get(prefix, Some(options)).await.map_err(map_error)?;
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
        })
    }

    fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
    ) -> BoxFuture<'_, Result<Watch, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(async move {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(from_revision.max(0))
                .with_progress_notify();
            let (sender, responses, created) = match self.create_watch(&prefix, &options).await {
                // etcd-client refreshes an expired token only when a unary call fails, and a
                // watch is no unary call: a cache whose watch broke after its token expired would
                // be refused for good. Refresh it here, then try once more.
                Err(error) if error.kind == BackendErrorKind::Auth => {
                    tracing::debug!(%error, "watch refused: refreshing the auth token");
                    self.client.refresh_token().await.map_err(map_error)?;
                    self.create_watch(&prefix, &options).await?
                }
                other => other?,
            };
            let header = header(created.header())?;
            let member_id = created.header().map_or(0, |h| h.member_id());
            let stream = responses
                .map(|item| match item {
                    Ok(response) => message(response),
                    Err(error) => Some(Err(map_error(error))),
                })
                .filter_map(std::future::ready)
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
        Box::pin(async move {
            let mut client = self.client.clone();
            let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
            let response = client.lease_grant(seconds, None).await.map_err(map_error)?;
            Ok(response.id())
        })
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, BackendError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
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
        })
    }

    fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        condition: PutCondition,
    ) -> BoxFuture<'_, Result<PutOutcome, BackendError>> {
        let (key, value) = (key.to_vec(), value.to_vec());
        Box::pin(async move {
            let mut client = self.client.clone();
            let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            let compare = match condition {
                PutCondition::Absent => {
                    Some(Compare::create_revision(key.clone(), CompareOp::Equal, 0))
                }
                PutCondition::ModRevision(revision) => Some(Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )),
                PutCondition::Always => None,
            };
            let mut txn = Txn::new();
            if let Some(compare) = compare {
                txn = txn.when([compare]);
            }
            let txn = txn
                .and_then([EtcdTxnOp::put(key.clone(), value, options)])
                .or_else([EtcdTxnOp::get(key, None)]);
            let response = client.txn(txn).await.map_err(map_error)?;
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
        })
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            match client.lease_revoke(lease).await.map_err(map_error) {
                Ok(_) => Ok(()),
                // Already gone (expired or revoked): what revoking wanted.
                Err(e) if e.kind == BackendErrorKind::Rejected => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

/// Asks etcd for a progress notification on one watch stream.
struct Progress {
    sender: AsyncMutex<etcd_client::WatchRequestSender>,
}

impl ProgressRequester for Progress {
    fn request_progress(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.sender
                .lock()
                .await
                .request_progress()
                .await
                .map_err(map_error)
        })
    }
}

/// Turns one etcd watch response into a message; `None` for responses that carry nothing (a
/// late creation acknowledgement).
fn message(response: WatchResponse) -> Option<Result<WatchMessage, BackendError>> {
    if response.compact_revision() > 0 {
        return Some(Ok(WatchMessage::Compacted {
            compact_revision: response.compact_revision(),
        }));
    }
    if response.canceled() {
        return Some(Err(cancelled(&response)));
    }
    if response.created() {
        return None;
    }
    let header = match header(response.header()) {
        Ok(header) => header,
        Err(e) => return Some(Err(e)),
    };
    if response.events().is_empty() {
        return Some(Ok(WatchMessage::Progress { header }));
    }
    let events = response
        .events()
        .iter()
        .filter_map(|event| {
            let kv = key_value(event.kv()?);
            let kind = match event.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            };
            Some(Event { kind, kv })
        })
        .collect();
    Some(Ok(WatchMessage::Events { header, events }))
}

fn cancelled(response: &WatchResponse) -> BackendError {
    let reason = response.cancel_reason();
    let kind = if reason.contains("no leader") {
        BackendErrorKind::NoLeader
    } else if reason.contains("permission") || reason.contains("auth") {
        BackendErrorKind::Auth
    } else {
        BackendErrorKind::Unavailable
    };
    BackendError::new(kind, format!("watch cancelled by etcd: {reason}"))
}

fn header(header: Option<&etcd_client::ResponseHeader>) -> Result<Header, BackendError> {
    let header = header.ok_or_else(|| {
        BackendError::new(BackendErrorKind::Other, "etcd response without a header")
    })?;
    Ok(Header {
        revision: header.revision(),
        cluster_id: header.cluster_id(),
    })
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

/// Whether etcd said the lease does not exist (expired or revoked).
fn lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        _ => false,
    }
}

/// Sorts etcd-client's errors into the kinds the cache and registrations act on.
fn map_error(error: etcd_client::Error) -> BackendError {
    use etcd_client::Error as E;
    use tonic::Code;
    let kind = match &error {
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable if status.message().contains("no leader") => {
                BackendErrorKind::NoLeader
            }
            Code::Unavailable | Code::Aborted | Code::Cancelled | Code::Unknown => {
                if status.message().contains("no leader") {
                    BackendErrorKind::NoLeader
                } else {
                    BackendErrorKind::Unavailable
                }
            }
            Code::DeadlineExceeded => BackendErrorKind::Timeout,
            Code::OutOfRange | Code::ResourceExhausted
                if status.message().contains("message length too large")
                    || status.message().contains("larger than max") =>
            {
                BackendErrorKind::TooLarge
            }
            Code::Unauthenticated | Code::PermissionDenied => BackendErrorKind::Auth,
            Code::OutOfRange
                if status
                    .message()
                    .contains("required revision has been compacted") =>
            {
                BackendErrorKind::Compacted
            }
            Code::OutOfRange
                if status
                    .message()
                    .contains("required revision is a future revision") =>
            {
                BackendErrorKind::FutureRevision
            }
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange => BackendErrorKind::Rejected,
            _ => BackendErrorKind::Other,
        },
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => {
            BackendErrorKind::Unavailable
        }
        E::InvalidArgs(_) | E::InvalidUri(_) | E::EndpointError(_) => BackendErrorKind::Rejected,
        _ => BackendErrorKind::Other,
    };
    BackendError::new(kind, error.to_string())
}
