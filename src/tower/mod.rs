//! tower integration (feature `tower`): a balancing [`Service`](::tower::Service) over one inner
//! service per instance, a tower [`Discover`](::tower::discover::Discover) stream, and the
//! classification of HTTP and gRPC responses into outcomes for passive health.
//!
//! - [`Balanced`]: routes each `http::Request` to an instance chosen by a [`Route`] (p2c by
//!   default), through an inner service built lazily per instance and kept while the instance
//!   is in the snapshot (also while frozen). Outcomes feed outlier ejection, so a dead instance
//!   stops receiving requests after a few failures even while etcd is down. With no instance to
//!   pick it fails at once with [`NoInstance`], never waits.
//! - [`Discover`]: for tower's own balancer; inserts and removes services as instances come
//!   and go, never errs, never ends, never removes while the cache is frozen, and leaves
//!   draining instances out.
//!
//! The tonic helpers (feature `tonic`) build a [`Balanced`] over tonic `Channel`s in one call:
//! see [`crate::tonic`].

mod balance;
mod body;
mod classify;
pub(crate) mod discover;
mod route;

pub use balance::{Balanced, BalancedBuilder, NoInstance, NoInstanceReason, ResponseFuture};
pub use body::Observed;
pub use classify::{Classifier, Outcome};
pub use discover::Discover;
pub use route::{Route, RoutingKey};

/// The error type of [`Balanced`] and of most tower middleware: any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
