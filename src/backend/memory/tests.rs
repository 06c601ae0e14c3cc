use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

use super::{MemoryBackend, TxnOp};
use crate::backend::{
    Backend, BackendErrorKind, Event, EventKind, Header, KeyValue, Watch, WatchMessage,
};

const CLUSTER: u64 = 0x1000;

fn header(revision: i64) -> Header {
    Header {
        revision,
        cluster_id: CLUSTER,
    }
}

fn put_event(key: &str, value: &str, create_revision: i64, mod_revision: i64) -> Event {
    Event {
        kind: EventKind::Put,
        kv: KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision,
            mod_revision,
            lease: 0,
        },
    }
}

fn delete_event(key: &str, revision: i64) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.into(),
            mod_revision: revision,
            ..KeyValue::default()
        },
    }
}

fn events(header: Header, events: Vec<Event>) -> WatchMessage {
    WatchMessage::Events { header, events }
}

/// The next message, failing the test if none arrives within a (virtual) second.
async fn next(watch: &mut Watch) -> Option<Result<WatchMessage, crate::backend::BackendError>> {
    tokio::time::timeout(Duration::from_secs(1), watch.stream.next())
        .await
        .unwrap_or_else(|_| panic!("no watch message within a second"))
}

async fn next_ok(watch: &mut Watch) -> WatchMessage {
    match next(watch).await {
        Some(Ok(message)) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn next_err_kind(watch: &mut Watch) -> BackendErrorKind {
    match next(watch).await {
        Some(Err(error)) => error.kind,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Asserts that nothing is ready on the stream right now.
fn assert_quiet(watch: &mut Watch) {
    if let Some(message) = watch.stream.next().now_or_never() {
        panic!("expected no message, got {message:?}");
    }
}

fn keys_of(backend: &MemoryBackend, prefix: &str) -> Vec<String> {
    backend
        .keys(prefix)
        .into_iter()
        .map(|kv| String::from_utf8(kv.key).unwrap())
        .collect()
}

#[tokio::test]
async fn revisions_start_at_one_and_bump_once_per_write() {
    let etcd = MemoryBackend::new();
    assert_eq!(etcd.revision(), 1);
    assert_eq!(etcd.cluster_id(), CLUSTER);
    assert_eq!(etcd.put("a", "1"), 2);
    assert_eq!(etcd.put("a", "1"), 3, "an identical put is still a write");
    assert_eq!(etcd.put("b", "2"), 4);
    assert_eq!(etcd.delete("missing"), None);
    assert_eq!(
        etcd.revision(),
        4,
        "deleting a missing key takes no revision"
    );
    assert_eq!(etcd.delete("a"), Some(5));
    assert_eq!(etcd.revision(), 5);

    assert_eq!(etcd.put("a", "x"), 6);
    assert_eq!(etcd.put("a", "y"), 7);
    let kv = etcd.get("a").unwrap();
    assert_eq!(
        kv,
        KeyValue {
            key: b"a".to_vec(),
            value: b"y".to_vec(),
            create_revision: 6,
            mod_revision: 7,
            lease: 0,
        }
    );
    assert_eq!(
        etcd.version("a"),
        Some(2),
        "recreated keys start a new version count"
    );
    assert_eq!(etcd.get("nope"), None);
}

#[tokio::test]
async fn txn_is_one_revision_and_one_message() {
    let etcd = MemoryBackend::new();
    etcd.put("svc/old", "o");
    let mut watch = etcd.watch(b"svc/", 0).await.unwrap();
    let revision = etcd
        .txn(vec![
            TxnOp::put("svc/a", "1"),
            TxnOp::put("svc/b", "2"),
            TxnOp::delete("svc/old"),
            TxnOp::put("other/c", "3"),
        ])
        .unwrap();
    assert_eq!(revision, 3);
    assert_eq!(etcd.revision(), 3);
    assert_eq!(
        next_ok(&mut watch).await,
        events(
            header(3),
            vec![
                put_event("svc/a", "1", 3, 3),
                put_event("svc/b", "2", 3, 3),
                delete_event("svc/old", 3),
            ]
        )
    );
    assert_quiet(&mut watch);

    // Changes nothing: no revision, no message.
    assert_eq!(etcd.txn(vec![TxnOp::delete("svc/missing")]).unwrap(), 3);
    assert_eq!(etcd.txn(Vec::new()).unwrap(), 3);
    assert_eq!(etcd.revision(), 3);
    assert_quiet(&mut watch);
}

#[tokio::test]
async fn txn_is_refused_whole_like_etcd() {
    let etcd = MemoryBackend::new();
    let unknown_lease = etcd.txn(vec![
        TxnOp::put("a", "1"),
        TxnOp::put_with_lease("b", "2", 12345),
    ]);
    assert_eq!(unknown_lease.unwrap_err().kind, BackendErrorKind::Rejected);
    let duplicate = etcd.txn(vec![TxnOp::put("a", "1"), TxnOp::delete("a")]);
    assert_eq!(duplicate.unwrap_err().kind, BackendErrorKind::Rejected);
    let empty_key = etcd.txn(vec![TxnOp::put("", "1")]);
    assert_eq!(empty_key.unwrap_err().kind, BackendErrorKind::Rejected);
    assert_eq!(etcd.revision(), 1);
    assert!(etcd.keys("").is_empty());
}

#[tokio::test]
async fn list_filters_by_prefix_in_key_order() {
    let etcd = MemoryBackend::new();
    etcd.put("a/2", "two");
    etcd.put("ab/1", "other");
    etcd.put("a/1", "one");
    etcd.put("b/1", "b");
    let list = etcd.list(b"a/").await.unwrap();
    assert_eq!(list.header, header(5));
    let keys: Vec<&[u8]> = list.kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [b"a/1".as_slice(), b"a/2".as_slice()]);
    assert_eq!(list.kvs[0].value, b"one");
    assert_eq!(list.kvs[0].mod_revision, 4);
    assert_eq!(etcd.list(b"").await.unwrap().kvs.len(), 4);
    assert!(etcd.list(b"c/").await.unwrap().kvs.is_empty());
    assert_eq!(keys_of(&etcd, "a"), ["a/1", "a/2", "ab/1"]);

    assert_eq!(etcd.delete_prefix("a/"), Some(6));
    assert_eq!(keys_of(&etcd, ""), ["ab/1", "b/1"]);
    assert_eq!(etcd.delete_prefix("a/"), None);
}

#[tokio::test]
async fn watch_replays_missed_events_then_live_ones() {
    let etcd = MemoryBackend::new();
    etcd.put("s/a", "1"); // 2
    let seen = etcd.list(b"s/").await.unwrap().header.revision;
    etcd.put("s/b", "2"); // 3
    etcd.put("x/ignored", "-"); // 4
    etcd.delete("s/a"); // 5

    let mut watch = etcd.watch(b"s/", seen + 1).await.unwrap();
    assert_eq!(watch.header, header(5));
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(5), vec![put_event("s/b", "2", 3, 3)])
    );
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(5), vec![delete_event("s/a", 5)])
    );
    assert_quiet(&mut watch);

    etcd.put("x/also-ignored", "-"); // 6
    etcd.put("s/c", "3"); // 7
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(7), vec![put_event("s/c", "3", 7, 7)])
    );
    assert_quiet(&mut watch);
}

