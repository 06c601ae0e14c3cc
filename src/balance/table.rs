//! [`Tables`]: what every picker needs from one snapshot, built once when it is published.
//!
//! The list of instances up, and a precomputed divisor, are built with the snapshot; the
//! weighted cycle, the alias table and the Maglev table are built the first time a pick needs
//! them (a `OnceLock` each), so callers that never use a picker never pay for its table.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::hash::Maglev;
use super::health::{Balancing, Health, HealthSlot, Outliers, SweepDue};
use super::rng;
use super::weighted::{Alias, smooth_cycle};
use crate::instance::Instance;
use crate::snapshot::Snapshot;

/// Where a selection's tables read and make health: the snapshot the selection was made from
/// (the whole service), and the position there of each selected instance. So a selection and
/// its cache share each instance's health slot, whichever of them reports first.
#[derive(Debug)]
struct Selected {
    source: Arc<Snapshot>,
    at: Box<[u32]>,
    /// How many of the selection's instances up are ejected, counted at an
    /// [ejection epoch](Outliers::ejection_epoch): `epoch << 32 | count`. Counted again (O(n))
    /// by the panic checks that find the epoch moved, that is after any ejection, end or lift
    /// in the whole service: usually one pick per change, more when several threads find it
    /// at once (nothing marks one as counting) or when a pick's own sweep moves it. Picks that
    /// meet no ejected candidate never check. Starts at epoch 0, count 0: true while no
    /// instance was ever ejected. The epoch wraps at 2^32: a count kept across exactly 2^32 changes
    /// would pass for current, a number of ejections no service comes near.
    ejected: AtomicU64,
}

/// The pick tables of one snapshot; shared by the snapshots that differ only in freshness.
#[derive(Debug)]
pub(crate) struct Tables {
    /// Indexes (into the snapshot's instances) of the instances that are up, in key order.
    up: Box<[u32]>,
    /// `u64::MAX / up.len() + 1`: Lemire's constant for a division-free `n % up.len()`.
    magic: u64,
    /// The health of each instance, parallel to the snapshot's instances; empty until needed.
    health: Arc<[HealthSlot]>,
    pub(crate) balancing: Arc<Balancing>,
    /// The balancing's [`Outliers`], one pointer closer for the pick path.
    outliers: Arc<Outliers>,
    cycle: OnceLock<Cycle>,
    alias: OnceLock<Alias>,
    maglev: OnceLock<Maglev>,
    /// Until when some instance of this snapshot warms up (slow start); `None` when none does.
    warming_until: Option<Instant>,
    /// Set once a pick saw the clock past `warming_until`: no gate for slow start after that.
    warmed: AtomicBool,
    /// For a selection's tables: where health lives (see [`select_from`](Self::select_from)).
    selected: OnceLock<Selected>,
}

