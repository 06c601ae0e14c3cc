//! The reference model of etcd and the system under test for `tests/model_sync.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_registry::backend::memory::{MemoryState, TxnOp};
use etcd_registry::{
    BackoffConfig, Codec, Decoded, Discovery, Instance, KeyLayout, MemoryBackend, ServiceCache,
    Snapshot, SyncStats,
};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use tokio::runtime::Runtime;
use tokio::time::Instant;

const NS: &str = "/svc";
const SERVICE: &str = "user";
const PREFIX: &str = "/svc/user/";
const IDS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
/// Small, so that a garbage value can be too large without being huge.
const MAX_VALUE: usize = 256;
/// Virtual time every step but a wait takes. Even, like every wait, while lease TTLs are odd:
/// a lease never ends exactly at a step boundary, so its delete is always seen within a step.
const STEP_MS: u64 = 2;
const STALL_MS: u64 = 4_000;
/// A wait at least this long with etcd reachable must end with the cache converged: far more
/// than the largest backoff step (2 s) plus a round trip.
const CONVERGE_MS: u64 = 10_000;
/// Cut off at least this long, the cache must say it is frozen: the stall bound is 4 s and a
/// hung list or watch creation times out after 5 s.
const DETECT_MS: u64 = 6_000;

fn codec() -> Codec {
    Codec::new(KeyLayout::Native, NS).with_max_value_size(MAX_VALUE)
}

// ----- keys and values ---------------------------------------------------------------------

/// A key: an instance of the watched service, a key nested below one (never an instance), or
/// an instance of the sibling service `user2` (never seen by the `user` cache).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Own(u8),
    Nested(u8),
    Sibling(u8),
}

impl Key {
    fn path(self) -> String {
        match self {
            Key::Own(i) => format!("{NS}/user/{}", IDS[i as usize]),
            Key::Nested(i) => format!("{NS}/user/{}/x", IDS[i as usize]),
            Key::Sibling(i) => format!("{NS}/user2/{}", IDS[i as usize]),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Key::Own(i) => write!(f, "{}", IDS[i as usize]),
            Key::Nested(i) => write!(f, "{}/x", IDS[i as usize]),
            Key::Sibling(i) => write!(f, "user2/{}", IDS[i as usize]),
        }
    }
}

/// A value: a valid native instance in a few shapes, or one kind of garbage.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Val {
    /// `{"addr":"10.0.0.1:<port>"}`
    Addr(u16),
    /// Every field, plus one the codec does not know.
    Full(u16),
    Draining(u16),
    NotJson,
    NoAddr,
    BadAddr,
    IdMismatch,
    Oversize,
    NotUtf8,
}

impl Val {
    fn bytes(self) -> Vec<u8> {
        match self {
            Val::Addr(p) => format!(r#"{{"addr":"10.0.0.1:{p}"}}"#).into_bytes(),
            Val::Full(p) => format!(
                r#"{{"addr":"10.0.0.1:{p}","tags":["v2"],"meta":{{"zone":"eu-1"}},"weight":3,"extra":true}}"#
            )
            .into_bytes(),
            Val::Draining(p) => {
                format!(r#"{{"addr":"10.0.0.1:{p}","state":"draining"}}"#).into_bytes()
            }
            Val::NotJson => b"{not json".to_vec(),
            Val::NoAddr => br#"{"tags":["v2"]}"#.to_vec(),
            Val::BadAddr => br#"{"addr":"no port here"}"#.to_vec(),
            Val::IdMismatch => br#"{"id":"zz","addr":"10.0.0.1:1"}"#.to_vec(),
            Val::Oversize => {
                format!(r#"{{"addr":"10.0.0.1:1","pad":"{}"}}"#, "x".repeat(MAX_VALUE)).into_bytes()
            }
            Val::NotUtf8 => vec![0xff, 0xfe, b'{'],
        }
    }
}

impl fmt::Debug for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Val::Addr(p) => write!(f, ":{p}"),
            Val::Full(p) => write!(f, "full:{p}"),
            Val::Draining(p) => write!(f, "draining:{p}"),
            Val::NotJson => f.write_str("!json"),
            Val::NoAddr => f.write_str("!addr"),
            Val::BadAddr => f.write_str("!badaddr"),
            Val::IdMismatch => f.write_str("!id"),
            Val::Oversize => f.write_str("!big"),
            Val::NotUtf8 => f.write_str("!utf8"),
        }
    }
}

