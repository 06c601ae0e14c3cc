//! Where the key space comes from: a [`Backend`] lists a prefix and watches it from a revision.
//!
//! Two implementations ship with the crate: `EtcdBackend` talks to a real etcd cluster, and
//! [`MemoryBackend`] is an in-process model of etcd (revisions, transactions, leases, compaction,
//! and injectable faults) for tests, demos and property tests.
//!
//! The types here are the crate's own, not etcd-client's, so that the sync machine and the memory
//! backend need no etcd connection and users never see etcd-client types in this API.

#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd;
pub mod memory;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use futures_util::future::BoxFuture;

#[cfg(feature = "tls")]
pub use etcd::TlsOptions;
#[cfg(feature = "etcd")]
pub use etcd::{EtcdBackend, EtcdOptions};
pub use memory::MemoryBackend;

/// The header etcd puts on every response: the store revision when it was answered, and the
/// cluster it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// The store's revision when the response was made.
    pub revision: i64,
    /// The cluster's id; a change means etcd was restored from a backup or replaced.
    pub cluster_id: u64,
}

/// One key and its value, as etcd stores them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a delete event).
    pub value: Vec<u8>,
    /// The revision of the key's creation.
    pub create_revision: i64,
    /// The revision of the key's last change (for a delete event: the revision of the delete).
    pub mod_revision: i64,
    /// The lease the key is attached to, or 0.
    pub lease: i64,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or changed.
    Put,
    /// The key was deleted (directly, or because its lease ended).
    Delete,
}

/// One change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete, only `key` and `mod_revision` are meaningful.
    pub kv: KeyValue,
}

/// The answer to a list: every key under the prefix at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListResponse {
    /// The revision the list is consistent at, and the cluster id.
    pub header: Header,
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
}

/// One key as it was at some revision, without its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRevision {
    /// The key.
    pub key: Vec<u8>,
    /// The revision of the key's last change at or before the revision asked about.
    pub mod_revision: i64,
    /// The revision at which the key was created (since it was last deleted).
    pub create_revision: i64,
    /// The lease the key is attached to (0 for none).
    pub lease: i64,
    /// The value, when it was asked for.
    pub value: Option<Vec<u8>>,
}

/// The answer to [`Backend::keys_at`]: every key under a prefix as of one past revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeysAt {
    /// The response header (its revision is the store's current one, not the one asked about).
    pub header: Header,
    /// The keys, in key order.
    pub keys: Vec<KeyRevision>,
}

/// One message of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// Events, each with its own revision; all events of one revision are in the same message.
    Events {
        /// The response header.
        header: Header,
        /// The events, in revision order.
        events: Vec<Event>,
    },
    /// A progress notification: every event up to `header.revision` has been delivered.
    Progress {
        /// The response header.
        header: Header,
    },
    /// The watch was cancelled because its start revision was compacted away; the stream ends.
    Compacted {
        /// The oldest revision still available.
        compact_revision: i64,
    },
}

/// What kind of failure a backend reported; it decides how the cache reports being frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// No connection could be made, or the connection was lost.
    Unavailable,
    /// The cluster has no leader, so it cannot answer authoritatively.
    NoLeader,
    /// A request took longer than its timeout.
    Timeout,
    /// Credentials were refused or lack permission.
    Auth,
    /// The request itself was refused (bad argument, key or lease not found, conflict).
    Rejected,
    /// A read at a revision that compaction has removed (`mvcc: required revision has been
    /// compacted`).
    Compacted,
    /// A read at a revision the store has not reached (`mvcc: required revision is a future
    /// revision`): its history is shorter than the reader thought.
    FutureRevision,
    /// A response was larger than the client accepts (a watch catching up on more than the
    /// response limit at once, or a single value over it). Retrying gives the same answer.
    TooLarge,
    /// The TLS handshake with etcd failed, or one side spoke TLS and the other plain text; the
    /// problem says which. Retrying helps only once the certificates or the endpoints are fixed
    /// (or rotated in, see `EtcdBackend::reload`).
    Tls(TlsProblem),
    /// Anything else.
    Other,
}

