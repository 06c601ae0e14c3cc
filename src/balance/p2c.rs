//! Power of two choices on load: two random instances, the one with the lower cost wins.
//!
//! Cost, after go-zero's `p2c_ewma` (`zrpc/internal/balancer/p2c/p2c.go`), itself after
//! Finagle's and Linkerd's peak EWMA:
//!
//! `cost = sqrt(latency_ewma_ns + 1) * (in_flight + 1) / max(success_rate, 0.01) / share`
//!
//! where `latency_ewma_ns` is the peak-sensitive latency EWMA, `in_flight` the requests sent and
//! not yet reported, `success_rate` the success EWMA (so an instance failing half its requests
//! costs twice as much) and `share` the slow-start share of a warming instance (1.0 otherwise).
//! The loser is taken anyway when p2c has not picked it for [`FORCE_PICK`] (go-zero's
//! `forcePick`), so a slow or recovering instance keeps being probed and its EWMA can come down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::health::Health;
use super::rng;
use super::table::{Admit, Gate, Tables};
use crate::instance::Instance;

/// How long p2c may leave an instance unpicked before it is probed anyway (go-zero: 1 s).
pub const FORCE_PICK: Duration = Duration::from_secs(1);

/// How many random pairs p2c draws looking for two admissible instances (go-zero: 3).
const PAIR_TRIES: u32 = 3;

/// The cost of an instance as a fraction `(numerator, denominator)`, squared so that no square
/// root is taken: `((latency + 1) * (in_flight + 1)^2, (success * share)^2)`. One with no
/// health yet (never reported) costs as an idle, fast, always successful one.
#[inline]
fn cost(health: Option<&Arc<Health>>, share: f64) -> (f64, f64) {
    let (latency, in_flight, success) = health.map_or((0.0, 0, 1.0), |health| {
        (
            health.latency_nanos(),
            health.in_flight(),
            health.success_rate(),
        )
    });
    let load = f64::from(in_flight) + 1.0;
    let weight = success.max(0.01) * share.max(0.01);
    ((latency + 1.0) * load * load, weight * weight)
}

/// Whether `a` costs no more than `b`: the documented cost compared without a square root or
/// a division (both sides are positive, so cross-multiplying keeps the order).
#[inline]
fn no_costlier(a: (f64, f64), b: (f64, f64)) -> bool {
    a.0 * b.1 <= b.0 * a.1
}

/// The p2c pick among the instances up, at `now`; `None` when none is up. Returns the chosen
/// instance's index, `now` as a stamp of its health ([`Health::stamp`], converted once here for
/// the caller's [`Call`]) and its health, which it has afterwards. A pick by p2c records its
/// time there (for the forced pick); the gate's fallback, when no draw found an admissible
/// instance, does not.
///
/// [`Call`]: crate::Call
pub(crate) fn pick<'t>(
    tables: &'t Tables,
    instances: &[Arc<Instance>],
    now: Instant,
) -> Option<(u32, u64, &'t Arc<Health>)> {
    let len = u32::try_from(tables.up_len()).unwrap_or(u32::MAX);
    if len == 0 {
        return None;
    }
    // Every health of one tables has the same clock origin: one conversion serves all.
    let stamp = tables.stamp(now);
    match tables.gate_at(Some(now)) {
        // Nothing ejected, nothing warming (the common case): one pair, taken as drawn.
        None => {
            let (first, second) = pair(rng::next_random64(), len);
            let first = *tables.up().get(first as usize)?;
            match second {
                None => single(tables, instances, first, stamp),
                Some(second) => {
                    let second = *tables.up().get(second as usize)?;
                    prefetch_instance(instances, first);
                    prefetch_instance(instances, second);
                    choose(tables, instances, (first, 1.0), (second, 1.0), stamp)
                }
            }
        }
        Some(gate) => gated(tables, instances, gate, len, stamp),
    }
}