// ----- transitions -------------------------------------------------------------------------

/// One step. Leases and backups are named by the order they were made in (`L0`, `#0`).
#[derive(Clone, PartialEq, Eq)]
pub enum Transition {
    Put(Key, Val),
    Delete(Key),
    /// Puts (`Some`) and deletes (`None`) of distinct keys, in one revision.
    Txn(Vec<(Key, Option<Val>)>),
    /// A lease with this TTL in ms (odd).
    Grant(u64),
    PutLease(Key, Val, usize),
    Revoke(usize),
    /// `set_reachable(false)`.
    Outage,
    /// `stall()`.
    Stall,
    /// `set_reachable(true)` and `resume()`.
    Heal,
    /// `break_streams()`.
    Break,
    /// Compacts at this many revisions below the current one.
    Compact(i64),
    /// `snapshot_state()`, kept for a later restore.
    Backup,
    /// `restore(backup)`: etcd back at an older revision, as a new cluster.
    Restore(usize),
    Wipe,
    /// Wiped and started again with unchanged flags: the cluster id stays, revisions restart.
    WipeKeepingIdentity,
    /// Lets this many ms of virtual time pass (even).
    Wait(u64),
    /// `set_latency`: every later list and watch call of the cache takes this long (ms), so
    /// writes land between a list and the watch that follows it.
    Latency(u64),
}

impl Transition {
    fn duration_ms(&self) -> u64 {
        match self {
            Transition::Wait(ms) => *ms,
            _ => STEP_MS,
        }
    }
}

impl fmt::Debug for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transition::Put(k, v) => write!(f, "put {k:?} {v:?}"),
            Transition::Delete(k) => write!(f, "del {k:?}"),
            Transition::Txn(ops) => {
                f.write_str("txn[")?;
                for (n, (k, v)) in ops.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    match v {
                        Some(v) => write!(f, "put {k:?} {v:?}")?,
                        None => write!(f, "del {k:?}")?,
                    }
                }
                f.write_str("]")
            }
            Transition::Grant(ttl) => write!(f, "grant {ttl}ms"),
            Transition::PutLease(k, v, l) => write!(f, "put {k:?} {v:?} @L{l}"),
            Transition::Revoke(l) => write!(f, "revoke L{l}"),
            Transition::Outage => f.write_str("outage"),
            Transition::Stall => f.write_str("stall"),
            Transition::Heal => f.write_str("heal"),
            Transition::Break => f.write_str("break streams"),
            Transition::Compact(back) => write!(f, "compact rev-{back}"),
            Transition::Backup => f.write_str("backup"),
            Transition::Restore(b) => write!(f, "restore #{b}"),
            Transition::Wipe => f.write_str("wipe"),
            Transition::WipeKeepingIdentity => f.write_str("wipe, same cluster id"),
            Transition::Wait(ms) => write!(f, "wait {ms}ms"),
            Transition::Latency(ms) => write!(f, "latency {ms}ms"),
        }
    }
}

// ----- the reference model -------------------------------------------------------------------

#[derive(Clone, PartialEq, Eq)]
struct Entry {
    value: Vec<u8>,
    /// The lease, by grant order.
    lease: Option<usize>,
}

#[derive(Clone, Copy)]
struct Lease {
    ttl_ms: u64,
    /// When it ends; `None` once revoked or expired (or absent after a restore).
    deadline_ms: Option<u64>,
}

#[derive(Clone)]
struct Backup {
    kvs: BTreeMap<String, Entry>,
    revision: i64,
    /// The TTL of each lease alive at the backup, by grant order.
    leases: Vec<Option<u64>>,
}

/// One cluster's history, from its start (the first list, a restore or a wipe) on.
#[derive(Clone)]
struct Epoch {
    /// The decoded instances, in key order, after every revision that touched the watched
    /// prefix, and at the epoch's first revision.
    states: BTreeMap<i64, Arc<Vec<Instance>>>,
    /// The store revision now, or when the epoch ended.
    revision: i64,
    /// Whether the epoch kept the cluster id of the one before.
    same_identity: bool,
}

