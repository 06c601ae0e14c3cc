//! Property test of the pickers' guarantees, whatever happens around them: over random instance
//! sets (up or draining, weights, tags), random outlier settings, random failures and successes
//! (reported at once or on calls held across time), instances drained, brought back, removed
//! and re-added, and time passing (ejections ending), every pick of every picker, on the cache
//! and on its selections:
//!
//! 1. never returns a draining instance;
//! 2. never returns an ejected instance unless in panic mode: fewer than the panic threshold of
//!    the instances up are healthy, or none is (then an ejected one beats none). For a
//!    selection, as its docs say, its own instances up and how many of them are ejected;
//! 3. never returns `None` while an instance is up.
//!
//! What is ejected is read from `ServiceCache::health()` (ejections that end at or before now
//! are not), the instances and their states from the snapshot. Paused tokio time, so every run
//! of a case is the same run (up to the per-thread random numbers of the random pickers).
//!
//! `PROPTEST_CASES` overrides the default number of cases.

mod support;

use std::time::Duration;

use etcd_registry::{
    Call, Discovery, Instance, MemoryBackend, OutlierEjection, Picked, Selection, Selector,
    ServiceCache, SlowStart, State,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use support::{NS, codec, wait_for};

/// Cases per run unless `PROPTEST_CASES` says otherwise: a few seconds in the debug profile.
const DEFAULT_CASES: u32 = 256;

fn config() -> ProptestConfig {
    support::proptest_config::config(DEFAULT_CASES, 2048, Some("model_balance"))
}

/// One instance of the model: `i{n}` of service `user`.
#[derive(Debug, Clone)]
struct Spec {
    present: bool,
    up: bool,
    weight: u32,
    tagged: bool,
}

#[derive(Debug, Clone, Copy)]
enum Picker {
    RoundRobin,
    Random,
    Weighted,
    WeightedRandom,
    ByKey(u16),
    P2c,
}

#[derive(Debug, Clone, Copy)]
enum Scope {
    Cache,
    /// A selection of every instance.
    All,
    /// A selection of the tagged instances.
    Tagged,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Success,
    Failure,
    Drop,
}

#[derive(Debug, Clone)]
enum Op {
    Pick(Scope, Picker, u8),
    /// Failures reported on instance `n` (each on a round-robin pick of it, if it is picked).
    Fail(usize, u8),
    Succeed(usize),
    /// Starts a call to instance `n` and keeps it.
    Hold(usize),
    /// Ends held call `n` (modulo how many are held).
    End(usize, Outcome),
    Advance(u32),
    /// Instance `n` turns draining, or up again.
    Toggle(usize),
    /// Instance `n` is deleted from etcd, or put back.
    Presence(usize),
}

#[derive(Debug, Clone)]
struct Case {
    specs: Vec<Spec>,
    ejection: OutlierEjection,
    slow_start: Option<SlowStart>,
    ops: Vec<Op>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (prop::bool::weighted(0.8), 1u32..=4, any::<bool>()).prop_map(|(up, weight, tagged)| Spec {
        present: true,
        up,
        weight,
        tagged,
    })
}

fn picker() -> impl Strategy<Value = Picker> {
    prop_oneof![
        Just(Picker::RoundRobin),
        Just(Picker::Random),
        Just(Picker::Weighted),
        Just(Picker::WeightedRandom),
        any::<u16>().prop_map(Picker::ByKey),
        Just(Picker::P2c),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let scope = prop_oneof![Just(Scope::Cache), Just(Scope::All), Just(Scope::Tagged)];
    let outcome = prop_oneof![
        Just(Outcome::Success),
        Just(Outcome::Failure),
        Just(Outcome::Drop)
    ];
    prop_oneof![
        4 => (scope, picker(), 1u8..20).prop_map(|(s, p, n)| Op::Pick(s, p, n)),
        4 => (0usize..8, 1u8..6).prop_map(|(i, n)| Op::Fail(i, n)),
        1 => (0usize..8).prop_map(Op::Succeed),
        1 => (0usize..8).prop_map(Op::Hold),
        1 => (0usize..8, outcome).prop_map(|(c, o)| Op::End(c, o)),
        2 => prop_oneof![0u32..2_000, 0u32..70_000].prop_map(Op::Advance),
        1 => (0usize..8).prop_map(Op::Toggle),
        1 => (0usize..8).prop_map(Op::Presence),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let ejection = (
        prop_oneof![Just(1u32), Just(2), Just(5)],
        1u64..60,
        prop_oneof![Just(0u8), Just(10), Just(50), Just(100)],
        prop_oneof![Just(0u8), Just(30), Just(50), Just(100)],
        // The sweep timer at the very end, Envoy's 10 s after it, or off.
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::from_secs(10)),
            Just(Duration::MAX)
        ],
    )
        .prop_map(|(failures, base, max, panic, sweep)| {
            OutlierEjection::default()
                .consecutive_failures(failures)
                .base_ejection_time(Duration::from_secs(base))
                .max_ejection_time(Duration::from_secs(base * 4))
                .max_ejection_percent(max)
                .panic_threshold_percent(panic)
                .sweep_interval(sweep)
        });
    let slow_start = prop::option::of((2u64..60, 0u64..100)).prop_map(|o| {
        o.map(|(window, young)| {
            SlowStart::new(Duration::from_secs(window))
                .young(Duration::from_secs(window) * u32::try_from(young).unwrap_or(0) / 100)
        })
    });
    (
        prop::collection::vec(spec(), 1..7),
        ejection,
        slow_start,
        prop::collection::vec(op(), 1..40),
    )
        .prop_map(|(specs, ejection, slow_start, ops)| Case {
            specs,
            ejection,
            slow_start,
            ops,
        })
}

fn id(n: usize) -> String {
    format!("i{n}")
}

fn write(etcd: &MemoryBackend, n: usize, spec: &Spec) {
    let mut builder = Instance::builder("user", format!("10.0.0.{n}:80"))
        .id(id(n))
        .weight(spec.weight)
        .state(if spec.up { State::Up } else { State::Draining });
    if spec.tagged {
        builder = builder.tag("t");
    }
    let instance = builder.build().expect("valid");
    let codec = codec();
    if spec.present {
        etcd.put(codec.key(&instance, 0), codec.encode_value(&instance));
    } else {
        etcd.delete(codec.key(&instance, 0));
    }
}

/// The model's instances as the cache should show them: `(id, up)`, sorted.
fn expected(specs: &[Spec]) -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = specs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.present)
        .map(|(n, s)| (id(n), s.up))
        .collect();
    v.sort();
    v
}

