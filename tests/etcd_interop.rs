//! Interoperability with what Go services write to etcd, over a real etcd: keys put by
//! `etcdctl` exactly as go-zero's `discov` publisher and etcd's `naming/endpoints` write them
//! (under leases), and the native JSON layout written by hand; and registrations made by this
//! crate in the Go layouts, read back by `etcdctl` in exactly the Go formats.

mod support;

use std::time::{Duration, Instant};

use etcd_registry::{
    Discovery, EtcdBackend, EtcdOptions, Instance, KeyLayout, Registration, ServiceCache, Snapshot,
    State,
};
use support::etcd::EtcdCluster;
use support::wait::*;
use support::*;

const LONG: Duration = Duration::from_secs(20);
async fn connect(etcd: &EtcdCluster) -> EtcdBackend {
    let options = EtcdOptions::new()
        .keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1));
    EtcdBackend::connect(etcd.endpoints(), options)
        .await
        .expect("connect to etcd")
}

async fn cache(
    backend: &EtcdBackend,
    namespace: &str,
    layout: KeyLayout,
    service: &str,
) -> ServiceCache {
    Discovery::with_backend(backend.clone())
        .namespace(namespace)
        .layout(layout)
        .backoff(FAST_BACKOFF)
        .build()
        .expect("valid config")
        .service(service)
        .await
        .expect("first list")
}

/// `id=addr` of every instance, in key order.
fn addrs(s: &Snapshot) -> Vec<String> {
    s.instances()
        .iter()
        .map(|i| format!("{}={}", i.id(), i.addr()))
        .collect()
}

/// A put under a lease, the way the Go libraries write (etcdctl takes the lease id in hex).
fn put_leased(etcd: &EtcdCluster, key: &str, value: &str, lease_hex: &str) {
    etcd.etcdctl(&["put", &format!("--lease={lease_hex}"), key, value]);
}

/// go-zero: key `{service}/{lease id in decimal}`, value the bare `host:port`, discovered with
/// an empty namespace. Puts, updates, deletes and a lease revoke are followed; the sibling
/// service `user.rpcx`, whose name extends `user.rpc`, never leaks in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_zero_keys_written_by_etcdctl_are_followed() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let (hex1, l1) = grant(&etcd, 10);
    put_leased(&etcd, &format!("user.rpc/{l1}"), "10.0.0.7:8080", &hex1);
    put_leased(&etcd, &format!("user.rpcx/{l1}"), "10.0.0.9:1", &hex1);
    let backend = connect(&etcd).await;
    let users = cache(&backend, "", KeyLayout::GoZero, "user.rpc").await;
    let recorder = Recorder::start(&users);
    assert_eq!(
        addrs(&users.snapshot()),
        vec![format!("{l1}=10.0.0.7:8080")]
    );
    let first = users.snapshot();
    let i = &first.instances()[0];
    assert_eq!(
        (i.service(), i.weight(), i.state(), i.tags().len()),
        ("user.rpc", 1, State::Up, 0)
    );

    let (hex2, l2) = grant(&etcd, 10);
    put_leased(&etcd, &format!("user.rpc/{l2}"), "10.0.0.8:8080", &hex2);
    let mut want = vec![format!("{l1}=10.0.0.7:8080"), format!("{l2}=10.0.0.8:8080")];
    want.sort_by_key(|s| s.clone());
    wait_for(&users, LONG, "a second instance", |s| {
        let mut got = addrs(s);
        got.sort();
        got == want
    })
    .await;

    put_leased(&etcd, &format!("user.rpc/{l1}"), "10.0.0.7:9090", &hex1);
    wait_for(&users, LONG, "the update", |s| {
        s.get(&l1.to_string()).map(|i| i.addr()) == Some("10.0.0.7:9090")
    })
    .await;

    etcd.etcdctl(&["del", &format!("user.rpc/{l2}")]);
    wait_for(&users, LONG, "the delete", |s| {
        addrs(s) == vec![format!("{l1}=10.0.0.7:9090")]
    })
    .await;

    etcd.etcdctl(&["lease", "revoke", &hex1]);
    let s = wait_for(&users, LONG, "the revoke", |s| s.is_empty()).await;
    assert!(s.freshness().is_live());
    assert!(get_key(&etcd, &format!("user.rpcx/{l1}")).is_none());
    for s in recorder.snapshots() {
        assert!(
            s.instances().iter().all(|i| i.addr() != "10.0.0.9:1"),
            "the sibling leaked in: {s:?}"
        );
    }
    assert_eq!(
        users.stats().decode_errors,
        0,
        "the sibling is not even read"
    );
    report("go_zero_keys_written_by_etcdctl_are_followed", started);
}

