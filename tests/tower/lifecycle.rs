//! Inner services live while their instance does, frozen included.

use super::*;

#[tokio::test(start_paused = true)]
async fn services_live_while_their_instance_does_frozen_included() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = routed(&users, &fleet, Route::RoundRobin);
    for _ in 0..4 {
        get(&mut service).await.expect("answered");
    }
    assert_eq!((fleet.alive("a"), fleet.alive("b")), (1, 1));
    assert_eq!(service.services(), 2);

    // Frozen: a is deleted in etcd, but the cache cannot know; its service stays.
    etcd.set_reachable(false);
    wait_for(&users, LONG, "frozen", |s| !s.freshness().is_live()).await;
    etcd.delete(user_key("a"));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fleet.alive("a"), 1, "never dropped while frozen");
    assert_eq!(get(&mut service).await.ok().map(|_| ()), Some(()));

    // Live again: the deletion arrives and a's service is dropped, with no request needed.
    etcd.set_reachable(true);
    wait_for(&users, LONG, "a removed", |s| s.len() == 1).await;
    for _ in 0..100 {
        if fleet.alive("a") == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(fleet.alive("a"), 0, "dropped with its instance");
    assert_eq!(fleet.alive("b"), 1);
    assert_eq!(service.services(), 1);

    // A draining instance keeps its service (it may finish requests), but gets no new ones.
    put(
        &etcd,
        &spec("b").state(State::Draining).build().expect("valid"),
    );
    put(&etcd, &spec("c").build().expect("valid"));
    wait_for(&users, LONG, "b draining, c up", |s| {
        s.len() == 2 && s.up().count() == 1
    })
    .await;
    assert_eq!(get(&mut service).await.expect("c answers"), "c");
    assert_eq!(fleet.alive("b"), 1);
}
