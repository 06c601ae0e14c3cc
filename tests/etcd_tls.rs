//! TLS and mutual TLS to a real etcd, with certificates made at test time: discovery and
//! registration over mutual TLS; every misconfiguration named by its own [`TlsProblem`], at
//! connect and on first use (a cache frozen with [`FreezeCause::Tls`], retrying backed off);
//! certificates rotated on disk and picked up by [`EtcdBackend::reload`].

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_registry::backend::TlsOptions;
use etcd_registry::{
    Backend, Error, EtcdBackend, EtcdOptions, FreezeCause, Freshness, Registration, ServiceCache,
    TlsProblem,
};
use support::etcd::EtcdCluster;
use support::etcd::security::{Identity, Security, ServerCert};
use support::pki::Pki;
use support::wait::*;
use support::*;

const LONG: Duration = Duration::from_secs(20);

fn tls(pki: &Pki) -> TlsOptions {
    TlsOptions::from_ca_file(pki.ca_file()).expect("the CA parses")
}

fn with_identity(options: TlsOptions, identity: &Identity) -> TlsOptions {
    options
        .identity_files(&identity.cert, &identity.key)
        .expect("the identity parses")
}

fn options(tls: TlsOptions) -> EtcdOptions {
    EtcdOptions::new()
        .keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(2))
        .tls(tls)
}

/// The problem `connect` reports, or a panic saying what it did instead.
async fn connect_problem(endpoints: &[String], options: EtcdOptions) -> TlsProblem {
    match EtcdBackend::connect(endpoints, options).await {
        Err(Error::Tls { problem, detail }) => {
            assert!(!detail.is_empty());
            problem
        }
        Err(other) => panic!("expected a TLS error, got {other:?}"),
        Ok(_) => panic!("expected a TLS error, connected"),
    }
}

/// Over mutual TLS: a provider registers, a caller discovers it, and follows a put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_registration_work_over_mutual_tls() {
    let started = Instant::now();
    let pki = Arc::new(Pki::new());
    let etcd = EtcdCluster::start_secure(1, Security::mutual_tls(pki.clone()));
    let client = pki.client("registry");
    let backend =
        EtcdBackend::connect(etcd.endpoints(), options(with_identity(tls(&pki), &client)))
            .await
            .expect("connect over mutual TLS");
    let _registration = Registration::with_backend(backend.clone(), instance("user", "a", 1))
        .namespace(NS)
        .register()
        .await
        .expect("registered over mutual TLS");
    let users = discovery(backend)
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list over mutual TLS");
    assert_eq!(ids(&users.snapshot()), list(&["a@1"]));
    etcd.etcdctl(&["put", &user_key("b"), &value_of("b", 2)]);
    wait_for(&users, LONG, "b seen over the watch", |s| {
        ids(s) == list(&["a@1", "b@2"])
    })
    .await;
    report("discovery_and_registration_work_over_mutual_tls", started);
}

/// Each way TLS can be set up wrong is refused at connect with its own problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_misconfiguration_is_named_at_connect() {
    let started = Instant::now();
    let pki = Arc::new(Pki::new());
    let mutual = EtcdCluster::start_secure(1, Security::mutual_tls(pki.clone()));
    let expired = EtcdCluster::start_secure(1, Security::tls(pki.clone(), ServerCert::Expired));
    let wrong_host =
        EtcdCluster::start_secure(1, Security::tls(pki.clone(), ServerCert::WrongHost));
    let plain = EtcdCluster::single();
    let client = pki.client("registry");
    let good = || with_identity(tls(&pki), &client);

    let other_ca = TlsOptions::from_ca_file(pki.other_ca_file()).expect("the other CA parses");
    let cases: Vec<(&str, &EtcdCluster, EtcdOptions, TlsProblem)> = vec![
        (
            "a CA that did not sign etcd's certificate",
            &mutual,
            options(with_identity(other_ca, &client)),
            TlsProblem::UnknownIssuer,
        ),
        (
            "an expired server certificate",
            &expired,
            options(good()),
            TlsProblem::Expired,
        ),
        (
            "a server certificate for another host",
            &wrong_host,
            options(good()),
            TlsProblem::WrongHost,
        ),
        (
            "no client certificate where etcd requires one",
            &mutual,
            options(tls(&pki)),
            TlsProblem::ClientCertificateRequired,
        ),
        (
            "a client certificate of another CA",
            &mutual,
            options(with_identity(tls(&pki), &pki.foreign_client())),
            TlsProblem::ClientCertificateRejected,
        ),
    ];
    for (what, cluster, options, expected) in cases {
        let got = connect_problem(&cluster.endpoints(), options).await;
        assert_eq!(got, expected, "{what}");
    }

    // TLS to a plain-text etcd, and plain text to a TLS one.
    let https = plain.endpoints()[0].replace("http://", "https://");
    assert_eq!(
        connect_problem(&[https], options(good())).await,
        TlsProblem::NotTls,
        "https:// to an etcd without TLS"
    );
    let http = mutual.endpoints()[0].replace("https://", "http://");
    assert_eq!(
        connect_problem(&[http], EtcdOptions::new()).await,
        TlsProblem::TlsRequired,
        "http:// to an etcd with TLS"
    );

    // A domain name the certificate does not hold is a wrong host too.
    assert_eq!(
        connect_problem(
            &mutual.endpoints(),
            options(good().domain_name("etcd.elsewhere.example"))
        )
        .await,
        TlsProblem::WrongHost
    );
    report("each_misconfiguration_is_named_at_connect", started);
}

