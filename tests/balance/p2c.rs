//! Power of two choices: load, latency and success rate steer picks, and an instance left
//! unpicked for `FORCE_PICK` is probed.

use etcd_registry::OutlierEjection;
use etcd_registry::balance::p2c::FORCE_PICK;

use super::*;

/// `n` p2c picks, each dropped at once (so the in-flight counts do not build up).
fn p2c_tally(users: &ServiceCache, n: usize) -> BTreeMap<String, usize> {
    tally(n, || users.pick_p2c().map(|c| c.id().to_owned()))
}

/// A call to `id` that took `latency` of paused time, reported as a success.
async fn timed_success(users: &ServiceCache, id: &str, latency: Duration) {
    let call = pick_id(users, id).expect("picked").start();
    advance(latency).await;
    call.success();
}

/// Requests held in flight on one instance send p2c to the others.
#[tokio::test(start_paused = true)]
async fn p2c_prefers_the_less_loaded() {
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b", "c"]);
    let users = users(discovery(&etcd)).await;

    let held: Vec<_> = (0..2)
        .map(|_| pick_id(&users, "a").expect("a").start())
        .collect();
    assert_eq!(health_of(&users, "a").in_flight, 2);
    let counts = p2c_tally(&users, 1000);
    assert!(!counts.contains_key("a"), "a has 2 in flight: {counts:?}");
    assert!(counts["b"] > 300 && counts["c"] > 300, "{counts:?}");

    // Ended calls leave the load; now b is the busy one.
    drop(held);
    assert_eq!(health_of(&users, "a").in_flight, 0);
    let _held = pick_id(&users, "b").expect("b").start();
    let counts = p2c_tally(&users, 1000);
    assert!(!counts.contains_key("b"), "b has 1 in flight: {counts:?}");
    assert!(counts["a"] > 300 && counts["c"] > 300, "{counts:?}");
}

/// p2c prefers the faster instance and probes the slow one just after `FORCE_PICK`.
#[tokio::test(start_paused = true)]
async fn p2c_prefers_the_faster_and_probes_the_slow_one() {
    // Latency measured between pick and success steers p2c to the faster instance; the slow one is
    // probed once when p2c has left it alone for more than `FORCE_PICK`, and not before.
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["fast", "slow"]);
    let users = users(discovery(&etcd)).await;

    timed_success(&users, "slow", ms(200)).await;
    timed_success(&users, "fast", ms(10)).await;
    assert_eq!(health_of(&users, "slow").latency, ms(200));
    assert_eq!(health_of(&users, "fast").latency, ms(10));

    let counts = p2c_tally(&users, 1000);
    assert_eq!(counts.get("fast"), Some(&1000), "{counts:?}");

    // The slow one was never picked by p2c: once FORCE_PICK has passed, the next pick probes it.
    advance(FORCE_PICK).await;
    let probe = users.pick_p2c().expect("up");
    assert_eq!(probe.id(), "slow", "a forced pick probes the slow instance");
    drop(probe);
    let counts = p2c_tally(&users, 1000);
    assert_eq!(
        counts.get("fast"),
        Some(&1000),
        "one probe only: {counts:?}"
    );

    // Exactly FORCE_PICK after the probe: not yet stale (strictly more is needed).
    advance(FORCE_PICK - ms(1)).await;
    let counts = p2c_tally(&users, 500);
    assert_eq!(
        counts.get("fast"),
        Some(&500),
        "probed too early: {counts:?}"
    );
    advance(ms(1)).await;
    let counts = p2c_tally(&users, 500);
    assert_eq!(
        counts.get("fast"),
        Some(&500),
        "probed at exactly FORCE_PICK: {counts:?}"
    );
    advance(Duration::from_nanos(1)).await;
    let probe = users.pick_p2c().expect("up");
    assert_eq!(probe.id(), "slow", "probed just after FORCE_PICK");
}

/// A failure's drop in success rate outweighs 5 requests in flight in p2c's cost.
#[tokio::test(start_paused = true)]
async fn a_failing_instance_costs_more() {
    // A failure drops an instance's success rate, which divides into its cost: with 5 requests in
    // flight on the healthy one, p2c still prefers it to the failing one (and without the failure
    // it would not).
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["good", "bad"]);
    // No ejection in this test: only the cost speaks.
    let ejection = OutlierEjection::default().consecutive_failures(1000);
    let users = users(discovery(&etcd).outlier_ejection(ejection)).await;

    let held: Vec<_> = (0..5)
        .map(|_| pick_id(&users, "good").expect("good").start())
        .collect();
    let counts = p2c_tally(&users, 500);
    assert_eq!(
        counts.get("bad"),
        Some(&500),
        "load alone sends to bad: {counts:?}"
    );

    pick_id(&users, "bad").expect("bad").failure();
    let bad = health_of(&users, "bad");
    assert!(bad.success_rate < 0.01, "{bad:?}");
    assert_eq!(health_of(&users, "good").success_rate, 1.0);
    let counts = p2c_tally(&users, 500);
    assert_eq!(
        counts.get("good"),
        Some(&500),
        "the failing one costs more: {counts:?}"
    );
    drop(held);

    // Successes spread over time bring its success rate back: one request in flight on good
    // is enough to prefer bad again.
    for _ in 0..30 {
        advance(secs(1)).await;
        pick_id(&users, "bad").expect("bad").success(ms(0));
    }
    let bad = health_of(&users, "bad");
    assert!(bad.success_rate > 0.9, "{bad:?}");
    let _held = pick_id(&users, "good").expect("good").start();
    // good was left alone for 30 s: the first pick may be its forced probe.
    drop(users.pick_p2c());
    let counts = p2c_tally(&users, 500);
    assert_eq!(
        counts.get("bad"),
        Some(&500),
        "one in flight on good: {counts:?}"
    );
}

/// Each call counts in flight until it ends: success, failure or drop.
#[tokio::test(start_paused = true)]
async fn in_flight_counts_every_call_until_it_ends() {
    // Requests in flight are counted per instance and given back when each call ends, however it
    // ends (success, failure, drop).
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a"]);
    let users = users(discovery(&etcd)).await;

    let calls: Vec<_> = (0..3).map(|_| users.pick_p2c().expect("up")).collect();
    assert_eq!(health_of(&users, "a").in_flight, 3);
    let mut calls = calls.into_iter();
    calls.next().expect("1").success();
    assert_eq!(health_of(&users, "a").in_flight, 2);
    calls.next().expect("2").failure();
    assert_eq!(health_of(&users, "a").in_flight, 1);
    drop(calls);
    assert_eq!(health_of(&users, "a").in_flight, 0);
}
