//! Per-thread round-robin cursors (one per table) and random numbers: no shared state on the
//! pick path.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many tables (and pickers) a thread keeps a round-robin cursor for at once.
const CURSORS: usize = 8;

thread_local! {
    /// `(owner, next position)` of this thread's cursors; owner 0 is a free slot.
    static CURSOR: [Cell<(usize, u64)>; CURSORS] = const { [const { Cell::new((0, 0)) }; CURSORS] };
    /// The slot the next new owner takes (oldest first).
    static EVICT: Cell<usize> = const { Cell::new(0) };
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A per-thread seed: a global counter, taken once per thread (never on the hot path), mixed so
/// that consecutive threads land far apart in the table.
#[cold]
fn thread_seed() -> u64 {
    static THREADS: AtomicU64 = AtomicU64::new(0);
    splitmix64(THREADS.fetch_add(1, Ordering::Relaxed))
}

/// This thread's next position in the cycle of `owner` (not 0: the address of one snapshot's
/// tables, with its low bit telling round-robin from weighted round-robin).
///
/// Each owner has its own cursor, so a thread that picks from several caches, or from a cache
/// and its selections, in turn still goes round each one in order: with one cursor per thread,
/// a thread alternating between two caches of two instances would always get the same
/// instance of each. The last [`CURSORS`] owners of a thread keep their cursors; a new owner
/// starts at a random position, so that threads spread out.
#[inline]
pub(crate) fn next_position(owner: usize) -> u64 {
    CURSOR.with(|slots| {
        for slot in slots {
            let (held, n) = slot.get();
            if held == owner {
                slot.set((owner, n.wrapping_add(1)));
                return n;
            }
        }
        new_cursor(slots, owner)
    })
}

#[cold]
fn new_cursor(slots: &[Cell<(usize, u64)>; CURSORS], owner: usize) -> u64 {
    let start = u64::from(next_random());
    let evict = EVICT.with(|e| {
        let n = e.get() % CURSORS;
        e.set((n + 1) % CURSORS);
        n
    });
    if let Some(slot) = slots.get(evict) {
        slot.set((owner, start.wrapping_add(1)));
    }
    start
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
