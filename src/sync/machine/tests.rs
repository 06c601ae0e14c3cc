//! Transition tests of the sync machine: plain function calls, no runtime, time passed in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::backend::{Event, EventKind, Header, KeyRevision, KeyValue, KeysAt, ListResponse};
use crate::codec::{Codec, KeyLayout};
use crate::snapshot::{FreezeCause, Freshness, Snapshot};

const CLUSTER: u64 = 7;

fn key(id: &str) -> Vec<u8> {
    format!("/svc/user/{id}").into_bytes()
}

fn kv(id: &str, port: u16, rev: i64) -> KeyValue {
    KeyValue {
        key: key(id),
        value: format!(r#"{{"addr":"10.0.0.1:{port}"}}"#).into_bytes(),
        create_revision: rev,
        mod_revision: rev,
        lease: 0,
    }
}

fn garbage(id: &str, rev: i64) -> KeyValue {
    KeyValue {
        key: key(id),
        value: b"\xff not json".to_vec(),
        create_revision: rev,
        mod_revision: rev,
        lease: 0,
    }
}

fn put(id: &str, port: u16, rev: i64) -> Event {
    Event {
        kind: EventKind::Put,
        kv: kv(id, port, rev),
    }
}

fn del(id: &str, rev: i64) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key(id),
            mod_revision: rev,
            ..KeyValue::default()
        },
    }
}

fn hdr(rev: i64) -> Header {
    Header {
        revision: rev,
        cluster_id: CLUSTER,
    }
}

fn listed(rev: i64, kvs: Vec<KeyValue>) -> Input {
    Input::Listed(ListResponse {
        header: hdr(rev),
        kvs,
    })
}

/// etcd's keys-only answer at some revision: `(id, mod revision)` pairs, in key order.
fn keys_at(rev: i64, keys: &[(&str, i64)]) -> Input {
    let mut keys: Vec<KeyRevision> = keys
        .iter()
        .map(|&(id, mod_revision)| KeyRevision {
            key: key(id),
            mod_revision,
            create_revision: mod_revision,
            lease: 0,
            value: None,
        })
        .collect();
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    Input::Verified(KeysAt {
        header: hdr(rev),
        keys,
    })
}

fn batch(rev: i64, events: Vec<Event>) -> Input {
    Input::WatchBatch {
        header: hdr(rev),
        events,
    }
}

/// What a step is expected to ask the driver for (publishes are checked separately).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Next {
    Nothing,
    List,
    Verify(i64),
    Watch(i64),
    /// A sleep no longer than this.
    SleepAtMost(Duration),
}

struct Harness {
    machine: Machine,
    now: Instant,
    published: Vec<Arc<Snapshot>>,
}

impl Harness {
    fn new() -> Self {
        Self::with_backoff(BackoffConfig::default())
    }

    fn with_backoff(backoff: BackoffConfig) -> Self {
        let now = Instant::now();
        let mut machine = Machine::new(
            "user",
            Codec::new(KeyLayout::Native, "/svc"),
            backoff,
            42,
            now,
        );
        let first = machine.start();
        assert!(matches!(first.as_slice(), [Action::List]), "{first:?}");
        Self {
            machine,
            now,
            published: Vec::new(),
        }
    }

    /// A machine that listed `ids` at revision 10 and is watching.
    fn watching(ids: &[&str]) -> Self {
        let mut h = Self::new();
        let kvs = ids.iter().map(|id| kv(id, 80, 10)).collect();
        h.expect(listed(10, kvs), Next::Watch(11));
        h.open_watch(10);
        h
    }

    /// The watch asked for is accepted at `header_revision`, the machine checks etcd's keys at
    /// its applied revision, and finds what it applied: it follows the watch.
    #[track_caller]
    fn open_watch(&mut self, header_revision: i64) {
        let applied = self.machine.revision();
        self.expect(
            Input::WatchStarted(hdr(header_revision)),
            Next::Verify(applied),
        );
        let held = self.held();
        self.expect(held, Next::Nothing);
    }

    /// A machine whose watch (at revision 20) saw a header behind it (15), relisted, and learned
    /// from the linearizable list (21) that nothing went back: it is about to open a new watch.
    fn relisted_after_a_lagging_watch() -> Self {
        let mut h = Self::watching(&["a"]);
        h.expect(batch(20, vec![put("b", 1, 20)]), Next::Nothing);
        h.expect(Input::Progress(hdr(15)), Next::List);
        h.expect(
            listed(21, vec![kv("a", 80, 10), kv("b", 1, 20)]),
            Next::Watch(22),
        );
        h
    }