#[tokio::test]
async fn watch_from_now_and_from_the_future() {
    let etcd = MemoryBackend::new();
    etcd.put("k", "1"); // 2
    let mut now = etcd.watch(b"k", 0).await.unwrap();
    let mut future = etcd.watch(b"k", 4).await.unwrap();
    assert_eq!(future.header, header(2));
    etcd.put("k", "2"); // 3
    etcd.put("k", "3"); // 4
    let put3 = Event {
        kind: EventKind::Put,
        kv: KeyValue {
            key: b"k".to_vec(),
            value: b"2".to_vec(),
            create_revision: 2,
            mod_revision: 3,
            lease: 0,
        },
    };
    let mut put4 = put3.clone();
    put4.kv.value = b"3".to_vec();
    put4.kv.mod_revision = 4;
    assert_eq!(
        next_ok(&mut now).await,
        events(header(3), vec![put3.clone()])
    );
    assert_eq!(
        next_ok(&mut now).await,
        events(header(4), vec![put4.clone()])
    );
    assert_eq!(next_ok(&mut future).await, events(header(4), vec![put4]));
    assert_quiet(&mut future);
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_cancelled() {
    let etcd = MemoryBackend::new();
    for i in 0..5 {
        etcd.put("k", i.to_string()); // 2..=6
    }
    assert_eq!(etcd.compact(4), Ok(()));
    assert_eq!(etcd.compact_revision(), 4);
    assert_eq!(
        etcd.compact(4).unwrap_err().kind,
        BackendErrorKind::Rejected
    );
    assert_eq!(
        etcd.compact(3).unwrap_err().kind,
        BackendErrorKind::Rejected
    );
    assert_eq!(
        etcd.compact(7).unwrap_err().kind,
        BackendErrorKind::Rejected
    );

    let mut old = etcd.watch(b"k", 3).await.unwrap();
    assert_eq!(old.header, header(6));
    assert_eq!(
        next_ok(&mut old).await,
        WatchMessage::Compacted {
            compact_revision: 4
        }
    );
    assert!(next(&mut old).await.is_none(), "the stream ends");
    assert!(old.progress.request_progress().await.is_err());

    // The compaction revision itself is still available, as in etcd.
    let mut oldest = etcd.watch(b"k", 4).await.unwrap();
    for revision in 4..=6 {
        match next_ok(&mut oldest).await {
            WatchMessage::Events { events, .. } => {
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].kv.mod_revision, revision);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_quiet(&mut oldest);
    assert_eq!(etcd.compact(6), Ok(()));
}

#[tokio::test]
async fn compact_on_a_fresh_store_is_rejected_below_one() {
    let etcd = MemoryBackend::new();
    assert_eq!(
        etcd.compact(0).unwrap_err().kind,
        BackendErrorKind::Rejected
    );
    assert_eq!(etcd.compact(1), Ok(()));
    // Nothing was lost: a watch from 1 is served.
    let mut watch = etcd.watch(b"", 1).await.unwrap();
    etcd.put("a", "1");
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(2), vec![put_event("a", "1", 2, 2)])
    );
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_deletes_its_keys_in_one_revision() {
    let etcd = MemoryBackend::new();
    let ttl = Duration::from_secs(10);
    let lease = etcd.grant(ttl);
    assert_ne!(lease, 0);
    assert_eq!(etcd.put_with_lease("s/b", "2", lease), Ok(2));
    assert_eq!(etcd.put_with_lease("s/a", "1", lease), Ok(3));
    assert_eq!(etcd.put_with_lease("t/x", "3", lease), Ok(4));
    etcd.put("s/plain", "p"); // 5
    assert_eq!(etcd.get("s/a").unwrap().lease, lease);
    let mut watch = etcd.watch(b"s/", 0).await.unwrap();

    tokio::time::sleep(ttl - Duration::from_millis(1)).await;
    assert_eq!(etcd.revision(), 5);
    assert_quiet(&mut watch);

    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(keys_of(&etcd, ""), ["s/plain"]);
    assert_eq!(etcd.revision(), 6);
    assert_eq!(
        next_ok(&mut watch).await,
        events(
            header(6),
            vec![delete_event("s/a", 6), delete_event("s/b", 6)]
        )
    );
    assert_eq!(etcd.lease_ttl(lease), None);
    let gone = etcd.keep_alive(lease).unwrap_err();
    assert_eq!(gone.kind, BackendErrorKind::Rejected);
    let gone = etcd.put_with_lease("s/late", "x", lease).unwrap_err();
    assert_eq!(gone.kind, BackendErrorKind::Rejected);
}

#[tokio::test(start_paused = true)]
async fn lease_expires_on_time_without_any_call() {
    let etcd = MemoryBackend::new();
    let lease = etcd.grant(Duration::from_secs(1));
    etcd.put_with_lease("k", "v", lease).unwrap(); // 2
    let mut watch = etcd.watch(b"k", 0).await.unwrap();
    // Only the stream is awaited: the background task must do the work, at the deadline.
    let started = Instant::now();
    // The timeout is well past the deadline so the two timers cannot race.
    let message = tokio::time::timeout(Duration::from_secs(5), watch.stream.next()).await;
    assert_eq!(
        message,
        Ok(Some(Ok(events(header(3), vec![delete_event("k", 3)]))))
    );
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_extends_and_revoke_ends() {
    let etcd = MemoryBackend::new();
    let ttl = Duration::from_secs(5);
    let lease = etcd.grant(ttl);
    let other = etcd.grant(ttl);
    assert!(other > lease);
    etcd.put_with_lease("a", "1", lease).unwrap(); // 2
    etcd.put_with_lease("b", "2", lease).unwrap(); // 3

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(etcd.lease_ttl(lease), Some(Duration::from_secs(1)));
    assert_eq!(etcd.keep_alive(lease), Ok(ttl));
    assert_eq!(etcd.lease_ttl(lease), Some(ttl));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        keys_of(&etcd, ""),
        ["a", "b"],
        "kept alive past the first deadline"
    );
    assert_eq!(etcd.lease_ttl(other), None, "the other lease expired");
    assert_eq!(
        etcd.revision(),
        3,
        "an empty lease takes no revision when it ends"
    );

    let mut watch = etcd.watch(b"", 0).await.unwrap();
    assert_eq!(etcd.revoke(lease), Ok(Some(4)));
    assert!(etcd.keys("").is_empty());
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(4), vec![delete_event("a", 4), delete_event("b", 4)])
    );
    assert_eq!(
        etcd.revoke(lease).unwrap_err().kind,
        BackendErrorKind::Rejected
    );
    let empty = etcd.grant(ttl);
    assert_eq!(etcd.revoke(empty), Ok(None));
    assert_eq!(etcd.revision(), 4);
}