/// etcd's Go `naming/endpoints`: key `{target}/{addr}`, value
/// `{"Op":0,"Addr":…,"Metadata":…}`, for target `/services/user` (namespace `/services`,
/// service `user`). Metadata is read, updates are followed, and an endpoint goes on a delete,
/// on an `Op: 1` value and on a lease revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_naming_keys_written_by_etcdctl_are_followed() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let (hex, _) = grant(&etcd, 10);
    put_leased(
        &etcd,
        "/services/user/10.0.0.7:8080",
        r#"{"Op":0,"Addr":"10.0.0.7:8080","Metadata":{"zone":"eu-1"}}"#,
        &hex,
    );
    put_leased(
        &etcd,
        "/services/userx/10.0.0.9:1",
        r#"{"Op":0,"Addr":"10.0.0.9:1","Metadata":null}"#,
        &hex,
    );
    let backend = connect(&etcd).await;
    let users = cache(&backend, "/services", KeyLayout::EtcdNaming, "user").await;
    let recorder = Recorder::start(&users);
    let s = users.snapshot();
    assert_eq!(addrs(&s), vec!["10.0.0.7:8080=10.0.0.7:8080"]);
    assert_eq!(s.instances()[0].meta("zone"), Some("eu-1"));

    put_leased(
        &etcd,
        "/services/user/10.0.0.8:8080",
        r#"{"Op":0,"Addr":"10.0.0.8:8080","Metadata":null}"#,
        &hex,
    );
    let s = wait_for(&users, LONG, "a second endpoint", |s| s.len() == 2).await;
    assert_eq!(
        s.get("10.0.0.8:8080").map(|i| i.metadata().len()),
        Some(0),
        "null metadata is no metadata"
    );

    put_leased(
        &etcd,
        "/services/user/10.0.0.7:8080",
        r#"{"Op":0,"Addr":"10.0.0.7:8080","Metadata":{"zone":"eu-2","rack":7}}"#,
        &hex,
    );
    let s = wait_for(&users, LONG, "the metadata update", |s| {
        s.get("10.0.0.7:8080").and_then(|i| i.meta("zone")) == Some("eu-2")
    })
    .await;
    assert_eq!(
        s.get("10.0.0.7:8080").and_then(|i| i.meta("rack")),
        Some("7"),
        "a non-string metadata value is kept as its JSON text"
    );

    // An `Op: 1` update says the endpoint is gone.
    put_leased(
        &etcd,
        "/services/user/10.0.0.8:8080",
        r#"{"Op":1,"Addr":"10.0.0.8:8080"}"#,
        &hex,
    );
    wait_for(&users, LONG, "the Op 1 delete", |s| {
        addrs(s) == vec!["10.0.0.7:8080=10.0.0.7:8080"]
    })
    .await;
    // So does deleting its key (what the Go package's DeleteEndpoint does).
    etcd.etcdctl(&["del", "/services/user/10.0.0.8:8080"]);
    put_leased(
        &etcd,
        "/services/user/10.0.0.6:8080",
        r#"{"Op":0,"Addr":"10.0.0.6:8080","Metadata":null}"#,
        &hex,
    );
    wait_for(&users, LONG, "10.0.0.6 added", |s| s.len() == 2).await;
    etcd.etcdctl(&["del", "/services/user/10.0.0.6:8080"]);
    wait_for(&users, LONG, "the key delete", |s| {
        addrs(s) == vec!["10.0.0.7:8080=10.0.0.7:8080"]
    })
    .await;

    etcd.etcdctl(&["lease", "revoke", &hex]);
    let s = wait_for(&users, LONG, "the revoke", |s| s.is_empty()).await;
    assert!(s.freshness().is_live());
    for s in recorder.snapshots() {
        assert!(
            s.get("10.0.0.9:1").is_none(),
            "the sibling leaked in: {s:?}"
        );
    }
    assert_eq!(users.stats().decode_errors, 0);
    report("etcd_naming_keys_written_by_etcdctl_are_followed", started);
}