/// Starts loading the cache line of instance `index`'s reference count, which the caller
/// increments for the winner, while the candidates' costs are weighed. With many instances
/// that line is a cache miss, and this way it overlaps the misses on the candidates' health
/// instead of following them: with 1,000 instances on 2 threads the count's miss was a
/// quarter of a pick and report under `perf`.
#[inline(always)]
fn prefetch_instance(instances: &[Arc<Instance>], index: u32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(instance) = instances.get(index as usize) {
        // The reference counts sit right before the value in std's `#[repr(C)]` `ArcInner`
        // (two `usize`s, and `Instance` needs no more alignment than they do: pinned below).
        // Were std's layout ever to change, the hint would only fetch a useless line.
        const _: () = assert!(std::mem::align_of::<Instance>() <= std::mem::align_of::<usize>());
        let counts = Arc::as_ptr(instance)
            .cast::<u8>()
            .wrapping_sub(2 * std::mem::size_of::<usize>());
        // SAFETY: a prefetch is a hint: it never faults, whatever the address (this one lies
        // inside the live allocation `instance` keeps), and reads or writes no memory the
        // program sees. The call is unsafe only as a target-feature intrinsic, and every
        // x86_64 CPU implements SSE, which it needs (the x86-64 baseline).
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(counts.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (instances, index);
}

/// Two distinct positions among `len` from 64 random bits: a uniform one, and one `1..len`
/// places after it (`None` when `len` is 1). Multiply-shift reductions (Lemire's "fast range")
/// and a conditional subtraction: no division.
#[inline]
fn pair(r: u64, len: u32) -> (u32, Option<u32>) {
    let first = ((u64::from(r as u32) * u64::from(len)) >> 32) as u32;
    let second = (len > 1).then(|| {
        let offset = 1 + ((u64::from((r >> 32) as u32) * u64::from(len - 1)) >> 32);
        // first < len and offset < len: the sum is below 2 * len, one subtraction wraps it
        // (in 64 bits, so that no length overflows it).
        let second = u64::from(first) + offset;
        let second = if second >= u64::from(len) {
            second - u64::from(len)
        } else {
            second
        };
        // Below `len`, itself a `u32`: the conversion never fails.
        u32::try_from(second).unwrap_or(0)
    });
    (first, second)
}

/// The pick while some instance is ejected or warming: up to [`PAIR_TRIES`] pairs until both
/// are admitted, each weighed by its slow-start share; one admitted instance is taken alone;
/// none, and the gate's own fallback decides.
#[cold]
fn gated<'t>(
    tables: &'t Tables,
    instances: &[Arc<Instance>],
    mut gate: Gate<'_>,
    len: u32,
    stamp: u64,
) -> Option<(u32, u64, &'t Arc<Health>)> {
    let mut admit = |index: u32| match gate.admit(index) {
        Admit::Yes(share) => Some((index, share)),
        Admit::No => None,
    };
    let mut chosen: Option<(u32, f64)> = None;
    for _ in 0..PAIR_TRIES {
        let (first, second) = pair(rng::next_random64(), len);
        let a = admit(*tables.up().get(first as usize)?);
        let b = match second {
            Some(second) => admit(*tables.up().get(second as usize)?),
            None => None,
        };
        match (a, b) {
            (Some(a), Some(b)) => return choose(tables, instances, a, b, stamp),
            (Some(one), None) | (None, Some(one)) => {
                if chosen.is_none() {
                    chosen = Some(one);
                }
                if len <= 2 {
                    break;
                }
            }
            (None, None) => {}
        }
    }
    match chosen {
        Some((one, _)) => single(tables, instances, one, stamp),
        None => {
            // Nothing admissible in a few draws: the gate's own fallback.
            let start = rng::next_random();
            let index = tables.choose(|attempt| tables.nth(start.wrapping_add(attempt)))?;
            let health = tables.health_or_new(index, instances)?;
            Some((index, stamp, health))
        }
    }
}

/// The only candidate: taken, its pick recorded.
#[inline]
fn single<'t>(
    tables: &'t Tables,
    instances: &[Arc<Instance>],
    index: u32,
    stamp: u64,
) -> Option<(u32, u64, &'t Arc<Health>)> {
    let health = tables.health_or_new(index, instances)?;
    health.mark_picked(stamp);
    Some((index, stamp, health))
}

