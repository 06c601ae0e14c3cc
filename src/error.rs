//! The crate's error type.

use std::time::Duration;

use crate::backend::{BackendError, TlsProblem};
use crate::codec::DecodeError;
use crate::instance::InstanceError;

/// Everything that can go wrong in this crate, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An instance failed validation.
    #[error("invalid instance: {0}")]
    Instance(#[from] InstanceError),
    /// A key or value read from etcd could not be decoded.
    #[error("undecodable entry: {0}")]
    Decode(#[from] DecodeError),
    /// The backend (etcd, or the in-memory model) failed.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    /// The first list of a service did not succeed in time; etcd may be unreachable.
    #[error(
        "no answer listing service {service:?} within {after:?} (last error: {last_error}); \
         check that etcd is reachable, or raise DiscoveryBuilder::first_list_timeout"
    )]
    FirstListTimeout {
        /// The service being listed.
        service: String,
        /// How long it waited.
        after: Duration,
        /// The last failure seen while trying, if any.
        last_error: String,
    },
    /// etcd's answer for a service was larger than the client accepts, so no amount of waiting
    /// helps: a watch catching up on more than the response limit at once, or one value over
    /// it. The cache stays frozen with
    /// [`FreezeCause::ResponseTooLarge`](crate::FreezeCause::ResponseTooLarge) and keeps trying.
    #[error(
        "etcd's answer for service {service:?} is larger than this client accepts ({detail}); \
         this is not a reachability problem: look for oversized values under the service's prefix"
    )]
    ResponseTooLarge {
        /// The service being listed.
        service: String,
        /// What the transport said, with the sizes.
        detail: String,
    },
    /// The instance's key is held by another live registration (another lease). Pick another
    /// instance id, stop the other instance, or register with
    /// [`RegistrationBuilder::replace`](crate::RegistrationBuilder::replace) to take the key over.
    #[error(
        "key {key:?} is already registered under lease {holder_lease} (not ours); use another id, \
         stop the other instance, or set RegistrationBuilder::replace(true)"
    )]
    Conflict {
        /// The contested key.
        key: String,
        /// The lease holding it (0: a key with no lease).
        holder_lease: i64,
    },
    /// etcd refused the credentials of `user`: a wrong password, a user that does not exist,
    /// or authentication not enabled on etcd. Reported by
    /// [`EtcdBackend::connect`](crate::EtcdBackend::connect) when etcd answers it; afterwards a
    /// cache freezes with [`FreezeCause::Auth`](crate::FreezeCause::Auth) and keeps trying,
    /// backed off.
    #[error("etcd refused the credentials of user {user:?}: {detail}")]
    Auth {
        /// The user name given to [`EtcdOptions::user`](crate::EtcdOptions::user).
        user: String,
        /// What etcd said.
        detail: String,
    },
    /// The TLS connection to etcd failed: `problem` says why (a certificate not signed by the
    /// CA given, expired or for another host; a client certificate missing or refused; TLS on
    /// one side only). Reported by [`EtcdBackend::connect`](crate::EtcdBackend::connect) when
    /// it sees it, and by [`Discovery::service`](crate::Discovery::service) when the first
    /// list failed on it; a cache freezes with [`FreezeCause::Tls`](crate::FreezeCause::Tls).
    #[error("TLS to etcd failed: {problem} ({detail})")]
    Tls {
        /// What is wrong.
        problem: TlsProblem,
        /// The handshake error, for logs.
        detail: String,
    },
    /// A configuration value was out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The discovery or cache was shut down.
    #[error("shut down")]
    Shutdown,
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
