//! A state-machine property test of `Registration` over the in-memory etcd model, under paused
//! time: random outages, heals, lease revocations by others, key deletions by others, updates and
//! time passing. After every step:
//! - the instance is never doubled (at most one key for it, in either layout);
//! - while etcd is reachable, the instance is in etcd, with its latest update, within one
//!   backoff step plus one keep-alive interval (ARCHITECTURE.md §4, invariant 9: registrations survive
//!   outages); in particular it is back that soon after every heal.
//!
//! `PROPTEST_CASES` raises the number of cases (default 48).

mod support;

use std::time::Duration;

use etcd_registry::{
    BackoffConfig, Codec, Decoded, Instance, KeyLayout, MemoryBackend, Registration,
    RegistrationStatus,
};
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use tokio::runtime::Runtime;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(3);
const BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_millis(50),
    max: Duration::from_millis(800),
    reset_after: Duration::from_secs(30),
};
/// How long a reachable etcd may lack the instance: a keep-alive interval (TTL/3) to notice the
/// loss, one backoff step to come back, and a little for the calls themselves.
const BACK_WITHIN: Duration = Duration::from_millis(1000 + 800 + 100);

#[derive(Clone, Debug)]
struct Model {
    layout: KeyLayout,
    reachable: bool,
    weight: u32,
}

#[derive(Clone, Debug)]
enum Step {
    Outage,
    Heal,
    Wait(u64),
    RevokeOurLease,
    DeleteOurKey,
    Update(u32),
}

struct Reference;

impl ReferenceStateMachine for Reference {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        prop_oneof![Just(KeyLayout::Native), Just(KeyLayout::GoZero)]
            .prop_map(|layout| Model {
                layout,
                reachable: true,
                weight: 1,
            })
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let outage_or_heal = if state.reachable {
            Just(Step::Outage).boxed()
        } else {
            Just(Step::Heal).boxed()
        };
        prop_oneof![
            3 => outage_or_heal,
            3 => (1u64..8_000).prop_map(Step::Wait),
            1 => Just(Step::RevokeOurLease),
            1 => Just(Step::DeleteOurKey),
            1 => (1u32..100).prop_map(Step::Update),
        ]
        .boxed()
    }

    fn apply(mut state: Model, step: &Step) -> Model {
        match step {
            Step::Outage => state.reachable = false,
            Step::Heal => state.reachable = true,
            Step::Update(w) => state.weight = *w,
            Step::Wait(_) | Step::RevokeOurLease | Step::DeleteOurKey => {}
        }
        state
    }
}

struct Sut {
    rt: Runtime,
    etcd: MemoryBackend,
    registration: Registration,
    codec: Codec,
    prefix: String,
}

impl Sut {
    /// Our keys in etcd: (key, lease, weight).
    fn ours(&self) -> Vec<(String, i64, u32)> {
        self.etcd
            .keys(&self.prefix)
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8(kv.key.clone()).unwrap();
                let weight = match self.codec.decode("user.rpc", &kv.key, &kv.value) {
                    Ok(Decoded::Put(i)) => i.weight(),
                    other => panic!("our key {key} does not decode: {other:?}"),
                };
                (key, kv.lease, weight)
            })
            .collect()
    }

    fn lease(&self) -> Option<i64> {
        self.registration.status().borrow().lease()
    }

    /// Advances virtual time in small steps until our key is in etcd with `weight`, at most
    /// `within`; panics otherwise.
    fn back_within(&self, within: Duration, weight: u32, after: &str) {
        let layout_weight = |w| {
            if self.codec.layout() == KeyLayout::Native {
                w
            } else {
                1
            }
        };
        self.rt.block_on(async {
            let start = Instant::now();
            loop {
                let ours = self.ours();
                if ours.len() == 1 && ours[0].2 == layout_weight(weight) {
                    return;
                }
                assert!(
                    start.elapsed() <= within,
                    "not back within {within:?} after {after}: keys {ours:?}, status {:?}",
                    *self.registration.status().borrow()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Sut;
    type Reference = Reference;

    fn init_test(model: &Model) -> Sut {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let etcd = MemoryBackend::new();
        let instance = Instance::builder("user.rpc", "10.0.0.7:8080")
            .id("u1")
            .build()
            .unwrap();
        let codec = Codec::new(model.layout, "");
        let registration = rt
            .block_on(
                Registration::with_backend(etcd.clone(), instance)
                    .layout(model.layout)
                    .ttl(TTL)
                    .backoff(BACKOFF)
                    .jitter_seed(9)
                    .register(),
            )
            .unwrap();
        Sut {
            rt,
            etcd,
            registration,
            codec,
            prefix: "user.rpc/".into(),
        }
    }

    fn apply(sut: Sut, model: &Model, step: Step) -> Sut {
        match &step {
            Step::Outage => sut.etcd.set_reachable(false),
            Step::Heal => sut.etcd.set_reachable(true),
            Step::Wait(ms) => {
                let d = Duration::from_millis(*ms);
                sut.rt.block_on(async move { tokio::time::sleep(d).await })
            }
            Step::RevokeOurLease => {
                if let Some(lease) = sut.lease() {
                    let _ = sut.etcd.revoke(lease);
                }
            }
            Step::DeleteOurKey => {
                for (key, _, _) in sut.ours() {
                    sut.etcd.delete(key);
                }
            }
            Step::Update(weight) => {
                let weight = *weight;
                let result = sut
                    .rt
                    .block_on(sut.registration.update(move |b| b.weight(weight)));
                if model.reachable {
                    // Reachable etcd, live registration: the write may still fail if the lease
                    // was just revoked; it is retried either way, which the check below proves.
                    let _ = result;
                }
            }
        }
        if model.reachable {
            sut.back_within(BACK_WITHIN, model.weight, &format!("{step:?}"));
        }
        sut
    }

    fn check_invariants(sut: &Sut, _model: &Model) {
        let ours = sut.ours();
        assert!(ours.len() <= 1, "the instance is doubled: {ours:?}");
        let status = *sut.registration.status().borrow();
        assert_ne!(
            status,
            RegistrationStatus::Deregistered,
            "stopped by itself"
        );
    }
}

fn config() -> ProptestConfig {
    support::proptest_config::config(48, ProptestConfig::default().max_shrink_iters, None)
}

prop_state_machine! {
    #![proptest_config(config())]

    #[test]
    fn registration_survives_outages_and_is_never_doubled(sequential 1..30 => Sut);
}