impl Tables {
    /// Tables for `instances` and their `health` slots (same length, same order).
    pub(crate) fn new(
        instances: &[Arc<Instance>],
        health: Arc<[HealthSlot]>,
        balancing: Arc<Balancing>,
    ) -> Self {
        let up: Box<[u32]> = instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.is_up())
            // A snapshot never holds more than u32::MAX instances: the backend's value size and
            // count limits keep it far below, and `try_from` drops any excess rather than wrapping.
            .filter_map(|(n, _)| u32::try_from(n).ok())
            .collect();
        let magic = lemire_magic(up.len());
        let warming_until = balancing.slow_start.and_then(|slow_start| {
            up.iter()
                .filter_map(|&n| health.get(n as usize)?.get()?.born())
                .max()
                .map(|born| warm_until(born, slow_start.window()))
        });
        Self {
            up,
            magic,
            health,
            outliers: balancing.outliers(),
            balancing,
            cycle: OnceLock::new(),
            alias: OnceLock::new(),
            maglev: OnceLock::new(),
            warming_until,
            warmed: AtomicBool::new(false),
            selected: OnceLock::new(),
        }
    }

    /// Makes these (a selection's) tables read and make health in `source`'s slots: `at[n]` is
    /// where instance `n` of the selection is in `source`. Without it, a selection made before
    /// an instance had health would never see the health its cache made later (and the other
    /// way round): an instance ejected through one would still be picked by the other.
    pub(crate) fn select_from(&self, source: Arc<Snapshot>, at: Box<[u32]>) {
        let _ = self.selected.set(Selected {
            source,
            at,
            ejected: AtomicU64::new(0),
        });
    }

    /// For a selection's tables: the snapshot they were selected from (see
    /// [`select_from`](Self::select_from)).
    pub(crate) fn selected_from(&self) -> Option<&Arc<Snapshot>> {
        self.selected.get().map(|selected| &selected.source)
    }

    /// This table's round-robin cursor owner (see [`rng::next_position`]): its address, which
    /// is even (the weighted cursor sets the low bit).
    #[inline]
    pub(crate) fn cursor_owner(&self) -> usize {
        std::ptr::from_ref(self) as usize & !1
    }

    /// `now` as a stamp of this snapshot's instance health: every health of a cache (and of
    /// its selections) has the cache's clock origin (see [`Health::stamp`]).
    #[inline]
    pub(crate) fn stamp(&self, now: Instant) -> u64 {
        self.outliers.stamp(now)
    }

    /// How many instances may be picked.
    #[inline]
    pub(crate) fn up_len(&self) -> usize {
        self.up.len()
    }

    /// Panic mode for these tables: fewer than the panic threshold of their instances up are
    /// healthy. A selection weighs its own instances, the service all of them, as Envoy weighs
    /// each host set, a subset's included (`LoadBalancerBase::isHostSetInPanic`).
    fn panicking(&self) -> bool {
        let ejected = match self.selected.get() {
            None => self.outliers.ejected(),
            Some(selected) => self.ejected_among(selected),
        };
        self.outliers.panicking(self.up.len(), ejected)
    }

    /// How many of a selection's instances up are ejected: the count kept in `selected` while
    /// no ejection changed since, else counted again (see [`Selected::ejected`]). Two threads
    /// counting at once both count, and the one with the older epoch may store last: the next
    /// check then counts again.
    fn ejected_among(&self, selected: &Selected) -> u32 {
        let epoch = self.outliers.ejection_epoch();
        let kept = selected.ejected.load(Ordering::Relaxed);
        if kept >> 32 == u64::from(epoch) {
            // The low half: the count.
            return kept as u32;
        }
        self.count_ejected(selected, epoch)
    }

    /// Counts a selection's ejected instances up and keeps the count for `epoch`, read before.
    #[cold]
    fn count_ejected(&self, selected: &Selected, epoch: u32) -> u32 {
        let count = self
            .up
            .iter()
            .filter(|&&n| self.health(n).is_some_and(|h| h.maybe_ejected()))
            .count();
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        selected
            .ejected
            .store(u64::from(epoch) << 32 | u64::from(count), Ordering::Relaxed);
        count
    }

    /// The indexes of the instances up.
    pub(crate) fn up(&self) -> &[u32] {
        &self.up
    }

    /// The health of instance `index`, if it has any yet.
    #[inline]
    pub(crate) fn health(&self, index: u32) -> Option<&Arc<Health>> {
        if let Some(selected) = self.selected.get() {
            let at = *selected.at.get(index as usize)?;
            return selected.source.tables().health(at);
        }
        self.health.get(index as usize)?.get()
    }

    /// The health of instance `index` of `instances`, made now if it has none yet.
    pub(crate) fn health_or_new(
        &self,
        index: u32,
        instances: &[Arc<Instance>],
    ) -> Option<&Arc<Health>> {
        if let Some(selected) = self.selected.get() {
            let at = *selected.at.get(index as usize)?;
            let source = &selected.source;
            return source.tables().health_or_new(at, source.instances());
        }
        let slot = self.health.get(index as usize)?;
        if let Some(health) = slot.get() {
            return Some(health);
        }
        let instance = instances.get(index as usize)?;
        // Not `get_or_init` around `health_of`: that fills the newest snapshot's slot itself,
        // which may be this very slot, and a `OnceLock` set from inside its own initializer
        // would wait for itself.
        let health = self.balancing.health_of(instance, super::clock::now());
        let _ = slot.set(health);
        slot.get()
    }

    pub(crate) fn slots(&self) -> &[HealthSlot] {
        &self.health
    }

    /// The instance index at position `n % len`, or `None` when nothing is up.
    #[inline]
    pub(crate) fn nth(&self, n: u32) -> Option<u32> {
        self.up
            .get(lemire_rem(self.magic, n, self.up.len())?)
            .copied()
    }

    /// One cycle of smooth weighted round-robin over the instances up.
    #[inline]
    pub(crate) fn cycle(&self, instances: &[Arc<Instance>]) -> &Cycle {
        match self.cycle.get() {
            Some(cycle) => cycle,
            None => self.build_cycle(instances),
        }
    }

    #[cold]
    #[inline(never)]
    fn build_cycle(&self, instances: &[Arc<Instance>]) -> &Cycle {
        self.cycle
            .get_or_init(|| Cycle::new(smooth_cycle(&self.weights(instances))))
    }

    /// The alias table of the instances up, by weight.
    #[inline]
    pub(crate) fn alias(&self, instances: &[Arc<Instance>]) -> &Alias {
        match self.alias.get() {
            Some(alias) => alias,
            None => self.build_alias(instances),
        }
    }

    #[cold]
    #[inline(never)]
    fn build_alias(&self, instances: &[Arc<Instance>]) -> &Alias {
        self.alias
            .get_or_init(|| Alias::new(&self.weights(instances)))
    }

    /// The Maglev table of the instances up.
    #[inline]
    pub(crate) fn maglev(&self, instances: &[Arc<Instance>]) -> &Maglev {
        match self.maglev.get() {
            Some(maglev) => maglev,
            None => self.build_maglev(instances),
        }
    }

    #[cold]
    #[inline(never)]
    fn build_maglev(&self, instances: &[Arc<Instance>]) -> &Maglev {
        self.maglev.get_or_init(|| {
            let entries: Vec<(u32, &str, u32)> = self
                .up
                .iter()
                .filter_map(|&n| {
                    let instance = instances.get(n as usize)?;
                    Some((n, instance.id(), instance.weight()))
                })
                .collect();
            Maglev::new(&entries)
        })
    }

    fn weights(&self, instances: &[Arc<Instance>]) -> Vec<(u32, u32)> {
        self.up
            .iter()
            .filter_map(|&n| Some((n, instances.get(n as usize)?.weight())))
            .collect()
    }

    /// Whether picks must look at health or age at all: only while some instance is ejected
    /// (and these tables are not in panic mode) or warming up. When not, a pick is the bare table
    /// read.
    #[inline]
    pub(crate) fn gate(&self) -> Option<Gate<'_>> {
        self.gate_at(None)
    }

    /// [`gate`](Self::gate) for a pick at `now` (read from the clock when needed, if `None`).
    ///
    /// Only a pick whose candidate shows an ejection or may be warming gets here (see
    /// [`choose`](Self::choose)); a p2c pick passes the time it read. Ejections that
    /// ended are swept out of the count (see
    /// [`Outliers::sweep_due`](super::health::Outliers::sweep_due)) whenever the clock is read:
    /// by [`Gate::admit`] for a candidate that shows an ejection, and here in panic mode, where
    /// the gate admits every candidate without looking at its ejection end and so would never
    /// notice that the ejections causing the panic are over.
    #[inline]
    pub(crate) fn gate_at(&self, now: Option<Instant>) -> Option<Gate<'_>> {
        let warm = self.warming_until.is_some() && !self.warmed.load(Ordering::Relaxed);
        let mut now = now;
        let mut eject = false;
        if self.outliers.any_ejected() {
            if let Some(at) = now {
                self.sweep_if_due(at);
            } else if self.panicking() {
                let at = *now.get_or_insert_with(super::clock::now);
                self.sweep_if_due(at);
            }
            eject = self.outliers.any_ejected() && !self.panicking();
        }
        (eject || warm).then_some(Gate {
            tables: self,
            eject,
            warm,
            now,
        })
    }

    /// The first candidate `candidate(0)` if the gate admits it, else the next ones the picker
    /// offers, else any instance up that is not ejected, else `candidate(0)` (better an ejected
    /// instance than none: panic).
    #[inline]
    pub(crate) fn choose(&self, candidate: impl Fn(u32) -> Option<u32>) -> Option<u32> {
        let first = candidate(0)?;
        if self.quiet() {
            return Some(first);
        }
        self.choose_slow(first, candidate)
    }

    /// Nothing ejected and nothing warming: a pick needs no gate at all. Two loads of lines no
    /// pick writes (the ejected count is written only by ejections and returns).
    #[inline]
    fn quiet(&self) -> bool {
        !self.outliers.any_ejected() && !self.warming()
    }

    /// Whether some instance may still be warming up: then a pick whose candidate was first seen
    /// after the first list goes through the gate (see [`plainly_admitted`](Self::plainly_admitted)).
    #[inline]
    fn warming(&self) -> bool {
        self.warming_until.is_some() && !self.warmed.load(Ordering::Relaxed)
    }

    /// Whether candidate `first` shows an ejection. One that shows none is picked whatever else
    /// is ejected (panic mode only ever lets ejected ones in), so while others are ejected this
    /// is all a consistent-hash pick of it reads beyond the ejected count (the hash ignores slow
    /// start): its health's ejection end, no clock.
    #[inline]
    fn shows_ejection(&self, first: u32) -> bool {
        self.health(first).is_some_and(|h| h.maybe_ejected())
    }

    /// Whether candidate `first` can be taken as it is, without the gate and its clock read: it
    /// shows no ejection (see [`shows_ejection`](Self::shows_ejection)), and nothing warms up
    /// or it was present at the first list (an adult takes its full share at any age).
    #[inline]
    fn plainly_admitted(&self, first: u32) -> bool {
        self.health(first)
            .is_none_or(|h| !h.maybe_ejected() && (h.born().is_none() || !self.warming()))
    }

    /// [`choose`](Self::choose) once something is ejected or warming: out of line, so that the
    /// quiet path stays the two loads of [`quiet`](Self::quiet).
    #[cold]
    fn choose_slow(&self, first: u32, candidate: impl Fn(u32) -> Option<u32>) -> Option<u32> {
        if self.plainly_admitted(first) {
            return Some(first);
        }
        match self.gate() {
            None => Some(first),
            Some(mut gate) => gate.choose(first, candidate),
        }
    }

    /// [`choose`](Self::choose) with ejection only: slow start does not apply.
    #[inline]
    pub(crate) fn choose_sticky(&self, candidate: impl Fn(u32) -> Option<u32>) -> Option<u32> {
        let first = candidate(0)?;
        if !self.outliers.any_ejected() {
            return Some(first);
        }
        self.choose_sticky_slow(first, candidate)
    }

    /// [`choose_sticky`](Self::choose_sticky) once something is ejected.
    #[cold]
    fn choose_sticky_slow(
        &self,
        first: u32,
        candidate: impl Fn(u32) -> Option<u32>,
    ) -> Option<u32> {
        if !self.shows_ejection(first) {
            return Some(first);
        }
        match self.gate().map(Gate::without_slow_start) {
            None => Some(first),
            Some(mut gate) if gate.eject => gate.choose(first, candidate),
            Some(_) => Some(first),
        }
    }
}

