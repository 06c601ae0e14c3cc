//! The tower integration over the in-memory etcd model, under paused tokio time, with
//! in-process inner services whose behaviour each test sets per instance: the typed error when
//! there is nothing to pick, outcome classification (HTTP status, gRPC status in headers and in
//! trailers, transport errors), ejection and probing through the service, the retry of a failed
//! connection, services dropped with their instance (never while frozen), and the `Discover`
//! stream.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use etcd_registry::tower::{
    Balanced, BoxError, Classifier, Discover, NoInstance, NoInstanceReason, Route, RoutingKey,
};
use etcd_registry::{
    Discovery, Instance, InstanceHealth, MemoryBackend, Selector, ServiceCache, State,
};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use support::*;
use tower::discover::Change;
use tower::{Service, ServiceExt};

const LONG: Duration = Duration::from_secs(120);

/// What an instance's inner service does with a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    /// 200, plain HTTP.
    Ok,
    /// 503, plain HTTP.
    Http503,
    /// A gRPC response whose status (this code) comes in the trailers.
    GrpcTrailers(i32),
    /// A trailers-only gRPC response with this code.
    GrpcHeaders(i32),
    /// `Err` from the call that is not about the connection (a timeout, say).
    Transport,
    /// `Err` from the call with an I/O error inside: the connection broke.
    Broken,
    /// A gRPC response that ends without any status.
    GrpcNoStatus,
    /// A gRPC response whose body fails.
    BodyError,
    /// `Err` from `poll_ready`: the request is never sent.
    NotReady,
}

type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The instances' behaviours and what they saw, shared by every inner service of a test.
#[derive(Default)]
struct Fleet {
    behaviour: Mutex<HashMap<String, Behaviour>>,
    /// Requests that reached each instance's `call`.
    served: Mutex<BTreeMap<String, usize>>,
    /// `poll_ready` calls of each instance's service.
    readied: Mutex<BTreeMap<String, usize>>,
    /// Inner services alive (made and not dropped), by instance.
    alive: Mutex<HashMap<String, Arc<()>>>,
    made: AtomicUsize,
}

impl Fleet {
    fn set(&self, id: &str, behaviour: Behaviour) {
        self.behaviour
            .lock()
            .expect("lock")
            .insert(id.to_owned(), behaviour);
    }

    fn behaviour(&self, id: &str) -> Behaviour {
        self.behaviour
            .lock()
            .expect("lock")
            .get(id)
            .copied()
            .unwrap_or(Behaviour::Ok)
    }

