//! The provider side over the in-memory etcd model, under paused tokio time.

mod support;

use std::time::Duration;

use etcd_registry::{
    BackoffConfig, Discovery, Error, Instance, KeyLayout, MemoryBackend, Registration,
    RegistrationBuilder, RegistrationStatus, State,
};
use support::wait::{eventually, status_becomes};
use support::*;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(3);
const BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(1),
    reset_after: Duration::from_secs(30),
};

fn builder(etcd: &MemoryBackend, id: &str) -> RegistrationBuilder {
    Registration::with_backend(etcd.clone(), instance("user", id, 8080))
        .namespace(NS)
        .ttl(TTL)
        .backoff(BACKOFF)
        .jitter_seed(3)
}

fn lease_of(etcd: &MemoryBackend, key: &str) -> Option<i64> {
    etcd.get(key).map(|kv| kv.lease)
}

#[tokio::test(start_paused = true)]
async fn registers_under_a_lease_and_is_discovered() {
    let etcd = MemoryBackend::new();
    let registration = builder(&etcd, "u1").register().await.unwrap();
    let lease = lease_of(&etcd, &user_key("u1")).expect("key written");
    assert_ne!(lease, 0, "the key is bound to a lease");
    assert_eq!(
        *registration.status().borrow(),
        RegistrationStatus::Registered { lease }
    );
    let users = Discovery::memory(etcd.clone())
        .namespace(NS)
        .build()
        .unwrap()
        .service("user")
        .await
        .unwrap();
    assert_eq!(ids(&users.snapshot()), list(&["u1@8080"]));

    // Kept alive: many TTLs later it is still there, under the same lease.
    tokio::time::sleep(TTL * 5).await;
    assert_eq!(lease_of(&etcd, &user_key("u1")), Some(lease));
}

