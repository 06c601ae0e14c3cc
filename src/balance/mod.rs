//! Client-side load balancing over one snapshot, and the passive health that routes around
//! failure.
//!
//! Everything a pick needs is computed once per snapshot: the list of instances up
//! when the snapshot is built, and the weighted cycle, alias table and Maglev table the first time
//! a picker needs them. A pick reads those tables without a lock and allocates nothing.
//!
//! | picker | on [`ServiceCache`](crate::ServiceCache) | how |
//! |---|---|---|
//! | round-robin | [`pick`](crate::ServiceCache::pick) | per-thread cursors, one per snapshot |
//! | random | [`pick_random`](crate::ServiceCache::pick_random) | per-thread xorshift |
//! | smooth weighted round-robin | [`pick_weighted`](crate::ServiceCache::pick_weighted) | nginx's cycle, precomputed |
//! | weighted random | [`pick_weighted_random`](crate::ServiceCache::pick_weighted_random) | Vose's alias method |
//! | consistent hash | [`pick_by`](crate::ServiceCache::pick_by) | weighted Maglev, XXH3 ([`hash`]) |
//! | power of two choices | [`pick_p2c`](crate::ServiceCache::pick_p2c) | peak EWMA × in-flight ([`p2c`]) |
//!
//! [`Selection`](crate::Selection) runs the same pickers over the instances with given tags or metadata.
//!
//! Around every picker:
//! - **Draining instances** are never in the tables, so they are never picked.
//! - **Outlier ejection** ([`OutlierEjection`](crate::OutlierEjection)): reported failures eject an instance for a while; picks
//!   skip it, frozen or live, until it comes back on probation. While nothing is ejected a pick
//!   reads one shared counter more than it would without ejection, and no clock.
//! - **Slow start** ([`SlowStart`](crate::SlowStart)): an instance first seen after the first list ramps in.

mod clock;
pub mod hash;
pub(crate) mod health;
pub mod p2c;
pub(crate) mod pick;
pub(crate) mod picked;
pub(crate) mod rng;
pub(crate) mod select;
pub(crate) mod slow_start;
pub(crate) mod table;
pub(crate) mod view;
pub(crate) mod weighted;

pub(crate) use clock::now;

#[cfg(test)]
mod tests;
