//! Proves the real-etcd harness in `support::etcd` does what the integration tests rely on:
//! data survives kill + restart, SIGSTOP makes a member unresponsive, compaction, leader
//! failover in a 3-member cluster, wipe and restore-from-backup, cleanup on drop and on panic,
//! and a useful message when etcd is missing.

mod support;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use support::etcd::{
    EtcdCluster, NOT_FOUND, header_revision, port_accepts, try_find_binaries_with,
};

fn get_value(cluster: &EtcdCluster, key: &str) -> String {
    cluster
        .etcdctl(&["get", key, "--print-value-only"])
        .trim()
        .to_string()
}

#[test]
fn single_member_put_get_kill_restart() {
    let etcd = EtcdCluster::single();
    assert!(etcd.is_running(0));
    assert_eq!(etcd.endpoints(), vec![etcd.endpoint(0)]);
    assert!(etcd.endpoint(0).starts_with("http://127.0.0.1:"));
    let r0 = etcd.revision();
    assert_eq!(r0, 1, "a fresh cluster is at revision 1");

    for (n, v) in ["a", "b", "c"].iter().enumerate() {
        assert_eq!(etcd.etcdctl(&["put", "/k", v]).trim(), "OK");
        assert_eq!(etcd.revision(), r0 + n as i64 + 1, "one revision per put");
    }
    assert_eq!(get_value(&etcd, "/k"), "c");

    let pid = etcd.pid(0).expect("pid while running");
    etcd.kill(0);
    assert!(!etcd.is_running(0));
    assert_eq!(etcd.pid(0), None);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed member was reaped"
    );
    assert!(
        !port_accepts(etcd.client_port(0)),
        "client port refuses connections"
    );
    assert!(etcd.try_etcdctl(&["get", "/k"]).is_err());

    etcd.restart(0);
    assert!(etcd.is_running(0));
    assert_ne!(etcd.pid(0), Some(pid));
    assert_eq!(get_value(&etcd, "/k"), "c", "data kept across restart");
    assert_eq!(etcd.revision(), r0 + 3);
}

#[test]
fn stop_makes_member_unresponsive_and_cont_revives_it() {
    let etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", "k", "v"]);

    etcd.stop(0);
    assert!(etcd.is_running(0) && etcd.is_stopped(0));
    assert!(
        port_accepts(etcd.client_port(0)),
        "a stopped process keeps its socket"
    );
    let t = Instant::now();
    let err = etcd
        .try_etcdctl_at(0, &["--command-timeout=1s", "get", "k"])
        .expect_err("a stopped member does not answer");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "bounded by etcdctl's timeouts: {:?}",
        t.elapsed()
    );
    assert!(
        err.contains("deadline") || err.contains("timed out") || err.contains("context"),
        "fails by timing out: {err}"
    );
    assert!(etcd.live().is_empty());

    etcd.cont(0);
    assert!(!etcd.is_stopped(0));
    assert_eq!(
        etcd.etcdctl_at(
            0,
            &["--command-timeout=5s", "get", "k", "--print-value-only"]
        )
        .trim(),
        "v"
    );
}

#[test]
fn compaction_makes_old_revisions_unreadable() {
    let etcd = EtcdCluster::single();
    let mut revs = Vec::new();
    for v in ["1", "2", "3", "4"] {
        etcd.etcdctl(&["put", "k", v]);
        revs.push(etcd.revision());
    }
    // Before compaction the oldest revision is readable.
    assert_eq!(
        etcd.etcdctl(&[
            "get",
            "k",
            "--print-value-only",
            "--rev",
            &revs[0].to_string()
        ])
        .trim(),
        "1"
    );
    etcd.compact(revs[2]);
    let err = etcd
        .try_etcdctl(&["get", "k", "--rev", &revs[0].to_string()])
        .expect_err("revision below the compaction point");
    assert!(err.contains("compacted"), "{err}");
    // The compaction revision itself and later ones remain.
    assert_eq!(
        etcd.etcdctl(&[
            "get",
            "k",
            "--print-value-only",
            "--rev",
            &revs[2].to_string()
        ])
        .trim(),
        "3"
    );
    assert_eq!(get_value(&etcd, "k"), "4");
}

#[test]
fn three_members_elect_a_new_leader_when_the_leader_dies() {
    let etcd = EtcdCluster::start(3);
    assert_eq!(etcd.len(), 3);
    let cluster_id = etcd.cluster_id();
    let mut member_ids = Vec::new();
    for i in 0..3 {
        let s = etcd.status(i);
        assert_eq!(s.cluster_id, cluster_id, "one cluster");
        member_ids.push(s.member_id);
        etcd.etcdctl_at(i, &["endpoint", "health"]);
    }
    member_ids.dedup();
    assert_eq!(member_ids.len(), 3);
    etcd.etcdctl(&["put", "before", "1"]);

    let old = etcd.leader();
    assert!(old < 3);
    let t = Instant::now();
    etcd.kill(old);
    assert_eq!(etcd.live().len(), 2);
    let new = etcd.leader();
    assert_ne!(new, old, "a survivor leads");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "elected in {:?}",
        t.elapsed()
    );
    // Both survivors agree on the new leader.
    let new_id = etcd.status(new).member_id;
    for i in etcd.live() {
        assert_eq!(etcd.status(i).leader, new_id, "m{i} follows the new leader");
    }

    etcd.etcdctl(&["put", "during", "2"]);
    assert_eq!(get_value(&etcd, "during"), "2");

    etcd.restart(old);
    assert_eq!(etcd.live().len(), 3);
    // The old leader rejoined: it answers a linearizable read with data written while it was
    // dead, and reports the same cluster.
    assert_eq!(
        etcd.etcdctl_at(old, &["get", "during", "--print-value-only"])
            .trim(),
        "2"
    );
    assert_eq!(etcd.status(old).cluster_id, cluster_id);
    etcd.etcdctl(&["put", "after", "3"]);
    assert_eq!(get_value(&etcd, "after"), "3");
}