/// The native layout written by hand (any language can): every field is read, optional ones
/// default, unknown ones are ignored; updates, deletes and a lease revoke are followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_json_written_by_etcdctl_is_followed() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let (hex, _) = grant(&etcd, 10);
    put_leased(
        &etcd,
        &user_key("u1"),
        r#"{"id":"u1","addr":"10.0.0.7:8080","tags":["v2"],"meta":{"zone":"eu-1"},"weight":3,"state":"draining"}"#,
        &hex,
    );
    put_leased(
        &etcd,
        &user_key("u2"),
        r#"{"addr":"10.0.0.8:8080","added_later":{"x":1},"tags":null}"#,
        &hex,
    );
    let backend = connect(&etcd).await;
    let users = cache(&backend, NS, KeyLayout::Native, "user").await;
    let s = users.snapshot();
    assert_eq!(
        addrs(&s),
        vec!["u1=10.0.0.7:8080", "u2=10.0.0.8:8080"],
        "{s:?}"
    );
    let u1 = s.get("u1").expect("u1");
    assert_eq!(u1.tags().collect::<Vec<_>>(), vec!["v2"]);
    assert_eq!(
        (u1.meta("zone"), u1.weight(), u1.state()),
        (Some("eu-1"), 3, State::Draining)
    );
    let u2 = s.get("u2").expect("u2");
    assert_eq!(
        (
            u2.tags().len(),
            u2.metadata().len(),
            u2.weight(),
            u2.state()
        ),
        (0, 0, 1, State::Up),
        "defaults"
    );
    assert_eq!(
        users.pick().map(|i| i.id().to_owned()).as_deref(),
        Some("u2"),
        "a draining instance is not picked"
    );

    put_leased(
        &etcd,
        &user_key("u1"),
        r#"{"addr":"10.0.0.7:8080","weight":5}"#,
        &hex,
    );
    wait_for(&users, LONG, "the update", |s| {
        s.get("u1")
            .is_some_and(|i| i.weight() == 5 && i.is_up() && i.tags().len() == 0)
    })
    .await;

    etcd.etcdctl(&["del", &user_key("u2")]);
    wait_for(&users, LONG, "the delete", |s| {
        addrs(s) == vec!["u1=10.0.0.7:8080"]
    })
    .await;

    etcd.etcdctl(&["lease", "revoke", &hex]);
    let s = wait_for(&users, LONG, "the revoke", |s| s.is_empty()).await;
    assert!(s.freshness().is_live());
    assert_eq!(users.stats().decode_errors, 0);
    report("native_json_written_by_etcdctl_is_followed", started);
}

