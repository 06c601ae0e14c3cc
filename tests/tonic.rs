//! The tonic feeder over the in-memory etcd model, under paused time: what it sends to tonic's
//! `balance_channel`, and that it ends as soon as the channel is gone.

mod support;

use std::time::Duration;

use etcd_registry::{Instance, MemoryBackend, State};
use support::*;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tonic::transport::channel::Change;

const LONG: Duration = Duration::from_secs(120);

fn put(etcd: &MemoryBackend, instance: Instance) {
    let codec = codec();
    etcd.put(codec.key(&instance, 0), codec.encode_value(&instance));
}

async fn next(changes: &mut mpsc::Receiver<Change<String, Endpoint>>) -> String {
    match tokio::time::timeout(LONG, changes.recv()).await {
        Ok(Some(Change::Insert(id, endpoint))) => format!("+{id} {}", endpoint.uri()),
        Ok(Some(Change::Remove(id))) => format!("-{id}"),
        Ok(None) => panic!("the feeder ended"),
        Err(_) => panic!("no change within the bound"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_feeder_inserts_up_instances_removes_the_rest_and_ends_with_the_channel() {
    let etcd = MemoryBackend::new();
    put(
        &etcd,
        Instance::builder("user", "10.0.0.1:80")
            .id("a")
            .build()
            .expect("valid"),
    );
    let draining = Instance::builder("user", "10.0.0.2:80")
        .id("b")
        .state(State::Draining);
    put(&etcd, draining.build().expect("valid"));
    let users = users(&etcd).await;
    let (sender, mut changes) = mpsc::channel(16);
    let feeder = tokio::spawn(etcd_registry::tonic::feed_balance_channel(
        users.clone(),
        |endpoint| endpoint.timeout(Duration::from_secs(1)),
        sender,
    ));
    assert_eq!(
        next(&mut changes).await,
        "+a http://10.0.0.1:80/",
        "the draining b left out"
    );

    let tls = Instance::builder("user", "10.0.0.1:443")
        .id("a")
        .meta("scheme", "grpcs");
    put(&etcd, tls.build().expect("valid"));
    assert_eq!(next(&mut changes).await, "+a https://10.0.0.1:443/");
    // A scheme that makes no URI: the old endpoint is no longer where a is.
    let bad = Instance::builder("user", "10.0.0.1:443")
        .id("a")
        .meta("scheme", "no scheme");
    put(&etcd, bad.build().expect("valid"));
    assert_eq!(next(&mut changes).await, "-a");
    let up = Instance::builder("user", "10.0.0.2:80").id("b");
    put(&etcd, up.build().expect("valid"));
    assert_eq!(next(&mut changes).await, "+b http://10.0.0.2:80/");
    etcd.delete(user_key("b"));
    assert_eq!(next(&mut changes).await, "-b");

    // The channel goes: the feeder ends at once, with no change to wake it.
    drop(changes);
    tokio::time::timeout(Duration::from_secs(1), feeder)
        .await
        .expect("the feeder ended without waiting for a change")
        .expect("the feeder did not panic");
}
