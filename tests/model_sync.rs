//! A state-machine model of the sync loop (ARCHITECTURE.md §5): random sequences of writes, leases,
//! faults, compactions and restores are applied both to a reference model of etcd and to the
//! real driver over `MemoryBackend` under paused tokio time, and invariants 1–7 (plus the
//! stall-detection bound, 10) are checked after every step.
//!
//! The reference state is etcd's key space, revision, compaction point, cluster epoch, leases,
//! reachability and virtual time, plus the decoded instance set at every revision of every
//! epoch, so any snapshot the cache publishes can be checked against the exact state etcd had at
//! that snapshot's revision.
//!
//! `PROPTEST_CASES` overrides the default number of cases.

mod model;
mod support;

use model::{Model, Sut, Transition};
use proptest::test_runner::Config as ProptestConfig;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

/// Cases per run unless `PROPTEST_CASES` says otherwise: sized for the debug profile of
/// `cargo test --workspace` on a small CI machine.
const DEFAULT_CASES: u32 = 256;

fn config() -> ProptestConfig {
    support::proptest_config::config(DEFAULT_CASES, 4096, Some("model_sync"))
}

prop_state_machine! {
    #![proptest_config(config())]

    #[test]
    fn sync_follows_etcd_through_faults(sequential 20..40 => Sut);
}

/// Runs one fixed sequence through the same model and checks (for regressions found by the
/// property test, and to keep the model itself honest on the interesting paths).
fn run(model: Model, transitions: Vec<Transition>) {
    let mut state = model.clone();
    for t in &transitions {
        assert!(Model::preconditions(&state, t), "precondition of {t:?}");
        state = Model::apply(state, t);
    }
    Sut::test_sequential(ProptestConfig::default(), model, transitions, None);
}

#[test]
fn fixed_outage_compaction_restore_sequence() {
    use model::{Key::*, Transition::*, Val::*};
    run(
        Model::new(Vec::new(), 7),
        vec![
            Put(Own(0), Addr(1)),
            Backup,
            Outage,
            Put(Own(1), Addr(2)),
            Txn(vec![(Own(0), None), (Own(2), Some(Addr(3)))]),
            Compact(0),
            Heal,
            Wait(12_000),
            Restore(0),
            Wait(12_000),
            Grant(1_501),
            PutLease(Own(3), Addr(1), 0),
            Wait(2_000),
            Stall,
            Put(Own(4), NotJson),
            Wait(8_000),
            Heal,
            Wait(12_000),
            Wipe,
            Wait(12_000),
        ],
    );
}
