//! The `sync_machine` target: arbitrary sequences of inputs fed to the sans-IO [`Machine`], with
//! the machine's promises checked after every call.
//!
//! # Input format
//!
//! The bytes are read with `arbitrary` as a `Vec<`[`Step`]`>` (at most [`MAX_STEPS`] are used).
//! The mirror types below are deliberately small: keys come from five ids under the watched
//! prefix plus a few bad keys, values are valid native JSON, JSON that fails validation, or
//! garbage bytes, and revisions and cluster ids come from small ranges, so that duplicates, stale
//! events, regressions and cluster changes are frequent rather than astronomically rare.
//!
//! # What is checked
//!
//! On every call (`handle` for [`Step::One`], `handle_all` for [`Step::Together`], whose inputs
//! after the first never answer an action: see [`run`]):
//!
//! - Shape: at most one `Publish`, first, and at most one other action; a published snapshot is
//!   the machine's [`published`](Machine::published) one afterwards; without a publish that one
//!   did not change. `Watch { from_revision }` is `revision() + 1` (invariant 2), a `Sleep` is at
//!   most the backoff's `max`. [`Stats`] counters never go down.
//! - Every published snapshot is well formed: the service's, instances valid, sorted by key (so by
//!   id, as every key shares the prefix) with no id twice.
//! - Invariant 1 (a failure freezes the set): from a `Failed` input on, until a published snapshot
//!   is live again (which takes an authoritative answer: a list, or a watch accepted anew), every
//!   published snapshot has the instance set of the last one published before the failure. In a
//!   `handle_all` call where an input that may change the set comes *before* the failure, the set
//!   at the failure is not observable (publishing happens once, at the end), so that call is not
//!   checked and the reference becomes the set it published.
//! - Invariant 4: the published revision, and [`Machine::revision`], never go down unless
//!   `stats().resets` went up in the same call.
//! - Single inputs are checked against a reference model of what they do:
//!   - `Listed`: handled exactly when the machine answers `Watch`. Then the set is exactly the
//!     decodable kvs, `decode_errors` grows by the undecodable ones, the revision is the header's,
//!     the snapshot is live (and the first list always publishes), `relists` grows unless it is
//!     the first list, and `resets` grows exactly when the list went back (an older revision than
//!     the applied one, or another cluster). Ignored otherwise: nothing changes at all.
//!   - `WatchBatch` (invariants 2, 3, 7): either ignored (no event counted, set, revision and
//!     `decode_errors` unchanged) or applied as a whole. Applied, the reference applies, in order,
//!     every event above the revision before the call: a put that decodes sets its id, a put that
//!     does not decode removes it and counts one decode error, a delete removes it. The published
//!     set must be the reference's, `events_applied` / `events_skipped` / `decode_errors` must grow
//!     by the reference's counts, the revision is the highest applied one, and the snapshot is live.
//!   - Any other input never changes the set or counts a decode error, and publishes only to
//!     change freshness (a progress notification alone publishes nothing).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_registry::backend::{
    Event, EventKind, Header, KeyRevision, KeyValue, KeysAt, ListResponse,
};
use etcd_registry::instance::Instance;
use etcd_registry::snapshot::{FreezeCause, Snapshot};
use etcd_registry::sync::{Action, BackoffConfig, Input, Machine, Stats};
use etcd_registry::{Codec, Decoded, KeyLayout};
use libfuzzer_sys::arbitrary::{self, Arbitrary};

/// The service the machine follows.
pub const SERVICE: &str = "user";
/// The namespace of its keys.
pub const NAMESPACE: &str = "/services";
/// The usual cluster id; [`Hdr::cluster`] sometimes picks `CLUSTER + 1`.
pub const CLUSTER: u64 = 7;
/// Revisions are taken modulo this, so they repeat and go back often.
pub const REVISIONS: u8 = 24;
/// How many steps of one input are used.
pub const MAX_STEPS: usize = 64;
/// How many kvs a list, events a batch, inputs a `Together` and bytes a garbage value keep.
pub const MAX_KVS: usize = 8;
/// See [`MAX_KVS`].
pub const MAX_EVENTS: usize = 8;
/// See [`MAX_KVS`].
pub const MAX_TOGETHER: usize = 4;
/// See [`MAX_KVS`].
pub const MAX_GARBAGE: usize = 24;