impl Epoch {
    /// The instances at `revision`, if it belongs to this epoch.
    fn at(&self, revision: i64) -> Option<&Arc<Vec<Instance>>> {
        if revision > self.revision {
            return None;
        }
        self.states.range(..=revision).next_back().map(|(_, s)| s)
    }

    fn last_change(&self) -> i64 {
        self.states.keys().next_back().copied().unwrap_or(0)
    }
}

/// etcd as the cache should see it.
#[derive(Clone)]
pub struct Model {
    seed: u64,
    /// Instances put before the cache starts: (id, port).
    initial: Vec<(u8, u16)>,
    kvs: BTreeMap<String, Entry>,
    revision: i64,
    compact_revision: i64,
    epochs: Vec<Epoch>,
    leases: Vec<Lease>,
    backups: Vec<Backup>,
    /// Virtual time since the cache started.
    now_ms: u64,
    reachable: bool,
    stalled: bool,
    /// Successful compactions so far.
    compactions: u64,
    /// Restores and wipes so far.
    restores: u64,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let initial: Vec<String> = self
            .initial
            .iter()
            .map(|(i, p)| format!("{}:{p}", IDS[*i as usize]))
            .collect();
        write!(f, "start with {initial:?}, jitter seed {}", self.seed)
    }
}

fn decode_all(kvs: &BTreeMap<String, Entry>) -> Vec<Instance> {
    let codec = codec();
    kvs.range(PREFIX.to_owned()..)
        .take_while(|(k, _)| k.starts_with(PREFIX))
        .filter_map(
            |(k, e)| match codec.decode(SERVICE, k.as_bytes(), &e.value) {
                Ok(Decoded::Put(instance)) => Some(instance),
                Ok(Decoded::Delete) | Err(_) => None,
            },
        )
        .collect()
}

type Op = (String, Option<(Vec<u8>, Option<usize>)>);

impl Model {
    pub fn new(initial: Vec<(u8, u16)>, seed: u64) -> Self {
        let mut model = Self {
            seed,
            initial: initial.clone(),
            kvs: BTreeMap::new(),
            revision: 1,
            compact_revision: 0,
            epochs: vec![Epoch {
                states: BTreeMap::from([(1, Arc::new(Vec::new()))]),
                revision: 1,
                same_identity: false,
            }],
            leases: Vec::new(),
            backups: Vec::new(),
            now_ms: 0,
            reachable: true,
            stalled: false,
            compactions: 0,
            restores: 0,
        };
        for (id, port) in initial {
            model.write(vec![(
                Key::Own(id).path(),
                Some((Val::Addr(port).bytes(), None)),
            )]);
        }
        model
    }

    fn epoch(&self) -> &Epoch {
        self.epochs.last().expect("there is always an epoch")
    }

    fn current(&self) -> Vec<Instance> {
        decode_all(&self.kvs)
    }

    /// One transaction: one revision if anything changed.
    fn write(&mut self, ops: Vec<Op>) {
        let mut changed = false;
        let mut touched = false;
        for (key, op) in ops {
            let hit = match op {
                Some((value, lease)) => {
                    self.kvs.insert(key.clone(), Entry { value, lease });
                    true
                }
                None => self.kvs.remove(&key).is_some(),
            };
            changed |= hit;
            touched |= hit && key.starts_with(PREFIX);
        }
        if !changed {
            return;
        }
        self.revision += 1;
        let revision = self.revision;
        let instances = touched.then(|| Arc::new(self.current()));
        let epoch = self.epochs.last_mut().expect("there is always an epoch");
        epoch.revision = revision;
        if let Some(instances) = instances {
            epoch.states.insert(revision, instances);
        }
    }

    fn alive(&self, lease: usize) -> bool {
        self.leases
            .get(lease)
            .is_some_and(|l| l.deadline_ms.is_some())
    }

    /// Ends a lease, deleting its keys in one revision.
    fn revoke(&mut self, lease: usize) {
        if !self.alive(lease) {
            return;
        }
        self.leases[lease].deadline_ms = None;
        let ops = self
            .kvs
            .iter()
            .filter(|(_, e)| e.lease == Some(lease))
            .map(|(k, _)| (k.clone(), None))
            .collect();
        self.write(ops);
    }

