//! A service registry on etcd that keeps serving when etcd falls over.
//!
//! Providers register themselves in etcd under a lease they keep alive; callers embed this crate
//! and get a lock-free, always-readable [`Snapshot`] of the instances of the services they call,
//! fed by a list plus an incremental watch that resumes from the last revision it applied. When
//! etcd is unreachable the snapshot is **frozen, never cleared**: callers keep routing to the last
//! known instances while the cache reconnects with exponential backoff and jitter.
//!
//! ```
//! use etcd_registry::{Discovery, Instance, MemoryBackend, Codec, KeyLayout};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), etcd_registry::Error> {
//! // An in-process etcd model; production code uses a real etcd connection.
//! let etcd = MemoryBackend::new();
//! let codec = Codec::new(KeyLayout::Native, "/services");
//! let instance = Instance::builder("user", "10.0.0.7:8080").id("user-7").build()?;
//! etcd.put(codec.key(&instance, 0), codec.encode_value(&instance));
//!
//! let discovery = Discovery::memory(etcd).namespace("/services").build()?;
//! let users = discovery.service("user").await?;   // first list, bounded by a timeout
//! let target = users.pick().expect("one instance is up"); // lock-free round-robin
//! assert_eq!(target.addr(), "10.0.0.7:8080");
//! assert!(users.freshness().is_live());
//! # Ok(()) }
//! ```
//!
//! The parts, one module each: [`instance`] (what is registered), [`codec`] (how it is laid out
//! in etcd: native JSON, go-zero, or etcd's naming package), [`snapshot`] (an immutable view),
//! [`cache`] (the always-readable handle), [`diff`] (changes between snapshots, per instance),
//! [`balance`] (pickers, outlier ejection, slow start),
//! [`sync`] (the sans-IO list/watch machine and the task that drives it), [`backend`] (etcd or
//! the in-memory model), and [`metrics`] (metric names). `ARCHITECTURE.md` in the repository
//! describes how they fit together, the invariants they keep (§4) and how each is tested.
//!
//! # Observability
//!
//! The names below are part of the public interface: dashboards, alerts and log filters are
//! built on them, so they change only with a major version.
//!
//! **Tracing spans** (level `INFO`):
//!
//! | span | fields | wraps |
//! |---|---|---|
//! | `etcd_registry::cache` | `service` | the sync task of one [`ServiceCache`] |
//! | `etcd_registry::registration` | `service`, `id` | the keep-alive task of one [`Registration`] |
//!
//! **Event targets** are the module paths: `etcd_registry::sync::machine` (`info`: frozen, live,
//! relist after compaction; `warn`: history went back, reset, an entry that does not decode,
//! logged once per key), `etcd_registry::sync::driver` (`info`/`debug`: request and watch
//! failures, timeouts, stalls), `etcd_registry::register` (`info`/`warn`: registered, lost,
//! registered again, deregistered, key deleted or taken over). Filter them with
//! `RUST_LOG=etcd_registry=info`, for example.
//!
//! **Metrics** (through the [`metrics`](https://docs.rs/metrics) facade, each labelled
//! `service`; the constants are in [`metrics`]):
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `etcd_registry_instances` | gauge | instances in the current snapshot |
//! | `etcd_registry_frozen` | gauge | 1 while the snapshot is frozen, 0 while live |
//! | `etcd_registry_relists_total` | counter | lists after the first (compaction, reset, regression) |
//! | `etcd_registry_resets_total` | counter | times etcd went back in time or changed cluster |
//! | `etcd_registry_watch_restarts_total` | counter | watches established after the first |
//! | `etcd_registry_events_applied_total` | counter | watch events applied |
//! | `etcd_registry_decode_errors_total` | counter | entries skipped because they did not decode |
//! | `etcd_registry_failures_total` | counter | list or watch failures |
//! | `etcd_registry_publishes_total` | counter | snapshots published |
//! | `etcd_registry_picks_total` | counter | reported outcomes, labelled `outcome` = `success`, `failure` or `dropped` |
//! | `etcd_registry_ejections_total` | counter | instances ejected by outlier ejection |
//! | `etcd_registry_ejected` | gauge | instances ejected now (an ended ejection leaves it at the next report, `health()` read, or pick that meets an ejected instance) |
//!
//! The balancing metrics are registered when a cache is created, so that reporting an outcome
//! never allocates: install the recorder before asking for the caches. Outlier ejection logs
//! one `info` event per ejection and per return, under `etcd_registry::balance::health`.
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
mod backoff;
pub mod balance;
pub mod cache;
pub mod codec;
pub mod diff;
mod discovery;
mod error;
mod in_span;
pub mod instance;
pub mod metrics;
mod register;
pub mod snapshot;
pub mod sync;
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub mod tonic;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;

pub use backend::{Backend, MemoryBackend, TlsProblem};
#[cfg(feature = "etcd")]
pub use backend::{EtcdBackend, EtcdOptions};
pub use backoff::BackoffConfig;
pub use balance::health::OutlierEjection;
pub use balance::picked::{Call, Picked};
pub use balance::select::{Selection, Selector};
pub use balance::slow_start::SlowStart;
pub use balance::view::InstanceHealth;
pub use cache::{ServiceCache, SyncStats};
pub use codec::{Codec, DecodeError, Decoded, KeyLayout, ParseLayoutError};
pub use diff::{Diff, Diffs, InstanceChange};
pub use discovery::{Discovery, DiscoveryBuilder};
pub use error::{Error, Result};
pub use instance::{Instance, InstanceBuilder, InstanceError, State};
pub use register::{Registration, RegistrationBuilder, RegistrationStatus};
pub use snapshot::{FreezeCause, Freshness, Snapshot};

/// The README's Rust examples, compiled as doctests so they cannot drift from the API.
#[cfg(all(doctest, feature = "etcd", feature = "tonic", feature = "tls"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
