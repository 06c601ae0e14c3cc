//! Client-side load balancing over one snapshot.
//!
//! Everything a pick needs is computed once, when a snapshot is built ([`PickTable`]), so a pick
//! is a thread-local counter bump, a multiply-based modulo and two array reads: no lock, no
//! allocation, and no write to memory shared with other threads.
//!
//! - Round-robin ([`ServiceCache::pick`](crate::ServiceCache::pick)) keeps one cursor per thread,
//!   not a shared atomic: threads never contend on a cache line, and each thread still cycles
//!   through every instance in turn. Each thread starts at a different offset so that many threads
//!   starting together do not all hit the first instance.
//! - Random ([`ServiceCache::pick_random`](crate::ServiceCache::pick_random)) uses a per-thread
//!   xorshift generator, seeded per thread.
//! - Draining instances are never in the table, so they are never picked.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::instance::Instance;

/// The instances that may be picked from one snapshot, with a precomputed divisor.
#[derive(Debug, Clone, Default)]
pub(crate) struct PickTable {
    /// Indexes (into the snapshot's instances) of the instances that are up; shared by the
    /// snapshots that differ only in freshness.
    up: Arc<[u32]>,
    /// `u64::MAX / up.len() + 1`: Lemire's constant for a division-free `n % up.len()`.
    magic: u64,
}

impl PickTable {
    /// Builds the table for `instances`.
    pub(crate) fn new(instances: &[Arc<Instance>]) -> Self {
        let up: Arc<[u32]> = instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.is_up())
            // A snapshot never holds more than u32::MAX instances: the backend's value size and
            // count limits keep it far below, and `try_from` drops any excess rather than wrapping.
            .filter_map(|(n, _)| u32::try_from(n).ok())
            .collect();
        let magic = match up.len() {
            0 => 0,
            len => (u64::MAX / len as u64).wrapping_add(1),
        };
        Self { up, magic }
    }

    /// How many instances may be picked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.up.len()
    }

    /// The instance index at position `n % len`, or `None` when nothing is up.
    #[inline]
    pub(crate) fn nth(&self, n: u32) -> Option<u32> {
        let len = self.up.len() as u64;
        if len == 0 {
            return None;
        }
        // Lemire, Kaser, Kurz: "Faster Remainder by Direct Computation" (2019). Exact for every
        // 32-bit n and divisor; the result is < len, so `get` never misses.
        let low = self.magic.wrapping_mul(u64::from(n));
        let rem = ((u128::from(low) * u128::from(len)) >> 64) as usize;
        self.up.get(rem).copied()
    }
}

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
        (x >> 32) as u32
    })
}

/// SplitMix64's output function: a strong 64-bit mixer.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::State;

    fn instances(states: &[State]) -> Vec<Arc<Instance>> {
        states
            .iter()
            .enumerate()
            .map(|(n, s)| {
                Arc::new(
                    Instance::builder("s", format!("10.0.0.{n}:80"))
                        .state(*s)
                        .build()
                        .unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn fast_modulo_is_exact() {
        for len in [1usize, 2, 3, 7, 10, 1000, 65_537, 100_000] {
            let inst = instances(&vec![State::Up; len.min(2000)]);
            let table = PickTable::new(&inst);
            let len = table.len() as u32;
            for n in [0u32, 1, 2, 3, 999, 65_536, 1 << 31, u32::MAX - 1, u32::MAX] {
                assert_eq!(table.nth(n), Some(n % len), "n={n} len={len}");
            }
        }
    }

    #[test]
    fn draining_never_in_table() {
        let inst = instances(&[State::Draining, State::Up, State::Draining, State::Up]);
        let table = PickTable::new(&inst);
        assert_eq!(table.len(), 2);
        let picked: Vec<_> = (0..8).map(|n| table.nth(n).unwrap()).collect();
        assert_eq!(picked, [1, 3, 1, 3, 1, 3, 1, 3]);
        assert_eq!(PickTable::new(&instances(&[State::Draining])).nth(0), None);
        assert_eq!(PickTable::new(&[]).nth(5), None);
    }

    #[test]
    fn cursor_advances_by_one_per_pick() {
        let a = next_cursor();
        let b = next_cursor();
        assert_eq!(b, a.wrapping_add(1));
    }

    #[test]
    fn threads_start_at_different_offsets() {
        let starts: std::collections::HashSet<u32> = (0..8)
            .map(|_| std::thread::spawn(next_cursor).join().unwrap())
            .collect();
        assert!(starts.len() > 1, "every thread started at the same cursor");
    }

    #[test]
    fn random_covers_all() {
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            seen[(next_random() % 5) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