#[tokio::test(start_paused = true)]
async fn moving_a_key_off_a_lease_keeps_it() {
    let etcd = MemoryBackend::new();
    let lease = etcd.grant(Duration::from_secs(1));
    etcd.put_with_lease("a", "1", lease).unwrap();
    etcd.put_with_lease("b", "1", lease).unwrap();
    etcd.put("a", "2"); // detaches "a"
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(keys_of(&etcd, ""), ["a"]);
    assert_eq!(etcd.get("a").unwrap().lease, 0);
}

#[tokio::test]
async fn outage_breaks_streams_and_refuses_calls_until_healed() {
    let etcd = MemoryBackend::new();
    let mut watch = etcd.watch(b"", 0).await.unwrap();
    etcd.put("a", "1"); // 2, delivered before the outage
    etcd.set_reachable(false);
    assert!(matches!(
        next_ok(&mut watch).await,
        WatchMessage::Events { .. }
    ));
    assert_eq!(
        next_err_kind(&mut watch).await,
        BackendErrorKind::Unavailable
    );
    assert!(next(&mut watch).await.is_none());
    assert_eq!(etcd.watcher_count(), 0);
    assert!(watch.progress.request_progress().await.is_err());

    let list = etcd.list(b"").await.unwrap_err();
    assert_eq!(list.kind, BackendErrorKind::Unavailable);
    let watch = etcd.watch(b"", 0).await.unwrap_err();
    assert_eq!(watch.kind, BackendErrorKind::Unavailable);
    assert_eq!(etcd.put("b", "2"), 3, "other clients still write");

    etcd.set_reachable(true);
    let list = etcd.list(b"").await.unwrap();
    assert_eq!(list.header, header(3));
    assert_eq!(list.kvs.len(), 2);
    let mut watch = etcd.watch(b"", 3).await.unwrap();
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(3), vec![put_event("b", "2", 3, 3)])
    );
}

