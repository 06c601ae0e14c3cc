//! Nothing to pick: the typed error, at once, with its reason.

use super::*;

#[tokio::test(start_paused = true)]
async fn nothing_to_pick_is_a_typed_error_at_once() {
    /// The error of one request, which must come without any time passing (paused clock).
    async fn refused(service: &mut Balanced<Inner>) -> NoInstanceReason {
        let start = tokio::time::Instant::now();
        let error = get(service).await.expect_err("no instance");
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "waited before failing: {error}"
        );
        no_instance(&error)
    }
    let etcd = MemoryBackend::new();
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = balanced(&users, &fleet);
    assert_eq!(
        refused(&mut service).await,
        NoInstanceReason::NoneRegistered
    );
    let error = get(&mut service).await.expect_err("no instance");
    assert!(error.to_string().contains("`user`"), "{error}");

    put(
        &etcd,
        &spec("a").state(State::Draining).build().expect("valid"),
    );
    wait_for(&users, LONG, "a draining", |s| s.len() == 1).await;
    assert_eq!(refused(&mut service).await, NoInstanceReason::AllDraining);

    put(&etcd, &spec("b").build().expect("valid"));
    wait_for(&users, LONG, "b up", |s| s.len() == 2).await;
    let canaries = users.select(Selector::new().tag("canary"));
    let mut selected = {
        let fleet = Arc::clone(&fleet);
        Balanced::builder_for(&canaries).service(move |i| fleet.make(i))
    };
    assert_eq!(
        refused(&mut selected).await,
        NoInstanceReason::SelectionEmpty
    );
    assert_eq!(get(&mut service).await.expect("b is up"), "b");
    assert_eq!(
        fleet.served("a"),
        0,
        "a draining instance is never sent a request"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cache_never_listed_says_so() {
    let etcd = MemoryBackend::new();
    etcd.set_reachable(false);
    let users = Discovery::memory(etcd.clone())
        .namespace(NS)
        .build()
        .expect("valid config")
        .service_now("user")
        .expect("a cache");
    let fleet = Arc::new(Fleet::default());
    let mut service = balanced(&users, &fleet);
    let error = get(&mut service).await.expect_err("nothing listed");
    assert_eq!(no_instance(&error), NoInstanceReason::NotListed);
}
