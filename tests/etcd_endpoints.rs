//! Imperfect endpoint lists, against a real 3-member etcd cluster: an endpoint that is down from
//! the start, one that is a typo, and a member removed from the cluster while caches and
//! registrations run on it. Everything keeps working through the members that remain, and
//! nothing at start takes longer than one request timeout. A list with nothing usable in it is
//! a clear error.

mod support;

use std::time::{Duration, Instant};

use etcd_registry::{Backend, Error, EtcdBackend, EtcdOptions, Registration, RegistrationStatus};
use support::etcd::{EtcdCluster, free_port};
use support::wait::*;
use support::*;

/// The request timeout of the caches and registrations under test: the bound on their start.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const TTL: Duration = Duration::from_secs(3);
const LONG: Duration = Duration::from_secs(20);

fn options() -> EtcdOptions {
    EtcdOptions::new()
        .keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
}

/// Members 0 and 1 listed as they are, member 2 down from the start, a malformed copy of member
/// 1's URL and a port nobody listens on: caches and a registration start within one request
/// timeout, and keep working after member 0, which they were using, leaves the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_and_registrations_work_through_an_imperfect_list_and_a_member_removal() {
    let started = Instant::now();
    let etcd = EtcdCluster::start(3);
    etcd.kill(2);
    // If member 2 led, the others elect a leader first: the client's start is what is timed
    // here, not an election (which under load can outlast the request timeout).
    etcd.leader();
    let typo = etcd.endpoint(1).replace("http://", "http//");
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let endpoints = [
        typo,
        etcd.endpoint(2),
        nobody,
        etcd.endpoint(0),
        etcd.endpoint(1),
    ];

    let start = Instant::now();
    let backend = EtcdBackend::connect(&endpoints, options())
        .await
        .expect("connect with two usable members in the list");
    let connected = start.elapsed();
    let registration = Registration::with_backend(backend.clone(), instance("user", "a", 1))
        .namespace(NS)
        .ttl(TTL)
        .request_timeout(REQUEST_TIMEOUT)
        .register()
        .await
        .expect("registered");
    let registered = start.elapsed() - connected;
    let before_list = Instant::now();
    let users = discovery(backend.clone())
        .request_timeout(REQUEST_TIMEOUT)
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list");
    let listed = before_list.elapsed();
    eprintln!("connect {connected:?}, register {registered:?}, first list {listed:?}");
    for (what, took) in [
        ("connect", connected),
        ("register", registered),
        ("first list", listed),
    ] {
        assert!(
            took < REQUEST_TIMEOUT,
            "{what} took {took:?}, more than one request timeout"
        );
    }
    assert_eq!(ids(&users.snapshot()), list(&["a@1"]));

    // Member 2 comes back (the cluster keeps a quorum of 2 once member 0 is gone), then member
    // 0 is removed from the cluster: it shuts down, and its endpoint refuses from then on.
    etcd.restart(2);
    etcd.remove_member(0);
    etcd.etcdctl(&["put", &user_key("b"), &value_of("b", 2)]);
    wait_for(&users, LONG, "b seen after member 0 left", |s| {
        s.freshness().is_live() && ids(s) == list(&["a@1", "b@2"])
    })
    .await;

    // The registration keeps its lease alive through the remaining members: after three TTLs
    // its key is still there, under the same lease.
    let lease = registration.status().borrow().lease().expect("a lease");
    tokio::time::sleep(TTL * 3).await;
    let key = get_key(&etcd, &user_key("a")).expect("the registration's key outlived 3 TTLs");
    assert_eq!(key.lease, lease);
    assert!(
        matches!(
            *registration.status().borrow(),
            RegistrationStatus::Registered { .. }
        ),
        "{:?}",
        *registration.status().borrow()
    );
    report(
        "caches_and_registrations_work_through_an_imperfect_list_and_a_member_removal",
        started,
    );
}

/// A member that hangs (SIGSTOP: its TCP connections stay up, it answers nothing) costs one
/// request, given up after its timeout; the requests after it go to the other members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_costs_one_request_then_is_left_out() {
    let started = Instant::now();
    let etcd = EtcdCluster::start(3);
    let backend = EtcdBackend::connect(etcd.endpoints(), options())
        .await
        .expect("connect");
    // Every member gets a connection, so the hung one is among those picked.
    for _ in 0..6 {
        backend.probe(NS.as_bytes()).await.expect("a probe");
    }
    let hung = (etcd.leader() + 1) % 3;
    etcd.stop(hung);
    let mut timed_out = 0;
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_millis(1500), backend.probe(NS.as_bytes())).await
        {
            Ok(answer) => {
                answer.expect("an answer from a member that runs");
            }
            Err(_) => timed_out += 1,
        }
    }
    etcd.cont(hung);
    assert!(
        timed_out <= 1,
        "{timed_out} of 20 requests waited for the hung member"
    );
    report("a_hung_member_costs_one_request_then_is_left_out", started);
}

/// A list with nothing usable: every entry is named with what is wrong with it.
#[tokio::test]
async fn a_list_with_nothing_usable_is_a_config_error_naming_each_entry() {
    let error = EtcdBackend::connect(
        ["htp://127.0.0.1:2379", "http://127.0.0.1", "  "],
        EtcdOptions::new(),
    )
    .await
    .expect_err("nothing usable");
    let Error::Config(message) = &error else {
        panic!("expected a configuration error, got {error:?}");
    };
    for entry in ["htp://127.0.0.1:2379", "http://127.0.0.1\"", "\"  \""] {
        assert!(message.contains(entry), "{entry} not named in: {message}");
    }
    assert!(message.contains("no port"), "{message}");
}

/// A list of endpoints where nothing listens: connecting succeeds (etcd may come later), and
/// the first list fails after its timeout with an error that says the connection was refused.
#[tokio::test]
async fn a_list_of_unreachable_endpoints_says_the_connection_was_refused() {
    let list = [
        format!("http://127.0.0.1:{}", free_port()),
        format!("http://127.0.0.1:{}", free_port()),
    ];
    let backend = EtcdBackend::connect(&list, options())
        .await
        .expect("connect is lazy");
    let error = discovery(backend)
        .first_list_timeout(Duration::from_secs(1))
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect_err("nothing answers");
    let text = error.to_string();
    assert!(matches!(error, Error::FirstListTimeout { .. }), "{error:?}");
    assert!(text.to_lowercase().contains("connection refused"), "{text}");
}
