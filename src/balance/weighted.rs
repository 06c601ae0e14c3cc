//! Weighted picks: smooth weighted round-robin and weighted random (alias method).
//!
//! Both tables are built once per snapshot, the first time a weighted pick needs them, and
//! only read after that.

/// The longest smooth weighted round-robin cycle kept. Weights whose sum is larger are scaled
/// down to fit (each keeps at least 1), so the cycle is exact only up to this sum.
pub(crate) const MAX_CYCLE: u64 = 1 << 16;

/// The most steps (instances x cycle length) nginx's algorithm may take to build a cycle: the
/// build runs on the first weighted pick after a publish, and pickers wait for it. About a
/// few milliseconds.
const NGINX_STEPS: u64 = 4_000_000;

/// One cycle of smooth weighted round-robin: each instance appears exactly `weight` times
/// (after scaling), spread out rather than in runs. Precomputed, so a pick is one position in
/// the cycle.
///
/// Up to 2,000 instances: nginx's algorithm (`ngx_http_upstream_get_peer`: each step every
/// instance gains its weight, the one with the most is chosen and loses the total), which costs
/// instances x cycle length, so the cycle is kept to `NGINX_STEPS / instances` turns. Past
/// 2,000 instances: earliest deadline first (the k-th turn of an instance of weight w is due at
/// k / w), also exact per cycle, in O(cycle log n), with the cycle up to [`MAX_CYCLE`].
pub(crate) fn smooth_cycle(entries: &[(u32, u32)]) -> Vec<u32> {
    let n = entries.len() as u64;
    let total: u64 = entries.iter().map(|&(_, w)| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    // nginx's algorithm while instances x cycle stays within budget, else earliest deadline
    // first, whose cost does not multiply by the instance count.
    let nginx = NGINX_STEPS / n.max(1) >= n;
    let cap = if nginx {
        MAX_CYCLE.min(NGINX_STEPS / n.max(1))
    } else {
        MAX_CYCLE.max(n)
    };
    let scaled: Vec<(u32, u64)> = entries
        .iter()
        .map(|&(index, weight)| {
            let weight = if total > cap {
                (u64::from(weight) * cap / total).max(1)
            } else {
                u64::from(weight)
            };
            (index, weight)
        })
        .collect();
    let sum: u64 = scaled.iter().map(|&(_, w)| w).sum();
    if !nginx {
        return earliest_deadline_first(&scaled, sum);
    }
    let sum = sum as i64;
    let mut current = vec![0i64; scaled.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(sum).unwrap_or(0));
    for _ in 0..sum {
        let mut best = 0;
        for (n, &(_, weight)) in scaled.iter().enumerate() {
            current[n] += weight as i64;
            if current[n] > current[best] {
                best = n;
            }
        }
        current[best] -= sum;
        cycle.push(scaled[best].0);
    }
    cycle
}

/// The cycle of `(index, weight)` entries by earliest deadline first: turn `k` of an entry of
/// weight `w` is due at `k / w` (compared exactly, as fractions), ties to the earlier entry.
fn earliest_deadline_first(entries: &[(u32, u64)], sum: u64) -> Vec<u32> {
    use std::cmp::{Ordering, Reverse};
    use std::collections::BinaryHeap;

    #[derive(PartialEq, Eq)]
    struct Due {
        turn: u64,
        weight: u64,
        entry: usize,
    }
    impl Ord for Due {
        fn cmp(&self, other: &Self) -> Ordering {
            (u128::from(self.turn) * u128::from(other.weight))
                .cmp(&(u128::from(other.turn) * u128::from(self.weight)))
                .then(self.entry.cmp(&other.entry))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }

    let mut due: BinaryHeap<Reverse<Due>> = entries
        .iter()
        .enumerate()
        .map(|(entry, &(_, weight))| {
            Reverse(Due {
                turn: 1,
                weight,
                entry,
            })
        })
        .collect();
    let mut cycle = Vec::with_capacity(usize::try_from(sum).unwrap_or(0));
    while let Some(Reverse(next)) = due.pop() {
        if let Some(&(index, weight)) = entries.get(next.entry) {
            cycle.push(index);
            if next.turn < weight {
                due.push(Reverse(Due {
                    turn: next.turn + 1,
                    ..next
                }));
            }
        }
    }
    cycle
}

/// Vose's alias method ("A linear algorithm for generating random numbers with a given
/// distribution", 1991): a weighted random pick in O(1), one column and one biased coin.
#[derive(Debug, Default)]
pub(crate) struct Alias {
    /// Per column: the instance index, its threshold out of 2^32, and the alias index.
    columns: Box<[(u32, u32, u32)]>,
}

impl Alias {
    /// The table for `(instance index, weight)` pairs; weight-0 entries are never picked.
    pub(crate) fn new(entries: &[(u32, u32)]) -> Self {
        let entries: Vec<(u32, u32)> = entries.iter().copied().filter(|&(_, w)| w > 0).collect();
        let n = entries.len();
        if n == 0 {
            return Self::default();
        }
        let total: f64 = entries.iter().map(|&(_, w)| f64::from(w)).sum();
        let mut scaled: Vec<f64> = entries
            .iter()
            .map(|&(_, w)| f64::from(w) * n as f64 / total)
            .collect();
        let mut columns: Vec<(u32, u32, u32)> =
            entries.iter().map(|&(i, _)| (i, u32::MAX, i)).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&k| scaled[k] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            let threshold = (scaled[s] * 4_294_967_296.0).min(u32::MAX as f64) as u32;
            columns[s] = (entries[s].0, threshold, entries[l].0);
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // What is left is 1.0 up to rounding: always the column's own instance.
        Self {
            columns: columns.into_boxed_slice(),
        }
    }

    /// The instance for 64 random bits: the high half picks the column, the low half tosses the
    /// coin.
    #[inline]
    pub(crate) fn pick(&self, random: u64) -> Option<u32> {
        let len = self.columns.len() as u64;
        if len == 0 {
            return None;
        }
        let column = ((u128::from(random >> 32) * u128::from(len)) >> 32) as usize;
        let (own, threshold, alias) = *self.columns.get(column)?;
        Some(if (random as u32) < threshold {
            own
        } else {
            alias
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_cycle_is_exact_and_spread() {
        let cycle = smooth_cycle(&[(0, 5), (1, 1), (2, 1)]);
        // nginx's documented sequence for weights 5, 1, 1.
        assert_eq!(cycle, [0, 0, 1, 0, 2, 0, 0]);
    }

    /// Past 2,000 instances the cycle is built by earliest deadline first, still exact per
    /// cycle, and fast (the nginx build would take instances x cycle steps).
    #[test]
    fn a_cycle_of_many_instances_is_built_by_deadline_and_exact() {
        let entries: Vec<(u32, u32)> = (0..5_000).map(|n| (n, 1 + n % 3)).collect();
        let cycle = smooth_cycle(&entries);
        let mut counts = vec![0u32; 5_000];
        for &n in &cycle {
            counts[n as usize] += 1;
        }
        for (n, &count) in counts.iter().enumerate() {
            assert_eq!(count, 1 + n as u32 % 3, "instance {n}");
        }
        let sum: u32 = entries.iter().map(|&(_, w)| w).sum();
        assert_eq!(cycle.len(), sum as usize);
        // Spread: no instance takes two turns in a row where others are due.
        assert!(cycle.windows(2).filter(|w| w[0] == w[1]).count() == 0);
    }

    #[test]
    fn smooth_cycle_scales_huge_weights() {
        let cycle = smooth_cycle(&[(0, u32::MAX), (1, u32::MAX), (2, 1)]);
        assert!(cycle.len() as u64 <= MAX_CYCLE + 3);
        assert!(cycle.contains(&2), "a tiny weight keeps at least one slot");
    }

    #[test]
    fn alias_follows_weights() {
        let alias = Alias::new(&[(7, 3), (8, 1), (9, 0)]);
        let mut counts = [0u32; 10];
        let mut x = 1u64;
        for _ in 0..100_000 {
            x = crate::balance::rng::splitmix64(x);
            counts[alias.pick(x).unwrap() as usize] += 1;
        }
        assert_eq!(counts[9], 0, "weight 0 is never picked");
        let share = f64::from(counts[7]) / 100_000.0;
        assert!((share - 0.75).abs() < 0.01, "{counts:?}");
    }
}