#[test]
fn wipe_resets_revision_and_cluster_id() {
    let etcd = EtcdCluster::single();
    let endpoint = etcd.endpoint(0);
    for v in ["1", "2", "3"] {
        etcd.etcdctl(&["put", "k", v]);
    }
    assert_eq!(etcd.revision(), 4);
    let id_before = etcd.status(0).cluster_id;

    etcd.wipe_and_restart_empty();
    assert_eq!(etcd.endpoint(0), endpoint, "same ports");
    assert_eq!(etcd.revision(), 1, "empty again");
    assert_eq!(get_value(&etcd, "k"), "");
    assert_ne!(etcd.status(0).cluster_id, id_before, "a new cluster");
}

#[test]
fn restore_from_backup_rolls_back_revision_and_data() {
    let etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", "a", "1"]);
    etcd.etcdctl(&["put", "b", "2"]);
    let backup = etcd.backup();
    assert_eq!(backup.revision, etcd.revision());
    assert!(backup.path.is_file());
    let at_backup = etcd.etcdctl(&["get", "", "--prefix"]);

    etcd.etcdctl(&["put", "a", "changed"]);
    etcd.etcdctl(&["put", "c", "3"]);
    etcd.etcdctl(&["del", "b"]);
    assert_eq!(etcd.revision(), backup.revision + 3);
    let id_before = etcd.status(0).cluster_id;

    etcd.restore_from(&backup);
    assert_eq!(etcd.revision(), backup.revision, "revision went back");
    assert_eq!(
        etcd.etcdctl(&["get", "", "--prefix"]),
        at_backup,
        "data as backed up"
    );
    assert_ne!(
        etcd.status(0).cluster_id,
        id_before,
        "restored as a new cluster"
    );
    // And it is writable again from there.
    etcd.etcdctl(&["put", "d", "4"]);
    assert_eq!(etcd.revision(), backup.revision + 1);
}

#[test]
fn drop_kills_members_and_removes_data_even_when_a_test_panics() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let etcd = EtcdCluster::single();
        etcd.stop(0); // a stopped member must be killed too
        seen = Some((
            etcd.pid(0).unwrap(),
            etcd.client_port(0),
            etcd.root().to_path_buf(),
        ));
        panic!("test failure while etcd runs");
    }));
    assert!(result.is_err());
    let (pid, port, root) = seen.expect("cluster started");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "etcd {pid} reaped"
    );
    assert!(!port_accepts(port), "nothing listens on the client port");
    assert!(!root.exists(), "temp dir removed");
}

#[test]
fn missing_binary_says_how_to_install() {
    let empty = std::env::temp_dir().join(format!("etcd-harness-empty-{}", std::process::id()));
    fs::create_dir_all(&empty).unwrap();
    let path = Some(empty.as_os_str());

    assert_eq!(
        EtcdCluster::try_find_binary_with(None, path).unwrap_err(),
        NOT_FOUND
    );
    assert_eq!(
        try_find_binaries_with(Some(OsStr::new("")), None).unwrap_err(),
        NOT_FOUND
    );
    let err = try_find_binaries_with(Some(OsStr::new("/nonexistent/etcd")), path).unwrap_err();
    assert!(
        err.starts_with(NOT_FOUND) && err.contains("/nonexistent/etcd"),
        "{err}"
    );
    assert!(NOT_FOUND.contains("apt-get install etcd-server etcd-client"));
    assert!(NOT_FOUND.contains("ETCD_BIN="));

    // ETCD_BIN wins over PATH and etcdctl is taken from next to it.
    let fake = empty.join("bin");
    fs::create_dir_all(&fake).unwrap();
    for name in ["etcd", "etcdctl"] {
        let p = fake.join(name);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bins = try_find_binaries_with(Some(fake.join("etcd").as_os_str()), path).unwrap();
    assert_eq!(bins.etcd, fake.join("etcd"));
    assert_eq!(bins.etcdctl, fake.join("etcdctl"));
    // Found on PATH too; a non-executable file is not a binary.
    let bins = try_find_binaries_with(None, Some(fake.as_os_str())).unwrap();
    assert_eq!(bins.etcd, fake.join("etcd"));
    fs::set_permissions(fake.join("etcd"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        try_find_binaries_with(None, Some(fake.as_os_str())).unwrap_err(),
        NOT_FOUND
    );
    fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn header_revision_parses_etcdctl_json() {
    let json = r#"{"header":{"cluster_id":10209395086029371855,"member_id":1,"revision":4,"raft_term":2},"count":1}"#;
    assert_eq!(header_revision(json), Some(4));
    assert_eq!(header_revision("not json"), None);
}