/// Why a TLS connection to etcd failed, as far as the client can tell.
///
/// The client sees its own verdict on the server's certificate exactly; of the server's verdict
/// on the client's certificate it sees only the TLS alert the server sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsProblem {
    /// The server's certificate is not signed by the CA the client trusts: a wrong CA was
    /// given, or the server uses a certificate of another PKI.
    UnknownIssuer,
    /// The server's certificate has expired (or is not valid yet: check the clocks).
    Expired,
    /// The server's certificate is not valid for the name the client connected to: use the
    /// endpoint's name from the certificate, or set the expected name with
    /// `TlsOptions::domain_name`.
    WrongHost,
    /// The server requires a client certificate (etcd's `--client-cert-auth`) and none was
    /// sent: give one with `TlsOptions::identity`.
    ClientCertificateRequired,
    /// The server refused the client's certificate (not signed by a CA in etcd's
    /// `--trusted-ca-file`, expired, or not meant for client authentication).
    ClientCertificateRejected,
    /// The endpoint answered in plain text to a TLS handshake: it does not serve TLS, so
    /// connect to it with `http://` (or enable TLS on etcd).
    NotTls,
    /// The endpoint serves TLS and the client spoke plain text: connect with `https://` and
    /// TLS options.
    TlsRequired,
    /// Any other handshake failure; the error's message has the details.
    Other,
}

impl fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsProblem::UnknownIssuer => "the server's certificate is not signed by a trusted CA",
            TlsProblem::Expired => "the server's certificate has expired or is not valid yet",
            TlsProblem::WrongHost => {
                "the server's certificate is not valid for the endpoint's name"
            }
            TlsProblem::ClientCertificateRequired => {
                "the server requires a client certificate and none was sent"
            }
            TlsProblem::ClientCertificateRejected => "the server refused the client certificate",
            TlsProblem::NotTls => "the endpoint does not speak TLS",
            TlsProblem::TlsRequired => "the endpoint requires TLS and was spoken to in plain text",
            TlsProblem::Other => "the TLS handshake failed",
        })
    }
}

/// A failure reported by a [`Backend`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BackendError {
    /// What kind of failure.
    pub kind: BackendErrorKind,
    /// Details for logs.
    pub message: String,
}

impl BackendError {
    /// A new error of `kind`.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for an [`Unavailable`](BackendErrorKind::Unavailable) error.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(BackendErrorKind::Unavailable, message)
    }
}

/// A stream of watch messages; it ends (or yields an error) when the watch is over.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchMessage, BackendError>> + Send>>;

/// Asks a watch for a progress notification.
pub trait ProgressRequester: Send + Sync {
    /// Asks the server to send a [`WatchMessage::Progress`] on the stream soon. A healthy server
    /// answers within a round trip; a hung one does not, which is how a stall is detected.
    fn request_progress(&self) -> BoxFuture<'_, Result<(), BackendError>>;
}

/// An established watch: the server accepted it at `header`, and events follow on `stream`.
pub struct Watch {
    /// The header of the creation response. Its revision is the store's revision when the watch
    /// was created; events from the requested start revision up to it may still be on the way.
    pub header: Header,
    /// The messages.
    pub stream: WatchStream,
    /// Requests progress notifications on this watch.
    pub progress: Arc<dyn ProgressRequester>,
    /// The id of the member serving the watch (0 when unknown): a liveness probe counts for
    /// this watch only when the same member answers it.
    pub member_id: u64,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// What a conditional put requires of the key's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutCondition {
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this modification revision (compare-and-swap).
    ModRevision(i64),
    /// Write whatever is there.
    Always,
}

/// The result of a conditional put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The value was written at this revision.
    Written {
        /// The revision of the write.
        revision: i64,
    },
    /// The condition did not hold; nothing was written.
    Refused {
        /// The key as it is now (`None` if it does not exist).
        current: Option<KeyValue>,
    },
}