/// Registrations made by this crate in the go-zero and etcd-naming layouts are, byte for byte,
/// what the Go libraries write: `etcdctl get` shows the Go key and value, under the
/// registration's lease; a cache in the same layout finds them; deregistering removes the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_in_go_layouts_are_written_as_go_writes_them() {
    let started = Instant::now();
    let etcd = EtcdCluster::single();
    let backend = connect(&etcd).await;
    let register = |instance: Instance, namespace: &str, layout: KeyLayout| {
        Registration::with_backend(backend.clone(), instance)
            .namespace(namespace)
            .layout(layout)
            .ttl(Duration::from_secs(10))
            .register()
    };

    // go-zero: `user.rpc/{lease id in decimal}` → the bare address.
    let gz = register(
        Instance::builder("user.rpc", "10.0.0.7:8080")
            .tag("dropped")
            .weight(3)
            .build()
            .unwrap(),
        "",
        KeyLayout::GoZero,
    )
    .await
    .expect("go-zero registration");
    let lease = gz.status().borrow().lease().expect("a lease");
    let (_, kvs) = get(&etcd, "user.rpc/", true);
    assert_eq!(kvs.len(), 1, "{kvs:?}");
    assert_eq!(kvs[0].key, format!("user.rpc/{lease}"));
    assert_eq!(kvs[0].value_str(), "10.0.0.7:8080");
    assert_eq!(kvs[0].lease, lease);
    let rpc = cache(&backend, "", KeyLayout::GoZero, "user.rpc").await;
    assert_eq!(
        addrs(&rpc.snapshot()),
        vec![format!("{lease}=10.0.0.7:8080")]
    );

    // etcd-naming: `{target}/{addr}` → `{"Op":0,"Addr":…,"Metadata":…}`, metadata `null` when
    // there is none (Go's encoding of a nil interface).
    let with_meta = register(
        Instance::builder("user", "10.0.0.8:8080")
            .meta("zone", "eu-1")
            .build()
            .unwrap(),
        "/services",
        KeyLayout::EtcdNaming,
    )
    .await
    .expect("etcd-naming registration");
    let bare = register(
        Instance::builder("user", "10.0.0.9:8080").build().unwrap(),
        "/services",
        KeyLayout::EtcdNaming,
    )
    .await
    .expect("etcd-naming registration");
    for (reg, key, value) in [
        (
            &with_meta,
            "/services/user/10.0.0.8:8080",
            r#"{"Op":0,"Addr":"10.0.0.8:8080","Metadata":{"zone":"eu-1"}}"#,
        ),
        (
            &bare,
            "/services/user/10.0.0.9:8080",
            r#"{"Op":0,"Addr":"10.0.0.9:8080","Metadata":null}"#,
        ),
    ] {
        let kv = get_key(&etcd, key).unwrap_or_else(|| panic!("{key} written"));
        assert_eq!(kv.value_str(), value, "{key}");
        assert_eq!(Some(kv.lease), reg.status().borrow().lease(), "{key}");
    }
    let users = cache(&backend, "/services", KeyLayout::EtcdNaming, "user").await;
    let s = users.snapshot();
    assert_eq!(
        addrs(&s),
        vec!["10.0.0.8:8080=10.0.0.8:8080", "10.0.0.9:8080=10.0.0.9:8080"]
    );
    assert_eq!(
        s.get("10.0.0.8:8080").and_then(|i| i.meta("zone")),
        Some("eu-1")
    );

    gz.deregister().await.expect("deregistered");
    with_meta.deregister().await.expect("deregistered");
    bare.deregister().await.expect("deregistered");
    wait_for(&rpc, LONG, "go-zero key gone", |s| s.is_empty()).await;
    wait_for(&users, LONG, "etcd-naming keys gone", |s| s.is_empty()).await;
    assert!(get(&etcd, "user.rpc/", true).1.is_empty());
    assert!(get(&etcd, "/services/", true).1.is_empty());
    report(
        "registrations_in_go_layouts_are_written_as_go_writes_them",
        started,
    );
}

/// The Backend contract: renewing a lease that no longer exists answers zero (etcd-client reports
/// it as an error, which the backend must translate), so a registration sees the loss at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_of_a_gone_lease_answers_zero() {
    use etcd_registry::Backend;
    let etcd = EtcdCluster::single();
    let backend = EtcdBackend::connect(etcd.endpoints(), EtcdOptions::new())
        .await
        .expect("connect");
    let lease = backend.grant(Duration::from_secs(30)).await.expect("grant");
    assert!(backend.keep_alive(lease).await.expect("renew") > Duration::ZERO);
    backend.revoke(lease).await.expect("revoke");
    assert_eq!(backend.keep_alive(lease).await, Ok(Duration::ZERO));
    assert_eq!(backend.keep_alive(0x7777_0000).await, Ok(Duration::ZERO));
    backend.revoke(lease).await.expect("revoking twice is fine");
}
