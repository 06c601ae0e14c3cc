//! Slow start: an instance first seen after the first list ramps in along Envoy's formula;
//! instances of the first list do not; the consistent hash ignores it.

use etcd_registry::SlowStart;

use super::*;

const WINDOW: Duration = Duration::from_secs(60);

/// A picker by name, returning the id picked.
type Named<'a> = (&'static str, Box<dyn Fn() -> Option<String> + 'a>);

/// The pickers that apply slow start, by name, as id-returning closures.
fn pickers(users: &ServiceCache) -> Vec<Named<'_>> {
    let id = |p: Option<Picked>| p.map(|p| p.id().to_owned());
    vec![
        ("pick", Box::new(move || id(users.pick()))),
        ("pick_random", Box::new(move || id(users.pick_random()))),
        ("pick_weighted", Box::new(move || id(users.pick_weighted()))),
        (
            "pick_weighted_random",
            Box::new(move || id(users.pick_weighted_random())),
        ),
    ]
}

/// Three instances at the first list, then `new` added; returns the cache once it sees `new`,
/// and when it first saw it.
async fn with_newcomer(
    etcd: &MemoryBackend,
    slow_start: SlowStart,
) -> (ServiceCache, std::time::Instant) {
    put_all(etcd, &["a", "b", "c"]);
    let users = users(discovery(etcd).slow_start(slow_start)).await;
    put(etcd, spec("new"));
    until_ids(&users, &["a", "b", "c", "new"]).await;
    let born = health_of(&users, "new")
        .first_seen
        .expect("seen after the first list");
    for old in ["a", "b", "c"] {
        assert_eq!(health_of(&users, old).first_seen, None, "{old} is an adult");
    }
    (users, born)
}

/// A newcomer's share at window/4, window/2 and window follows Envoy's formula.
#[tokio::test(start_paused = true)]
async fn a_newcomer_ramps_along_the_formula() {
    // At a quarter and a half of the window, the newcomer's share is Envoy's: its weight scaled by
    // `age / window`, against the others' full weights (`f / (f + 3)`), within 1 point for every
    // picker; at the end of the window it has its full quarter.
    let etcd = MemoryBackend::new();
    let (users, born) = with_newcomer(&etcd, SlowStart::new(WINDOW)).await;

    for (age, factor) in [(WINDOW / 4, 0.25), (WINDOW / 2, 0.5), (WINDOW, 1.0)] {
        advance_to(born + age).await;
        let want = factor / (factor + 3.0);
        for (name, pick) in pickers(&users) {
            let counts = tally(40_000, &pick);
            let got = share(&counts, "new");
            println!("slow start at {age:?}: {name}: share {got:.4} (formula {want:.4})");
            assert!(
                (got - want).abs() < 0.01,
                "{name} at {age:?}: {got} vs {want}"
            );
        }
    }
}

/// A young newcomer is never picked while others are up, then gets the minimum share.
#[tokio::test(start_paused = true)]
async fn a_young_newcomer_is_never_picked() {
    // With a young period the newcomer is never picked while others are up, by any picker; after
    // it, it gets the minimum share (10 %, as age/window is below it).
    let etcd = MemoryBackend::new();
    let slow_start = SlowStart::new(WINDOW).young(secs(5));
    let (users, born) = with_newcomer(&etcd, slow_start).await;

    advance_to(born + secs(5) - ms(1)).await;
    for (name, pick) in pickers(&users) {
        let counts = tally(10_000, &pick);
        assert!(
            !counts.contains_key("new"),
            "{name} picked a young one: {counts:?}"
        );
    }
    // p2c too, even once it would force a probe of the never-picked newcomer.
    let counts = tally(10_000, || users.pick_p2c().map(|c| c.id().to_owned()));
    assert!(
        !counts.contains_key("new"),
        "p2c picked a young one: {counts:?}"
    );

    advance_to(born + secs(5)).await;
    let want = 0.1 / 3.1;
    let counts = tally(40_000, || users.pick_random().map(|p| p.id().to_owned()));
    let got = share(&counts, "new");
    println!("slow start just after the young period: share {got:.4} (formula {want:.4})");
    assert!((got - want).abs() < 0.01, "{got} vs {want}");
}

/// Instances present at the first list are not ramped: each gets its full share at once.
#[tokio::test(start_paused = true)]
async fn instances_of_the_first_list_are_not_ramped() {
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b", "c", "d"]);
    let slow_start = SlowStart::new(WINDOW).young(secs(5));
    let users = users(discovery(&etcd).slow_start(slow_start)).await;
    for h in users.health() {
        assert_eq!(h.first_seen, None, "{h:?}");
    }
    for (name, pick) in pickers(&users) {
        let counts = tally(40_000, &pick);
        for id in ["a", "b", "c", "d"] {
            let got = share(&counts, id);
            assert!(
                (got - 0.25).abs() < 0.01,
                "{name}: {id} has {got}: {counts:?}"
            );
        }
    }
}

/// The consistent hash ignores slow start: a young newcomer gets its keys at once.
#[tokio::test(start_paused = true)]
async fn the_consistent_hash_ignores_slow_start() {
    // The consistent hash ignores slow start: with a young newcomer, every key maps where it maps
    // for a cache without slow start, the newcomer's keys included.
    let etcd = MemoryBackend::new();
    let slow_start = SlowStart::new(WINDOW).young(secs(5));
    let (slow, _) = with_newcomer(&etcd, slow_start).await;
    let plain = users(discovery(&etcd)).await;

    let mut to_new = 0;
    for k in 0..10_000 {
        let key = format!("key-{k}");
        let a = slow.pick_by(&key).expect("up");
        let b = plain.pick_by(&key).expect("up");
        assert_eq!(a.id(), b.id(), "key {key}");
        to_new += usize::from(a.id() == "new");
    }
    assert!(to_new > 1000, "the newcomer has its keys at once: {to_new}");
}

/// A slow-start window too long for an `Instant` does not panic the sync task.
#[tokio::test(start_paused = true)]
async fn a_huge_window_is_no_panic() {
    // A window too long to add to an instant (valid settings) is no panic: the newcomer is
    // published and picked (at the minimum share), and the cache stays live.
    let etcd = MemoryBackend::new();
    let (users, _) = with_newcomer(&etcd, SlowStart::new(Duration::MAX)).await;
    let counts = tally(10_000, || users.pick().map(|p| p.id().to_owned()));
    assert!(counts.contains_key("new"), "{counts:?}");
    put(&etcd, spec("newer"));
    until_ids(&users, &["a", "b", "c", "new", "newer"]).await;
    assert!(users.snapshot().freshness().is_live());
}

/// An instance first seen when a restarted sync task lists again is new to the caller and
/// warms up: only the cache's own first list makes adults, not a restart's.
#[test]
fn an_instance_first_seen_by_a_restarted_task_warms_up() {
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b"]);
    let discovery = discovery(&etcd)
        .slow_start(SlowStart::new(WINDOW))
        .build()
        .expect("valid settings");
    let first = runtime();
    let users = first
        .block_on(discovery.service("user"))
        .expect("first list");
    drop(first);
    put(&etcd, spec("new"));

    runtime().block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        until_ids(&again, &["a", "b", "new"]).await;
        assert!(
            health_of(&again, "new").first_seen.is_some(),
            "new, first seen by the restarted task, is taken for an adult"
        );
        for old in ["a", "b"] {
            assert_eq!(health_of(&users, old).first_seen, None, "{old} is an adult");
        }
    });
}