impl Tables {
    /// Lets every ejection that ended by `now` end (back on probation, slot released), and
    /// schedules the next sweep at the end of the first one still running.
    ///
    /// Over the cache's registry, which holds every instance's health (this snapshot's slots
    /// would miss health made after it was built), if its lock is free: a pick never waits for
    /// it. When a publish or a report holds it, the sweep taken is given back, due when it was:
    /// the next clock read takes it, and the sweep timer keeps its time.
    #[cold]
    #[inline(never)]
    fn sweep(&self, now: Instant, due: SweepDue) {
        if !self.balancing.try_sweep(now) {
            self.outliers.give_back(due);
        }
    }

    /// Sweeps (see [`sweep`](Self::sweep)) if an ejection may have ended by `now`: one thread
    /// per due time (see [`Outliers::sweep_due`](super::health::Outliers::sweep_due)).
    #[inline]
    fn sweep_if_due(&self, now: Instant) {
        if let Some(due) = self.outliers.sweep_due(now) {
            self.sweep(now, due);
        }
    }
}

/// `born + window`, or a century after `born` when the window is too long for an instant (a
/// valid setting: it must not panic), or `born` itself if even that is.
fn warm_until(born: Instant, window: std::time::Duration) -> Instant {
    const CENTURY: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);
    born.checked_add(window)
        .or_else(|| born.checked_add(CENTURY))
        .unwrap_or(born)
}

