//! The one clock balancing reads: tokio's, so that tests under paused time are deterministic.

use std::time::Instant;

/// Now, on tokio's clock (the real clock outside a runtime, or when time is not paused).
#[inline]
pub(crate) fn now() -> Instant {
    #[cfg(test)]
    READS.with(|reads| reads.set(reads.get() + 1));
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
thread_local! {
    /// How many times this thread read the clock through [`now`]: what the pick path's tests
    /// count.
    static READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has read the clock through [`now`].
#[cfg(test)]
pub(crate) fn reads() -> u64 {
    READS.with(std::cell::Cell::get)
}