    fn served(&self, id: &str) -> usize {
        self.served
            .lock()
            .expect("lock")
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    fn readied(&self, id: &str) -> usize {
        self.readied
            .lock()
            .expect("lock")
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// How many inner services of `id` are alive (the pool's and in-flight clones).
    fn alive(&self, id: &str) -> usize {
        self.alive
            .lock()
            .expect("lock")
            .get(id)
            .map_or(0, |token| Arc::strong_count(token) - 1)
    }

    /// The inner service of `instance`.
    fn make(self: &Arc<Self>, instance: &Instance) -> Inner {
        self.made.fetch_add(1, Ordering::Relaxed);
        let token = Arc::clone(
            self.alive
                .lock()
                .expect("lock")
                .entry(instance.id().to_owned())
                .or_default(),
        );
        Inner {
            id: instance.id().to_owned(),
            fleet: Arc::clone(self),
            _alive: token,
        }
    }
}

#[derive(Clone)]
struct Inner {
    id: String,
    fleet: Arc<Fleet>,
    _alive: Arc<()>,
}

impl Service<http::Request<()>> for Inner {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        *self
            .fleet
            .readied
            .lock()
            .expect("lock")
            .entry(self.id.clone())
            .or_default() += 1;
        match self.fleet.behaviour(&self.id) {
            Behaviour::NotReady => std::task::Poll::Ready(Err("connection refused".into())),
            _ => std::task::Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, _request: http::Request<()>) -> Self::Future {
        *self
            .fleet
            .served
            .lock()
            .expect("lock")
            .entry(self.id.clone())
            .or_default() += 1;
        let behaviour = self.fleet.behaviour(&self.id);
        let id = self.id.clone();
        Box::pin(async move {
            let body = Full::new(Bytes::from(id))
                .map_err(|never: Infallible| -> BoxError { match never {} });
            let grpc = || http::Response::builder().header("content-type", "application/grpc");
            let response = match behaviour {
                Behaviour::Ok | Behaviour::NotReady => http::Response::new(body.boxed()),
                Behaviour::Http503 => http::Response::builder()
                    .status(503)
                    .body(body.boxed())
                    .expect("valid"),
                Behaviour::GrpcHeaders(code) => grpc()
                    .header("grpc-status", code.to_string())
                    .body(body.boxed())
                    .expect("valid"),
                Behaviour::GrpcTrailers(code) => {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert(
                        "grpc-status",
                        code.to_string().parse().expect("a valid header value"),
                    );
                    let body = body.with_trailers(async move { Some(Ok(trailers)) });
                    grpc().body(body.boxed()).expect("valid")
                }
                Behaviour::Transport => return Err("deadline has elapsed".into()),
                Behaviour::Broken => {
                    let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
                    return Err(BoxError::from(reset));
                }
                Behaviour::GrpcNoStatus => grpc().body(body.boxed()).expect("valid"),
                Behaviour::BodyError => {
                    let frames = futures_util::stream::iter([
                        Ok(http_body::Frame::data(Bytes::from_static(b"partial"))),
                        Err::<http_body::Frame<Bytes>, BoxError>("stream reset".into()),
                    ]);
                    grpc()
                        .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
                        .expect("valid")
                }
            };
            Ok(response)
        })
    }
}

async fn users(etcd: &MemoryBackend) -> ServiceCache {
    Discovery::memory(etcd.clone())
        .namespace(NS)
        .stall_timeout(Duration::from_secs(4))
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list")
}

fn put(etcd: &MemoryBackend, instance: &Instance) {
    let codec = codec();
    etcd.put(codec.key(instance, 0), codec.encode_value(instance));
}

fn spec(id: &str) -> etcd_registry::InstanceBuilder {
    Instance::builder("user", format!("{id}:80")).id(id)
}

fn balanced(users: &ServiceCache, fleet: &Arc<Fleet>) -> Balanced<Inner> {
    let fleet = Arc::clone(fleet);
    Balanced::new(users, move |instance| fleet.make(instance))
}

/// Sends one request; the instance that answered (the body, read to the end), or the error.
async fn send(
    service: &mut Balanced<Inner>,
    request: http::Request<()>,
) -> Result<String, BoxError> {
    let response = service.ready().await?.call(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8(body.to_vec()).expect("utf-8"))
}

async fn get(service: &mut Balanced<Inner>) -> Result<String, BoxError> {
    send(service, http::Request::new(())).await
}

fn health(users: &ServiceCache, id: &str) -> InstanceHealth {
    users
        .health()
        .into_iter()
        .find(|h| h.instance.id() == id)
        .expect("the instance is in the snapshot")
}

fn no_instance(error: &BoxError) -> NoInstanceReason {
    error
        .downcast_ref::<NoInstance>()
        .unwrap_or_else(|| panic!("not a NoInstance: {error}"))
        .reason()
}

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
        let mut service = {
            let fleet = Arc::clone(&fleet);
            Balanced::builder(&users)
                .route(route.clone())
                .service(move |i| fleet.make(i))
        };
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

#[tokio::test(start_paused = true)]
async fn a_request_never_sent_goes_to_another_instance_once() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = {
        let fleet = Arc::clone(&fleet);
        Balanced::builder(&users)
            .route(Route::RoundRobin)
            .service(move |i| fleet.make(i))
    };
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
async fn services_live_while_their_instance_does_frozen_included() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = {
        let fleet = Arc::clone(&fleet);
        Balanced::builder(&users)
            .route(Route::RoundRobin)
            .service(move |i| fleet.make(i))
    };
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

#[tokio::test(start_paused = true)]
async fn hash_routing_is_sticky_by_extension_or_header() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b", "c", "d"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = {
        let fleet = Arc::clone(&fleet);
        Balanced::builder(&users)
            .route(Route::Hash {
                header: Some(http::HeaderName::from_static("x-user")),
            })
            .service(move |i| fleet.make(i))
    };
    for user in ["u1", "u2", "u3", "u4", "u5"] {
        let expected = users.pick_by(user).expect("up").id().to_owned();
        for _ in 0..3 {
            let mut by_extension = http::Request::new(());
            by_extension.extensions_mut().insert(RoutingKey::new(user));
            assert_eq!(
                send(&mut service, by_extension).await.expect("answered"),
                expected
            );
            let by_header = http::Request::builder()
                .header("x-user", user)
                .body(())
                .expect("valid");
            assert_eq!(
                send(&mut service, by_header).await.expect("answered"),
                expected
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn discover_inserts_removes_and_never_ends_or_removes_while_frozen() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    put(
        &etcd,
        &spec("z").state(State::Draining).build().expect("valid"),
    );
    let users = users(&etcd).await;
    let mut discover = Discover::new(&users, |i: &Instance| i.addr().to_owned());
    let mut next = async || -> Change<String, String> {
        match tokio::time::timeout(LONG, discover.next()).await {
            Ok(Some(Ok(change))) => change,
            Ok(Some(Err(never))) => match never {},
            Ok(None) => panic!("the discover stream ended"),
            Err(_) => panic!("no change within the bound"),
        }
    };
    let describe = |change: &Change<String, String>| match change {
        Change::Insert(id, addr) => format!("+{id}@{addr}"),
        Change::Remove(id) => format!("-{id}"),
    };
    let first = [describe(&next().await), describe(&next().await)];
    assert_eq!(first, ["+a@a:80", "+b@b:80"], "the draining z is left out");

    put(
        &etcd,
        &spec("a").state(State::Draining).build().expect("valid"),
    );
    assert_eq!(describe(&next().await), "-a");
    put(&etcd, &spec("a").build().expect("valid"));
    assert_eq!(describe(&next().await), "+a@a:80");
    put(
        &etcd,
        &Instance::builder("user", "10.9.9.9:80")
            .id("b")
            .build()
            .expect("valid"),
    );
    assert_eq!(
        describe(&next().await),
        "+b@10.9.9.9:80",
        "a new address replaces"
    );
    put(&etcd, &spec("z").build().expect("valid"));
    assert_eq!(describe(&next().await), "+z@z:80");

    etcd.set_reachable(false);
    wait_for(&users, LONG, "frozen", |s| !s.freshness().is_live()).await;
    etcd.delete(user_key("a"));
    let quiet = tokio::time::timeout(Duration::from_secs(90), discover.next()).await;
    assert!(
        quiet.is_err(),
        "a change while frozen: {:?}",
        quiet.map(|c| c.map(|c| c.map(|c| describe(&c))))
    );
    etcd.set_reachable(true);
    let mut next = async || -> Change<String, String> {
        match tokio::time::timeout(LONG, discover.next()).await {
            Ok(Some(Ok(change))) => change,
            other => panic!("no change: ended or timed out ({})", other.is_ok()),
        }
    };
    assert_eq!(describe(&next().await), "-a", "removed once live");
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
    let mut service = {
        let fleet = Arc::clone(&fleet);
        Balanced::builder(&users)
            .route(Route::RoundRobin)
            .service(move |i| fleet.make(i))
    };
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
async fn the_routing_key_extension_wins_over_the_header_and_no_key_goes_by_p2c() {
    let etcd = MemoryBackend::new();
    for id in ["a", "b", "c", "d"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let fleet = Arc::new(Fleet::default());
    let mut service = {
        let fleet = Arc::clone(&fleet);
        Balanced::builder(&users)
            .route(Route::Hash {
                header: Some(http::HeaderName::from_static("x-user")),
            })
            .service(move |i| fleet.make(i))
    };
    let (by_extension, by_header) = (0..1000)
        .map(|n| (format!("e{n}"), format!("h{n}")))
        .find(|(e, h)| users.pick_by(e).expect("up").id() != users.pick_by(h).expect("up").id())
        .expect("two keys on different instances");
    let expected = users.pick_by(&by_extension).expect("up").id().to_owned();
    let mut request = http::Request::builder()
        .header("x-user", &by_header)
        .body(())
        .expect("valid");
    request
        .extensions_mut()
        .insert(RoutingKey::new(&by_extension));
    assert_eq!(
        send(&mut service, request).await.expect("answered"),
        expected
    );
    // No key at all: p2c, which spreads.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        seen.insert(get(&mut service).await.expect("answered"));
    }
    assert!(seen.len() >= 3, "p2c without a key: {seen:?}");
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

#[tokio::test(start_paused = true)]
async fn discover_reinserts_on_any_change_and_plugs_into_towers_balance() {
    let etcd = MemoryBackend::new();
    put(&etcd, &spec("a").build().expect("valid"));
    let users = users(&etcd).await;
    let mut discover = Discover::new(&users, |i: &Instance| i.meta("zone").map(str::to_owned));
    let mut next = async || match tokio::time::timeout(LONG, discover.next()).await {
        Ok(Some(Ok(change))) => change,
        _ => panic!("no change"),
    };
    assert!(matches!(next().await, Change::Insert(id, None) if id == "a"));
    put(
        &etcd,
        &spec("a").meta("zone", "eu-1").build().expect("valid"),
    );
    assert!(
        matches!(next().await, Change::Insert(id, Some(zone)) if id == "a" && zone == "eu-1"),
        "a metadata-only change makes a new service"
    );

    // tower's own balancer over it.
    let echo = |i: &Instance| {
        let id = i.id().to_owned();
        tower::load::Constant::new(
            tower::service_fn(move |_: ()| {
                let id = id.clone();
                async move { Ok::<_, Infallible>(id) }
            }),
            1,
        )
    };
    let mut balance = tower::balance::p2c::Balance::new(Discover::new(&users, echo));
    let answer = tokio::time::timeout(LONG, async {
        balance.ready().await.expect("ready").call(()).await
    })
    .await
    .expect("answered within the bound")
    .expect("answered");
    assert_eq!(answer, "a");
}