/// One step of a script.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// One input, fed with [`Machine::handle`].
    One(Op),
    /// Inputs that arrived together, fed with [`Machine::handle_all`].
    Together(Vec<Op>),
    /// Time passes: this many milliseconds.
    Advance(u16),
}

/// A mirror of [`Input`].
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// [`Input::Listed`].
    Listed {
        /// The list's header.
        header: Hdr,
        /// Its kvs (a key given twice keeps its first kv, as etcd never lists a key twice).
        kvs: Vec<Kv>,
    },
    /// [`Input::WatchStarted`].
    WatchStarted(Hdr),
    /// [`Input::WatchBatch`].
    WatchBatch {
        /// The response header.
        header: Hdr,
        /// Its events, in the given order.
        events: Vec<Ev>,
    },
    /// [`Input::Progress`].
    Progress(Hdr),
    /// [`Input::Compacted`] at this revision (modulo [`REVISIONS`]).
    Compacted(u8),
    /// [`Input::Failed`].
    Failed(Cause),
    /// [`Input::TimerFired`].
    TimerFired,
    /// [`Input::Verified`]: etcd's keys at some revision (a key given twice counts once).
    Verified {
        /// The response header.
        header: Hdr,
        /// The keys with their mod revisions (from the kvs; values are ignored).
        keys: Vec<Kv>,
    },
    /// [`Input::HistoryShorter`].
    HistoryShorter,
}

/// A mirror of [`Header`].
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    /// The revision, modulo [`REVISIONS`].
    pub revision: u8,
    /// The cluster id is `CLUSTER + 1` when this is 7 modulo 8, else `CLUSTER`.
    pub cluster: u8,
}

/// A mirror of [`KeyValue`].
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// Which key; see [`key`].
    pub key: u8,
    /// The value.
    pub value: Value,
    /// The revision of the change, modulo [`REVISIONS`].
    pub mod_revision: u8,
}

/// A mirror of [`Event`]; a delete's value is dropped, as etcd sends none.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Ev {
    /// A delete rather than a put.
    pub delete: bool,
    /// The key, value and revision.
    pub kv: Kv,
}

/// A value, valid or not.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `{"addr":"10.0.0.N:80"}`.
    Addr(u8),
    /// Every native field: valid unless the weight is 0.
    Full {
        /// The port is this plus one.
        port: u8,
        /// The weight (0 is invalid).
        weight: u8,
        /// The state.
        draining: bool,
    },
    /// JSON that decodes but names another id than its key's.
    IdMismatch,
    /// Arbitrary bytes (at most [`MAX_GARBAGE`]).
    Garbage(Vec<u8>),
}

/// A mirror of [`FreezeCause`].
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Cause {
    NotListed,
    Unavailable,
    NoLeader,
    Timeout,
    Stalled,
    Auth,
    Other,
}

/// The key a [`Kv::key`] byte names: mostly one of five ids under the prefix, sometimes a key the
/// codec refuses (another service, a nested key, an empty id, non-UTF-8).
pub fn key(k: u8) -> Vec<u8> {
    let n = k % 5;
    match k {
        0..=207 => format!("{NAMESPACE}/{SERVICE}/i{n}").into_bytes(),
        208..=223 => format!("{NAMESPACE}/{SERVICE}2/i{n}").into_bytes(),
        224..=239 => format!("{NAMESPACE}/{SERVICE}/i{n}/x").into_bytes(),
        240..=247 => format!("{NAMESPACE}/{SERVICE}/").into_bytes(),
        _ => {
            let mut key = format!("{NAMESPACE}/{SERVICE}/").into_bytes();
            key.extend_from_slice(&[0xff, n]);
            key
        }
    }
}

