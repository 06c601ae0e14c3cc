//! The one clock balancing reads: tokio's, so that tests under paused time are deterministic.

use std::time::Instant;

/// Now, on tokio's clock (the real clock outside a runtime, or when time is not paused).
#[inline]
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
