//! Weighted pickers: smooth weighted round-robin is exact per cycle and spread; weighted random
//! follows the weights; draining instances are never picked; per-thread cursors are per cache.

use etcd_registry::{Selector, State};

use super::*;

/// The ids of `n` consecutive picks of `pick`.
fn sequence(n: usize, mut pick: impl FnMut() -> Option<String>) -> Vec<String> {
    (0..n).map(|_| pick().expect("an instance is up")).collect()
}

/// Asserts every window of `cycle` consecutive picks holds each id exactly `weights[id]` times.
#[track_caller]
fn exact_per_cycle(picks: &[String], weights: &[(&str, usize)]) {
    let cycle: usize = weights.iter().map(|w| w.1).sum();
    for (start, window) in picks.windows(cycle).enumerate() {
        for &(id, weight) in weights {
            let got = window.iter().filter(|p| *p == id).count();
            assert_eq!(
                got, weight,
                "{id} picked {got} times in the {cycle} picks from {start}, not {weight}: {picks:?}"
            );
        }
    }
}

/// Smooth WRR 5:1:1 is exact in every 7 picks and follows nginx's spread order.
#[tokio::test(start_paused = true)]
async fn smooth_weighted_round_robin_is_exact_per_cycle_and_spread() {
    // Smooth WRR with weights 5:1:1 picks each instance exactly `weight` times in every 7 picks on
    // one thread, in nginx's documented spread order (a a b a c a a, from some rotation).
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a").weight(5));
    put(&etcd, spec("b"));
    put(&etcd, spec("c"));
    let users = users(discovery(&etcd)).await;

    let picks = sequence(70, || users.pick_weighted().map(|p| p.id().to_owned()));
    exact_per_cycle(&picks, &[("a", 5), ("b", 1), ("c", 1)]);

    // nginx, ngx_http_upstream_round_robin.c: "a a b a c a a" for weights 5, 1, 1.
    let nginx = ["a", "a", "b", "a", "c", "a", "a"];
    let rotation = (0..7).find(|&r| (0..7).all(|k| picks[k] == nginx[(r + k) % 7]));
    assert!(
        rotation.is_some(),
        "not a rotation of nginx's sequence: {:?}",
        &picks[..7]
    );
}

/// Round-robin and smooth WRR picks mixed on one thread each stay exact.
#[tokio::test(start_paused = true)]
async fn round_robin_and_weighted_cursors_do_not_disturb_each_other() {
    // Mixing round-robin and smooth WRR picks on one thread keeps each exact: their cursors are
    // apart.
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a").weight(3));
    put(&etcd, spec("b"));
    let users = users(discovery(&etcd)).await;

    let mut weighted = Vec::new();
    let mut plain = Vec::new();
    for _ in 0..40 {
        weighted.push(users.pick_weighted().expect("up").id().to_owned());
        plain.push(users.pick().expect("up").id().to_owned());
    }
    exact_per_cycle(&weighted, &[("a", 3), ("b", 1)]);
    exact_per_cycle(&plain, &[("a", 1), ("b", 1)]);
}

/// A thread alternating between caches (or a cache and a selection) gets exact cycles.
#[tokio::test(start_paused = true)]
async fn cursors_are_per_cache_when_a_thread_alternates_caches() {
    // A thread that picks from two caches in turn gets exact cycles from each (each cache keeps its
    // own per-thread cursor): with one shared cursor, a 2-instance cache picked every other time
    // would always get the same instance.
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a").weight(5));
    put(&etcd, spec("b"));
    put(&etcd, spec_in("order", "x"));
    put(&etcd, spec_in("order", "y"));
    let discovery = discovery(&etcd).build().expect("valid");
    let users = discovery.service(SVC).await.expect("listed");
    let orders = discovery.service("order").await.expect("listed");

    let (mut u, mut o) = (Vec::new(), Vec::new());
    for _ in 0..60 {
        u.push(users.pick_weighted().expect("up").id().to_owned());
        o.push(orders.pick_weighted().expect("up").id().to_owned());
    }
    exact_per_cycle(&u, &[("a", 5), ("b", 1)]);
    exact_per_cycle(&o, &[("x", 1), ("y", 1)]);

    let (mut u, mut o) = (Vec::new(), Vec::new());
    for _ in 0..60 {
        u.push(users.pick().expect("up").id().to_owned());
        o.push(orders.pick().expect("up").id().to_owned());
    }
    exact_per_cycle(&u, &[("a", 1), ("b", 1)]);
    exact_per_cycle(&o, &[("x", 1), ("y", 1)]);

    // A cache and a selection of it, in turn: each exact too.
    let all = users.select(Selector::new());
    let (mut u, mut s) = (Vec::new(), Vec::new());
    for _ in 0..60 {
        u.push(users.pick_weighted().expect("up").id().to_owned());
        s.push(all.pick_weighted().expect("up").id().to_owned());
    }
    exact_per_cycle(&u, &[("a", 5), ("b", 1)]);
    exact_per_cycle(&s, &[("a", 5), ("b", 1)]);
}

