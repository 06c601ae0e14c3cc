//! The outage drill over mutual TLS with authentication: three providers registered as a
//! least-privilege provider user, a caller discovering them as a read-only user, both over
//! mutual TLS. etcd is SIGKILLed; while it is away one provider crashes; the caller's frozen
//! snapshot keeps all three, and outlier ejection stops the requests to the crashed one after at
//! most its consecutive-failure threshold. etcd restarts from its data directory (which drops
//! every auth token): the caller resumes its watch without a relist and learns the provider is
//! gone; the others' registrations survive.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_registry::backend::TlsOptions;
use etcd_registry::{EtcdBackend, EtcdOptions, FreezeCause, Freshness, Registration};
use support::etcd::EtcdCluster;
use support::etcd::security::Security;
use support::pki::Pki;
use support::wait::*;
use support::*;

const LONG: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(2);
/// Outlier ejection's default consecutive-failure threshold.
const EJECT_AFTER: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outage_drill_passes_over_mutual_tls_with_auth() {
    let started = Instant::now();
    let pki = Arc::new(Pki::new());
    let etcd = EtcdCluster::start_secure(1, Security::mutual_tls(pki.clone()).with_auth());
    etcd.add_role("registry-caller");
    etcd.grant_read_prefix("registry-caller", &format!("{NS}/"));
    etcd.add_user("caller", "caller-secret");
    etcd.grant_role("caller", "registry-caller");
    etcd.add_role("registry-provider");
    etcd.grant_readwrite_prefix("registry-provider", &format!("{NS}/user/"));
    etcd.add_user("user-service", "provider-secret");
    etcd.grant_role("user-service", "registry-provider");

    let options = |user: &str, password: &str| {
        let identity = pki.client(user);
        let tls = TlsOptions::from_ca_file(pki.ca_file())
            .and_then(|tls| tls.identity_files(&identity.cert, &identity.key))
            .expect("the certificates parse");
        EtcdOptions::new()
            .keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .connect_timeout(Duration::from_secs(1))
            .tls(tls)
            .user(user, password)
    };
    let provider =
        EtcdBackend::connect(etcd.endpoints(), options("user-service", "provider-secret"))
            .await
            .expect("the provider connects");
    let mut registrations = Vec::new();
    for n in 1..=3u16 {
        let registration =
            Registration::with_backend(provider.clone(), instance("user", &format!("user-{n}"), n))
                .namespace(NS)
                .ttl(TTL)
                .backoff(FAST_BACKOFF)
                .request_timeout(Duration::from_secs(1))
                .register()
                .await
                .expect("registered over mutual TLS as the provider user");
        registrations.push(Some(registration));
    }
    let caller = EtcdBackend::connect(etcd.endpoints(), options("caller", "caller-secret"))
        .await
        .expect("the caller connects");
    let users = discovery(caller)
        .stall_timeout(Duration::from_secs(2))
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list");
    let all = list(&["user-1@1", "user-2@2", "user-3@3"]);
    assert_eq!(ids(&users.snapshot()), all);

    etcd.kill(0);
    wait_for(&users, LONG, "frozen once etcd is killed", |s| {
        !s.freshness().is_live()
    })
    .await;
    // user-2 crashes: its server is gone and it never deregisters.
    registrations[1] = None;

    let mut failed = BTreeMap::<String, u32>::new();
    let mut routed = BTreeMap::<String, u32>::new();
    for _ in 0..150 {
        let call = users.pick().expect("an instance to route to").start();
        let id = call.id().to_owned();
        *routed.entry(id.clone()).or_default() += 1;
        if id == "user-2" {
            call.failure();
            *failed.entry(id).or_default() += 1;
        } else {
            call.success();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Frozen because etcd is away: the handshake and the credentials are not to blame.
    match users.freshness() {
        Freshness::Frozen { cause, .. } => assert!(
            !matches!(cause, FreezeCause::Tls(_) | FreezeCause::Auth),
            "an outage reported as {cause:?}"
        ),
        Freshness::Live => panic!("live while etcd is down"),
    }
    assert_eq!(ids(&users.snapshot()), all, "frozen, never cleared");
    let to_crashed = failed.get("user-2").copied().unwrap_or(0);
    assert!(
        (1..=EJECT_AFTER).contains(&to_crashed),
        "user-2 got {to_crashed} requests while frozen; routed {routed:?}"
    );

    let relists = users.stats().relists;
    etcd.restart(0);
    wait_for(
        &users,
        LONG,
        "live without user-2 once its lease expires",
        |s| s.freshness().is_live() && ids(s) == list(&["user-1@1", "user-3@3"]),
    )
    .await;
    assert_eq!(
        users.stats().relists,
        relists,
        "the watch resumed from its revision: no relist"
    );
    // The other two kept (or re-made) their registrations through the restart.
    for n in [1, 3] {
        let id = format!("user-{n}");
        let kv = get_key(&etcd, &user_key(&id));
        assert!(kv.is_some(), "{id} still registered");
    }
    eprintln!("routed while frozen: {routed:?}; failed: {failed:?}");
    report("the_outage_drill_passes_over_mutual_tls_with_auth", started);
}