fn pick_one(users: &ServiceCache, selection: Option<&Selection>, picker: Picker) -> Option<String> {
    let id = |p: Option<Picked>| p.map(|p| p.id().to_owned());
    let call = |c: Option<Call>| c.map(|c| c.id().to_owned());
    match (selection, picker) {
        (None, Picker::RoundRobin) => id(users.pick()),
        (None, Picker::Random) => id(users.pick_random()),
        (None, Picker::Weighted) => id(users.pick_weighted()),
        (None, Picker::WeightedRandom) => id(users.pick_weighted_random()),
        (None, Picker::ByKey(k)) => id(users.pick_by(k.to_be_bytes())),
        (None, Picker::P2c) => call(users.pick_p2c()),
        (Some(s), Picker::RoundRobin) => id(s.pick()),
        (Some(s), Picker::Random) => id(s.pick_random()),
        (Some(s), Picker::Weighted) => id(s.pick_weighted()),
        (Some(s), Picker::WeightedRandom) => id(s.pick_weighted_random()),
        (Some(s), Picker::ByKey(k)) => id(s.pick_by(k.to_be_bytes())),
        (Some(s), Picker::P2c) => call(s.pick_p2c()),
    }
}

/// A round-robin pick of instance `n`, if it is picked at all.
fn pick_of(users: &ServiceCache, n: usize) -> Option<Picked> {
    let want = id(n);
    (0..50)
        .filter_map(|_| users.pick())
        .find(|p| p.id() == want)
}