    /// Lets time pass, ending leases at their deadlines, earliest (then oldest) first.
    fn advance(&mut self, ms: u64) {
        let until = self.now_ms + ms;
        loop {
            let due = self
                .leases
                .iter()
                .enumerate()
                .filter_map(|(n, l)| l.deadline_ms.map(|d| (d, n)))
                .filter(|(d, _)| *d <= until)
                .min();
            match due {
                Some((_, lease)) => self.revoke(lease),
                None => break,
            }
        }
        self.now_ms = until;
    }

    fn start_epoch(&mut self, kvs: BTreeMap<String, Entry>, revision: i64, same_identity: bool) {
        self.kvs = kvs;
        self.revision = revision;
        // As the memory backend (and etcd restored from a snapshot): no event history.
        self.compact_revision = if revision > 1 { revision + 1 } else { 0 };
        self.epochs.push(Epoch {
            states: BTreeMap::from([(revision, Arc::new(self.current()))]),
            revision,
            same_identity,
        });
        self.restores += 1;
    }
}

fn key_strategy() -> impl Strategy<Value = Key> {
    prop_oneof![
        10 => (0..6u8).prop_map(Key::Own),
        1 => (0..6u8).prop_map(Key::Nested),
        1 => (0..6u8).prop_map(Key::Sibling),
    ]
}

fn val_strategy() -> impl Strategy<Value = Val> {
    let port = 1..4u16;
    prop_oneof![
        8 => port.clone().prop_map(Val::Addr),
        1 => port.clone().prop_map(Val::Full),
        1 => port.prop_map(Val::Draining),
        2 => prop_oneof![
            Just(Val::NotJson),
            Just(Val::NoAddr),
            Just(Val::BadAddr),
            Just(Val::IdMismatch),
            Just(Val::Oversize),
            Just(Val::NotUtf8),
        ],
    ]
}

fn txn_strategy() -> impl Strategy<Value = Transition> {
    let mut keys: Vec<Key> = (0..6).map(Key::Own).collect();
    keys.push(Key::Nested(0));
    keys.push(Key::Sibling(1));
    proptest::sample::subsequence(keys, 2..=4)
        .prop_flat_map(|keys| {
            let n = keys.len();
            (
                Just(keys),
                proptest::collection::vec(proptest::option::weighted(0.7, val_strategy()), n),
            )
        })
        .prop_map(|(keys, vals)| Transition::Txn(keys.into_iter().zip(vals).collect()))
}

impl ReferenceStateMachine for Model {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        (
            proptest::collection::vec((0..6u8, 1..4u16), 0..4),
            0..1000u64,
        )
            .prop_map(|(initial, seed)| Model::new(initial, seed))
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Transition> {
        use Transition as T;
        let mut choices: Vec<(u32, BoxedStrategy<Transition>)> = vec![
            (
                12,
                (key_strategy(), val_strategy())
                    .prop_map(|(k, v)| T::Put(k, v))
                    .boxed(),
            ),
            (4, key_strategy().prop_map(T::Delete).boxed()),
            (4, txn_strategy().boxed()),
            (2, (1..10_000u64).prop_map(|n| T::Grant(n * 2 + 1)).boxed()),
            (2, Just(T::Outage).boxed()),
            (2, Just(T::Stall).boxed()),
            (3, Just(T::Heal).boxed()),
            (2, Just(T::Break).boxed()),
            (2, (0..4i64).prop_map(T::Compact).boxed()),
            (1, Just(T::Backup).boxed()),
            (1, Just(T::Wipe).boxed()),
            (1, Just(T::WipeKeepingIdentity).boxed()),
            (
                1,
                proptest::sample::select(vec![0u64, 1, 3, 5, 50, 1_000])
                    .prop_map(T::Latency)
                    .boxed(),
            ),
            // Short waits: within a backoff step, the stall bound, a lease's TTL.
            (4, (1..1_500u64).prop_map(|n| T::Wait(n * 2)).boxed()),
            // Long waits: the cache must converge if etcd is reachable.
            (2, (5_000..20_000u64).prop_map(|n| T::Wait(n * 2)).boxed()),
        ];
        let leases = state.leases.len();
        if leases > 0 {
            choices.push((
                4,
                (key_strategy(), val_strategy(), 0..leases)
                    .prop_map(|(k, v, l)| T::PutLease(k, v, l))
                    .boxed(),
            ));
            choices.push((1, (0..leases).prop_map(T::Revoke).boxed()));
        }
        let backups = state.backups.len();
        if backups > 0 {
            choices.push((1, (0..backups).prop_map(T::Restore).boxed()));
        }
        Union::new_weighted(choices).boxed()
    }