/// `u64::MAX / len + 1`: Lemire's constant for a division-free `n % len` (0 for an empty table).
fn lemire_magic(len: usize) -> u64 {
    match len {
        0 => 0,
        len => (u64::MAX / len as u64).wrapping_add(1),
    }
}

/// `n % len` with `magic` from [`lemire_magic`]; `None` when `len` is 0.
///
/// Lemire, Kaser, Kurz: "Faster Remainder by Direct Computation" (2019). Exact for every 32-bit
/// `n` and divisor; the result is `< len`.
#[inline]
fn lemire_rem(magic: u64, n: u32, len: usize) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let low = magic.wrapping_mul(u64::from(n));
    Some(((u128::from(low) * u128::from(len as u64)) >> 64) as usize)
}

/// One smooth weighted round-robin cycle, with its divisor precomputed.
#[derive(Debug)]
pub(crate) struct Cycle {
    slots: Box<[u32]>,
    magic: u64,
}

impl Cycle {
    fn new(slots: Vec<u32>) -> Self {
        Self {
            magic: lemire_magic(slots.len()),
            slots: slots.into_boxed_slice(),
        }
    }

    /// The instance at position `n % len` of the cycle, or `None` when it is empty.
    #[inline]
    pub(crate) fn nth(&self, n: u32) -> Option<u32> {
        self.slots
            .get(lemire_rem(self.magic, n, self.slots.len())?)
            .copied()
    }