/// Weighted random gives each instance its weight's share within 1 point over 100k picks.
#[tokio::test(start_paused = true)]
async fn weighted_random_shares_follow_the_weights() {
    // Weighted random gives each instance its weight's share, within 1 percentage point, over
    // 100,000 picks.
    let etcd = MemoryBackend::new();
    let weights = [("a", 5u32), ("b", 3), ("c", 1), ("d", 1)];
    for (id, w) in weights {
        put(&etcd, spec(id).weight(w));
    }
    let users = users(discovery(&etcd)).await;

    let counts = tally(100_000, || {
        users.pick_weighted_random().map(|p| p.id().to_owned())
    });
    let total: u32 = weights.iter().map(|w| w.1).sum();
    for (id, w) in weights {
        let want = f64::from(w) / f64::from(total);
        let got = share(&counts, id);
        println!("weighted random: {id} weight {w}: share {got:.4} (want {want:.4})");
        assert!(
            (got - want).abs() < 0.01,
            "{id}: {got} vs {want}: {counts:?}"
        );
    }
}

/// A draining instance (here the heaviest) is never picked, by any picker.
#[tokio::test(start_paused = true)]
async fn draining_is_never_picked_by_any_picker() {
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a"));
    put(&etcd, spec("b").weight(10).state(State::Draining));
    put(&etcd, spec("c").weight(2));
    let users = users(discovery(&etcd)).await;

    let id = |p: Option<etcd_registry::Picked>| p.map(|p| p.id().to_owned());
    type Pick<'a> = &'a dyn Fn(usize) -> Option<String>;
    let pickers: [(&str, Pick); 6] = [
        ("pick", &|_| id(users.pick())),
        ("pick_random", &|_| id(users.pick_random())),
        ("pick_weighted", &|_| id(users.pick_weighted())),
        (
            "pick_weighted_random",
            &|_| id(users.pick_weighted_random()),
        ),
        ("pick_by", &|n| id(users.pick_by(format!("key-{n}")))),
        ("pick_p2c", &|_| users.pick_p2c().map(|c| c.id().to_owned())),
    ];
    for (name, pick) in pickers {
        let mut n = 0;
        let counts = tally(10_000, || {
            n += 1;
            pick(n)
        });
        assert!(
            !counts.contains_key("b"),
            "{name} picked draining b: {counts:?}"
        );
        assert!(
            !counts.contains_key("-"),
            "{name} found nothing: {counts:?}"
        );
        assert!(
            counts.contains_key("a") && counts.contains_key("c"),
            "{name}: {counts:?}"
        );
    }
}

/// Weights hold inside a selection, for smooth WRR and weighted random.
#[tokio::test(start_paused = true)]
async fn weight_is_honoured_in_a_selection() {
    // Weights hold inside a selection too: exact per cycle for smooth WRR, within 1 point for
    // weighted random; the heavy instance outside the selection is never picked.
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a").weight(3).tag("canary"));
    put(&etcd, spec("b").tag("canary"));
    put(&etcd, spec("c").weight(50).tag("stable"));
    let users = users(discovery(&etcd)).await;
    let canaries = users.select(Selector::new().tag("canary"));

    let picks = sequence(40, || canaries.pick_weighted().map(|p| p.id().to_owned()));
    exact_per_cycle(&picks, &[("a", 3), ("b", 1)]);

    let counts = tally(100_000, || {
        canaries.pick_weighted_random().map(|p| p.id().to_owned())
    });
    println!("selection weighted random: {counts:?}");
    assert!((share(&counts, "a") - 0.75).abs() < 0.01, "{counts:?}");
    assert!(!counts.contains_key("c"), "{counts:?}");
}