    fn preconditions(state: &Model, t: &Transition) -> bool {
        match t {
            Transition::PutLease(_, _, l) | Transition::Revoke(l) => *l < state.leases.len(),
            Transition::Restore(b) => *b < state.backups.len(),
            Transition::Txn(ops) => {
                let mut keys: Vec<String> = ops.iter().map(|(k, _)| k.path()).collect();
                keys.sort();
                keys.dedup();
                keys.len() == ops.len()
            }
            _ => true,
        }
    }

    fn apply(mut state: Model, t: &Transition) -> Model {
        match t {
            Transition::Put(k, v) => state.write(vec![(k.path(), Some((v.bytes(), None)))]),
            Transition::Delete(k) => state.write(vec![(k.path(), None)]),
            Transition::Txn(ops) => state.write(
                ops.iter()
                    .map(|(k, v)| (k.path(), v.map(|v| (v.bytes(), None))))
                    .collect(),
            ),
            Transition::Grant(ttl) => state.leases.push(Lease {
                ttl_ms: *ttl,
                deadline_ms: Some(state.now_ms + ttl),
            }),
            Transition::PutLease(k, v, l) => {
                if state.alive(*l) {
                    state.write(vec![(k.path(), Some((v.bytes(), Some(*l))))]);
                }
            }
            Transition::Revoke(l) => state.revoke(*l),
            Transition::Outage => state.reachable = false,
            Transition::Stall => state.stalled = true,
            Transition::Heal => {
                state.reachable = true;
                state.stalled = false;
            }
            Transition::Break => {}
            Transition::Compact(back) => {
                let at = state.revision - back;
                if at > state.compact_revision && at <= state.revision {
                    state.compact_revision = at;
                    state.compactions += 1;
                }
            }
            Transition::Backup => {
                let backup = Backup {
                    kvs: state.kvs.clone(),
                    revision: state.revision,
                    leases: state
                        .leases
                        .iter()
                        .map(|l| l.deadline_ms.map(|_| l.ttl_ms))
                        .collect(),
                };
                state.backups.push(backup);
            }
            Transition::Restore(b) => {
                let backup = state.backups[*b].clone();
                let now = state.now_ms;
                for (n, lease) in state.leases.iter_mut().enumerate() {
                    lease.deadline_ms = backup.leases.get(n).copied().flatten().map(|t| now + t);
                }
                state.start_epoch(backup.kvs, backup.revision, false);
            }
            Transition::Wipe | Transition::WipeKeepingIdentity => {
                for lease in &mut state.leases {
                    lease.deadline_ms = None;
                }
                let same = matches!(t, Transition::WipeKeepingIdentity);
                state.start_epoch(BTreeMap::new(), 1, same);
            }
            Transition::Wait(_) | Transition::Latency(_) => {}
        }
        state.advance(t.duration_ms());
        state
    }
}

// ----- the system under test -----------------------------------------------------------------

/// The real driver over the memory backend, on a paused current-thread runtime, with what the
/// checks remember between steps.
pub struct Sut {
    rt: Runtime,
    etcd: MemoryBackend,
    cache: ServiceCache,
    /// Every snapshot the cache published since the last step, as a subscriber saw them.
    seen: Arc<Mutex<Vec<Arc<Snapshot>>>>,
    t0: Instant,
    step: usize,
    /// Lease ids, by grant order.
    leases: Vec<i64>,
    backups: Vec<MemoryState>,
    /// The cluster id of each epoch.
    clusters: Vec<u64>,
    /// The last snapshot seen.
    last: Arc<Snapshot>,
    /// The published instances when the client was cut off (outage or stall), until healed.
    frozen: Option<Vec<Instance>>,
    cut_since_ms: Option<u64>,
    /// The stats and model counters at the last step.
    stats: SyncStats,
    compactions: u64,
    restores: u64,
    /// Compactions, restores and wipes since the last relist.
    relist_budget: u64,
    /// At the last convergence check.
    restores_at_converge: u64,
    resets_at_converge: u64,
}

