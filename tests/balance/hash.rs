//! Consistent hash (`pick_by`): the hash contract pinned by golden values, minimal disruption,
//! even load, and keys that move only while their instance is ejected or draining.
//!
//! The golden values were computed once by an implementation written apart from the crate's:
//! Python over the system's libxxhash (`XXH3_64bits_withSeed`), following the contract in the
//! docs of `etcd_registry::balance::hash` (table size, seeds, permutations, weighted turns in key
//! order, Lemire reduction, rehash seeds for next choices). A change of hash, seeds or table
//! breaks them.

use etcd_registry::State;
use etcd_registry::balance::hash::key_hash;

use super::*;

/// The instance each key maps to now.
fn map(users: &ServiceCache, keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| users.pick_by(k).expect("an instance is up").id().to_owned())
        .collect()
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|k| format!("key-{k}")).collect()
}

/// A cache of plain instances `ids`.
async fn cache_of(etcd: &MemoryBackend, ids: &[String]) -> ServiceCache {
    for id in ids {
        put(etcd, spec(id));
    }
    users(discovery(etcd)).await
}

#[track_caller]
fn assert_golden(users: &ServiceCache, golden: &[(&str, &str)]) {
    for &(key, want) in golden {
        let got = users.pick_by(key).expect("up");
        assert_eq!(got.id(), want, "key {key:?}");
    }
}

/// `key_hash` is XXH3-64 with seed 0: values from libxxhash.
#[test]
fn key_hash_is_xxh3_64_seed_0() {
    assert_eq!(key_hash(b""), 3_244_421_341_483_603_138);
    assert_eq!(key_hash(b"user-42"), 5_836_184_775_705_692_621);
    assert_eq!(key_hash(b"session:abc"), 55_939_712_084_599_036);
    assert_eq!(key_hash(b"tenant/7"), 5_916_783_301_657_132_952);
}

/// Ten equal instances (table of 1031 slots): each key maps to its golden instance.
#[tokio::test(start_paused = true)]
async fn golden_mapping_of_ten_instances() {
    let etcd = MemoryBackend::new();
    let users = cache_of(&etcd, &names("node", 10)).await;
    assert_golden(
        &users,
        &[
            ("user-42", "node-07"),
            ("session:abc", "node-09"),
            ("", "node-01"),
            ("tenant/7", "node-07"),
            ("order-1001", "node-05"),
            ("zz", "node-08"),
            ("k0", "node-07"),
            ("k1", "node-08"),
            ("k2", "node-08"),
            ("k3", "node-00"),
            ("k4", "node-04"),
            ("k5", "node-00"),
        ],
    );
}

/// Seventeen instances (the table grows to 2053 slots): golden instances again.
#[tokio::test(start_paused = true)]
async fn golden_mapping_of_seventeen_instances() {
    let etcd = MemoryBackend::new();
    let users = cache_of(&etcd, &names("node", 17)).await;
    assert_golden(
        &users,
        &[
            ("user-42", "node-03"),
            ("session:abc", "node-09"),
            ("", "node-08"),
            ("tenant/7", "node-07"),
            ("order-1001", "node-13"),
            ("zz", "node-15"),
            ("k0", "node-11"),
            ("k1", "node-09"),
            ("k2", "node-01"),
            ("k3", "node-11"),
            ("k4", "node-04"),
            ("k5", "node-07"),
        ],
    );
}

/// Weighted instances (1, 3, 1, 2): golden instances of the weighted turns.
#[tokio::test(start_paused = true)]
async fn golden_mapping_of_weighted_instances() {
    let etcd = MemoryBackend::new();
    for (id, w) in [("alpha", 1), ("bravo", 3), ("charlie", 1), ("delta", 2)] {
        put(&etcd, spec(id).weight(w));
    }
    let users = users(discovery(&etcd)).await;
    assert_golden(
        &users,
        &[
            ("user-42", "bravo"),
            ("session:abc", "alpha"),
            ("", "bravo"),
            ("tenant/7", "bravo"),
            ("order-1001", "alpha"),
            ("zz", "delta"),
            ("k0", "alpha"),
            ("k1", "bravo"),
            ("k2", "alpha"),
            ("k3", "bravo"),
            ("k4", "bravo"),
            ("k5", "delta"),
        ],
    );
}

