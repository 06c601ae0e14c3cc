//! Consistent hashing for sticky routing: a weighted Maglev table.
//!
//! Maglev (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer",
//! NSDI 2016, §3.4) fills a table of `M` slots (a prime) by letting each instance claim slots in
//! its own permutation order, in turns, so every instance ends up with an equal share of the
//! slots (here: a share proportional to its weight) and adding or removing one instance moves
//! few keys. A pick is one hash of the key and one table read.
//!
//! # The hash is part of the contract
//! Everything is hashed with **XXH3-64** (the `xxh3_64_with_seed` of the XXH3 specification),
//! seeded as below, so that every process, in every release, maps a key to the same instance for
//! the same set of instances:
//! - a key's slot: `xxh3(key, seed 0)`, reduced to `0..M` by `(h * M) >> 64` (Lemire);
//! - its next choices when the instance there is ejected: `xxh3(key, seed attempt)` for attempts
//!   1 to 8, then, for attempt `a` above 8, slot `(s0 + a - 8) % M` where `s0` is the key's own
//!   (seed 0) slot, up to `n + 3` attempts in all; when none of those is admitted, an instance
//!   not ejected chosen at random (a last resort that is not sticky);
//! - an instance's permutation: `offset = xxh3(id, OFFSET_SEED) % M`,
//!   `skip = xxh3(id, SKIP_SEED) % (M - 1) + 1`, from its instance id;
//! - `M` is the first prime at or above `64 * n.next_power_of_two()` (`n` the instances up), at
//!   least 1031: it changes only when the count crosses a power of two, and then most keys move;
//! - the table is filled in rounds over the instances in key order: each round an instance earns
//!   `weight / max_weight` of a turn (an `f64` credit) and, with a whole turn, takes the next
//!   free slot of its permutation, until every slot is taken (Maglev's fill, weighted).
//!
//! A test pins golden values of all of it.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of an instance's permutation offset.
pub const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
/// Seed of an instance's permutation skip.
pub const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"
/// How many rehashed next choices a key gets before the slots after its last one are tried.
pub(crate) const REHASHES: u64 = 8;

/// The hash of a routing key, as [`pick_by`](crate::ServiceCache::pick_by) computes it.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, 0)
}

/// A built Maglev table: slot → instance index.
#[derive(Debug, Default)]
pub(crate) struct Maglev {
    slots: Box<[u32]>,
}

/// The table size for `n` instances.
pub(crate) fn table_size(n: usize) -> u64 {
    let target = (n.max(1).next_power_of_two() as u64)
        .saturating_mul(64)
        .max(1031);
    next_prime(target)
}

fn next_prime(mut n: u64) -> u64 {
    loop {
        if is_prime(n) {
            return n;
        }
        n += 1;
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

impl Maglev {
    /// The table for `(instance index, instance id, weight)` triples (the instances up).
    pub(crate) fn new(entries: &[(u32, &str, u32)]) -> Self {
        if entries.is_empty() {
            return Self::default();
        }
        let m = table_size(entries.len());
        let max_weight = entries.iter().map(|e| e.2).max().unwrap_or(1).max(1);
        let mut next: Vec<u64> = entries
            .iter()
            .map(|e| xxh3_64_with_seed(e.1.as_bytes(), OFFSET_SEED) % m)
            .collect();
        let skip: Vec<u64> = entries
            .iter()
            .map(|e| xxh3_64_with_seed(e.1.as_bytes(), SKIP_SEED) % (m - 1) + 1)
            .collect();
        // Weighted turns: each round an instance earns weight / max_weight of a slot.
        let mut credit: Vec<f64> = vec![0.0; entries.len()];
        const EMPTY: u32 = u32::MAX;
        let mut slots = vec![EMPTY; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (n, entry) in entries.iter().enumerate() {
                credit[n] += f64::from(entry.2) / f64::from(max_weight);
                if credit[n] < 1.0 {
                    continue;
                }
                credit[n] -= 1.0;
                loop {
                    let slot = next[n] as usize;
                    next[n] = (next[n] + skip[n]) % m;
                    if slots[slot] == EMPTY {
                        slots[slot] = entry.0;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    break 'fill;
                }
            }
        }
        Self {
            slots: slots.into_boxed_slice(),
        }
    }

    /// How many slots the table has.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The instance in `slot_hash`'s slot.
    #[inline]
    pub(crate) fn lookup(&self, slot_hash: u64) -> Option<u32> {
        let m = self.slots.len() as u64;
        let slot = ((u128::from(slot_hash) * u128::from(m)) >> 64) as usize;
        self.slots.get(slot).copied()
    }

    /// The `attempt`-th next choice of `key` (attempt 1 and up), for when its instance is
    /// ejected.
    pub(crate) fn next_choice(&self, key: &[u8], first: u64, attempt: u64) -> Option<u32> {
        if attempt <= REHASHES {
            return self.lookup(xxh3_64_with_seed(key, attempt));
        }
        let m = self.slots.len() as u64;
        if m == 0 {
            return None;
        }
        let start = ((u128::from(first) * u128::from(m)) >> 64) as u64;
        let slot = (start + attempt - REHASHES) % m;
        self.slots.get(slot as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sizes_are_primes_that_change_only_at_powers_of_two() {
        assert_eq!(table_size(1), 1031);
        assert_eq!(table_size(10), 1031);
        assert_eq!(table_size(16), 1031);
        assert_eq!(table_size(17), 2053);
        assert_eq!(table_size(1000), 65537);
    }

    #[test]
    fn every_slot_is_filled_in_proportion_to_weight() {
        let ids: Vec<String> = (0..4).map(|n| format!("i{n}")).collect();
        let entries: Vec<(u32, &str, u32)> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| (n as u32, id.as_str(), if n == 0 { 2 } else { 1 }))
            .collect();
        let table = Maglev::new(&entries);
        let mut counts = [0usize; 4];
        for &slot in table.slots.iter() {
            counts[slot as usize] += 1;
        }
        let m = table.len();
        assert_eq!(counts.iter().sum::<usize>(), m);
        assert!(counts[0].abs_diff(2 * m / 5) <= 2, "{counts:?} of {m}");
        assert!(counts[1].abs_diff(m / 5) <= 2, "{counts:?} of {m}");
    }
}