fn value(v: &Value) -> Vec<u8> {
    match v {
        Value::Addr(n) => format!(r#"{{"addr":"10.0.0.{n}:80"}}"#).into_bytes(),
        Value::Full {
            port,
            weight,
            draining,
        } => {
            let port = u16::from(*port) + 1;
            let state = if *draining { "draining" } else { "up" };
            format!(
                r#"{{"addr":"h-1:{port}","tags":["t"],"meta":{{"z":"a"}},"weight":{weight},"state":"{state}"}}"#
            )
            .into_bytes()
        }
        Value::IdMismatch => br#"{"id":"nope","addr":"10.0.0.1:80"}"#.to_vec(),
        Value::Garbage(bytes) => bytes[..bytes.len().min(MAX_GARBAGE)].to_vec(),
    }
}

fn header(h: Hdr) -> Header {
    Header {
        revision: i64::from(h.revision % REVISIONS),
        cluster_id: if h.cluster % 8 == 7 {
            CLUSTER + 1
        } else {
            CLUSTER
        },
    }
}

fn kv(kv: &Kv, with_value: bool) -> KeyValue {
    let rev = i64::from(kv.mod_revision % REVISIONS);
    KeyValue {
        key: key(kv.key),
        value: if with_value {
            value(&kv.value)
        } else {
            Vec::new()
        },
        create_revision: rev,
        mod_revision: rev,
        lease: 0,
    }
}

fn cause(c: Cause) -> FreezeCause {
    match c {
        Cause::NotListed => FreezeCause::NotListed,
        Cause::Unavailable => FreezeCause::Unavailable,
        Cause::NoLeader => FreezeCause::NoLeader,
        Cause::Timeout => FreezeCause::Timeout,
        Cause::Stalled => FreezeCause::Stalled,
        Cause::Auth => FreezeCause::Auth,
        Cause::Other => FreezeCause::Other,
    }
}

/// The library's [`Input`] for an [`Op`].
pub fn input(op: &Op) -> Input {
    match op {
        Op::Listed { header: h, kvs } => {
            let mut by_key = BTreeMap::new();
            for k in kvs.iter().take(MAX_KVS) {
                let k = kv(k, true);
                by_key.entry(k.key.clone()).or_insert(k);
            }
            Input::Listed(ListResponse {
                header: header(*h),
                kvs: by_key.into_values().collect(),
            })
        }
        Op::WatchStarted(h) => Input::WatchStarted(header(*h)),
        Op::WatchBatch { header: h, events } => Input::WatchBatch {
            header: header(*h),
            events: events
                .iter()
                .take(MAX_EVENTS)
                .map(|e| Event {
                    kind: if e.delete {
                        EventKind::Delete
                    } else {
                        EventKind::Put
                    },
                    kv: kv(&e.kv, !e.delete),
                })
                .collect(),
        },
        Op::Progress(h) => Input::Progress(header(*h)),
        Op::Compacted(r) => Input::Compacted {
            compact_revision: i64::from(r % REVISIONS),
        },
        Op::Failed(c) => Input::Failed(cause(*c)),
        Op::TimerFired => Input::TimerFired,
        Op::Verified { header: h, keys } => {
            let mut by_key = BTreeMap::new();
            for k in keys.iter().take(MAX_KVS) {
                let k = kv(k, true);
                by_key.entry(k.key.clone()).or_insert(k);
            }
            Input::Verified(KeysAt {
                header: header(*h),
                keys: by_key
                    .into_values()
                    .map(|kv| KeyRevision {
                        key: kv.key,
                        mod_revision: kv.mod_revision,
                        create_revision: kv.create_revision,
                        lease: kv.lease,
                        value: Some(kv.value),
                    })
                    .collect(),
            })
        }
        Op::HistoryShorter => Input::HistoryShorter,
    }
}

/// Runs a script; panics if the machine breaks a promise (see the module docs).
pub fn run(steps: &[Step]) {
    let mut h = Harness::new();
    for step in steps.iter().take(MAX_STEPS) {
        match step {
            Step::Advance(ms) => h.elapsed += Duration::from_millis(u64::from(*ms)),
            Step::One(op) => h.call(vec![input(op)], true),
            Step::Together(ops) => {
                // An answer to an action (a list, an accepted watch, a timer) cannot arrive
                // together with the input that asked for it, so only the first input of a group
                // may be one; later ones are dropped. (With them the returned action could be
                // stale, e.g. [Listed, WatchStarted] returns the list's `Watch` while the machine
                // already watches: a sequence no driver can produce.)
                let inputs = ops
                    .iter()
                    .take(MAX_TOGETHER)
                    .enumerate()
                    .filter(|(k, op)| *k == 0 || !is_answer(op))
                    .map(|(_, op)| input(op))
                    .collect();
                h.call(inputs, false);
            }
        }
    }
}

/// Whether an input answers an action of the machine (`List`, `Watch`, `Sleep`).
fn is_answer(op: &Op) -> bool {
    matches!(
        op,
        Op::Listed { .. }
            | Op::WatchStarted(_)
            | Op::TimerFired
            | Op::Verified { .. }
            | Op::HistoryShorter
    )
}

/// The instances of a snapshot by id.
type Set = BTreeMap<String, Instance>;

fn set_of(snapshot: &Snapshot) -> Set {
    snapshot
        .instances()
        .iter()
        .map(|i| (i.id().to_owned(), Instance::clone(i)))
        .collect()
}

struct Harness {
    machine: Machine,
    codec: Codec,
    backoff: BackoffConfig,
    base: Instant,
    elapsed: Duration,
    /// While frozen by a failure: the instances of the last snapshot published before it.
    frozen: Option<Vec<Arc<Instance>>>,
    /// The revision of the last published snapshot.
    published_revision: i64,
    /// The cluster id of the last list the machine handled.
    listed_cluster: Option<u64>,
    /// A history check was answered since the last list: a check that found other keys makes
    /// the next list a reset even when its revision does not go back.
    checked_since_list: bool,
}

impl Harness {
    fn new() -> Self {
        let codec = Codec::new(KeyLayout::Native, NAMESPACE);
        let backoff = BackoffConfig::default();
        let base = Instant::now();
        let mut machine = Machine::new(SERVICE, codec.clone(), backoff, 42, base);
        let first = machine.start();
        assert!(matches!(first.as_slice(), [Action::List]), "{first:?}");
        assert_eq!(machine.revision(), 0);
        assert!(!machine.published().freshness().is_live());
        assert!(machine.published().is_empty());
        Self {
            machine,
            codec,
            backoff,
            base,
            elapsed: Duration::ZERO,
            frozen: None,
            published_revision: 0,
            listed_cluster: None,
            checked_since_list: false,
        }
    }

    fn call(&mut self, inputs: Vec<Input>, single: bool) {
        let now = self.base + self.elapsed;
        let stats0 = self.machine.stats();
        let rev0 = self.machine.revision();
        let pub0 = self.machine.published().clone();
        let listed0 = self.machine.has_listed();

        let actions = if single {
            self.machine.handle(now, inputs[0].clone())
        } else {
            self.machine.handle_all(now, inputs.clone())
        };
        let stats = self.machine.stats();

        // ---- shape of the answer
        let mut published = None;
        let mut next = None;
        for action in actions {
            match action {
                Action::Publish(s) => {
                    assert!(published.is_none(), "two publishes in one call");
                    assert!(next.is_none(), "a publish after another action");
                    published = Some(s);
                }
                other => {
                    assert!(next.is_none(), "two actions besides publishing: {other:?}");
                    next = Some(other);
                }
            }
        }
        match &published {
            Some(s) => assert!(Arc::ptr_eq(s, self.machine.published())),
            None => assert!(Arc::ptr_eq(&pub0, self.machine.published())),
        }
        match next {
            Some(Action::Watch { from_revision }) => assert_eq!(
                from_revision,
                self.machine.revision().saturating_add(1),
                "a watch resumes right after the applied revision"
            ),
            Some(Action::Sleep(d)) => assert!(d <= self.backoff.max, "sleep {d:?}"),
            _ => {}
        }
        assert_counters_only_grow(&stats0, &stats);
        if let Some(s) = &published {
            assert_well_formed(s);
        }

        // ---- invariant 4: revisions only go down with a reset
        assert!(
            self.machine.published().revision() <= self.machine.revision(),
            "the published revision is ahead of the applied one"
        );
        let reset = stats.resets > stats0.resets;
        assert!(
            self.machine.revision() >= rev0 || reset,
            "revision {} -> {} without a reset",
            rev0,
            self.machine.revision()
        );
        if let Some(s) = &published {
            assert!(
                s.revision() >= self.published_revision || reset,
                "published revision {} -> {} without a reset",
                self.published_revision,
                s.revision()
            );
            self.published_revision = s.revision();
        }

        // ---- invariant 1: a failure freezes the instance set
        let may_change = |i: &Input| {
            !matches!(
                i,
                Input::Failed(_) | Input::TimerFired | Input::Verified(_) | Input::HistoryShorter
            )
        };
        let mut reanchor = false;
        if let Some(k) = inputs.iter().position(|i| matches!(i, Input::Failed(_))) {
            if inputs[..k].iter().any(may_change) {
                reanchor = true;
            } else if self.frozen.is_none() {
                self.frozen = Some(pub0.instances().to_vec());
            }
        }
        if let Some(s) = &published {
            if s.freshness().is_live() {
                self.frozen = None;
            } else if let (Some(reference), false) = (&self.frozen, reanchor) {
                assert_eq!(
                    s.instances(),
                    &reference[..],
                    "invariant 1: a frozen snapshot changed its instance set"
                );
            }
        }
        if reanchor {
            let p = self.machine.published();
            self.frozen = (!p.freshness().is_live()).then(|| p.instances().to_vec());
        }

        // ---- the cluster the machine now compares headers with: a group holds at most one list,
        // first (see `run`), and a handled list counts a relist or is the first one.
        let list_handled = matches!(inputs.first(), Some(Input::Listed(_)))
            && if listed0 {
                stats.relists > stats0.relists
            } else {
                self.machine.has_listed()
            };
        let cluster0 = self.listed_cluster;
        if let (true, Some(Input::Listed(list))) = (list_handled, inputs.first()) {
            self.listed_cluster = Some(list.header.cluster_id);
        }
        let checked = self.checked_since_list;
        if list_handled {
            self.checked_since_list = false;
        }
        if inputs.iter().any(|i| matches!(i, Input::Verified(_))) {
            self.checked_since_list = true;
        }

        // ---- reference model of single inputs
        if !single {
            return;
        }
        let now_pub = self.machine.published().clone();
        match &inputs[0] {
            Input::Listed(list) => {
                let handled = matches!(next, Some(Action::Watch { .. }));
                assert_eq!(
                    handled, list_handled,
                    "a handled list relists or is the first"
                );
                if !handled {
                    assert_eq!(stats, stats0, "an ignored list changed the stats");
                    assert!(published.is_none(), "an ignored list published");
                    assert_eq!(self.machine.revision(), rev0);
                    return;
                }
                let mut expected = Set::new();
                let mut errors = 0;
                for kv in &list.kvs {
                    match self.codec.decode(SERVICE, &kv.key, &kv.value) {
                        Ok(Decoded::Put(i)) => {
                            expected.insert(i.id().to_owned(), i);
                        }
                        Ok(Decoded::Delete) => unreachable!("native values are never deletes"),
                        Err(_) => errors += 1,
                    }
                }
                assert_eq!(
                    set_of(&now_pub),
                    expected,
                    "a list sets exactly its instances"
                );
                assert_eq!(stats.decode_errors - stats0.decode_errors, errors);
                assert_eq!(self.machine.revision(), list.header.revision);
                assert_eq!(now_pub.revision(), list.header.revision);
                assert!(
                    now_pub.freshness().is_live(),
                    "a list makes the snapshot live"
                );
                if !listed0 {
                    assert!(published.is_some(), "the first list always publishes");
                }
                let went_back = cluster0.is_some_and(|c| c != list.header.cluster_id)
                    || list.header.revision < rev0;
                assert_eq!(stats.relists - stats0.relists, u64::from(listed0));
                let resets = stats.resets - stats0.resets;
                if listed0 && went_back {
                    assert_eq!(resets, 1, "a relist that goes back is a reset");
                } else {
                    assert!(
                        resets <= u64::from(listed0 && checked),
                        "a reset without going back, and no history check to say so"
                    );
                }
            }
            Input::WatchBatch { events, .. } => {
                let counted = (stats.events_applied - stats0.events_applied)
                    + (stats.events_skipped - stats0.events_skipped);
                if counted == 0 {
                    // Ignored (another phase, or a regression that relists): nothing applied.
                    assert_eq!(
                        set_of(&now_pub),
                        set_of(&pub0),
                        "an ignored batch changed the set"
                    );
                    assert_eq!(stats.decode_errors, stats0.decode_errors);
                    assert_eq!(self.machine.revision(), rev0);
                    return;
                }
                assert_eq!(
                    counted,
                    events.len() as u64,
                    "a batch is applied whole or not at all"
                );
                let mut expected = set_of(&pub0);
                let (mut applied, mut skipped, mut errors, mut top) = (0, 0, 0, rev0);
                for event in events {
                    let rev = event.kv.mod_revision;
                    if rev <= rev0 {
                        skipped += 1;
                        continue;
                    }
                    applied += 1;
                    top = top.max(rev);
                    let Ok(id) = self.codec.instance_id(SERVICE, &event.kv.key) else {
                        // A key the codec refuses never names an instance in the set; a put
                        // under it still counts as a decode error.
                        if event.kind == EventKind::Put {
                            errors += 1;
                        }
                        continue;
                    };
                    let id = id.to_owned();
                    let decoded = match event.kind {
                        EventKind::Delete => None,
                        EventKind::Put => {
                            match self.codec.decode(SERVICE, &event.kv.key, &event.kv.value) {
                                Ok(Decoded::Put(i)) => Some(i),
                                Ok(Decoded::Delete) => unreachable!("native values never delete"),
                                Err(_) => {
                                    errors += 1;
                                    None
                                }
                            }
                        }
                    };
                    match decoded {
                        Some(i) => expected.insert(id, i),
                        None => expected.remove(&id),
                    };
                }
                assert_eq!(
                    set_of(&now_pub),
                    expected,
                    "invariant 7: the batch's valid events"
                );
                assert_eq!(stats.events_applied - stats0.events_applied, applied);
                assert_eq!(stats.events_skipped - stats0.events_skipped, skipped);
                assert_eq!(
                    stats.decode_errors - stats0.decode_errors,
                    errors,
                    "invariant 7: one decode error per undecodable put above the revision"
                );
                assert_eq!(self.machine.revision(), top);
                if applied > 0 {
                    // An applied event publishes its revision; with every event skipped the
                    // snapshot may keep an older one (a progress notification moved the machine
                    // on without publishing).
                    assert_eq!(now_pub.revision(), top);
                }
                assert!(now_pub.freshness().is_live(), "an applied batch is live");
            }
            other => {
                assert_eq!(
                    now_pub.instances(),
                    pub0.instances(),
                    "{other:?} changed the instance set"
                );
                assert_eq!(stats.decode_errors, stats0.decode_errors);
                if let Some(s) = &published {
                    assert_ne!(
                        s.freshness(),
                        pub0.freshness(),
                        "{other:?} published without a change of freshness"
                    );
                }
            }
        }
    }
}

fn assert_counters_only_grow(a: &Stats, b: &Stats) {
    let pairs = [
        ("relists", a.relists, b.relists),
        ("resets", a.resets, b.resets),
        ("watch_restarts", a.watch_restarts, b.watch_restarts),
        ("events_applied", a.events_applied, b.events_applied),
        ("events_skipped", a.events_skipped, b.events_skipped),
        ("decode_errors", a.decode_errors, b.decode_errors),
        ("failures", a.failures, b.failures),
        ("verifications", a.verifications, b.verifications),
    ];
    for (name, before, after) in pairs {
        assert!(after >= before, "{name} went down: {before} -> {after}");
    }
}

fn assert_well_formed(s: &Snapshot) {
    assert_eq!(s.service(), SERVICE);
    let mut last: Option<&str> = None;
    for i in s.instances() {
        assert_eq!(i.service(), SERVICE);
        assert_eq!(
            i.to_builder().build().as_ref(),
            Ok(&**i),
            "an invalid instance"
        );
        if let Some(prev) = last {
            assert!(
                prev < i.id(),
                "ids out of key order or repeated: {prev:?}, {:?}",
                i.id()
            );
        }
        last = Some(i.id());
    }
    assert_eq!(s.len(), s.instances().len());
}