/// An ejected instance's keys go to their golden next choices; other keys stay.
#[tokio::test(start_paused = true)]
async fn golden_next_choices_of_an_ejected_instance() {
    // With node-07 ejected, its keys go to their golden next choice (rehash with seed 1, 2, ...);
    // other keys stay.
    let etcd = MemoryBackend::new();
    let users = cache_of(&etcd, &names("node", 10)).await;
    fail(&users, "node-07", 5);
    assert_eq!(ejected(&users), ["node-07"]);
    assert_golden(
        &users,
        &[
            ("user-42", "node-05"),
            ("tenant/7", "node-04"),
            ("k0", "node-04"),
            ("k3", "node-00"),
            ("session:abc", "node-09"),
        ],
    );
}

/// Adds one instance (`new`) to `n`, and maps 100,000 keys before and after: the fraction of
/// keys that moved, and the fraction that moved to the new instance. Prints both.
async fn disruption(n: usize, new: &str) -> (f64, f64) {
    let keys = keys(100_000);
    let etcd = MemoryBackend::new();
    let ids = names("node", n);
    let users = cache_of(&etcd, &ids).await;
    let before = map(&users, &keys);
    put(&etcd, spec(new));
    let mut all: Vec<&str> = ids.iter().map(String::as_str).collect();
    all.push(new);
    until_ids(&users, &all).await;
    let after = map(&users, &keys);

    let total = keys.len() as f64;
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / total;
    let to_new = after.iter().filter(|a| *a == new).count() as f64 / total;
    let ideal = 1.0 / (n as f64 + 1.0);
    println!(
        "N={n}, adding {new}: {moved:.4} of the keys moved ({:.2} x 1/(N+1)): \
         {to_new:.4} to it, {:.4} between the others",
        moved / ideal,
        moved - to_new
    );
    (moved, to_new)
}

/// Adding one instance to N moves about 1/(N+1) of the keys to it, and few others.
#[tokio::test(start_paused = true)]
async fn adding_one_instance_moves_about_one_key_in_n_plus_one() {
    // Adding one instance to 10 moves about 1/11 of 100,000 keys: at most 1.5/11 in all, and the
    // new instance gets 1/11 of them within 20 % (Maglev also moves a few between the others). To
    // 100, the new instance gets 1/101 within 20 % too. The new instance sorts first or last in
    // key order: it takes the first or the last turn in the table fill.
    for n in [10usize, 100] {
        for new in ["aaa-new", "zzz-new"] {
            let (moved, to_new) = disruption(n, new).await;
            let ideal = 1.0 / (n as f64 + 1.0);
            assert!(
                (to_new / ideal - 1.0).abs() <= 0.2,
                "N={n} {new}: {to_new} to it"
            );
            if n == 10 {
                assert!(moved <= 1.5 * ideal, "N={n} {new}: moved {moved}");
            }
        }
    }
}

/// Adding one instance to 100 moves about 3/101 of the keys: Maglev's known cost over the
/// minimal 1/101, bounded here so that a change of table or hash cannot make it worse.
///
/// Measured 2.83-3.08 x 1/(N+1) (about 1/101 to the new instance, 2 % between the old ones);
/// an independent Maglev gives the same. Maglev trades this for a near-perfect balance from a
/// table of 64 slots per instance; 512 per instance would still give 1.56x (README, "Balancing").
#[tokio::test(start_paused = true)]
async fn adding_one_instance_to_a_hundred_moves_about_three_in_n_plus_one() {
    for new in ["aaa-new", "zzz-new"] {
        let (moved, _) = disruption(100, new).await;
        println!(
            "N=100, adding {new}: moved {moved:.4} = {:.2}/(N+1)",
            moved * 101.0
        );
        assert!(
            moved >= 1.0 / 101.0 * 0.8,
            "{new}: moved only {moved}: is it moving keys at all?"
        );
        assert!(moved <= 3.5 / 101.0, "{new}: moved {moved}");
    }
}

