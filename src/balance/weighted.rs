//! Weighted picks: smooth weighted round-robin and weighted random (alias method).
//!
//! Both tables are built once per snapshot, the first time a weighted pick needs them, and
//! only read after that.

/// The longest smooth weighted round-robin cycle kept. Weights whose sum is larger are scaled
/// down to fit (each keeps at least 1), so the cycle is exact only up to this sum.
pub(crate) const MAX_CYCLE: u64 = 1 << 16;

/// One cycle of smooth weighted round-robin (nginx's `ngx_http_upstream_get_peer`): each step,
/// every instance gains its weight, the one with the most is chosen and loses the total. Over a
/// cycle of `sum(weights)` steps each instance is chosen exactly `weight` times, spread out
/// rather than in runs. Precomputed, so a pick is one position in the cycle.
pub(crate) fn smooth_cycle(entries: &[(u32, u32)]) -> Vec<u32> {
    let total: u64 = entries.iter().map(|&(_, w)| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    let scaled: Vec<(u32, i64)> = entries
        .iter()
        .map(|&(index, weight)| {
            let weight = if total > MAX_CYCLE {
                (u64::from(weight) * MAX_CYCLE / total).max(1)
            } else {
                u64::from(weight)
            };
            (index, weight as i64)
        })
        .collect();
    let sum: i64 = scaled.iter().map(|&(_, w)| w).sum();
    let mut current = vec![0i64; scaled.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(sum).unwrap_or(0));
    for _ in 0..sum {
        let mut best = 0;
        for (n, &(_, weight)) in scaled.iter().enumerate() {
            current[n] += weight;
            if current[n] > current[best] {
                best = n;
            }
        }
        current[best] -= sum;
        cycle.push(scaled[best].0);
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
