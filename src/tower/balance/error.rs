//! [`NoInstance`]: the error of a request that had no instance to go to.

use std::fmt;

/// Why no instance could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoInstanceReason {
    /// The service has never been listed: etcd has not answered since the cache started
    /// (see [`Discovery::service_now`](crate::Discovery::service_now)).
    NotListed,
    /// The service has no instance in the snapshot: none registered (or none left).
    NoneRegistered,
    /// Every instance (of the selection, if any) is draining.
    AllDraining,
    /// The service has instances, but none matches the selection's tags and metadata.
    SelectionEmpty,
}

impl fmt::Display for NoInstanceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotListed => "etcd has not listed the service yet",
            Self::NoneRegistered => "no instance is registered",
            Self::AllDraining => "every instance is draining",
            Self::SelectionEmpty => "no instance matches the selection",
        })
    }
}

/// A request that a [`Balanced`](crate::tower::Balanced) service could not send: there was no
/// instance to pick. Returned at once, boxed as the service's error; find it with
/// `error.downcast_ref::<NoInstance>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoInstance {
    pub(crate) service: String,
    pub(crate) reason: NoInstanceReason,
}

impl NoInstance {
    /// The service the request was for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Why there was no instance.
    pub fn reason(&self) -> NoInstanceReason {
        self.reason
    }
}

impl fmt::Display for NoInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no instance of service `{}` to send the request to: {}",
            self.service, self.reason
        )
    }
}

impl std::error::Error for NoInstance {}
