//! Consistent-hash routing by extension or header.

use super::*;

/// Four instances, and a service routing by the hash of a `RoutingKey` or of `x-user`.
async fn hash_routed() -> (ServiceCache, Balanced<Inner>) {
    let etcd = MemoryBackend::new();
    for id in ["a", "b", "c", "d"] {
        put(&etcd, &spec(id).build().expect("valid"));
    }
    let users = users(&etcd).await;
    let service = routed(
        &users,
        &Arc::new(Fleet::default()),
        Route::Hash {
            header: Some(http::HeaderName::from_static("x-user")),
        },
    );
    (users, service)
}

#[tokio::test(start_paused = true)]
async fn hash_routing_is_sticky_by_extension_or_header() {
    let (users, mut service) = hash_routed().await;
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
async fn the_routing_key_extension_wins_over_the_header_and_no_key_goes_by_p2c() {
    let (users, mut service) = hash_routed().await;
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