/// A backend that connected while etcd was down meets the problem on first use: the cache
/// freezes with `FreezeCause::Tls(..)` and keeps retrying, backed off, never in a tight loop;
/// `Discovery::service` says which problem it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_first_use_the_cache_freezes_with_the_problem_and_retries_backed_off() {
    let started = Instant::now();
    let pki = Arc::new(Pki::new());
    let etcd = EtcdCluster::start_secure(1, Security::tls(pki.clone(), ServerCert::Expired));
    etcd.kill(0);
    let backend = EtcdBackend::connect(etcd.endpoints(), options(tls(&pki)))
        .await
        .expect("connect is lazy while etcd is down");
    etcd.restart(0);

    let discovery = discovery(backend)
        .first_list_timeout(Duration::from_secs(2))
        .build()
        .expect("valid config");
    let users = discovery.service_now("user").expect("a cache");
    let frozen = wait_for(&users, LONG, "frozen on the expired certificate", |s| {
        matches!(
            s.freshness(),
            Freshness::Frozen {
                cause: FreezeCause::Tls(TlsProblem::Expired),
                ..
            }
        )
    })
    .await;
    assert_eq!(frozen.len(), 0);
    retries_backed_off(&users).await;
    assert!(
        matches!(
            users.freshness(),
            Freshness::Frozen {
                cause: FreezeCause::Tls(TlsProblem::Expired),
                ..
            }
        ),
        "{:?}",
        users.freshness()
    );
    match discovery.service("orders").await {
        Err(Error::Tls {
            problem: TlsProblem::Expired,
            ..
        }) => {}
        other => panic!("expected Error::Tls(Expired) from the first list, got {other:?}"),
    }
    report(
        "on_first_use_the_cache_freezes_with_the_problem_and_retries_backed_off",
        started,
    );
}

/// The client's CA file is wrong (a rotation half done); the cache is frozen on it. Once the
/// right CA is on disk, `reload` with options read again from the files brings the cache back,
/// with no restart. A reload that etcd refuses keeps the connection that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotated_on_disk_are_picked_up_by_reload() {
    let started = Instant::now();
    let pki = Arc::new(Pki::new());
    let etcd = EtcdCluster::start_secure(1, Security::mutual_tls(pki.clone()));
    etcd.etcdctl(&["put", &user_key("a"), &value_of("a", 1)]);
    let dir = tempdir(&pki);
    let ca = dir.join("ca.pem");
    let client = pki.client("registry");
    std::fs::write(&ca, pki.other_ca_pem()).expect("write the CA file");
    let from_disk = || {
        let tls = TlsOptions::from_ca_file(&ca)
            .expect("the CA file parses")
            .identity_files(&client.cert, &client.key)
            .expect("the identity parses");
        options(tls)
    };

    etcd.kill(0);
    let backend = EtcdBackend::connect(etcd.endpoints(), from_disk())
        .await
        .expect("connect is lazy while etcd is down");
    etcd.restart(0);
    let users = discovery(backend.clone())
        .build()
        .expect("valid config")
        .service_now("user")
        .expect("a cache");
    wait_frozen_with(&users, FreezeCause::Tls(TlsProblem::UnknownIssuer)).await;

    // The right CA arrives on disk.
    std::fs::write(&ca, pki.ca_pem()).expect("write the CA file");
    backend
        .reload(from_disk())
        .await
        .expect("reload with the right CA");
    wait_for(&users, LONG, "live after the reload", |s| {
        s.freshness().is_live() && ids(s) == list(&["a@1"])
    })
    .await;

    // A reload with a wrong CA is refused and changes nothing.
    std::fs::write(&ca, pki.other_ca_pem()).expect("write the CA file");
    match backend.reload(from_disk()).await {
        Err(Error::Tls {
            problem: TlsProblem::UnknownIssuer,
            ..
        }) => {}
        other => panic!("expected the reload to be refused, got {other:?}"),
    }
    // New requests still go through the connection that works.
    backend
        .list(NS.as_bytes())
        .await
        .expect("a new request on the old connection");
    etcd.etcdctl(&["put", &user_key("b"), &value_of("b", 2)]);
    wait_for(&users, LONG, "still live on the old connection", |s| {
        s.freshness().is_live() && ids(s) == list(&["a@1", "b@2"])
    })
    .await;
    report(
        "certificates_rotated_on_disk_are_picked_up_by_reload",
        started,
    );
}

/// A directory for files the test rewrites, inside the PKI's (removed with it).
fn tempdir(pki: &Pki) -> std::path::PathBuf {
    let dir = pki.dir().join("client-side");
    std::fs::create_dir_all(&dir).expect("create the client's directory");
    dir
}

async fn wait_frozen_with(users: &ServiceCache, cause: FreezeCause) {
    wait_for(
        users,
        LONG,
        &format!("frozen with {cause:?}"),
        |s| matches!(s.freshness(), Freshness::Frozen { cause: c, .. } if c == cause),
    )
    .await;
}
