//! Keeping a snapshot in step with etcd: the pure [`machine`] and the tokio driver that runs it.

pub(crate) mod driver;
pub mod machine;

pub use crate::backoff::BackoffConfig;
pub use machine::{Action, Input, Machine, Stats};
