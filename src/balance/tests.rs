//! Unit tests of the tables and the per-thread cursors.

use std::sync::Arc;
use std::time::Instant;

use super::clock;
use super::health::{Balancing, Health, OutlierEjection};
use super::pick::round_robin;
use super::rng::{next_position, next_random};
use super::table::Tables;
use crate::instance::{Instance, State};

/// The tables of `instances`, each with fresh health, default outlier ejection and no slow
/// start.
fn tables(instances: &[Arc<Instance>]) -> Tables {
    let balancing = Balancing::new("s".into(), OutlierEjection::default(), None);
    let now = Instant::now();
    let health = balancing.slots(&instances.iter().cloned().collect(), now, true);
    Tables::new(instances, health, balancing)
}

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

/// Ten instances up, and a balancing that may eject two of them at once (20 %).
fn two_slots_of_ten() -> (Vec<Arc<Instance>>, Arc<Balancing>) {
    let ejection = OutlierEjection::default().max_ejection_percent(20);
    let balancing = Balancing::new("s".into(), ejection, None);
    (instances(&[State::Up; 10]), balancing)
}

/// The tables of a snapshot of `inst` published now under `balancing`.
fn published(inst: &[Arc<Instance>], balancing: &Arc<Balancing>) -> Tables {
    let all: Arc<[Arc<Instance>]> = inst.iter().cloned().collect();
    Tables::new(
        inst,
        balancing.slots(&all, clock::now(), true),
        balancing.clone(),
    )
}

/// The tables of `n` instances under `slow_start`, the last one first seen now, after a first
/// list of the others: the others are adults, the last one warms up.
fn with_newcomer(n: usize, slow_start: super::slow_start::SlowStart) -> Tables {
    let balancing = Balancing::new("s".into(), OutlierEjection::default(), Some(slow_start));
    let inst = instances(&vec![State::Up; n]);
    let now = clock::now();
    let first: Arc<[Arc<Instance>]> = inst[..n - 1].iter().cloned().collect();
    let _ = balancing.slots(&first, now, true);
    let all: Arc<[Arc<Instance>]> = inst.iter().cloned().collect();
    Tables::new(&inst, balancing.slots(&all, now, false), balancing)
}

/// Five failures of instance `index` reported at `at` through `tables`, which make its health
/// if it has none: an ejection, if a slot is free.
fn fail_five(tables: &Tables, inst: &[Arc<Instance>], index: u32, at: Instant) -> Arc<Health> {
    let health = tables
        .health_or_new(index, inst)
        .expect("the instance exists")
        .clone();
    for _ in 0..5 {
        health.on_failure(at);
    }
    health
}

#[test]
fn fast_modulo_is_exact() {
    for len in [1usize, 2, 3, 7, 10, 1000, 65_537, 100_000] {
        let inst = instances(&vec![State::Up; len.min(2000)]);
        let table = tables(&inst);
        let len = table.up_len() as u32;
        for n in [0u32, 1, 2, 3, 999, 65_536, 1 << 31, u32::MAX - 1, u32::MAX] {
            assert_eq!(table.nth(n), Some(n % len), "n={n} len={len}");
        }
    }
}

#[test]
fn draining_never_in_table() {
    let inst = instances(&[State::Draining, State::Up, State::Draining, State::Up]);
    let table = tables(&inst);
    assert_eq!(table.up_len(), 2);
    let picked: Vec<_> = (0..8).map(|n| table.nth(n).unwrap()).collect();
    assert_eq!(picked, [1, 3, 1, 3, 1, 3, 1, 3]);
    assert_eq!(tables(&instances(&[State::Draining])).nth(0), None);
    assert_eq!(tables(&[]).nth(5), None);
}

#[test]
fn cursor_advances_by_one_per_pick() {
    let a = next_position(8);
    let b = next_position(8);
    assert_eq!(b, a.wrapping_add(1));
}

#[test]
fn each_owner_has_its_own_cursor() {
    let a = next_position(16);
    let x = next_position(24);
    assert_eq!(next_position(16), a.wrapping_add(1));
    assert_eq!(next_position(24), x.wrapping_add(1));
}