#[tokio::test(start_paused = true)]
async fn a_key_held_by_another_lease_is_a_conflict_unless_replacing() {
    let etcd = MemoryBackend::new();
    let other = etcd.grant(Duration::from_secs(60));
    etcd.put_with_lease(user_key("u1"), br#"{"addr":"10.9.9.9:1"}"#, other)
        .unwrap();
    match builder(&etcd, "u1").register().await {
        Err(Error::Conflict { key, holder_lease }) => {
            assert_eq!(key, user_key("u1"));
            assert_eq!(holder_lease, other);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(lease_of(&etcd, &user_key("u1")), Some(other), "untouched");

    builder(&etcd, "u1").replace(true).register().await.unwrap();
    let now = lease_of(&etcd, &user_key("u1")).unwrap();
    assert_ne!(now, other, "taken over");
}

#[tokio::test(start_paused = true)]
async fn update_and_drain_reach_callers() {
    let etcd = MemoryBackend::new();
    let registration = builder(&etcd, "u1").register().await.unwrap();
    let users = Discovery::memory(etcd.clone())
        .namespace(NS)
        .build()
        .unwrap()
        .service("user")
        .await
        .unwrap();

    registration
        .update(|b| b.weight(5).tag("v2").meta("zone", "eu-1"))
        .await
        .unwrap();
    let s = wait_for(&users, Duration::from_secs(5), "weight 5", |s| {
        s.get("u1").is_some_and(|i| i.weight() == 5)
    })
    .await;
    let u1 = s.get("u1").unwrap();
    assert!(u1.has_tag("v2"));
    assert_eq!(u1.meta("zone"), Some("eu-1"));

    registration.drain().await.unwrap();
    wait_for(&users, Duration::from_secs(5), "draining", |s| {
        s.get("u1").is_some_and(|i| i.state() == State::Draining)
    })
    .await;
    assert!(
        users.pick().is_none(),
        "a draining instance is never picked"
    );

    let err = registration
        .update(|b| b.id("someone-else"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let err = registration.update(|b| b.weight(0)).await.unwrap_err();
    assert!(matches!(err, Error::Instance(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn deregister_revokes_at_once() {
    let etcd = MemoryBackend::new();
    let registration = builder(&etcd, "u1").register().await.unwrap();
    let mut status = registration.status();
    let lease = lease_of(&etcd, &user_key("u1")).unwrap();
    registration.deregister().await.unwrap();
    assert!(
        etcd.get(user_key("u1")).is_none(),
        "gone without waiting for the TTL"
    );
    assert_eq!(etcd.lease_ttl(lease), None, "lease revoked");
    status_becomes(&mut status, Duration::from_secs(1), "deregistered", |s| {
        *s == RegistrationStatus::Deregistered
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn dropping_stops_the_keep_alive_so_the_lease_expires() {
    let etcd = MemoryBackend::new();
    let registration = builder(&etcd, "u1").register().await.unwrap();
    let dropped = Instant::now();
    drop(registration);
    eventually(TTL * 2, "key expired", || {
        (etcd.get(user_key("u1")).is_none()).then_some(())
    })
    .await;
    assert!(
        dropped.elapsed() >= TTL - TTL / 3,
        "expired by its TTL, not revoked"
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_deleted_by_someone_else_is_put_back() {
    let etcd = MemoryBackend::new();
    let registration = builder(&etcd, "u1").register().await.unwrap();
    let lease = lease_of(&etcd, &user_key("u1")).unwrap();
    etcd.delete(user_key("u1"));
    eventually(Duration::from_secs(1), "key put back", || {
        (etcd.get(user_key("u1")).is_some()).then_some(())
    })
    .await;
    assert_eq!(lease_of(&etcd, &user_key("u1")), Some(lease), "same lease");
    drop(registration);
}

#[tokio::test(start_paused = true)]
async fn a_revoked_lease_is_replaced_with_a_new_one_for_the_same_key() {
    let etcd = MemoryBackend::new();
    let registration = builder(&etcd, "u1").register().await.unwrap();
    let mut status = registration.status();
    let lease = lease_of(&etcd, &user_key("u1")).unwrap();
    etcd.revoke(lease).unwrap();
    let back = status_becomes(&mut status, TTL + BACKOFF.max, "reregistered", |s| {
        matches!(s, RegistrationStatus::Reregistered { .. })
    })
    .await;
    let RegistrationStatus::Reregistered { lease: new } = back else {
        unreachable!()
    };
    assert_ne!(new, lease);
    assert_eq!(lease_of(&etcd, &user_key("u1")), Some(new));
}

#[tokio::test(start_paused = true)]
async fn a_lease_lost_during_an_outage_is_back_within_one_backoff_step() {
    let etcd = MemoryBackend::new();
    let registration = builder(&etcd, "u1").register().await.unwrap();
    let mut status = registration.status();
    let first = lease_of(&etcd, &user_key("u1")).unwrap();

    etcd.set_reachable(false);
    status_becomes(&mut status, TTL, "renewing", |s| {
        matches!(s, RegistrationStatus::Renewing { .. })
    })
    .await;
    // Long enough for the lease to run out in etcd, and for the provider to give it up.
    status_becomes(&mut status, TTL * 2, "lost", |s| {
        *s == RegistrationStatus::Lost
    })
    .await;
    eventually(TTL * 2, "lease expired in etcd", || {
        (etcd.get(user_key("u1")).is_none()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await; // backoff reaches its cap

    let healed = Instant::now();
    etcd.set_reachable(true);
    let back = status_becomes(&mut status, Duration::from_secs(10), "reregistered", |s| {
        matches!(s, RegistrationStatus::Reregistered { .. })
    })
    .await;
    let took = healed.elapsed();
    assert!(
        took <= BACKOFF.max,
        "back {took:?} after etcd's return; one backoff step is at most {:?}",
        BACKOFF.max
    );
    let RegistrationStatus::Reregistered { lease } = back else {
        unreachable!()
    };
    assert_ne!(lease, first);
    assert_eq!(
        lease_of(&etcd, &user_key("u1")),
        Some(lease),
        "same key, new lease"
    );
    assert_eq!(etcd.keys(format!("{NS}/user/")).len(), 1, "never doubled");
}

#[tokio::test(start_paused = true)]
async fn a_short_outage_keeps_the_same_lease() {
    let etcd = MemoryBackend::new();
    let registration = builder(&etcd, "u1").register().await.unwrap();
    let mut status = registration.status();
    let lease = lease_of(&etcd, &user_key("u1")).unwrap();
    etcd.set_reachable(false);
    status_becomes(&mut status, TTL, "renewing", |s| {
        matches!(s, RegistrationStatus::Renewing { .. })
    })
    .await;
    etcd.set_reachable(true);
    status_becomes(&mut status, TTL, "registered again", |s| {
        *s == RegistrationStatus::Registered { lease }
    })
    .await;
    assert_eq!(lease_of(&etcd, &user_key("u1")), Some(lease));
}

#[tokio::test(start_paused = true)]
async fn go_zero_keys_follow_the_lease() {
    let etcd = MemoryBackend::new();
    let instance = Instance::builder("user.rpc", "10.0.0.7:8080")
        .build()
        .unwrap();
    let registration = Registration::with_backend(etcd.clone(), instance)
        .layout(KeyLayout::GoZero)
        .ttl(TTL)
        .backoff(BACKOFF)
        .register()
        .await
        .unwrap();
    let mut status = registration.status();
    let keys = |etcd: &MemoryBackend| -> Vec<(String, i64)> {
        etcd.keys("user.rpc/")
            .into_iter()
            .map(|kv| (String::from_utf8(kv.key).unwrap(), kv.lease))
            .collect()
    };
    let first = keys(&etcd);
    assert_eq!(first.len(), 1);
    let (key, lease) = first[0].clone();
    assert_eq!(key, format!("user.rpc/{lease}"));
    assert_eq!(etcd.get(&key).unwrap().value, b"10.0.0.7:8080");

    etcd.revoke(lease).unwrap();
    status_becomes(&mut status, TTL + BACKOFF.max, "reregistered", |s| {
        matches!(s, RegistrationStatus::Reregistered { .. })
    })
    .await;
    let now = keys(&etcd);
    assert_eq!(now.len(), 1, "the old key is gone, one new key");
    assert_eq!(now[0].0, format!("user.rpc/{}", now[0].1));
    assert_ne!(now[0].1, lease);

    // Discovered as go-zero callers see it.
    let users = Discovery::memory(etcd.clone())
        .layout(KeyLayout::GoZero)
        .build()
        .unwrap()
        .service("user.rpc")
        .await
        .unwrap();
    assert_eq!(users.pick().unwrap().addr(), "10.0.0.7:8080");
}

#[tokio::test(start_paused = true)]
async fn bad_settings_are_clear_errors() {
    let etcd = MemoryBackend::new();
    let err = builder(&etcd, "u1")
        .ttl(Duration::from_millis(500))
        .register()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ttl"), "{err}");
    let err = builder(&etcd, "u1")
        .backoff(BackoffConfig {
            initial: Duration::ZERO,
            ..BACKOFF
        })
        .register()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("backoff"), "{err}");
    etcd.set_reachable(false);
    let err = builder(&etcd, "u1").register().await.unwrap_err();
    assert!(matches!(err, Error::Backend(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn updates_while_lost_do_not_hold_back_the_re_registration() {
    // Each attempt has one deadline; an update must not restart the wait with a fresh delay.
    // Several seeds, so that a redraw cannot pass by luck: with redraws, some seed takes longer
    // than one backoff step.
    for seed in 0..8 {
        let etcd = MemoryBackend::new();
        let registration = builder(&etcd, "u1")
            .jitter_seed(seed)
            .register()
            .await
            .unwrap();
        let mut status = registration.status();
        etcd.set_reachable(false);
        status_becomes(&mut status, TTL * 3, "lost", |s| {
            *s == RegistrationStatus::Lost
        })
        .await;
        tokio::time::sleep(Duration::from_secs(10)).await; // backoff at its cap

        let healed = Instant::now();
        etcd.set_reachable(true);
        let mut weight = 1;
        while !matches!(*status.borrow(), RegistrationStatus::Reregistered { .. }) {
            assert!(
                healed.elapsed() <= BACKOFF.max + Duration::from_millis(50),
                "seed {seed}: updates every 20 ms kept the registration away for {:?}",
                healed.elapsed()
            );
            weight += 1;
            let w = weight;
            registration.update(move |b| b.weight(w)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Written with the latest update.
        let value = etcd.get(user_key("u1")).unwrap().value;
        match codec().decode("user", user_key("u1").as_bytes(), &value) {
            Ok(etcd_registry::Decoded::Put(i)) => assert_eq!(i.weight(), weight, "seed {seed}"),
            other => panic!("{other:?}"),
        }
    }
}

/// With the default backoff, attempts after a lost lease come at least every TTL/3, however
/// long the outage: an etcd that was down keeps the old lease and extends it by about one TTL
/// when it is back, so an attempt later than that would let the instance vanish from callers
/// (the old lease expiring) before the new key is written.
#[tokio::test(start_paused = true)]
async fn the_default_backoff_retries_within_a_third_of_the_ttl() {
    let etcd = MemoryBackend::new();
    let registration = Registration::with_backend(etcd.clone(), instance("user", "u1", 8080))
        .namespace(NS)
        .ttl(TTL)
        .jitter_seed(3)
        .register()
        .await
        .unwrap();
    let mut status = registration.status();
    etcd.set_reachable(false);
    status_becomes(&mut status, TTL * 3, "lost", |s| {
        *s == RegistrationStatus::Lost
    })
    .await;
    // Long enough for an uncapped backoff to reach its 10 s cap.
    tokio::time::sleep(Duration::from_secs(60)).await;
    for _ in 0..5 {
        // Cut off again each time: every attempt now waits its full backoff step.
        let healed = Instant::now();
        etcd.set_reachable(true);
        status_becomes(&mut status, Duration::from_secs(30), "reregistered", |s| {
            matches!(s, RegistrationStatus::Reregistered { .. })
        })
        .await;
        let took = healed.elapsed();
        assert!(
            took <= TTL / 3,
            "back {took:?} after etcd's return; TTL/3 is {:?}",
            TTL / 3
        );
        etcd.set_reachable(false);
        status_becomes(&mut status, TTL * 3, "lost", |s| {
            *s == RegistrationStatus::Lost
        })
        .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}