    /// Whether the cycle is empty (no instance up).
    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// What an admission check found out about one candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Admit {
    /// Pick it; for a warming instance, the share of its weight it has now (else 1.0).
    Yes(f64),
    /// Ejected, or young: skip it.
    No,
}

/// The admission checks of one pick: ejection and slow start, with the clock read at most once.
pub(crate) struct Gate<'a> {
    tables: &'a Tables,
    eject: bool,
    warm: bool,
    now: Option<Instant>,
}

impl Gate<'_> {
    /// Leaves slow start out of this pick (the consistent hash: keys must not move).
    pub(crate) fn without_slow_start(mut self) -> Self {
        self.warm = false;
        self
    }

    /// The time of this pick: the clock is read at most once per pick, and the first read
    /// sweeps out ejections that ended, if one may have.
    pub(crate) fn now(&mut self) -> Instant {
        match self.now {
            Some(now) => now,
            None => {
                let now = super::clock::now();
                self.tables.sweep_if_due(now);
                *self.now.insert(now)
            }
        }
    }

    /// Whether `index` may be picked now, and at what share of its weight.
    pub(crate) fn admit(&mut self, index: u32) -> Admit {
        let Some(health) = self.tables.health(index) else {
            // No health yet: never reported, so neither ejected nor warming.
            return Admit::Yes(1.0);
        };
        if self.eject && health.maybe_ejected() {
            let now = self.now();
            if health.is_ejected(now) {
                return Admit::No;
            }
        }
        if self.warm {
            let now = self.now();
            if let Some(until) = self.tables.warming_until
                && now >= until
            {
                self.tables.warmed.store(true, Ordering::Relaxed);
                self.warm = false;
                return Admit::Yes(1.0);
            }
            if let (Some(age), Some(slow_start)) =
                (health.age(now), self.tables.balancing.slow_start)
            {
                return match slow_start.factor(age) {
                    None => Admit::No,
                    Some(factor) => Admit::Yes(factor),
                };
            }
        }
        Admit::Yes(1.0)
    }

    /// Admission with slow start applied as a coin: a warming instance is taken with the
    /// probability of its share, so over many picks it gets that share of its traffic.
    fn admit_coin(&mut self, index: u32) -> bool {
        match self.admit(index) {
            Admit::No => false,
            Admit::Yes(share) => share >= 1.0 || rng::next_unit() < share,
        }
    }

    fn choose(&mut self, first: u32, candidate: impl Fn(u32) -> Option<u32>) -> Option<u32> {
        if self.admit_coin(first) {
            return Some(first);
        }
        // Each instance up once, plus a few more draws for random pickers.
        let tries = u32::try_from(self.tables.up.len())
            .unwrap_or(u32::MAX)
            .saturating_add(4);
        for attempt in 1..tries {
            let next = candidate(attempt)?;
            if self.admit_coin(next) {
                return Some(next);
            }
        }
        // Nothing passed the coin: an instance the gate admits (a warming one at any share),
        // else one that is not ejected (a young one: better than none), chosen uniformly among
        // them, so that this rare path spreads its picks instead of sending them to the first
        // instance in key order (or to the one after an ejected one); else the first candidate.
        // O(n), off the common path.
        let fallback = self
            .uniformly(|gate, n| gate.admit(n) != Admit::No)
            .or_else(|| self.uniformly(|gate, n| !gate.ejected(n)));
        Some(fallback.unwrap_or(first))
    }

    /// Whether `index` is ejected at this pick (never, when ejection does not apply to it).
    fn ejected(&mut self, index: u32) -> bool {
        self.eject
            && self
                .tables
                .health(index)
                .is_some_and(|h| h.maybe_ejected() && h.is_ejected(self.now()))
    }

    /// An instance up for which `eligible` holds, chosen uniformly among them; `None` if none.
    /// Two passes over the instances up (count, then take), so nothing is allocated.
    fn uniformly(&mut self, mut eligible: impl FnMut(&mut Self, u32) -> bool) -> Option<u32> {
        let tables = self.tables;
        let allowed = tables.up.iter().filter(|&&n| eligible(self, n)).count();
        if allowed == 0 {
            return None;
        }
        let nth = rng::next_random() as usize % allowed;
        tables
            .up
            .iter()
            .copied()
            .filter(|&n| eligible(self, n))
            .nth(nth)
    }
}