fn instances(snapshot: &Snapshot) -> Vec<Instance> {
    snapshot.instances().iter().map(|i| (**i).clone()).collect()
}

fn show(instances: &[Instance]) -> Vec<String> {
    instances
        .iter()
        .map(|i| {
            let port = i.addr().rsplit(':').next().unwrap_or("");
            format!("{}:{port}", i.id())
        })
        .collect()
}

fn brief(s: &Snapshot) -> String {
    let live = if s.freshness().is_live() {
        "live"
    } else {
        "frozen"
    };
    format!("rev {} {live} {:?}", s.revision(), show(&instances(s)))
}

/// Runs the runtime until the subscriber has seen the snapshot published last.
async fn settle(cache: &ServiceCache, seen: &Mutex<Vec<Arc<Snapshot>>>, last: &Arc<Snapshot>) {
    for n in 0..10_000 {
        tokio::task::yield_now().await;
        if n < 8 {
            continue;
        }
        let current = cache.snapshot();
        let recorded = seen.lock().unwrap().last().cloned();
        if Arc::ptr_eq(recorded.as_ref().unwrap_or(last), &current) {
            return;
        }
    }
    panic!("the subscriber never saw the last published snapshot");
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Sut;
    type Reference = Model;

    fn init_test(model: &Model) -> Sut {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let etcd = MemoryBackend::new();
        let (cache, seen, first, t0, cluster) = rt.block_on(async {
            for (id, port) in &model.initial {
                etcd.put(Key::Own(*id).path(), Val::Addr(*port).bytes());
            }
            let cache = Discovery::memory(etcd.clone())
                .namespace(NS)
                .max_value_size(MAX_VALUE)
                .stall_timeout(Duration::from_millis(STALL_MS))
                .backoff(BackoffConfig {
                    initial: Duration::from_millis(100),
                    max: Duration::from_secs(2),
                    reset_after: Duration::from_secs(30),
                })
                .jitter_seed(model.seed)
                .build()
                .expect("valid config")
                .service(SERVICE)
                .await
                .expect("first list");
            let mut changes = cache.changes();
            let first = changes.borrow_and_update().clone();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let sink = seen.clone();
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let snapshot = changes.borrow_and_update().clone();
                    sink.lock().unwrap().push(snapshot);
                }
            });
            (cache, seen, first, Instant::now(), etcd.cluster_id())
        });
        assert!(first.freshness().is_live(), "live after the first list");
        assert_eq!(first.revision(), model.revision, "first list revision");
        assert_eq!(
            show(&instances(&first)),
            show(&model.current()),
            "first list"
        );
        assert_eq!(instances(&first), model.current(), "first list");
        Sut {
            rt,
            etcd,
            cache,
            seen,
            t0,
            step: 0,
            leases: Vec::new(),
            backups: Vec::new(),
            clusters: vec![cluster],
            last: first,
            frozen: None,
            cut_since_ms: None,
            stats: SyncStats::default(),
            compactions: 0,
            restores: 0,
            relist_budget: 0,
            restores_at_converge: 0,
            resets_at_converge: 0,
        }
    }

    fn apply(mut sut: Sut, model: &Model, t: Transition) -> Sut {
        sut.step += 1;
        match t {
            Transition::Outage | Transition::Stall if sut.frozen.is_none() => {
                sut.frozen = Some(instances(&sut.last));
                sut.cut_since_ms = Some(model.now_ms - t.duration_ms());
            }
            Transition::Heal => {
                sut.frozen = None;
                sut.cut_since_ms = None;
            }
            _ => {}
        }
        {
            let Sut {
                rt,
                etcd,
                cache,
                seen,
                leases,
                backups,
                last,
                ..
            } = &mut sut;
            rt.block_on(async {
                match &t {
                    Transition::Put(k, v) => {
                        etcd.put(k.path(), v.bytes());
                    }
                    Transition::Delete(k) => {
                        etcd.delete(k.path());
                    }
                    Transition::Txn(ops) => {
                        let ops = ops
                            .iter()
                            .map(|(k, v)| match v {
                                Some(v) => TxnOp::put(k.path(), v.bytes()),
                                None => TxnOp::delete(k.path()),
                            })
                            .collect();
                        etcd.txn(ops).expect("a valid transaction");
                    }
                    Transition::Grant(ttl) => leases.push(etcd.grant(Duration::from_millis(*ttl))),
                    Transition::PutLease(k, v, l) => {
                        // Refused when the lease is gone; the model knows when.
                        let _ = etcd.put_with_lease(k.path(), v.bytes(), leases[*l]);
                    }
                    Transition::Revoke(l) => {
                        let _ = etcd.revoke(leases[*l]);
                    }
                    Transition::Outage => etcd.set_reachable(false),
                    Transition::Stall => etcd.stall(),
                    Transition::Heal => {
                        etcd.set_reachable(true);
                        etcd.resume();
                    }
                    Transition::Break => etcd.break_streams(),
                    Transition::Compact(back) => {
                        let _ = etcd.compact(etcd.revision() - back);
                    }
                    Transition::Backup => backups.push(etcd.snapshot_state()),
                    Transition::Restore(b) => etcd.restore(backups[*b].clone()),
                    Transition::Wipe => etcd.wipe(),
                    Transition::WipeKeepingIdentity => etcd.wipe_keeping_identity(),
                    Transition::Wait(_) => {}
                    Transition::Latency(ms) => etcd.set_latency(Duration::from_millis(*ms)),
                }
                tokio::time::sleep(Duration::from_millis(t.duration_ms())).await;
                settle(cache, seen, last).await;
            });
        }
        sut.check(model, &t);
        sut
    }

    fn teardown(mut sut: Sut, model: Model) {
        // Heal, wait, and the cache must hold exactly what etcd holds.
        let mut model = model;
        for t in [Transition::Heal, Transition::Wait(30_000)] {
            model = Model::apply(model, &t);
            sut = Sut::apply(sut, &model, t);
        }
    }
}

