//! The `Discover` stream.

use super::*;

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
