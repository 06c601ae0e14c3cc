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
use super::table::{Admit, Tables};
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

/// The p2c pick among the instances up, at `now`; `None` when none is up. The chosen instance
/// has health afterwards (its pick time is recorded there). Returns its index and `now` as a
/// stamp of its health ([`Health::stamp`]), converted once here for the caller's [`Call`].
///
/// [`Call`]: super::Call
pub(crate) fn pick(
    tables: &Tables,
    instances: &[Arc<Instance>],
    now: Instant,
) -> Option<(u32, u64)> {
    let len = tables.up_len();
    if len == 0 {
        return None;
    }
    let mut gate = tables.gate_at(Some(now));
    let mut admit = |index: u32| match gate.as_mut() {
        None => Admit::Yes(1.0),
        Some(gate) => gate.admit(index),
    };
    let mut chosen: Option<(u32, f64)> = None;
    let mut other: Option<(u32, f64)> = None;
    let len32 = u32::try_from(len).unwrap_or(u32::MAX);
    for _ in 0..PAIR_TRIES {
        let r = rng::next_random64();
        // Two distinct positions: a uniform one, and one 1..len places after it.
        let at = ((u64::from(r as u32) * u64::from(len32)) >> 32) as u32;
        let first = *tables.up().get(at as usize)?;
        let second = (len32 > 1).then(|| {
            let offset = 1 + ((u64::from((r >> 32) as u32) * u64::from(len32 - 1)) >> 32) as u32;
            let second = (u64::from(at) + u64::from(offset)) % u64::from(len32);
            tables.up().get(second as usize).copied()
        });
        let second = second.flatten();
        let a = match admit(first) {
            Admit::Yes(share) => Some((first, share)),
            Admit::No => None,
        };
        let b = second.and_then(|n| match admit(n) {
            Admit::Yes(share) => Some((n, share)),
            Admit::No => None,
        });
        match (a, b) {
            (Some(a), Some(b)) => {
                chosen = Some(a);
                other = Some(b);
                break;
            }
            (Some(one), None) | (None, Some(one)) => {
                if chosen.is_none() {
                    chosen = Some(one);
                }
                if len32 <= 2 {
                    break;
                }
            }
            (None, None) => {}
        }
    }
    let Some((a, share_a)) = chosen else {
        // Nothing admissible in a few draws: the gate's own fallback.
        let start = rng::next_random();
        let index = tables.choose(|attempt| tables.nth(start.wrapping_add(attempt)))?;
        let stamp = tables.health_or_new(index, instances)?.stamp(now);
        return Some((index, stamp));
    };
    let Some((b, share_b)) = other else {
        let health = tables.health_or_new(a, instances)?;
        let stamp = health.stamp(now);
        health.mark_picked(stamp);
        return Some((a, stamp));
    };
    let (winner, loser) = if no_costlier(
        cost(tables.health(a), share_a),
        cost(tables.health(b), share_b),
    ) {
        (a, b)
    } else {
        (b, a)
    };
    // The loser is probed when p2c left it alone too long. One with no health yet was never
    // picked by p2c, but it also costs the least, so it wins its pairs instead.
    // Every health of one tables has the same clock origin: one conversion serves both.
    let mut stamp = None;
    if let Some(health) = tables.health(loser) {
        let at = health.stamp(now);
        stamp = Some(at);
        let last = health.last_pick();
        let stale = at.saturating_sub(last) > FORCE_PICK.as_nanos() as u64;
        if stale && health.take_forced_pick(last, at) {
            return Some((loser, at));
        }
    }
    let health = tables.health_or_new(winner, instances)?;
    let stamp = stamp.unwrap_or_else(|| health.stamp(now));
    health.mark_picked(stamp);
    Some((winner, stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

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
