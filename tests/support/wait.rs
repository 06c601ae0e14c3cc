//! Helpers for the tests against real etcd processes: bounded waits on real time, and etcd's
//! own view of a prefix read back through etcdctl (the ground truth a cache is compared with).
#![allow(dead_code)]

use std::time::Duration;

use tokio::time::Instant;

use etcd_registry::{
    Backend, BackoffConfig, Codec, Decoded, Discovery, DiscoveryBuilder, RegistrationStatus,
};
use tokio::sync::watch;

use super::NS;
use super::etcd::EtcdCluster;

/// The caches' reconnection backoff in real-etcd tests: fast, so a test does not wait out long
/// sleeps.
pub const FAST_BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_millis(50),
    max: Duration::from_millis(500),
    reset_after: Duration::from_secs(30),
};

/// A discovery over `backend` under [`NS`] with [`FAST_BACKOFF`]; a test adds what it varies.
pub fn discovery(backend: impl Backend) -> DiscoveryBuilder {
    Discovery::with_backend(backend)
        .namespace(NS)
        .backoff(FAST_BACKOFF)
}

/// How often [`eventually`] probes a condition nobody can subscribe to (etcd's state, as seen
/// through etcdctl).
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// Probes until `probe` returns `Some`, at most `within` (on tokio's clock, so under paused time
/// it advances virtual time); panics naming `what` otherwise.
pub async fn eventually<T>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Waits until a registration's status satisfies `pred`, at most `within`.
pub async fn status_becomes(
    status: &mut watch::Receiver<RegistrationStatus>,
    within: Duration,
    what: &str,
    pred: impl Fn(&RegistrationStatus) -> bool,
) -> RegistrationStatus {
    let found = match tokio::time::timeout(within, status.wait_for(|s| pred(s))).await {
        Ok(Ok(s)) => Some(*s),
        Ok(Err(_)) => panic!("registration ended while waiting for: {what}"),
        Err(_) => None,
    };
    found.unwrap_or_else(|| {
        panic!(
            "not within {within:?}: {what}; status {:?}",
            *status.borrow()
        )
    })
}

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
    pub mod_revision: i64,
}

impl Kv {
    pub fn value_str(&self) -> &str {
        std::str::from_utf8(&self.value).expect("utf-8 value")
    }
}

/// Standard base64 (what `etcdctl -w json` encodes keys and values with).
fn base64(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            other => panic!("not base64: {other:?} in {text}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Every key under `prefix` (or exactly `key` when `prefix` is false), with the read's header
/// revision, through the live members.
pub fn get(etcd: &EtcdCluster, key: &str, prefix: bool) -> (i64, Vec<Kv>) {
    let mut args = vec!["get", key, "-w", "json"];
    if prefix {
        args.push("--prefix");
    }
    let out = etcd.etcdctl(&args);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcdctl json ({e}): {out}"));
    let revision = v["header"]["revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no header revision: {out}"));
    let kvs = v["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| Kv {
                    key: String::from_utf8(base64(kv["key"].as_str().unwrap_or(""))).unwrap(),
                    value: base64(kv["value"].as_str().unwrap_or("")),
                    lease: kv["lease"].as_i64().unwrap_or(0),
                    mod_revision: kv["mod_revision"].as_i64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    (revision, kvs)
}

/// The one key `key`, if etcd has it.
pub fn get_key(etcd: &EtcdCluster, key: &str) -> Option<Kv> {
    get(etcd, key, false).1.into_iter().next()
}

/// etcd's state of `service` as a cache of it should show it: `id@port` of every entry under
/// the codec's prefix that decodes (sorted), and the header revision of the read.
pub fn etcd_ids(etcd: &EtcdCluster, codec: &Codec, service: &str) -> (i64, Vec<String>) {
    let (revision, kvs) = get(etcd, &codec.prefix(service), true);
    let mut ids: Vec<String> = kvs
        .iter()
        .filter_map(
            |kv| match codec.decode(service, kv.key.as_bytes(), &kv.value) {
                Ok(Decoded::Put(i)) => Some(format!(
                    "{}@{}",
                    i.id(),
                    i.addr().rsplit(':').next().unwrap_or("")
                )),
                _ => None,
            },
        )
        .collect();
    ids.sort();
    (revision, ids)
}

/// Grants a lease of `ttl_secs` through etcdctl; returns its id as etcdctl prints it (hex) and
/// as a number.
pub fn grant(etcd: &EtcdCluster, ttl_secs: u32) -> (String, i64) {
    let out = etcd.etcdctl(&["lease", "grant", &ttl_secs.to_string()]);
    // "lease 694d7a2d6b1b4a0b granted with TTL(10s)"
    let hex = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected lease grant output: {out}"))
        .to_owned();
    let id = i64::from_str_radix(&hex, 16).unwrap_or_else(|e| panic!("lease id {hex}: {e}"));
    (hex, id)
}

/// Prints how long a test ran (shown with `--nocapture`).
pub fn report(test: &str, started: std::time::Instant) {
    eprintln!("[runtime] {test}: {:.2?}", started.elapsed());
}

/// `etcd_debugging_mvcc_watcher_total` of the member listening on client `port`: how many
/// watchers it serves (read from its `/metrics` page, on loopback).
pub fn watchers(port: u16) -> Result<u64, String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("write {addr}: {e}"))?;
    let mut page = String::new();
    conn.read_to_string(&mut page)
        .map_err(|e| format!("read {addr}: {e}"))?;
    page.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| format!("no watcher count on {addr}/metrics"))
}

/// Over 3 s, a cache that cannot list keeps trying, backed off: with [`FAST_BACKOFF`] (50 ms
/// doubling to 500 ms, full jitter: 250 ms on average once at the top) that is about a dozen
/// failed attempts, 16 in one run seen; a tight loop would be thousands, a cache that gave up
/// none. The bound leaves room for the jitter.
pub async fn retries_backed_off(cache: &etcd_registry::ServiceCache) {
    let before = cache.stats().failures;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = cache.stats().failures - before;
    assert!(
        (2..=40).contains(&attempts),
        "{attempts} failed attempts in 3 s: a cache must keep trying, backed off"
    );
}
