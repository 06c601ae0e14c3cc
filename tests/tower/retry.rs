//! Failed connections: retried once elsewhere, shared by their waiters; broken ones made again.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_request_never_sent_goes_to_another_instance_once() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = routed(&users, &fleet, Route::RoundRobin);
    fleet.set("a", Behaviour::NotReady);
    for _ in 0..4 {
        assert_eq!(get(&mut service).await.expect("retried on b"), "b");
    }
    assert_eq!(fleet.served("a"), 0);
    // Round-robin from a random start: the requests that picked a first (3 or 4) were each
    // refused once, and each refusal counted.
    let refused = health(&users, "a").consecutive_failures;
    assert!((3..=4).contains(&refused), "{refused} refusals counted");

    // With every instance refusing, the retry fails too: the error, after two tries.
    fleet.set("b", Behaviour::NotReady);
    let error = get(&mut service).await.expect_err("nobody ready");
    assert_eq!(error.to_string(), "connection refused");
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_fails_is_retried_elsewhere_and_made_again_later() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let attempts = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let refuse = Arc::new(Mutex::new(true));
    let fleet = Arc::new(Fleet::default());
    let mut service = {
        let (attempts, refuse, fleet) = (attempts.clone(), refuse.clone(), fleet.clone());
        Balanced::builder(&users)
            .route(Route::RoundRobin)
            .connector(move |instance: &Instance| {
                let id = instance.id().to_owned();
                *attempts
                    .lock()
                    .expect("lock")
                    .entry(id.clone())
                    .or_default() += 1;
                let refused = id == "a" && *refuse.lock().expect("lock");
                let inner = fleet.make(instance);
                async move {
                    if refused {
                        Err::<Inner, BoxError>("connection refused".into())
                    } else {
                        Ok(inner)
                    }
                }
            })
    };
    for _ in 0..4 {
        assert_eq!(get(&mut service).await.expect("retried on b"), "b");
    }
    let tried_a = attempts
        .lock()
        .expect("lock")
        .get("a")
        .copied()
        .unwrap_or(0);
    assert!(
        (3..=4).contains(&tried_a),
        "one attempt per pick of a: {tried_a}"
    );
    assert_eq!(
        health(&users, "a").consecutive_failures as usize,
        tried_a,
        "each refusal counted"
    );
    assert_eq!(
        attempts.lock().expect("lock").get("b"),
        Some(&1),
        "b connected once"
    );
    *refuse.lock().expect("lock") = false;
    let answers: Vec<String> = {
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(get(&mut service).await.expect("answered"));
        }
        answers
    };
    assert!(
        answers.iter().any(|a| a == "a"),
        "a connected again: {answers:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn requests_waiting_for_a_failed_connection_go_elsewhere_at_once() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b", "c"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let key = (0..1000)
        .map(|n| format!("k{n}"))
        .find(|k| users.pick_by(k).expect("up").id() == "a")
        .expect("some key maps to a");
    let attempts = Arc::new(AtomicUsize::new(0));
    let fleet = Arc::new(Fleet::default());
    let service = {
        let (attempts, fleet) = (attempts.clone(), fleet.clone());
        Balanced::builder(&users)
            .route(Route::Hash { header: None })
            .connector(move |instance: &Instance| {
                let dead = instance.id() == "a";
                if dead {
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
                let inner = fleet.make(instance);
                async move {
                    if dead {
                        // A host that does not answer: the attempt times out after 1 s.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Err::<Inner, BoxError>("connect timed out".into())
                    } else {
                        Ok(inner)
                    }
                }
            })
    };
    let start = tokio::time::Instant::now();
    let requests = (0..4).map(|_| {
        let mut service = service.clone();
        let key = key.clone();
        async move {
            let mut request = http::Request::new(());
            request.extensions_mut().insert(RoutingKey::new(key));
            let answer = send(&mut service, request).await;
            (answer, start.elapsed())
        }
    });
    for (answer, took) in futures_util::future::join_all(requests).await {
        let answer = answer.expect("retried on another instance");
        assert_ne!(answer, "a");
        assert_eq!(
            took,
            Duration::from_secs(1),
            "waited for one attempt, not a queue"
        );
    }
    assert_eq!(
        attempts.load(Ordering::Relaxed),
        1,
        "one attempt for the four waiters"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_is_retried_once_not_on_every_instance() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b", "c"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = routed(&users, &fleet, Route::RoundRobin);
    fleet.set("a", Behaviour::NotReady);
    fleet.set("b", Behaviour::NotReady);
    let (mut answered, mut refused) = (0, 0);
    for n in 1..=4 {
        let before = fleet.readied("a") + fleet.readied("b") + fleet.readied("c");
        match get(&mut service).await {
            Ok(answer) => {
                assert_eq!(answer, "c");
                answered += 1;
            }
            Err(error) => {
                assert_eq!(error.to_string(), "connection refused", "request {n}");
                refused += 1;
            }
        }
        let tried = fleet.readied("a") + fleet.readied("b") + fleet.readied("c") - before;
        assert!(
            (1..=2).contains(&tried),
            "request {n} tried {tried} instances"
        );
    }
    // Round-robin over a, b, c with two refusing: some request meets both and gives up.
    assert!(
        refused > 0 && answered > 0,
        "{answered} answered, {refused} refused"
    );
}

#[tokio::test(start_paused = true)]
async fn a_timeout_keeps_the_connection_and_a_broken_one_is_made_again() {
    let etcd = MemoryBackend::new();
    put(&etcd, &spec("a").build().expect("valid"));
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = balanced(&users, &fleet);
    get(&mut service).await.expect("answered");
    assert_eq!(fleet.made.load(Ordering::Relaxed), 1);
    fleet.set("a", Behaviour::Transport);
    get(&mut service).await.expect_err("timed out");
    fleet.set("a", Behaviour::Ok);
    get(&mut service).await.expect("answered");
    assert_eq!(
        fleet.made.load(Ordering::Relaxed),
        1,
        "a timeout keeps the connection"
    );
    fleet.set("a", Behaviour::Broken);
    get(&mut service).await.expect_err("connection reset");
    fleet.set("a", Behaviour::Ok);
    get(&mut service).await.expect("answered");
    assert_eq!(
        fleet.made.load(Ordering::Relaxed),
        2,
        "a broken connection is made again"
    );
}