impl Sut {
    /// Checks invariants 1–7 (and 10) after step `t`; `model` is the state after it.
    fn check(&mut self, model: &Model, t: &Transition) {
        let _runtime = self.rt.enter();
        let at = format!("step {} ({t:?})", self.step);

        // The model follows the backend (a failure here is a bug of the model or the backend).
        assert_eq!(
            Instant::now() - self.t0,
            Duration::from_millis(model.now_ms),
            "{at}: virtual clock"
        );
        assert_eq!(self.etcd.revision(), model.revision, "{at}: store revision");
        assert_eq!(
            self.etcd.compact_revision(),
            model.compact_revision,
            "{at}: compaction revision"
        );
        let got: Vec<(String, Vec<u8>, i64)> = self
            .etcd
            .keys("")
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    kv.value,
                    kv.lease,
                )
            })
            .collect();
        let want: Vec<(String, Vec<u8>, i64)> = model
            .kvs
            .iter()
            .map(|(k, e)| {
                (
                    k.clone(),
                    e.value.clone(),
                    e.lease.map_or(0, |l| self.leases[l]),
                )
            })
            .collect();
        assert_eq!(got, want, "{at}: store contents");
        let cluster = self.etcd.cluster_id();
        if model.epochs.len() > self.clusters.len() {
            if model.epoch().same_identity {
                assert_eq!(
                    Some(&cluster),
                    self.clusters.last(),
                    "{at}: the wipe kept the cluster id"
                );
            } else {
                assert!(
                    !self.clusters.contains(&cluster),
                    "{at}: a restore gives a new cluster id"
                );
            }
            self.clusters.push(cluster);
        }
        assert_eq!(self.clusters.len(), model.epochs.len());
        assert_eq!(Some(&cluster), self.clusters.last(), "{at}: cluster id");

        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        let stats = self.cache.stats();
        let mut went_down = 0;
        for s in &seen {
            // 4: the revision goes down only with a reset.
            if s.revision() < self.last.revision() {
                went_down += 1;
            }
            // 3 (and 2, 7): a snapshot is exactly etcd's state at its revision: no half
            // transaction, nothing lost or doubled, garbage and foreign keys left out.
            let got = instances(s);
            if s.freshness().is_live() {
                let want = model.epoch().at(s.revision()).unwrap_or_else(|| {
                    panic!(
                        "{at}: live snapshot {} is not at a revision of the current cluster \
                         (revisions {}..={})",
                        brief(s),
                        model.epoch().states.keys().next().unwrap(),
                        model.revision
                    )
                });
                assert_eq!(
                    show(&got),
                    show(want),
                    "{at}: live snapshot {} differs from etcd at that revision",
                    brief(s)
                );
                assert_eq!(&got, &**want, "{at}: live snapshot {}", brief(s));
            } else if s.revision() > 0 {
                assert!(
                    model
                        .epochs
                        .iter()
                        .any(|e| e.at(s.revision()).is_some_and(|w| **w == got)),
                    "{at}: frozen snapshot {} was never etcd's state at that revision",
                    brief(s)
                );
            }
            // 1: cut off, the instance set never changes.
            if let (Some(frozen), false) = (&self.frozen, matches!(t, Transition::Heal)) {
                assert_eq!(
                    show(&got),
                    show(frozen),
                    "{at}: the instance set changed while etcd was out of reach ({})",
                    brief(s)
                );
                assert_eq!(&got, frozen, "{at}: instance set changed while cut off");
            }
            self.last = s.clone();
        }
        assert!(
            Arc::ptr_eq(&self.last, &self.cache.snapshot()),
            "{at}: the subscriber saw the current snapshot"
        );
        assert!(
            stats.resets - self.stats.resets >= went_down,
            "{at}: the revision went down {went_down} times, resets {} -> {}",
            self.stats.resets,
            stats.resets
        );

        // 5: a relist only after a compaction, restore or wipe, and at most one per them.
        self.relist_budget +=
            (model.compactions - self.compactions) + (model.restores - self.restores);
        let relists = stats.relists - self.stats.relists;
        assert!(
            relists <= self.relist_budget,
            "{at}: {relists} relists with {} compactions/restores since the last one",
            self.relist_budget
        );
        if relists > 0 {
            self.relist_budget = 0;
        }

        // 10: a cut-off client says so within the detection bound.
        if let Some(since) = self.cut_since_ms {
            if model.now_ms - since >= DETECT_MS {
                assert!(
                    !self.last.freshness().is_live(),
                    "{at}: still live {} ms after being cut off",
                    model.now_ms - since
                );
            }
        }

        // 2, 5, 6: reachable and given time, the cache converges to exactly etcd's state.
        let waited = matches!(t, Transition::Wait(ms) if *ms >= CONVERGE_MS);
        if waited && model.reachable && !model.stalled {
            let s = &self.last;
            assert!(s.freshness().is_live(), "{at}: not live: {}", brief(s));
            assert_eq!(
                show(&instances(s)),
                show(&model.current()),
                "{at}: not converged: {}",
                brief(s)
            );
            assert_eq!(instances(s), model.current(), "{at}: not converged");
            assert!(
                s.revision() >= model.epoch().last_change() && s.revision() <= model.revision,
                "{at}: converged at revision {}, last change at {}, etcd at {}",
                s.revision(),
                model.epoch().last_change(),
                model.revision
            );
            let restores = model.restores - self.restores_at_converge;
            let resets = stats.resets - self.resets_at_converge;
            // A wipe that kept the cluster id and whose new history holds, at the revision the
            // cache had applied, exactly what it applied (an empty prefix both times, say) is
            // rightly not a reset: the cache resumes on a history that agrees with it.
            let new_identities = model.epochs[model.epochs.len() - restores as usize..]
                .iter()
                .filter(|e| !e.same_identity)
                .count() as u64;
            assert!(
                resets <= restores && (new_identities == 0 || resets >= 1),
                "{at}: {resets} resets after {restores} restores/wipes ({new_identities} with a new cluster id)"
            );
            self.restores_at_converge = model.restores;
            self.resets_at_converge = stats.resets;
            assert_eq!(self.etcd.watcher_count(), 1, "{at}: one open watch");
        }

        self.stats = stats;
        self.compactions = model.compactions;
        self.restores = model.restores;
    }
}
