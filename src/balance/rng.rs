//! Per-thread round-robin cursors and random numbers: no shared state on the pick path.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    static CURSOR: Cell<u32> = const { Cell::new(u32::MAX) };
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A per-thread seed: a global counter, taken once per thread (never on the hot path), mixed so
/// that consecutive threads land far apart in the table.
#[cold]
fn thread_seed() -> u64 {
    static THREADS: AtomicU64 = AtomicU64::new(0);
    splitmix64(THREADS.fetch_add(1, Ordering::Relaxed))
}

/// The next round-robin position of this thread.
#[inline]
pub(crate) fn next_cursor() -> u32 {
    CURSOR.with(|c| {
        let mut n = c.get();
        if n == u32::MAX {
            n = thread_seed() as u32 & 0x7FFF_FFFF;
        }
        c.set(n.wrapping_add(1));
        n
    })
}

/// A uniformly random 32-bit number from this thread's xorshift generator.
#[inline]
pub(crate) fn next_random() -> u32 {
    (next_random64() >> 32) as u32
}

/// 64 random bits from this thread's xorshift generator (never all zero).
#[inline]
pub(crate) fn next_random64() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        if x == 0 {
            x = thread_seed() | 1;
        }
        // xorshift64 (Marsaglia 2003): full period over non-zero states.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.set(x);
        x
    })
}

/// SplitMix64's output function: a strong 64-bit mixer.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniformly random number in `[0, 1)`.
#[inline]
pub(crate) fn next_unit() -> f64 {
    (next_random64() >> 11) as f64 / (1u64 << 53) as f64
}