/// `n` picks of `picker` on `scope`, each checked against the three guarantees.
fn check_picks(
    users: &ServiceCache,
    selections: &[Selection; 2],
    case: &Case,
    scope: Scope,
    picker: Picker,
    n: u8,
) {
    let snapshot = users.snapshot();
    let ejected: Vec<String> = users
        .health()
        .into_iter()
        .filter(|h| h.ejected_until.is_some())
        .map(|h| h.instance.id().to_owned())
        .collect();
    let (selection, in_scope): (Option<&Selection>, fn(&Instance) -> bool) = match scope {
        Scope::Cache => (None, |_| true),
        Scope::All => (Some(&selections[0]), |_| true),
        Scope::Tagged => (Some(&selections[1]), |i| i.has_tag("t")),
    };
    let up: Vec<&str> = snapshot
        .instances()
        .iter()
        .filter(|i| i.is_up() && in_scope(i))
        .map(|i| i.id())
        .collect();
    // The count the pick weighs: the ejected among the instances up in scope.
    let healthy = up
        .iter()
        .filter(|i| !ejected.iter().any(|e| e == *i))
        .count();
    let panic = healthy * 100 < up.len() * usize::from(case.ejection.panic_threshold_percent)
        || healthy == 0;
    for _ in 0..n {
        let got = pick_one(users, selection, picker);
        let Some(got) = got else {
            assert!(
                up.is_empty(),
                "{scope:?} {picker:?}: None while {up:?} are up"
            );
            continue;
        };
        assert!(
            up.contains(&got.as_str()),
            "{scope:?} {picker:?}: picked {got}, not one of the instances up {up:?}"
        );
        assert!(
            panic || !ejected.contains(&got),
            "{scope:?} {picker:?}: picked ejected {got} (ejected {ejected:?}, up {up:?}, no panic)"
        );
    }
}

async fn run(case: Case) {
    let etcd = MemoryBackend::new();
    let mut specs = case.specs.clone();
    for (n, spec) in specs.iter().enumerate() {
        write(&etcd, n, spec);
    }
    let mut builder = Discovery::memory(etcd.clone())
        .namespace(NS)
        .outlier_ejection(case.ejection);
    if let Some(slow_start) = case.slow_start {
        builder = builder.slow_start(slow_start);
    }
    let users = builder
        .build()
        .expect("valid settings")
        .service("user")
        .await
        .expect("listed");
    let selections = [
        users.select(Selector::new()),
        users.select(Selector::new().tag("t")),
    ];
    let mut held: Vec<Call> = Vec::new();

    for op in &case.ops {
        match *op {
            Op::Pick(scope, picker, n) => check_picks(&users, &selections, &case, scope, picker, n),
            Op::Fail(i, n) => {
                for _ in 0..n {
                    if let Some(picked) = pick_of(&users, i % specs.len()) {
                        picked.failure();
                    }
                }
            }
            Op::Succeed(i) => {
                if let Some(picked) = pick_of(&users, i % specs.len()) {
                    picked.success(Duration::from_millis(3));
                }
            }
            Op::Hold(i) => {
                if let Some(picked) = pick_of(&users, i % specs.len()) {
                    held.push(picked.start());
                }
            }
            Op::End(c, outcome) => {
                if !held.is_empty() {
                    let call = held.swap_remove(c % held.len());
                    match outcome {
                        Outcome::Success => call.success(),
                        Outcome::Failure => call.failure(),
                        Outcome::Drop => drop(call),
                    }
                }
            }
            Op::Advance(ms) => tokio::time::advance(Duration::from_millis(u64::from(ms))).await,
            Op::Toggle(i) | Op::Presence(i) => {
                let n = i % specs.len();
                match op {
                    Op::Toggle(_) => specs[n].up = !specs[n].up,
                    _ => specs[n].present = !specs[n].present,
                }
                write(&etcd, n, &specs[n]);
                let want = expected(&specs);
                wait_for(&users, Duration::from_secs(30), "the change", move |s| {
                    let mut got: Vec<(String, bool)> = s
                        .instances()
                        .iter()
                        .map(|i| (i.id().to_owned(), i.is_up()))
                        .collect();
                    got.sort();
                    got == want
                })
                .await;
            }
        }
    }
    // Whatever happened, every picker still answers on every scope.
    for scope in [Scope::Cache, Scope::All, Scope::Tagged] {
        for picker in [Picker::RoundRobin, Picker::P2c, Picker::ByKey(7)] {
            check_picks(&users, &selections, &case, scope, picker, 10);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Every pick keeps the three guarantees, whatever the instances, settings, reports and time.
    #[test]
    fn picks_never_draining_never_ejected_outside_panic_never_none(case in case()) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime")
            .block_on(run(case));
    }
}