#[tokio::test]
async fn break_streams_ends_watches_but_new_calls_work() {
    let etcd = MemoryBackend::new();
    let mut first = etcd.watch(b"", 0).await.unwrap();
    let mut second = etcd.watch(b"x", 0).await.unwrap();
    etcd.break_streams();
    assert_eq!(
        next_err_kind(&mut first).await,
        BackendErrorKind::Unavailable
    );
    assert!(next(&mut first).await.is_none());
    assert_eq!(
        next_err_kind(&mut second).await,
        BackendErrorKind::Unavailable
    );
    let mut again = etcd.watch(b"", 0).await.unwrap();
    etcd.put("a", "1");
    assert_eq!(
        next_ok(&mut again).await,
        events(header(2), vec![put_event("a", "1", 2, 2)])
    );
}

#[tokio::test(start_paused = true)]
async fn stall_holds_messages_and_calls_until_resume() {
    let etcd = MemoryBackend::new();
    let mut watch = etcd.watch(b"k/", 0).await.unwrap();
    etcd.stall();
    etcd.put("k/a", "1"); // 2
    etcd.put("k/b", "2"); // 3
    assert_eq!(watch.progress.request_progress().await, Ok(()));
    etcd.put("k/c", "3"); // 4

    let lister = etcd.clone();
    let pending_list = tokio::spawn(async move { lister.list(b"k/").await });
    let watcher = etcd.clone();
    let pending_watch = tokio::spawn(async move { watcher.watch(b"k/", 3).await });
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!pending_list.is_finished());
    assert!(!pending_watch.is_finished());
    assert_quiet(&mut watch);
    etcd.put("k/d", "4"); // 5

    etcd.resume();
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(2), vec![put_event("k/a", "1", 2, 2)])
    );
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(3), vec![put_event("k/b", "2", 3, 3)])
    );
    assert_eq!(
        next_ok(&mut watch).await,
        WatchMessage::Progress { header: header(3) }
    );
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(4), vec![put_event("k/c", "3", 4, 4)])
    );
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(5), vec![put_event("k/d", "4", 5, 5)])
    );
    assert_quiet(&mut watch);

    let list = pending_list.await.unwrap().unwrap();
    assert_eq!(list.header, header(5));
    assert_eq!(list.kvs.len(), 4);
    let mut late = pending_watch.await.unwrap().unwrap();
    assert_eq!(late.header, header(5));
    for revision in 3..=5 {
        match next_ok(&mut late).await {
            WatchMessage::Events { header: h, events } => {
                assert_eq!(h, header(5));
                assert_eq!(events[0].kv.mod_revision, revision);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn outage_during_stall_drops_held_messages() {
    let etcd = MemoryBackend::new();
    let mut watch = etcd.watch(b"", 0).await.unwrap();
    etcd.stall();
    etcd.put("a", "1");
    etcd.set_reachable(false);
    assert_eq!(
        next_err_kind(&mut watch).await,
        BackendErrorKind::Unavailable
    );
    assert!(next(&mut watch).await.is_none());

    let lister = etcd.clone();
    let pending = tokio::spawn(async move { lister.list(b"").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!pending.is_finished(), "a stall wins over the outage");
    etcd.resume();
    let refused = pending.await.unwrap().unwrap_err();
    assert_eq!(refused.kind, BackendErrorKind::Unavailable);
}

#[tokio::test]
async fn progress_is_answered_after_the_events_already_queued() {
    let etcd = MemoryBackend::new();
    etcd.put("a", "0"); // 2
    let mut watch = etcd.watch(b"a", 1).await.unwrap(); // replays revision 2
    etcd.put("a", "1"); // 3
    etcd.put("zzz", "-"); // 4, outside the prefix
    watch.progress.request_progress().await.unwrap();
    assert_eq!(
        next_ok(&mut watch).await,
        events(header(2), vec![put_event("a", "0", 2, 2)])
    );
    match next_ok(&mut watch).await {
        WatchMessage::Events { header: h, .. } => assert_eq!(h, header(3)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        next_ok(&mut watch).await,
        WatchMessage::Progress { header: header(4) }
    );
    assert_quiet(&mut watch);
}

#[tokio::test(start_paused = true)]
async fn progress_is_not_answered_while_stalled() {
    let etcd = MemoryBackend::new();
    let mut watch = etcd.watch(b"", 0).await.unwrap();
    etcd.stall();
    watch.progress.request_progress().await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_quiet(&mut watch);
    etcd.resume();
    assert_eq!(
        next_ok(&mut watch).await,
        WatchMessage::Progress { header: header(1) }
    );
}

#[tokio::test]
async fn restore_goes_back_with_a_new_cluster_and_breaks_streams() {
    let etcd = MemoryBackend::new();
    etcd.put("a", "1"); // 2
    etcd.put("b", "2"); // 3
    let backup = etcd.snapshot_state();
    assert_eq!(backup.revision(), 3);
    assert_eq!(backup.cluster_id(), CLUSTER);
    assert_eq!(backup.kvs().len(), 2);
    etcd.put("c", "3"); // 4
    etcd.delete("a"); // 5
    let mut watch = etcd.watch(b"", 0).await.unwrap();

    etcd.restore(backup.clone());
    assert_eq!(
        next_err_kind(&mut watch).await,
        BackendErrorKind::Unavailable
    );
    assert!(next(&mut watch).await.is_none());
    assert_eq!(etcd.revision(), 3);
    let first_new_id = etcd.cluster_id();
    assert_ne!(first_new_id, CLUSTER);
    assert_eq!(keys_of(&etcd, ""), ["a", "b"]);
    let list = etcd.list(b"").await.unwrap();
    assert_eq!(list.header.revision, 3);
    assert_eq!(list.header.cluster_id, first_new_id);

    // History is gone up to the restored revision; later revisions are waited for.
    let mut old = etcd.watch(b"", 3).await.unwrap();
    assert_eq!(
        next_ok(&mut old).await,
        WatchMessage::Compacted {
            compact_revision: 4
        }
    );
    let mut newer = etcd.watch(b"", 4).await.unwrap();
    assert_quiet(&mut newer);
    assert_eq!(etcd.put("d", "4"), 4);
    assert_eq!(
        next_ok(&mut newer).await,
        events(
            Header {
                revision: 4,
                cluster_id: first_new_id
            },
            vec![put_event("d", "4", 4, 4)]
        )
    );

    etcd.restore(backup);
    let second_new_id = etcd.cluster_id();
    assert_ne!(second_new_id, first_new_id);
    assert_ne!(second_new_id, CLUSTER);
}

#[tokio::test(start_paused = true)]
async fn restore_brings_leases_back_with_a_full_ttl() {
    let etcd = MemoryBackend::new();
    let lease = etcd.grant(Duration::from_secs(10));
    etcd.put_with_lease("k", "v", lease).unwrap();
    let backup = etcd.snapshot_state();
    etcd.revoke(lease).unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    etcd.restore(backup);
    assert_eq!(keys_of(&etcd, ""), ["k"]);
    assert_eq!(etcd.lease_ttl(lease), Some(Duration::from_secs(10)));
    let newer = etcd.grant(Duration::from_secs(1));
    assert!(newer > lease, "lease ids are not reused");
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(etcd.keys("").is_empty());
}

#[tokio::test]
async fn wipe_empties_the_store() {
    let etcd = MemoryBackend::new();
    etcd.put("a", "1");
    etcd.put("b", "2");
    let mut watch = etcd.watch(b"", 0).await.unwrap();
    etcd.wipe();
    assert_eq!(
        next_err_kind(&mut watch).await,
        BackendErrorKind::Unavailable
    );
    assert_eq!(etcd.revision(), 1);
    assert_ne!(etcd.cluster_id(), CLUSTER);
    assert!(etcd.keys("").is_empty());
    assert_eq!(etcd.compact_revision(), 0);
    let mut watch = etcd.watch(b"", 1).await.unwrap();
    assert_eq!(etcd.put("c", "3"), 2);
    match next_ok(&mut watch).await {
        WatchMessage::Events { events, .. } => assert_eq!(events, [put_event("c", "3", 2, 2)]),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn latency_delays_every_call_by_exactly_that_long() {
    let etcd = MemoryBackend::new();
    let latency = Duration::from_millis(250);
    etcd.set_latency(latency);
    let started = Instant::now();
    etcd.list(b"").await.unwrap();
    assert_eq!(started.elapsed(), latency);
    let started = Instant::now();
    etcd.watch(b"", 0).await.unwrap();
    assert_eq!(started.elapsed(), latency);
    etcd.set_latency(Duration::ZERO);
    let started = Instant::now();
    etcd.list(b"").await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn dropping_a_stream_closes_its_watch() {
    let etcd = MemoryBackend::new();
    let watch = etcd.watch(b"", 0).await.unwrap();
    let progress = watch.progress.clone();
    assert_eq!(etcd.watcher_count(), 1);
    drop(watch.stream);
    assert_eq!(etcd.watcher_count(), 0);
    assert!(progress.request_progress().await.is_err());
    etcd.put("a", "1");
}

#[tokio::test(start_paused = true)]
async fn lease_task_stops_with_the_last_handle() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let etcd = MemoryBackend::new();
    let clone = etcd.clone();
    etcd.grant(Duration::from_secs(3600));
    tokio::task::yield_now().await;
    assert_eq!(metrics.num_alive_tasks(), 1);
    drop(etcd);
    tokio::task::yield_now().await;
    assert_eq!(metrics.num_alive_tasks(), 1, "a handle is still alive");
    drop(clone);
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_huge_ttl_does_not_overflow() {
    let etcd = MemoryBackend::new();
    let lease = etcd.grant(Duration::MAX);
    etcd.put_with_lease("k", "v", lease).unwrap();
    assert_eq!(etcd.keep_alive(lease), Ok(Duration::MAX));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(keys_of(&etcd, ""), ["k"]);
}

/// `(key, mod revision)` pairs of a keys-only read at `revision`, or the error kind.
async fn keys_at(
    backend: &MemoryBackend,
    prefix: &str,
    revision: i64,
) -> Result<Vec<(String, i64)>, BackendErrorKind> {
    backend
        .keys_at(prefix.as_bytes(), revision, false)
        .await
        .map(|answer| {
            answer
                .keys
                .into_iter()
                .map(|k| (String::from_utf8(k.key).expect("utf-8"), k.mod_revision))
                // create_revision and lease are checked against etcd's by the machine tests'
                // and model's convergence; here the revisions and presence matter.
                .collect()
        })
        .map_err(|e| e.kind)
}

#[tokio::test]
async fn keys_at_reads_the_past_like_etcd() {
    let etcd = MemoryBackend::new();
    etcd.put("p/a", "1"); // 2
    etcd.put("p/b", "1"); // 3
    etcd.put("q/x", "1"); // 4
    etcd.put("p/a", "2"); // 5
    etcd.delete("p/b"); // 6
    let at = |rev| keys_at(&etcd, "p/", rev);
    assert_eq!(at(1).await, Ok(vec![]));
    assert_eq!(at(3).await, Ok(vec![("p/a".into(), 2), ("p/b".into(), 3)]));
    assert_eq!(at(5).await, Ok(vec![("p/a".into(), 5), ("p/b".into(), 3)]));
    assert_eq!(at(6).await, Ok(vec![("p/a".into(), 5)]));
    assert_eq!(at(7).await, Err(BackendErrorKind::FutureRevision));
    etcd.compact(5).expect("compact");
    assert_eq!(at(4).await, Err(BackendErrorKind::Compacted));
    assert_eq!(at(5).await, Ok(vec![("p/a".into(), 5), ("p/b".into(), 3)]));
    assert_eq!(at(6).await, Ok(vec![("p/a".into(), 5)]));
}

#[tokio::test]
async fn a_wipe_keeping_identity_reuses_revisions_under_the_same_cluster_id() {
    let etcd = MemoryBackend::new();
    etcd.put("p/u1", "1"); // 2
    etcd.put("p/u2", "1"); // 3
    let id = etcd.cluster_id();
    etcd.wipe_keeping_identity();
    assert_eq!(etcd.cluster_id(), id);
    assert_eq!(keys_at(&etcd, "p/", 1).await, Ok(vec![]));
    etcd.put("p/u3", "1"); // 2 again
    etcd.put("x", "1"); // 3 again
    assert_eq!(keys_at(&etcd, "p/", 3).await, Ok(vec![("p/u3".into(), 2)]));
    etcd.wipe();
    assert_ne!(etcd.cluster_id(), id, "a plain wipe is another cluster");
}

#[tokio::test]
async fn keys_at_reads_a_restored_store_at_its_snapshot_revision_like_etcd() {
    let etcd = MemoryBackend::new();
    etcd.put("p/a", "1"); // 2
    let backup = etcd.snapshot_state();
    etcd.put("p/b", "1"); // 3
    etcd.restore(backup);
    etcd.put("p/c", "1"); // 3 again
    assert_eq!(keys_at(&etcd, "p/", 2).await, Ok(vec![("p/a".into(), 2)]));
    assert_eq!(
        keys_at(&etcd, "p/", 1).await,
        Err(BackendErrorKind::Compacted)
    );
}