/// The cheaper of `a` and `b` (each with its slow-start share), or the other when p2c has left
/// it alone for [`FORCE_PICK`].
// Always inlined: in the common case both shares are the constant 1.0 and fold away.
#[inline(always)]
fn choose<'t>(
    tables: &'t Tables,
    instances: &[Arc<Instance>],
    (a, share_a): (u32, f64),
    (b, share_b): (u32, f64),
    stamp: u64,
) -> Option<(u32, u64, &'t Arc<Health>)> {
    let (health_a, health_b) = (tables.health(a), tables.health(b));
    let ((winner, winner_health), (loser, loser_health)) =
        if no_costlier(cost(health_a, share_a), cost(health_b, share_b)) {
            ((a, health_a), (b, health_b))
        } else {
            ((b, health_b), (a, health_a))
        };
    // The loser is probed when p2c left it alone too long. One with no health yet was never
    // picked by p2c, but it also costs the least, so it wins its pairs instead.
    if let Some(loser_health) = loser_health {
        let last = loser_health.last_pick();
        let stale = stamp.saturating_sub(last) > FORCE_PICK.as_nanos() as u64;
        if stale && loser_health.take_forced_pick(last, stamp) {
            return Some((loser, stamp, loser_health));
        }
    }
    let health = match winner_health {
        Some(health) => health,
        None => tables.health_or_new(winner, instances)?,
    };
    health.mark_picked(stamp);
    Some((winner, stamp, health))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every draw gives two distinct positions below the length, for every length (the
    /// largest included, where a 32-bit sum would overflow), and every ordered pair of a small
    /// table comes up about equally often.
    #[test]
    fn a_pair_is_two_distinct_positions_drawn_evenly() {
        let mut r = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            r
        };
        for len in [1, 2, 3, 10, 1_000, u32::MAX / 2 + 7, u32::MAX] {
            for _ in 0..10_000 {
                let (first, second) = pair(next(), len);
                assert!(first < len, "len {len}: {first}");
                match second {
                    None => assert_eq!(len, 1),
                    Some(second) => {
                        assert!(second < len, "len {len}: {second}");
                        assert_ne!(first, second, "len {len}");
                    }
                }
            }
        }
        // Extremes of the random bits, at the largest length.
        for r in [0, u64::MAX, u64::from(u32::MAX), u64::MAX << 32] {
            let (first, second) = pair(r, u32::MAX);
            let second = second.expect("two positions");
            assert!(
                first < u32::MAX && second < u32::MAX && first != second,
                "{r:#x}"
            );
        }
        let len = 5;
        let draws = 200_000;
        let mut counts = [[0u32; 5]; 5];
        for _ in 0..draws {
            let (first, second) = pair(next(), len);
            counts[first as usize][second.expect("two") as usize] += 1;
        }
        let expected = f64::from(draws) / 20.0;
        for (first, row) in counts.iter().enumerate() {
            for (second, &count) in row.iter().enumerate() {
                if first == second {
                    assert_eq!(count, 0);
                } else {
                    let off = (f64::from(count) - expected).abs() / expected;
                    assert!(off < 0.05, "({first}, {second}): {count} vs {expected}");
                }
            }
        }
    }

    /// The squared, cross-multiplied comparison orders instances as the documented cost does.
    #[test]
    fn the_cheap_comparison_orders_as_the_documented_cost() {
        let documented = |latency: f64, in_flight: f64, success: f64, share: f64| {
            (latency + 1.0).sqrt() * (in_flight + 1.0) / (success * share)
        };
        let cases = [
            (0.0, 0.0, 1.0, 1.0),
            (1e6, 0.0, 1.0, 1.0),
            (1e3, 3.0, 1.0, 1.0),
            (1e6, 1.0, 0.5, 1.0),
            (4e6, 0.0, 1.0, 0.25),
            (25e4, 2.0, 0.9, 0.5),
        ];
        for a in cases {
            for b in cases {
                let cheap = no_costlier(
                    (
                        (a.0 + 1.0) * (a.1 + 1.0) * (a.1 + 1.0),
                        (a.2 * a.3) * (a.2 * a.3),
                    ),
                    (
                        (b.0 + 1.0) * (b.1 + 1.0) * (b.1 + 1.0),
                        (b.2 * b.3) * (b.2 * b.3),
                    ),
                );
                let exact = documented(a.0, a.1, a.2, a.3) <= documented(b.0, b.1, b.2, b.3);
                assert_eq!(cheap, exact, "{a:?} vs {b:?}");
            }
        }
    }
}
