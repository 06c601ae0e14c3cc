//! Keeping a snapshot in step with etcd: the pure [`machine`] and the tokio [`driver`] that runs it.

pub(crate) mod driver;
pub mod machine;

pub use machine::{Action, BackoffConfig, Input, Machine, Stats};
