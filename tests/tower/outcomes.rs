//! Outcomes: classification of every kind of response, and ejection through the service.

use super::*;

#[tokio::test(start_paused = true)]
async fn outcomes_are_read_from_status_headers_and_trailers() {
    let etcd = MemoryBackend::new();
    put(&etcd, &spec("a").build().expect("valid"));
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = balanced(&users, &fleet);
    let cases = [
        (Behaviour::Ok, 0),
        (Behaviour::Http503, 1),
        (Behaviour::GrpcHeaders(0), 0),
        (Behaviour::GrpcHeaders(14), 1),
        (Behaviour::GrpcHeaders(5), 0),
        (Behaviour::GrpcTrailers(0), 0),
        (Behaviour::GrpcTrailers(4), 1),
        (Behaviour::GrpcTrailers(3), 0),
    ];
    for (behaviour, failures) in cases {
        fleet.set("a", behaviour);
        // A success in between resets the consecutive failures: each case stands alone.
        get(&mut service).await.expect("answered");
        let after = health(&users, "a");
        assert_eq!(
            after.consecutive_failures, failures,
            "{behaviour:?}: {after:?}"
        );
        assert_eq!(after.in_flight, 0, "{behaviour:?}: the call ended");
        fleet.set("a", Behaviour::Ok);
        get(&mut service).await.expect("answered");
    }
    fleet.set("a", Behaviour::Transport);
    get(&mut service).await.expect_err("a transport error");
    assert_eq!(health(&users, "a").consecutive_failures, 1);
    assert_eq!(health(&users, "a").in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_before_its_trailers_reports_nothing() {
    let etcd = MemoryBackend::new();
    put(&etcd, &spec("a").build().expect("valid"));
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = balanced(&users, &fleet);
    fleet.set("a", Behaviour::GrpcTrailers(14));
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(http::Request::new(()))
        .await
        .expect("answered");
    assert_eq!(
        health(&users, "a").in_flight,
        1,
        "in flight until the trailers"
    );
    drop(response);
    let after = health(&users, "a");
    assert_eq!(
        (after.in_flight, after.consecutive_failures),
        (0, 0),
        "{after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn grpc_without_status_or_with_a_failing_body_fails_and_classifiers_apply() {
    let etcd = MemoryBackend::new();
    put(&etcd, &spec("a").build().expect("valid"));
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = balanced(&users, &fleet);
    fleet.set("a", Behaviour::GrpcNoStatus);
    get(&mut service).await.expect("the body ends");
    assert_eq!(
        health(&users, "a").consecutive_failures,
        1,
        "no status: a failure"
    );
    fleet.set("a", Behaviour::BodyError);
    get(&mut service).await.expect_err("the body fails");
    assert_eq!(
        health(&users, "a").consecutive_failures,
        2,
        "a body error: a failure"
    );
    assert_eq!(health(&users, "a").in_flight, 0);

    // NOT_FOUND (5) is a success by default; a classifier can make it a failure.
    let mut strict = {
        let fleet = Arc::clone(&fleet);
        Balanced::builder(&users)
            .classifier(Classifier::default().grpc_failure(5, true))
            .service(move |i| fleet.make(i))
    };
    fleet.set("a", Behaviour::GrpcHeaders(5));
    get(&mut service).await.expect("answered");
    assert_eq!(health(&users, "a").consecutive_failures, 0);
    get(&mut strict).await.expect("answered");
    assert_eq!(health(&users, "a").consecutive_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn a_dead_instance_is_ejected_probed_and_restored_while_frozen() {
    for route in [Route::P2c, Route::RoundRobin] {
        let etcd = MemoryBackend::new();
        for id in ["a", "b", "c"] {
            put(&etcd, &spec(id).build().expect("valid"));
        }
        let users = users(&etcd).await;
        etcd.set_reachable(false);
        wait_for(&users, LONG, "frozen", |s| !s.freshness().is_live()).await;
        let fleet = Arc::new(Fleet::default());
        let mut service = routed(&users, &fleet, route.clone());
        fleet.set("a", Behaviour::Transport);
        let mut failed = 0;
        for _ in 0..300 {
            if get(&mut service).await.is_err() {
                failed += 1;
            }
            tokio::time::advance(Duration::from_millis(20)).await;
        }
        // 6 s of requests: at most 5 failures, then a is ejected (30 s) and gets nothing.
        assert!(failed <= 5, "{route:?}: {failed} failed");
        assert!(health(&users, "a").ejected_until.is_some(), "{route:?}");
        let before = fleet.served("a");
        // Recovered; after its ejection a probe restores it and it gets its share again.
        fleet.set("a", Behaviour::Ok);
        tokio::time::advance(Duration::from_secs(31)).await;
        for _ in 0..300 {
            get(&mut service).await.expect("all answer");
            tokio::time::advance(Duration::from_millis(20)).await;
        }
        // Round-robin gives it its share at once; p2c weighs its success rate, which climbs
        // back with each success, so at first it gets the probes of the forced pick (1/s).
        let back = fleet.served("a") - before;
        let least = if route == Route::RoundRobin { 90 } else { 5 };
        assert!(
            back >= least,
            "{route:?}: a back in rotation with {back} requests"
        );
        assert!(health(&users, "a").ejected_until.is_none(), "{route:?}");
        assert!(!users.freshness().is_live(), "frozen throughout");
    }
}