/// Over 100,000 keys, every one of N instances (10 and 100) gets within 10% of the mean.
#[tokio::test(start_paused = true)]
async fn load_is_within_ten_percent_of_the_mean() {
    let keys = keys(100_000);
    for n in [10usize, 100] {
        let etcd = MemoryBackend::new();
        let users = cache_of(&etcd, &names("node", n)).await;
        let mut counts = BTreeMap::<String, usize>::new();
        for id in map(&users, &keys) {
            *counts.entry(id).or_default() += 1;
        }
        assert_eq!(counts.len(), n, "every instance gets keys");
        let mean = keys.len() as f64 / n as f64;
        let worst = counts
            .values()
            .map(|&c| (c as f64 - mean).abs() / mean)
            .fold(0.0, f64::max);
        let (min, max) = (counts.values().min(), counts.values().max());
        println!("N={n}: keys per instance {min:?}..{max:?}, mean {mean}, worst {worst:.4}");
        assert!(worst <= 0.10, "N={n}: worst deviation {worst}");
    }
}

/// While an instance is ejected only its keys move, to stable next choices, and come back.
#[tokio::test(start_paused = true)]
async fn ejected_instance_keys_move_to_next_choices_and_come_back() {
    // While an instance is ejected only its keys move, each to a next choice that stays the same
    // for the key, spread over the others; when it comes back (probation) they all return.
    let keys = keys(20_000);
    let etcd = MemoryBackend::new();
    let users = cache_of(&etcd, &names("node", 10)).await;
    let before = map(&users, &keys);

    fail(&users, "node-03", 5);
    assert_eq!(ejected(&users), ["node-03"]);
    let during = map(&users, &keys);
    assert_eq!(map(&users, &keys), during, "next choices are stable");
    let mut targets = BTreeMap::<&str, usize>::new();
    for (b, d) in before.iter().zip(&during) {
        if b == "node-03" {
            assert_ne!(d, "node-03");
            *targets.entry(d.as_str()).or_default() += 1;
        } else {
            assert_eq!(b, d, "a key of another instance moved");
        }
    }
    println!("node-03's keys went to {targets:?}");
    assert_eq!(targets.len(), 9, "spread over all the others");

    advance(secs(30)).await;
    assert_eq!(map(&users, &keys), before, "back after the ejection");
    assert!(health_of(&users, "node-03").on_probation);
}

/// A draining instance's keys go elsewhere, few others move, and all come back after.
#[tokio::test(start_paused = true)]
async fn draining_instance_keys_move_and_come_back() {
    // A draining instance's keys all go elsewhere, and few others move with them (Maglev is not
    // minimal: at most 1.5/N of the keys move in all; the figure is printed); when it is up again
    // the mapping is exactly the original one.
    let keys = keys(100_000);
    let etcd = MemoryBackend::new();
    let ids = names("node", 10);
    let users = cache_of(&etcd, &ids).await;
    let before = map(&users, &keys);

    put(&etcd, spec("node-04").state(State::Draining));
    wait_for(&users, secs(30), "node-04 draining", |s| {
        s.get("node-04").is_some_and(|i| !i.is_up())
    })
    .await;
    let during = map(&users, &keys);
    let (mut own, mut others) = (0, 0);
    for (b, d) in before.iter().zip(&during) {
        assert_ne!(d, "node-04", "a draining instance got a key");
        if b == "node-04" {
            own += 1;
        } else if b != d {
            others += 1;
        }
    }
    let total = keys.len() as f64;
    println!(
        "draining one of 10: its {:.4} of the keys moved, and {:.4} of the others'",
        own as f64 / total,
        others as f64 / total
    );
    assert!(
        (own + others) as f64 <= 1.5 * total / 10.0,
        "{own} + {others} moved"
    );

    put(&etcd, spec("node-04"));
    wait_for(&users, secs(30), "node-04 up", |s| {
        s.get("node-04").is_some_and(|i| i.is_up())
    })
    .await;
    assert_eq!(map(&users, &keys), before, "back as before");
}