/// A source of key-value state that can be listed and watched, like etcd.
///
/// Implementations must keep etcd's guarantees: revisions only go up within one cluster id, all
/// events of one revision are delivered in one [`WatchMessage::Events`], a watch started at
/// revision `r` delivers every event from `r` on (or reports [`WatchMessage::Compacted`]), and a
/// progress notification at revision `r` means every event up to `r` was delivered (the sync
/// machine does not rely on that last promise: older etcd releases break it).
pub trait Backend: Send + Sync + 'static {
    /// Lists every key that starts with `prefix`.
    fn list(&self, prefix: &[u8]) -> BoxFuture<'_, Result<ListResponse, BackendError>>;

    /// Watches every key that starts with `prefix`, from `from_revision` on. The future resolves
    /// once the server accepted the watch.
    fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
    ) -> BoxFuture<'_, Result<Watch, BackendError>>;

    /// Grants a lease of `ttl` and returns its id. etcd counts TTLs in whole seconds: a real
    /// backend rounds up, to at least one second.
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, BackendError>>;

    /// Renews `lease` once; returns the TTL it now has, or zero when the lease no longer exists.
    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, BackendError>>;

    /// Writes `value` at `key`, attached to `lease` (0 for none), if `condition` holds.
    fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        condition: PutCondition,
    ) -> BoxFuture<'_, Result<PutOutcome, BackendError>>;

    /// Revokes `lease`, deleting every key attached to it. Revoking a lease that no longer
    /// exists is not an error.
    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Every key that starts with `prefix` as it was at `revision`: its create and mod
    /// revisions and its lease, and its value when `with_values` (etcd: a range read at that
    /// revision, keys-only unless values are asked for).
    ///
    /// A cache asks this after every interruption, before it resumes its watch at
    /// `revision + 1`: if etcd was wiped or restored under the same cluster id and its new
    /// history has passed `revision`, the keys differ from the ones the cache applied, and it
    /// lists afresh instead of following a watch on a history it never saw.
    ///
    /// # Errors
    /// [`BackendErrorKind::Compacted`] when `revision` was compacted away;
    /// [`BackendErrorKind::FutureRevision`] when the store has not reached `revision`.
    fn keys_at(
        &self,
        prefix: &[u8],
        revision: i64,
        with_values: bool,
    ) -> BoxFuture<'_, Result<KeysAt, BackendError>>;

    /// A cheap request that proves etcd answers (etcd: a keys-only range read of at most one
    /// key under `prefix`); returns the id of the member that answered (0 when unknown). A
    /// cache sends it when a progress request on an idle watch went unanswered: behind etcd's
    /// gRPC proxy, or on a release without progress requests, that is normal, and an answer
    /// from the watch's own member tells a healthy etcd from a hung one.
    fn probe(&self, prefix: &[u8]) -> BoxFuture<'_, Result<u64, BackendError>>;
}

impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn probe(&self, prefix: &[u8]) -> BoxFuture<'_, Result<u64, BackendError>> {
        (**self).probe(prefix)
    }

    fn keys_at(
        &self,
        prefix: &[u8],
        revision: i64,
        with_values: bool,
    ) -> BoxFuture<'_, Result<KeysAt, BackendError>> {
        (**self).keys_at(prefix, revision, with_values)
    }

    fn list(&self, prefix: &[u8]) -> BoxFuture<'_, Result<ListResponse, BackendError>> {
        (**self).list(prefix)
    }

    fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
    ) -> BoxFuture<'_, Result<Watch, BackendError>> {
        (**self).watch(prefix, from_revision)
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, BackendError>> {
        (**self).grant(ttl)
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, BackendError>> {
        (**self).keep_alive(lease)
    }

    fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        condition: PutCondition,
    ) -> BoxFuture<'_, Result<PutOutcome, BackendError>> {
        (**self).put(key, value, lease, condition)
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), BackendError>> {
        (**self).revoke(lease)
    }
}
