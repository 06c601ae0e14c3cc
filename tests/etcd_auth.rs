//! Authentication against a real etcd with auth enabled: the least-privilege roles the docs
//! of `backend::etcd` give (a caller that may only read the namespace, a provider that may only
//! write its own service's keys) are enough and no more; a wrong password is `Error::Auth`
//! naming the user, and a cache frozen with `FreezeCause::Auth` retrying backed off; a
//! permission revoked while running freezes the cache, granted again it recovers by itself.

mod support;

use std::time::{Duration, Instant};

use etcd_registry::backend::{BackendErrorKind, PutCondition};
use etcd_registry::{
    Backend, Error, EtcdBackend, EtcdOptions, FreezeCause, Freshness, Registration, ServiceCache,
};
use support::etcd::EtcdCluster;
use support::etcd::security::Security;
use support::wait::*;
use support::*;

const LONG: Duration = Duration::from_secs(20);
const CALLER_PASSWORD: &str = "caller-secret";
const PROVIDER_PASSWORD: &str = "provider-secret";

/// A cluster with auth on, and the two roles and users of the docs, for services under [`NS`].
fn cluster_with_roles() -> EtcdCluster {
    let etcd = EtcdCluster::start_secure(1, Security::auth());
    etcd.add_role("registry-caller");
    etcd.grant_read_prefix("registry-caller", &format!("{NS}/"));
    etcd.add_user("caller", CALLER_PASSWORD);
    etcd.grant_role("caller", "registry-caller");
    etcd.add_role("registry-provider");
    etcd.grant_readwrite_prefix("registry-provider", &format!("{NS}/user/"));
    etcd.add_user("user-service", PROVIDER_PASSWORD);
    etcd.grant_role("user-service", "registry-provider");
    etcd
}

fn options(user: &str, password: &str) -> EtcdOptions {
    EtcdOptions::new()
        .keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(2))
        .user(user, password)
}

async fn connect(etcd: &EtcdCluster, options: EtcdOptions) -> EtcdBackend {
    EtcdBackend::connect(etcd.endpoints(), options)
        .await
        .expect("connect with valid credentials")
}

async fn users(backend: &EtcdBackend) -> ServiceCache {
    discovery(backend.clone())
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list")
}

fn is_frozen_auth(freshness: Freshness) -> bool {
    matches!(
        freshness,
        Freshness::Frozen {
            cause: FreezeCause::Auth,
            ..
        }
    )
}

/// The provider registers and keeps its lease alive with nothing but `readwrite` on its own
/// prefix; the caller lists and watches with nothing but `read` on the namespace. Neither can
/// do more: the caller cannot write, the provider cannot write another service's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_roles_are_enough_and_no_more() {
    let started = Instant::now();
    let etcd = cluster_with_roles();
    let provider = connect(&etcd, options("user-service", PROVIDER_PASSWORD)).await;
    let caller = connect(&etcd, options("caller", CALLER_PASSWORD)).await;

    let registration = Registration::with_backend(provider.clone(), instance("user", "a", 1))
        .namespace(NS)
        .ttl(Duration::from_secs(2))
        .register()
        .await
        .expect("the provider role may register");
    let users = users(&caller).await;
    assert_eq!(ids(&users.snapshot()), list(&["a@1"]));
    // Three TTLs: only kept-alive leases survive that.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(ids(&users.snapshot()), list(&["a@1"]));
    assert!(users.freshness().is_live());
    registration.deregister().await.expect("deregister");
    wait_for(&users, LONG, "the deregistration seen", |s| s.is_empty()).await;

    let refused = caller
        .put(user_key("x").as_bytes(), b"{}", 0, PutCondition::Always)
        .await
        .expect_err("the caller role may not write");
    assert_eq!(refused.kind, BackendErrorKind::Auth, "{refused:?}");
    let refused = provider
        .put(
            format!("{NS}/orders/x").as_bytes(),
            b"{}",
            0,
            PutCondition::Always,
        )
        .await
        .expect_err("the provider role may not write another service's keys");
    assert_eq!(refused.kind, BackendErrorKind::Auth, "{refused:?}");
    report("least_privilege_roles_are_enough_and_no_more", started);
}

/// A wrong password: `connect` says so, naming the user. A backend that connected while etcd
/// was down finds out on first use: its cache freezes with `Auth` and retries, backed off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_auth_error_naming_the_user() {
    let started = Instant::now();
    let etcd = cluster_with_roles();
    match EtcdBackend::connect(etcd.endpoints(), options("caller", "wrong")).await {
        Err(Error::Auth { user, detail }) => {
            assert_eq!(user, "caller");
            assert!(detail.contains("authentication failed"), "{detail}");
        }
        other => panic!("expected Error::Auth, got {other:?}"),
    }

    etcd.kill(0);
    let backend = EtcdBackend::connect(etcd.endpoints(), options("caller", "wrong"))
        .await
        .expect("connect is lazy while etcd is down");
    etcd.restart(0);
    let users = discovery(backend)
        .build()
        .expect("valid config")
        .service_now("user")
        .expect("a cache");
    wait_for(&users, LONG, "frozen on the wrong password", |s| {
        is_frozen_auth(s.freshness())
    })
    .await;
    let error = users.last_error().expect("the refusal is kept");
    assert!(error.contains("\"caller\""), "the user is named: {error}");
    retries_backed_off(&users).await;
    assert!(is_frozen_auth(users.freshness()), "{:?}", users.freshness());
    report("a_wrong_password_is_an_auth_error_naming_the_user", started);
}

/// The caller's role loses `read` on the namespace while its cache runs: the cache freezes
/// with `Auth`, keeping its instances. Granted again, it recovers by itself and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_permission_freezes_the_cache_and_a_grant_recovers_it() {
    let started = Instant::now();
    let etcd = cluster_with_roles();
    etcd.etcdctl(&["put", &user_key("a"), &value_of("a", 1)]);
    let caller = connect(
        &etcd,
        options("caller", CALLER_PASSWORD).permission_check_interval(Duration::from_millis(500)),
    )
    .await;
    let users = users(&caller).await;
    assert_eq!(ids(&users.snapshot()), list(&["a@1"]));

    etcd.revoke_prefix("registry-caller", &format!("{NS}/"));
    let frozen = wait_for(&users, LONG, "frozen once the permission is revoked", |s| {
        is_frozen_auth(s.freshness())
    })
    .await;
    assert_eq!(ids(&frozen), list(&["a@1"]), "frozen, never cleared");

    etcd.etcdctl(&["put", &user_key("b"), &value_of("b", 2)]);
    etcd.grant_read_prefix("registry-caller", &format!("{NS}/"));
    wait_for(&users, LONG, "live again with b once granted", |s| {
        s.freshness().is_live() && ids(s) == list(&["a@1", "b@2"])
    })
    .await;
    report(
        "a_revoked_permission_freezes_the_cache_and_a_grant_recovers_it",
        started,
    );
}