    /// Sleeping after a failure: the timer fires, the machine checks etcd's keys at the applied
    /// revision, finds what it applied, and resumes the watch right after it.
    #[track_caller]
    fn resume(&mut self) {
        self.reconnect();
        let held = self.held();
        self.expect(held, Next::Nothing);
        assert!(self.last().freshness().is_live());
    }

    /// Sleeping after a failure: the timer fires, the watch resumes right after the applied
    /// revision, and once it is open the machine asks for etcd's keys at that revision.
    #[track_caller]
    fn reconnect(&mut self) {
        let applied = self.machine.revision();
        self.expect(Input::TimerFired, Next::Watch(applied + 1));
        self.expect(Input::WatchStarted(hdr(applied)), Next::Verify(applied));
    }

    /// etcd's answer to the history check when its history is the one applied: every key the
    /// machine holds, with its revisions, lease and a value that decodes to what it holds.
    fn held(&self) -> Input {
        let codec = Codec::new(KeyLayout::Native, "/svc");
        Input::Verified(KeysAt {
            header: hdr(self.machine.revision()),
            keys: self
                .machine
                .entries
                .iter()
                .map(|(key, entry)| KeyRevision {
                    key: key.to_vec(),
                    mod_revision: entry.mod_revision,
                    create_revision: entry.create_revision,
                    lease: entry.lease,
                    value: Some(match &entry.instance {
                        Some(instance) => codec.encode_value(instance),
                        None => b"\xff not json".to_vec(),
                    }),
                })
                .collect(),
        })
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn feed(&mut self, input: Input) -> Next {
        let actions = self.machine.handle(self.now, input);
        let mut next = Next::Nothing;
        let mut publishes = 0;
        for action in actions {
            match action {
                Action::Publish(s) => {
                    publishes += 1;
                    self.published.push(s);
                }
                Action::List => next = Next::List,
                Action::Verify { revision, .. } => next = Next::Verify(revision),
                Action::Watch { from_revision } => next = Next::Watch(from_revision),
                Action::Sleep(d) => next = Next::SleepAtMost(d),
            }
        }
        assert!(publishes <= 1, "one input published {publishes} snapshots");
        next
    }

    #[track_caller]
    fn expect(&mut self, input: Input, want: Next) {
        let got = self.feed(input);
        match (got, want) {
            (Next::SleepAtMost(d), Next::SleepAtMost(max)) => {
                assert!(d <= max && !d.is_zero(), "slept {d:?}, at most {max:?}")
            }
            _ => assert_eq!(got, want),
        }
    }

    fn last(&self) -> &Snapshot {
        self.published.last().expect("something was published")
    }

    fn ids(&self) -> Vec<String> {
        self.last()
            .instances()
            .iter()
            .map(|i| format!("{}@{}", i.id(), i.addr()))
            .collect()
    }
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn first_list_publishes_and_watches_from_the_next_revision() {
    let mut h = Harness::new();
    h.expect(
        listed(5, vec![kv("a", 1, 3), kv("b", 2, 5)]),
        Next::Watch(6),
    );
    assert_eq!(h.published.len(), 1);
    assert_eq!(h.ids(), ids(&["a@10.0.0.1:1", "b@10.0.0.1:2"]));
    assert_eq!(h.last().revision(), 5);
    assert_eq!(h.last().freshness(), Freshness::Live);
    assert!(h.machine.has_listed());
}

#[test]
fn an_empty_first_list_is_still_published_live() {
    let mut h = Harness::new();
    h.expect(listed(1, vec![]), Next::Watch(2));
    assert!(h.last().is_empty());
    assert!(h.last().freshness().is_live());
}

/// Each row: inputs after a machine listed {a, b} at revision 10 and started watching; then the
/// instance set and revision it must end with.
#[test]
fn watch_transitions_table() {
    type Row = (&'static str, Vec<Input>, &'static [&'static str], i64);
    let table: Vec<Row> = vec![
        (
            "put adds",
            vec![batch(11, vec![put("c", 3, 11)])],
            &["a@10.0.0.1:80", "b@10.0.0.1:80", "c@10.0.0.1:3"],
            11,
        ),
        (
            "put changes",
            vec![batch(11, vec![put("a", 9, 11)])],
            &["a@10.0.0.1:9", "b@10.0.0.1:80"],
            11,
        ),
        (
            "delete removes",
            vec![batch(11, vec![del("a", 11)])],
            &["b@10.0.0.1:80"],
            11,
        ),
        (
            "events at or below the applied revision are ignored",
            vec![batch(12, vec![del("a", 10), put("z", 1, 9)])],
            &["a@10.0.0.1:80", "b@10.0.0.1:80"],
            10,
        ),
        (
            "a batch straddling the applied revision applies only the new part",
            vec![
                batch(11, vec![put("c", 3, 11)]),
                batch(12, vec![del("c", 11), put("d", 4, 12)]),
            ],
            &[
                "a@10.0.0.1:80",
                "b@10.0.0.1:80",
                "c@10.0.0.1:3",
                "d@10.0.0.1:4",
            ],
            12,
        ),
        (
            "a move in one transaction",
            vec![batch(11, vec![del("a", 11), put("a2", 80, 11)])],
            &["a2@10.0.0.1:80", "b@10.0.0.1:80"],
            11,
        ),
        (
            "garbage over a valid entry removes it, neighbours stay",
            vec![batch(
                11,
                vec![
                    Event {
                        kind: EventKind::Put,
                        kv: garbage("a", 11),
                    },
                    put("c", 3, 11),
                ],
            )],
            &["b@10.0.0.1:80", "c@10.0.0.1:3"],
            11,
        ),
        (
            "progress proves liveness and moves nothing",
            vec![Input::Progress(hdr(40))],
            &["a@10.0.0.1:80", "b@10.0.0.1:80"],
            10,
        ),
        (
            "a batch from another cluster is not applied",
            vec![Input::WatchBatch {
                header: Header {
                    revision: 11,
                    cluster_id: CLUSTER + 1,
                },
                events: vec![del("a", 11)],
            }],
            &["a@10.0.0.1:80", "b@10.0.0.1:80"],
            10,
        ),
    ];
    for (name, inputs, want, revision) in table {
        let mut h = Harness::watching(&["a", "b"]);
        for input in inputs {
            h.feed(input);
        }
        assert_eq!(h.ids(), ids(want), "{name}");
        assert_eq!(h.machine.revision(), revision, "{name}");
    }
}

#[test]
fn each_batch_is_one_publish_with_all_its_events() {
    let mut h = Harness::watching(&["a", "b"]);
    let before = h.published.len();
    h.expect(
        batch(11, vec![del("a", 11), put("a2", 80, 11), del("b", 11)]),
        Next::Nothing,
    );
    assert_eq!(h.published.len(), before + 1);
    assert_eq!(h.ids(), ids(&["a2@10.0.0.1:80"]));
    assert_eq!(h.last().revision(), 11);
}

#[test]
fn several_inputs_at_once_publish_once() {
    let mut h = Harness::watching(&["a"]);
    let before = h.published.len();
    let actions = h.machine.handle_all(
        h.now,
        vec![
            batch(11, vec![put("b", 1, 11)]),
            batch(12, vec![put("c", 1, 12)]),
            batch(13, vec![del("a", 13)]),
        ],
    );
    let publishes: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(publishes.len(), 1);
    assert_eq!(publishes[0].len(), 2);
    assert_eq!(publishes[0].revision(), 13);
    assert_eq!(h.published.len(), before);
}

#[test]
fn failure_freezes_without_clearing_and_resumes_after_the_applied_revision() {
    let mut h = Harness::watching(&["a", "b"]);
    h.expect(batch(11, vec![put("c", 3, 11)]), Next::Nothing);
    let live = h.ids();
    h.advance(Duration::from_secs(1));
    let frozen_at = h.now;
    h.expect(
        Input::Failed(FreezeCause::Unavailable),
        Next::SleepAtMost(Duration::from_millis(100)),
    );
    assert_eq!(
        h.last().freshness(),
        Freshness::Frozen {
            since: frozen_at,
            cause: FreezeCause::Unavailable
        }
    );
    assert_eq!(h.ids(), live, "a failure must not change the instances");
    // More failures while frozen: `since` stays, the cause follows the latest failure, and
    // only a change of cause publishes.
    let published = h.published.len();
    for _ in 0..5 {
        h.expect(Input::TimerFired, Next::Watch(12));
        h.advance(Duration::from_secs(1));
        h.feed(Input::Failed(FreezeCause::Timeout));
    }
    assert_eq!(h.published.len(), published + 1);
    assert_eq!(
        h.last().freshness(),
        Freshness::Frozen {
            since: frozen_at,
            cause: FreezeCause::Timeout
        }
    );
    assert_eq!(h.ids(), live, "a failure must not change the instances");
    // Back: the watch resumes at revision 12, no relist, and the snapshot turns live.
    h.resume();
    assert_eq!(h.machine.stats().verifications, 2);
    h.expect(Input::WatchStarted(hdr(30)), Next::Nothing);
    assert!(h.last().freshness().is_live());
    assert_eq!(h.ids(), live);
    assert_eq!(h.machine.stats().relists, 0);
    assert_eq!(h.machine.stats().watch_restarts, 1);
}

#[test]
fn failure_before_the_first_list_lists_again() {
    let mut h = Harness::new();
    h.expect(
        Input::Failed(FreezeCause::Unavailable),
        Next::SleepAtMost(Duration::from_millis(100)),
    );
    // Before a list: an empty snapshot at revision 0 that says why it is not listed yet.
    assert_eq!(h.published.len(), 1);
    assert!(h.last().is_empty());
    assert_eq!(h.last().revision(), 0);
    assert!(matches!(
        h.last().freshness(),
        Freshness::Frozen {
            cause: FreezeCause::Unavailable,
            ..
        }
    ));
    h.expect(Input::TimerFired, Next::List);
    h.expect(listed(3, vec![kv("a", 1, 3)]), Next::Watch(4));
    assert!(h.last().freshness().is_live());
}

#[test]
fn failure_while_relisting_relists_again() {
    let mut h = Harness::watching(&["a"]);
    h.expect(
        Input::Compacted {
            compact_revision: 50,
        },
        Next::List,
    );
    h.expect(
        Input::Failed(FreezeCause::Unavailable),
        Next::SleepAtMost(Duration::from_millis(100)),
    );
    h.expect(Input::TimerFired, Next::List);
}

#[test]
fn compaction_relists_once_and_applies_the_difference_in_one_snapshot() {
    let mut h = Harness::watching(&["a", "b"]);
    h.expect(
        Input::Compacted {
            compact_revision: 50,
        },
        Next::List,
    );
    let before = h.published.len();
    h.expect(
        listed(60, vec![kv("b", 80, 10), kv("c", 3, 55)]),
        Next::Watch(61),
    );
    assert_eq!(h.published.len(), before + 1);
    assert_eq!(h.ids(), ids(&["b@10.0.0.1:80", "c@10.0.0.1:3"]));
    assert_eq!(h.last().revision(), 60);
    let stats = h.machine.stats();
    assert_eq!((stats.relists, stats.resets), (1, 0));
}

#[test]
fn unchanged_instances_keep_their_allocation_across_a_relist() {
    let mut h = Harness::watching(&["a", "b"]);
    let a = h.last().instances()[0].clone();
    h.expect(
        Input::Compacted {
            compact_revision: 50,
        },
        Next::List,
    );
    h.expect(listed(60, vec![kv("a", 80, 10)]), Next::Watch(61));
    assert!(Arc::ptr_eq(&a, &h.last().instances()[0]));
}

#[test]
fn history_going_back_relists_and_the_reset_is_counted() {
    let mut h = Harness::watching(&["a", "b"]);
    h.expect(batch(20, vec![put("c", 3, 20)]), Next::Nothing);
    // etcd restored from an older backup: the watch is accepted at revision 12 < 20.
    h.expect(Input::WatchStarted(hdr(12)), Next::Nothing); // ignored: already watching
    h.expect(
        Input::Failed(FreezeCause::Unavailable),
        Next::SleepAtMost(Duration::from_millis(100)),
    );
    h.expect(Input::TimerFired, Next::Watch(21));
    h.expect(Input::WatchStarted(hdr(12)), Next::List);
    h.expect(listed(12, vec![kv("a", 80, 10)]), Next::Watch(13));
    assert_eq!(h.ids(), ids(&["a@10.0.0.1:80"]));
    assert_eq!(
        h.last().revision(),
        12,
        "an explicit reset lowers the revision"
    );
    assert_eq!(h.machine.stats().resets, 1);
}

#[test]
fn a_new_cluster_id_relists_even_at_a_higher_revision() {
    let mut h = Harness::watching(&["a"]);
    let other = Header {
        revision: 99,
        cluster_id: CLUSTER + 1,
    };
    h.expect(Input::Progress(other), Next::List);
    h.expect(
        Input::Listed(ListResponse {
            header: other,
            kvs: vec![kv("z", 1, 90)],
        }),
        Next::Watch(100),
    );
    assert_eq!(h.ids(), ids(&["z@10.0.0.1:1"]));
    assert_eq!(h.machine.stats().resets, 1);
}

#[test]
fn a_lagging_member_backs_off_instead_of_spinning() {
    let mut h = Harness::relisted_after_a_lagging_watch();
    assert_eq!(h.machine.stats().resets, 0);
    h.expect(
        Input::WatchStarted(hdr(16)),
        Next::SleepAtMost(Duration::from_millis(100)),
    );
    h.expect(Input::TimerFired, Next::List);
}

#[test]
fn undecodable_entries_are_skipped_and_counted() {
    let mut h = Harness::new();
    h.expect(
        listed(5, vec![kv("a", 1, 2), garbage("bad", 3), kv("b", 2, 4)]),
        Next::Watch(6),
    );
    assert_eq!(h.ids(), ids(&["a@10.0.0.1:1", "b@10.0.0.1:2"]));
    assert_eq!(h.machine.stats().decode_errors, 1);
    let foreign = Event {
        kind: EventKind::Put,
        kv: KeyValue {
            key: b"/svc/user/nested/key".to_vec(),
            value: br#"{"addr":"10.0.0.1:1"}"#.to_vec(),
            mod_revision: 7,
            ..KeyValue::default()
        },
    };
    h.open_watch(5);
    h.expect(batch(7, vec![foreign, put("c", 3, 7)]), Next::Nothing);
    assert_eq!(h.ids().len(), 3);
    assert_eq!(h.machine.stats().decode_errors, 2);
}

#[test]
fn inputs_that_do_not_apply_are_ignored() {
    let mut h = Harness::new();
    // Before the list: watch traffic and timers mean nothing.
    for input in [
        batch(3, vec![put("a", 1, 3)]),
        Input::Progress(hdr(3)),
        Input::TimerFired,
        Input::WatchStarted(hdr(3)),
        Input::Compacted {
            compact_revision: 2,
        },
    ] {
        h.expect(input, Next::Nothing);
    }
    assert!(h.published.is_empty());
    // While sleeping: a late failure or batch from the old watch changes nothing.
    let mut h = Harness::watching(&["a"]);
    h.expect(
        Input::Failed(FreezeCause::Unavailable),
        Next::SleepAtMost(Duration::from_millis(100)),
    );
    let published = h.published.len();
    h.expect(batch(11, vec![del("a", 11)]), Next::Nothing);
    h.expect(Input::Failed(FreezeCause::Stalled), Next::Nothing);
    h.expect(listed(11, vec![]), Next::Nothing);
    assert_eq!(h.published.len(), published);
    assert_eq!(h.ids(), ids(&["a@10.0.0.1:80"]));
}

#[test]
fn backoff_grows_exponentially_with_full_jitter_up_to_the_cap() {
    let backoff = BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        reset_after: Duration::from_secs(30),
    };
    let mut h = Harness::with_backoff(backoff);
    let mut sleeps = Vec::new();
    for _ in 0..12 {
        match h.feed(Input::Failed(FreezeCause::Unavailable)) {
            Next::SleepAtMost(d) => sleeps.push(d),
            other => panic!("expected a sleep, got {other:?}"),
        }
        h.expect(Input::TimerFired, Next::List);
    }
    for (n, d) in sleeps.iter().enumerate() {
        let envelope = (backoff.initial * 2u32.pow(n as u32)).min(backoff.max);
        assert!(*d <= envelope, "attempt {n}: {d:?} above {envelope:?}");
    }
    // Full jitter: the later sleeps are spread, not pinned to the cap.
    let capped = &sleeps[6..];
    assert!(capped.iter().any(|d| *d < backoff.max / 2), "{sleeps:?}");
    assert!(
        capped.iter().any(|d| *d > backoff.initial * 4),
        "{sleeps:?}"
    );
}

#[test]
fn a_long_healthy_watch_resets_the_backoff() {
    let backoff = BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(10),
        reset_after: Duration::from_secs(30),
    };
    let mut h = Harness::with_backoff(backoff);
    h.expect(listed(10, vec![]), Next::Watch(11));
    // Eight failures in a row push the envelope to the cap.
    for _ in 0..8 {
        h.feed(Input::Failed(FreezeCause::Unavailable));
        h.resume();
    }
    h.expect(Input::WatchStarted(hdr(10)), Next::Nothing);
    // A short healthy spell keeps the envelope high: over many seeds some sleep would exceed
    // 100 ms. After 30 s healthy, the next sleep is within the initial envelope again.
    h.advance(Duration::from_secs(31));
    h.expect(
        Input::Failed(FreezeCause::Unavailable),
        Next::SleepAtMost(backoff.initial),
    );
}

#[test]
fn jitter_is_reproducible_from_the_seed() {
    let run = |seed| {
        let now = Instant::now();
        let mut m = Machine::new(
            "user",
            Codec::new(KeyLayout::Native, "/svc"),
            BackoffConfig::default(),
            seed,
            now,
        );
        m.start();
        (0..6)
            .flat_map(|_| {
                let a = m.handle(now, Input::Failed(FreezeCause::Unavailable));
                m.handle(now, Input::TimerFired);
                a
            })
            .filter_map(|a| match a {
                Action::Sleep(d) => Some(d),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn revision_never_goes_down_without_a_counted_reset() {
    let mut h = Harness::watching(&["a"]);
    let steps = vec![
        batch(12, vec![put("b", 1, 12)]),
        batch(12, vec![put("b", 2, 11)]),
        Input::Progress(hdr(20)),
        batch(21, vec![put("c", 1, 21)]),
        Input::Failed(FreezeCause::Unavailable),
        Input::TimerFired,
        Input::WatchStarted(hdr(25)),
    ];
    for step in steps {
        h.feed(step);
    }
    let held = h.held();
    for step in [held, batch(25, vec![del("c", 19)])] {
        h.feed(step);
    }
    let revisions: Vec<i64> = h.published.iter().map(|s| s.revision()).collect();
    assert!(revisions.windows(2).all(|w| w[0] <= w[1]), "{revisions:?}");
    assert_eq!(h.machine.stats().resets, 0);
    assert_eq!(
        h.ids(),
        ids(&["a@10.0.0.1:80", "b@10.0.0.1:1", "c@10.0.0.1:1"])
    );
}

#[test]
fn the_action_returned_is_the_last_accepted_inputs() {
    // A group in which the watch is requested, acknowledged and checked leaves nothing to do.
    let mut h = Harness::new();
    let a = kv("a", 1, 5);
    let checked = Input::Verified(KeysAt {
        header: hdr(19),
        keys: vec![KeyRevision {
            key: a.key.clone(),
            mod_revision: 5,
            create_revision: 5,
            lease: 0,
            value: Some(a.value.clone()),
        }],
    });
    let actions = h.machine.handle_all(
        h.now,
        vec![
            listed(5, vec![a]),
            Input::WatchStarted(hdr(19)),
            checked,
            Input::Progress(hdr(20)),
        ],
    );
    assert!(
        actions.iter().all(|a| matches!(a, Action::Publish(_))),
        "a stale request came back: {actions:?}"
    );
    // An ignored input after an accepted one keeps the accepted one's action.
    let mut h = Harness::watching(&["a"]);
    let actions = h.machine.handle_all(
        h.now,
        vec![
            Input::Compacted {
                compact_revision: 9,
            },
            Input::TimerFired,
        ],
    );
    assert!(matches!(actions.last(), Some(Action::List)), "{actions:?}");
}

#[test]
fn backing_off_from_a_lagging_member_freezes_the_snapshot() {
    let mut h = Harness::relisted_after_a_lagging_watch();
    assert!(h.last().freshness().is_live());
    h.expect(
        Input::WatchStarted(hdr(16)),
        Next::SleepAtMost(Duration::from_millis(100)),
    );
    assert!(matches!(
        h.last().freshness(),
        Freshness::Frozen {
            cause: FreezeCause::HistoryBehind,
            ..
        }
    ));
    assert_eq!(
        h.ids(),
        ids(&["a@10.0.0.1:80", "b@10.0.0.1:1"]),
        "frozen, not cleared"
    );
}

#[test]
fn a_watch_that_keeps_disagreeing_with_the_list_backs_off() {
    // Endpoints of two clusters behind one client: every list resets to one, every watch sees
    // the other. After the first relist, each disagreement backs off instead of spinning.
    let mut h = Harness::watching(&["a"]);
    let other = Header {
        revision: 50,
        cluster_id: CLUSTER + 1,
    };
    h.expect(Input::Progress(other), Next::List);
    for round in 0..5 {
        h.feed(Input::Listed(ListResponse {
            header: if round % 2 == 0 { hdr(10) } else { other },
            kvs: vec![kv("a", 80, 10)],
        }));
        let header = if round % 2 == 0 { other } else { hdr(10) };
        match h.feed(Input::WatchStarted(header)) {
            Next::SleepAtMost(_) => {}
            got => panic!("round {round}: relisted at once ({got:?}) instead of backing off"),
        }
        h.expect(Input::TimerFired, Next::List);
    }
    assert!(h.machine.stats().resets >= 4);
}

#[test]
fn a_resumed_watch_is_trusted_only_once_etcd_holds_what_was_applied() {
    // Applied: a@10, b@10, c@11, a garbage key g@12 and a key d deleted at 13. etcd's keys at
    // 13 are the same (the garbage key too): the watch resumes at 14, nothing relisted.
    let mut h = Harness::watching(&["a", "b"]);
    h.expect(
        batch(11, vec![put("c", 3, 11), put("d", 4, 11)]),
        Next::Nothing,
    );
    h.feed(Input::WatchBatch {
        header: hdr(12),
        events: vec![Event {
            kind: EventKind::Put,
            kv: garbage("g", 12),
        }],
    });
    h.expect(batch(13, vec![del("d", 13)]), Next::Nothing);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    let same = h.held();
    h.expect(same, Next::Nothing);
    assert!(h.last().freshness().is_live());
    assert_eq!(h.machine.stats().relists, 0);
    // One check after the first list's watch, one after the reconnect.
    assert_eq!(h.machine.stats().verifications, 2);
}

#[test]
fn history_rewritten_under_the_same_identity_relists_and_counts_a_reset() {
    // The caller applied u1@2 and u2@3. etcd was wiped and restarted with the same flags (same
    // cluster id); its new history has u3@2 and other keys up to 4.
    let mut h = Harness::new();
    h.expect(
        listed(3, vec![kv("u1", 1, 2), kv("u2", 2, 3)]),
        Next::Watch(4),
    );
    h.open_watch(3);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.expect(keys_at(4, &[("u3", 2)]), Next::List);
    assert_eq!(
        h.ids(),
        ids(&["u1@10.0.0.1:1", "u2@10.0.0.1:2"]),
        "frozen, not cleared"
    );
    h.expect(listed(4, vec![kv("u3", 3, 2)]), Next::Watch(5));
    assert_eq!(h.ids(), ids(&["u3@10.0.0.1:3"]));
    assert_eq!(h.last().revision(), 4);
    let stats = h.machine.stats();
    assert_eq!((stats.relists, stats.resets), (1, 1), "{stats:?}");

    // Same keys but one changed at another revision is a rewrite too.
    let mut h = Harness::watching(&["a", "b"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.expect(keys_at(12, &[("a", 10), ("b", 9)]), Next::List);
    // And so is a key the cache never saw.
    let mut h = Harness::watching(&["a"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.expect(keys_at(12, &[("a", 10), ("z", 7)]), Next::List);
}

#[test]
fn a_history_check_that_cannot_answer_relists_or_retries() {
    // etcd has not reached the applied revision: its history went back; the list resets.
    let mut h = Harness::watching(&["a"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.expect(Input::HistoryShorter, Next::List);
    h.expect(listed(4, vec![]), Next::Watch(5));
    assert_eq!(h.machine.stats().resets, 1);

    // The applied revision was compacted: one relist, not a reset (the revision goes up).
    let mut h = Harness::watching(&["a"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.expect(
        Input::Compacted {
            compact_revision: 0,
        },
        Next::List,
    );
    h.expect(listed(30, vec![kv("a", 80, 10)]), Next::Watch(31));
    let stats = h.machine.stats();
    assert_eq!((stats.relists, stats.resets), (1, 0), "{stats:?}");

    // The check itself fails: frozen still, back off, and check again next time.
    let mut h = Harness::watching(&["a"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.expect(
        Input::Failed(FreezeCause::Timeout),
        Next::SleepAtMost(Duration::from_millis(200)),
    );
    assert!(!h.last().freshness().is_live());
    h.reconnect();

    // A check answered by another cluster is a regression, like a watch header would be.
    let mut h = Harness::watching(&["a"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    let other = Input::Verified(KeysAt {
        header: Header {
            revision: 50,
            cluster_id: CLUSTER + 1,
        },
        keys: vec![],
    });
    h.expect(other, Next::List);
}

#[test]
fn a_key_recreated_at_the_same_revision_under_another_lease_is_a_rewrite() {
    // The pod re-registered u1 as the first write of the wiped etcd: same key, same revisions,
    // new lease (and, unseen by a keys-only read, a new address).
    let mut h = Harness::new();
    let mut old = kv("u1", 1, 2);
    old.lease = 7;
    h.expect(listed(2, vec![old]), Next::Watch(3));
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    let reregistered = Input::Verified(KeysAt {
        header: hdr(2),
        keys: vec![KeyRevision {
            key: key("u1"),
            mod_revision: 2,
            create_revision: 2,
            lease: 8,
            value: None,
        }],
    });
    h.expect(reregistered, Next::List);
}

#[test]
fn a_list_that_is_a_reset_twice_over_counts_once_and_forgets() {
    // A rewrite found by the check, then a list that also went back: one reset, and a later
    // ordinary relist (after compaction) counts none.
    let mut h = Harness::watching(&["a"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.expect(keys_at(12, &[("z", 11)]), Next::List);
    h.expect(listed(5, vec![kv("z", 1, 4)]), Next::Watch(6));
    assert_eq!(h.machine.stats().resets, 1);
    h.open_watch(5);
    h.expect(
        Input::Compacted {
            compact_revision: 9,
        },
        Next::List,
    );
    h.expect(listed(20, vec![kv("z", 1, 4)]), Next::Watch(21));
    let stats = h.machine.stats();
    assert_eq!((stats.relists, stats.resets), (2, 1), "{stats:?}");
}

#[test]
fn a_history_check_refused_for_good_relists_instead_of_asking_forever() {
    let mut h = Harness::watching(&["a"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.expect(
        Input::Failed(FreezeCause::ResponseTooLarge),
        Next::SleepAtMost(Duration::from_millis(200)),
    );
    h.expect(Input::TimerFired, Next::List);
    // A passing outage during the check is no reason to relist: check again.
    let mut h = Harness::watching(&["a"]);
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
}

#[test]
fn a_key_rewritten_with_another_value_at_the_same_revisions_is_a_rewrite() {
    // Same key, same revisions, no lease either time, another address: only the value tells
    // the histories apart, and a small service's check reads it.
    let mut h = Harness::new();
    h.expect(listed(2, vec![kv("a", 1, 2)]), Next::Watch(3));
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    let rewritten = Input::Verified(KeysAt {
        header: hdr(2),
        keys: vec![KeyRevision {
            key: key("a"),
            mod_revision: 2,
            create_revision: 2,
            lease: 0,
            value: Some(br#"{"addr":"10.0.0.1:3"}"#.to_vec()),
        }],
    });
    h.expect(rewritten, Next::List);
    // The same answer with the value that was applied resumes.
    let mut h = Harness::new();
    h.expect(listed(2, vec![kv("a", 1, 2)]), Next::Watch(3));
    h.feed(Input::Failed(FreezeCause::Unavailable));
    h.reconnect();
    let same = h.held();
    h.expect(same, Next::Nothing);
}

/// A machine parked by a task that ended (`take`) and continued by the next (`continue_from`)
/// starts its backoff over, as a new task's would: the first failure after the restart sleeps
/// within the initial envelope, not the one grown by an earlier outage. The placeholder left
/// behind has applied nothing.
#[test]
fn a_continued_machine_starts_its_backoff_over() {
    let backoff = BackoffConfig::default();
    let now = Instant::now();
    let mut m = Machine::new(
        "user",
        Codec::new(KeyLayout::Native, "/svc"),
        backoff,
        3,
        now,
    );
    m.start();
    m.handle(now, listed(10, vec![kv("a", 1, 10)]));
    let grown: Vec<Duration> = (0..12)
        .filter_map(|_| {
            let sleep = m.handle(now, Input::Failed(FreezeCause::Unavailable));
            m.handle(now, Input::TimerFired);
            sleep.into_iter().find_map(|a| match a {
                Action::Sleep(d) => Some(d),
                _ => None,
            })
        })
        .collect();
    assert!(
        grown.iter().any(|d| *d > backoff.initial),
        "the outage grew the backoff: {grown:?}"
    );

    let mut parked = m.take();
    assert_eq!(m.revision(), 0, "the placeholder applied nothing");
    assert_eq!(parked.revision(), 10);
    let snapshot = parked.published().clone();
    parked.continue_from(snapshot, parked.stats());
    parked.start();
    // Eight restarts, each followed by one failure: every sleep within the initial envelope
    // (a draw from the grown one lands there about once in a hundred).
    for _ in 0..8 {
        let actions = parked.handle(now, Input::Failed(FreezeCause::Unavailable));
        let sleep = actions.iter().find_map(|a| match a {
            Action::Sleep(d) => Some(*d),
            _ => None,
        });
        assert!(
            sleep.is_some_and(|d| d <= backoff.initial),
            "after the restart: {sleep:?}"
        );
        parked.handle(now, Input::TimerFired);
        parked.continue_from(parked.published().clone(), parked.stats());
    }
}