#[test]
fn threads_start_at_different_offsets() {
    let starts: std::collections::HashSet<u64> = (0..8)
        .map(|_| std::thread::spawn(|| next_position(8)).join().unwrap())
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

/// While one instance of ten is ejected, a pick reads the clock only when its candidate is that
/// one (to see whether its ejection has ended): the others cost what they cost with nothing
/// ejected.
#[test]
fn a_pick_reads_the_clock_only_when_it_meets_an_ejected_instance() {
    let inst = instances(&[State::Up; 10]);
    let table = tables(&inst);
    let now = clock::now();
    let ejected = fail_five(&table, &inst, 3, now);
    assert!(ejected.is_ejected(now), "five failures eject");
    // Positions are taken as `u32` (they wrap at 2^32, which would skew the count below): start
    // clear of the wrap.
    while next_position(table.cursor_owner()) as u32 > u32::MAX - 1_000 {}
    let start = next_position(table.cursor_owner());
    let before = clock::reads();
    for _ in 0..100 {
        assert_ne!(
            round_robin(&table),
            Some(3),
            "an ejected instance was picked"
        );
    }
    let reads = clock::reads() - before;
    // Each pick takes one position of the cursor, and one more when its candidate is the
    // ejected instance: the positions past 100 are the meetings (one in each round of 10).
    let meetings = next_position(table.cursor_owner()) - start - 1 - 100;
    assert!((10..=11).contains(&meetings), "{meetings} meetings");
    assert_eq!(reads, meetings, "clock reads in 100 picks");
}

/// An ejection that ended with no pick meeting it (nothing read the clock since) stops holding
/// its slot of the max ejected share when the next report comes: a failing instance is ejected
/// in its place.
#[test]
fn an_ejection_over_unnoticed_gives_its_slot_to_the_next_failing_instance() {
    let inst = instances(&[State::Up; 10]);
    let table = tables(&inst);
    let now = clock::now();
    let first = fail_five(&table, &inst, 3, now);
    assert!(first.maybe_ejected(), "five failures eject");
    // One of ten may be ejected at once (10 %, at least one): the second fails while the first
    // is ejected and stays in.
    let second = fail_five(&table, &inst, 5, now);
    assert!(
        !second.maybe_ejected(),
        "the max ejected share let a second in"
    );
    // Past the first one's 30 s, with no pick since: the second's next failure is ejected.
    let later = now + std::time::Duration::from_secs(31);
    second.on_failure(later);
    assert!(
        second.is_ejected(later),
        "the slot of an ejection over was not given back"
    );
    assert!(
        !first.maybe_ejected(),
        "the sweep did not end the first ejection"
    );
}

/// A pick through a snapshot older than the newest one sweeps every instance's ejection, not only
/// those whose health that snapshot shows: an instance that got its health after the older
/// snapshot was built keeps its place in the next sweep, and its slot comes back when its
/// ejection ends.
#[test]
fn a_sweep_through_an_older_snapshot_misses_no_ejection() {
    let (inst, balancing) = two_slots_of_ten();
    let older = published(&inst, &balancing);
    let newer = published(&inst, &balancing);
    let now = clock::now();
    let secs = |n: u64| now + std::time::Duration::from_secs(n);
    // The first instance gets its health through the older tables, the second through the
    // newer ones only (the older tables never see it).
    let first = fail_five(&older, &inst, 1, now);
    let second = fail_five(&newer, &inst, 2, secs(10));
    assert!(first.maybe_ejected() && second.maybe_ejected());
    // A pick through the older tables after the first ejection's end takes the sweep.
    let _ = older.gate_at(Some(secs(31)));
    assert!(!first.maybe_ejected(), "the sweep ended the first ejection");
    // Past the second ejection's end, two more fail: both fit in the two slots, unless the
    // second ejection, over, still holds one.
    let third = fail_five(&newer, &inst, 3, secs(41));
    let fourth = fail_five(&newer, &inst, 4, secs(41));
    assert!(third.is_ejected(secs(41)), "the third was refused a slot");
    assert!(
        fourth.is_ejected(secs(41)),
        "the fourth was refused the slot of an ejection over"
    );
}

/// While one instance of eleven warms up (slow start), a pick reads the clock only when its
/// candidate is that one: an instance present at the first list takes its full share at any
/// age, so its picks need no time.
#[test]
fn a_pick_reads_the_clock_only_when_it_meets_a_warming_instance() {
    let slow_start = super::slow_start::SlowStart::new(std::time::Duration::from_secs(60));
    let table = with_newcomer(11, slow_start);
    let young = table
        .health(10)
        .expect("slow start gives every instance health");
    assert!(
        young.born().is_some(),
        "instance 10 came after the first list"
    );
    while next_position(table.cursor_owner()) as u32 > u32::MAX - 1_000 {}
    let start = next_position(table.cursor_owner()) + 1;
    let before = clock::reads();
    for _ in 0..110 {
        assert!(round_robin(&table).is_some());
    }
    let reads = clock::reads() - before;
    let end = next_position(table.cursor_owner());
    // Positions `start..end` were taken by the picks (one more after each pick of the warming
    // instance that its share turned down); position `p` is instance `p % 11`.
    let meetings = (start..end).filter(|p| p % 11 == 10).count() as u64;
    assert!((10..=11).contains(&meetings), "{meetings} meetings");
    assert_eq!(reads, meetings, "clock reads in 110 picks");
}

/// A pick that finds a sweep due while the registry is locked (a publish or a report making
/// health) does not drop it: the next clock read, here a report's, sweeps.
#[test]
fn a_sweep_that_finds_the_registry_locked_is_left_to_the_next_clock_read() {
    let (inst, balancing) = two_slots_of_ten();
    let table = published(&inst, &balancing);
    let now = clock::now();
    let secs = |n: u64| now + std::time::Duration::from_secs(n);
    // The first ejection ends at 30 s, the second at 40 s.
    let first = fail_five(&table, &inst, 1, now);
    let second = fail_five(&table, &inst, 2, secs(10));
    {
        let _publishing = balancing.hold_registry();
        // A pick at 31 s finds the sweep due and the registry locked.
        let _ = table.gate_at(Some(secs(31)));
    }
    assert!(first.maybe_ejected(), "nothing has swept yet");
    // At 32 s a third fails five times: the first ejection is over, its slot is free.
    let third = fail_five(&table, &inst, 3, secs(32));
    assert!(second.is_ejected(secs(32)));
    assert!(
        third.is_ejected(secs(32)),
        "the sweep put off by the lock never came"
    );
    assert!(
        !first.maybe_ejected(),
        "the report's sweep ended the first ejection"
    );
}

/// Issue (review): a pick that took a due sweep and found the registry locked re-armed it at
/// its own time. The sweep timer, due `sweep_interval` after the end, then slept until that
/// long after the pick: up to twice the bound for a caller that goes idle. The pick now gives
/// back the due time it took, and the next clock read still sweeps.
#[test]
fn a_sweep_left_under_the_lock_keeps_the_timer_s_due_time() {
    let (inst, balancing) = two_slots_of_ten();
    let table = published(&inst, &balancing);
    let now = clock::now();
    let at = |ms: u64| now + std::time::Duration::from_millis(ms);
    // Ends at 30 s: the timer is due at 40 s.
    let first = fail_five(&table, &inst, 1, now);
    let due = balancing.timer_due();
    assert!(
        due.is_some_and(|due| due > at(39_000) && due <= at(40_000)),
        "{due:?}"
    );
    {
        let _publishing = balancing.hold_registry();
        // A pick at 39.9 s finds the sweep due and the registry locked.
        let _ = table.gate_at(Some(at(39_900)));
    }
    assert_eq!(balancing.timer_due(), due, "the timer's due time moved");
    assert!(first.maybe_ejected(), "nothing has swept yet");
    let _ = table.gate_at(Some(at(39_950)));
    assert!(!first.maybe_ejected(), "the next clock read did not sweep");
}

/// Issue (flaky `a_young_newcomer_is_never_picked`, 1 run in about 30): when no candidate a
/// picker offered passed the gate, the fallback chose among every instance not ejected, young
/// ones included, so a weighted random pick whose every draw met the young newcomer (one pick
/// in 65,000 with four instances) returned it, and a quarter of those picks kept it. The
/// fallback now takes an instance the gate admits, and one that is only not ejected when none
/// is.
#[test]
fn the_fallback_of_a_pick_takes_no_young_instance_while_another_is_admitted() {
    let slow_start = super::slow_start::SlowStart::new(std::time::Duration::from_secs(60))
        .young(std::time::Duration::from_secs(5));
    let table = with_newcomer(4, slow_start);
    // A picker whose every candidate is the young instance 3.
    let picks: Vec<_> = (0..200).map(|_| table.choose(|_| Some(3))).collect();
    let count = |n: u32| picks.iter().filter(|&&p| p == Some(n)).count();
    assert_eq!(count(3), 0, "the young one was picked");
    for adult in 0..3 {
        assert!(count(adult) > 0, "{adult} never picked");
    }
}
