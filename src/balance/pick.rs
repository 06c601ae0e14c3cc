//! The pickers, over one snapshot's [`Tables`]: each returns an index into the snapshot's
//! instances, or `None` when no instance is up.

use std::sync::Arc;

use super::hash::key_hash;
use super::rng;
use super::table::Tables;
use crate::instance::Instance;

/// Round-robin: this thread's next position in the table of instances up. A skipped
/// (ejected) instance moves the cursor on, so the others keep even shares.
#[inline]
pub(crate) fn round_robin(tables: &Tables) -> Option<u32> {
    let owner = tables.cursor_owner();
    // The cursor is 64 bits; positions wrap at 2^32, once in four billion picks.
    tables.choose(|_| tables.nth(rng::next_position(owner) as u32))
}

/// Uniformly random among the instances up.
#[inline]
pub(crate) fn random(tables: &Tables) -> Option<u32> {
    let n = rng::next_random();
    tables.choose(|attempt| match attempt {
        0 => tables.nth(n),
        1..=4 => tables.nth(rng::next_random()),
        _ => tables.nth(n.wrapping_add(attempt)),
    })
}

/// Smooth weighted round-robin: this thread's next position in the snapshot's weighted cycle
/// (a cursor apart from round-robin's, so that mixing the two keeps each exact).
#[inline]
pub(crate) fn weighted(tables: &Tables, instances: &[Arc<Instance>]) -> Option<u32> {
    let cycle = tables.cycle(instances);
    if cycle.is_empty() {
        return None;
    }
    let owner = tables.cursor_owner() | 1;
    // A skipped instance moves this thread's cursor on, as in round-robin. Positions wrap at
    // 2^32, once in four billion picks (the cycle is exact between wraps).
    tables.choose(|_| cycle.nth(rng::next_position(owner) as u32))
}

/// Weighted random, through the snapshot's alias table.
#[inline]
pub(crate) fn weighted_random(tables: &Tables, instances: &[Arc<Instance>]) -> Option<u32> {
    let alias = tables.alias(instances);
    let r = rng::next_random64();
    tables.choose(|attempt| match attempt {
        0 => alias.pick(r),
        _ => alias.pick(rng::next_random64()),
    })
}

/// Consistent hash of `key`, through the snapshot's Maglev table. An ejected instance's keys go
/// to their next choices while it is ejected.
#[inline]
pub(crate) fn by_key(tables: &Tables, instances: &[Arc<Instance>], key: &[u8]) -> Option<u32> {
    let maglev = tables.maglev(instances);
    let hash = key_hash(key);
    tables.choose_sticky(|attempt| match attempt {
        0 => maglev.lookup(hash),
        _ => maglev.next_choice(key, hash, u64::from(attempt)),
    })
}
