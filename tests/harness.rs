//! Proves the real-etcd harness in `support::etcd` does what the integration tests rely on:
//! data survives kill + restart, SIGSTOP makes a member unresponsive, compaction, leader
//! failover in a 3-member cluster, wipe and restore-from-backup, cleanup on drop and on panic,
//! and a useful message when etcd is missing. And its security: TLS clusters refuse what they
//! must (no CA, another CA, plain http, no or a foreign client certificate, an unauthenticated
//! or read-only user), the expired and wrong-host certificates really are that, member removal,
//! and `support::pki` cleaning up after itself.

mod support;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::etcd::{
    Credentials, EtcdCluster, NOT_FOUND, ROOT_USER, Security, ServerCert, header_revision,
    member_id, port_accepts, try_find_binaries_with,
};
use support::pki::Pki;

/// etcdctl flags for a call that is meant to fail: fast, and with gRPC's debug log, because
/// etcdctl 3.4 reports a failed TLS handshake only as `context deadline exceeded` and the
/// reason (`x509: ...`) is in that log.
fn failing(args: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec!["--debug", "--dial-timeout=1s", "--command-timeout=1s"];
    v.extend_from_slice(args);
    v
}

/// Asserts `result` failed and its message contains `needle`.
#[track_caller]
fn assert_refused(result: Result<String, String>, needle: &str) {
    match result {
        Ok(out) => panic!("expected a refusal mentioning {needle:?}, got: {out}"),
        Err(e) => assert!(e.contains(needle), "expected {needle:?} in: {e}"),
    }
}

/// Asserts that a grpc-proxy in front of `etcd`, spoken to in plain http without credentials
/// (it holds the cluster's), reads key `k` as `v`.
#[track_caller]
fn assert_the_proxy_serves_k(etcd: &EtcdCluster) {
    let proxy = etcd.grpc_proxy();
    assert_eq!(
        etcd.try_etcdctl_against(&proxy.endpoint(), &Credentials::default(), &["get", "k"])
            .map(|out| out.lines().nth(1).map(str::to_owned)),
        Ok(Some("v".into())),
        "through the proxy; its log:\n{}",
        proxy.log_tail(10)
    );
}

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

#[test]
fn tls_cluster_answers_with_the_ca_and_refuses_the_rest() {
    let pki = Arc::new(Pki::new());
    let dir = pki.dir().to_path_buf();
    let etcd = EtcdCluster::start_secure(1, Security::tls(pki.clone(), ServerCert::Valid));
    assert!(etcd.endpoint(0).starts_with("https://127.0.0.1:"));
    assert_eq!(etcd.endpoints(), vec![etcd.endpoint(0)]);
    assert_eq!(etcd.live_endpoints(), etcd.endpoints());
    // The harness's own etcdctl trusts the CA.
    assert_eq!(etcd.etcdctl(&["put", "k", "v"]).trim(), "OK");
    assert_eq!(
        etcd.status(0).member_id,
        etcd.status(etcd.leader()).member_id
    );

    let ca_only = Credentials::default().with_cacert(pki.ca_file());
    assert_eq!(
        etcd.etcdctl_with(&ca_only, &["get", "k", "--print-value-only"])
            .trim(),
        "v"
    );
    // The system roots, or another CA, do not vouch for the server.
    for creds in [
        Credentials::default(),
        Credentials::default().with_cacert(pki.other_ca_file()),
    ] {
        assert_refused(
            etcd.try_etcdctl_with(&creds, &failing(&["get", "k"])),
            "x509: certificate signed by unknown authority",
        );
    }
    // Plain http to the TLS port: etcd rejects the connection.
    let http = format!("http://127.0.0.1:{}", etcd.client_port(0));
    assert_refused(
        etcd.try_etcdctl_against(&http, &ca_only, &failing(&["get", "k"])),
        "context deadline exceeded",
    );
    let log = etcd.log_tail(0, 1000);
    assert!(
        log.contains("tls: first record does not look like a TLS handshake"),
        "etcd logs the plain-http connection it rejected:\n{log}"
    );

    // The grpc-proxy reaches the members over TLS and serves plain http itself.
    assert_the_proxy_serves_k(&etcd);

    // After a rotation (new key, same files) new connections still get through: etcd reads
    // its certificate files on every handshake.
    let before = pki.server_pem(ServerCert::Valid);
    pki.reissue_server();
    assert_ne!(
        pki.server_pem(ServerCert::Valid),
        before,
        "new certificate and key"
    );
    assert_eq!(
        etcd.etcdctl_with(&ca_only, &["get", "k", "--print-value-only"])
            .trim(),
        "v"
    );

    // The cluster keeps the certificates alive: a restart after the test let go of its
    // handle still finds them, with the same TLS flags.
    drop(pki);
    etcd.kill(0);
    etcd.restart(0);
    assert_eq!(
        etcd.etcdctl_with(&ca_only, &["get", "k", "--print-value-only"])
            .trim(),
        "v"
    );
    let backup = etcd.backup();
    etcd.etcdctl(&["put", "k", "later"]);
    etcd.restore_from(&backup);
    assert_eq!(get_value(&etcd, "k"), "v", "restored over TLS");
    drop(etcd);
    assert!(!dir.exists(), "certificates removed with the last holder");
}

#[test]
fn client_cert_auth_cluster_refuses_a_client_without_a_trusted_certificate() {
    let pki = Arc::new(Pki::new());
    let etcd = EtcdCluster::start_secure(1, Security::mutual_tls(pki.clone()));
    // The harness presents the CN-root client certificate.
    assert_eq!(etcd.etcdctl(&["put", "k", "v"]).trim(), "OK");
    let ca_only = Credentials::default().with_cacert(pki.ca_file());
    assert_refused(
        etcd.try_etcdctl_with(&ca_only, &failing(&["get", "k"])),
        "context deadline exceeded",
    );
    let foreign = ca_only.clone().with_client(pki.foreign_client());
    assert_refused(
        etcd.try_etcdctl_with(&foreign, &failing(&["get", "k"])),
        "context deadline exceeded",
    );
    let log = etcd.log_tail(0, 1000);
    assert!(
        log.contains("client didn't provide a certificate"),
        "etcd logs the client without a certificate:\n{log}"
    );
    assert!(
        log.contains(
            "failed to verify client certificate: x509: certificate signed by unknown authority"
        ),
        "etcd logs the client certificate of another CA:\n{log}"
    );
    // Any CN the CA signed is let in (there is no auth on this cluster).
    let caller = ca_only.with_client(pki.client("caller"));
    assert_eq!(
        etcd.etcdctl_with(&caller, &["get", "k", "--print-value-only"])
            .trim(),
        "v"
    );
    // The grpc-proxy presents the CA's certificate without a CN.
    assert_the_proxy_serves_k(&etcd);
}

#[test]
fn auth_cluster_refuses_an_unauthenticated_put_and_accepts_root() {
    let etcd = EtcdCluster::start_secure(1, Security::auth());
    assert!(etcd.auth_enabled());
    let nobody = Credentials::default();
    assert_refused(
        etcd.try_etcdctl_with(&nobody, &["put", "k", "v"]),
        "user name is empty",
    );
    // etcd 3.4's `endpoint health` needs a user too (only "permission denied" counts as healthy).
    assert_refused(
        etcd.try_etcdctl_with(&nobody, &["endpoint", "health"]),
        "user name is empty",
    );
    assert_refused(
        etcd.try_etcdctl_with(
            &nobody.clone().with_user(ROOT_USER, "wrong"),
            &["put", "k", "v"],
        ),
        "authentication failed",
    );
    let root = nobody.with_user(ROOT_USER, etcd.root_password());
    assert_eq!(etcd.etcdctl_with(&root, &["put", "k", "v"]).trim(), "OK");
    assert_eq!(get_value(&etcd, "k"), "v", "the harness is root");
    assert_eq!(etcd.credentials(), root);

    // A wipe loses users and auth; the harness enables auth again.
    etcd.wipe_and_restart_empty();
    assert!(etcd.auth_enabled());
    assert_refused(
        etcd.try_etcdctl_with(&Credentials::default(), &["put", "k", "v"]),
        "user name is empty",
    );
    assert_eq!(get_value(&etcd, "k"), "");
    etcd.restart(0);
    assert_eq!(etcd.etcdctl(&["put", "k", "w"]).trim(), "OK");
}

#[test]
fn read_only_user_can_get_but_not_put() {
    let etcd = EtcdCluster::start_secure(1, Security::auth());
    etcd.etcdctl(&["put", "/svc/user/a", "1"]);
    etcd.etcdctl(&["put", "/other", "x"]);
    etcd.add_user("reader", "reader-pw");
    etcd.add_role("svc-read");
    etcd.grant_read_prefix("svc-read", "/svc/");
    etcd.grant_role("reader", "svc-read");

    let reader = etcd.credentials_as("reader", "reader-pw");
    let get = ["get", "/svc/user/a", "--print-value-only"];
    assert_eq!(etcd.etcdctl_with(&reader, &get).trim(), "1");
    assert_eq!(
        etcd.etcdctl_with(&reader, &["get", "/svc/", "--prefix", "--keys-only"])
            .trim(),
        "/svc/user/a"
    );
    assert_refused(
        etcd.try_etcdctl_with(&reader, &["put", "/svc/user/a", "2"]),
        "permission denied",
    );
    assert_refused(
        etcd.try_etcdctl_with(&reader, &["get", "/other"]),
        "permission denied",
    );

    etcd.grant_readwrite_prefix("svc-read", "/svc/");
    assert_eq!(
        etcd.etcdctl_with(&reader, &["put", "/svc/user/a", "2"])
            .trim(),
        "OK"
    );
    etcd.revoke_prefix("svc-read", "/svc/");
    assert_refused(etcd.try_etcdctl_with(&reader, &get), "permission denied");
    assert_eq!(get_value(&etcd, "/svc/user/a"), "2");
}

#[test]
fn mutual_tls_with_auth_takes_the_user_from_the_certificate_cn() {
    let pki = Arc::new(Pki::new());
    let etcd = EtcdCluster::start_secure(1, Security::mutual_tls(pki.clone()).with_auth());
    etcd.etcdctl(&["put", "/svc/a", "1"]);
    etcd.add_user("caller", "unused");
    etcd.add_role("svc-read");
    etcd.grant_read_prefix("svc-read", "/svc/");
    etcd.grant_role("caller", "svc-read");

    // No --user: etcd takes the user from the client certificate's CN.
    let ca_only = Credentials::default().with_cacert(pki.ca_file());
    let caller = ca_only.clone().with_client(pki.client("caller"));
    assert_eq!(
        etcd.etcdctl_with(&caller, &["get", "/svc/a", "--print-value-only"])
            .trim(),
        "1"
    );
    assert_refused(
        etcd.try_etcdctl_with(&caller, &["put", "/svc/a", "2"]),
        "permission denied",
    );
    let root_cert = ca_only.with_client(pki.root_client());
    assert_eq!(
        etcd.etcdctl_with(&root_cert, &["put", "/svc/a", "3"])
            .trim(),
        "OK"
    );
    assert_eq!(get_value(&etcd, "/svc/a"), "3");
}

#[test]
fn expired_and_wrong_host_certificates_are_refused_without_skip_verify() {
    let pki = Arc::new(Pki::new());
    for (cert, reason) in [
        (
            ServerCert::Expired,
            "x509: certificate has expired or is not yet valid",
        ),
        (
            ServerCert::WrongHost,
            "x509: cannot validate certificate for 127.0.0.1 because it doesn't contain any IP SANs",
        ),
    ] {
        let etcd = EtcdCluster::start_secure(1, Security::tls(pki.clone(), cert));
        // The harness itself skips verification and works.
        assert_eq!(etcd.etcdctl(&["put", "k", "v"]).trim(), "OK", "{cert:?}");
        etcd.leader();
        let ca_only = Credentials::default().with_cacert(pki.ca_file());
        assert_refused(
            etcd.try_etcdctl_with(&ca_only, &failing(&["get", "k"])),
            reason,
        );
        // Same CA, same server: only the certificate's validity stood in the way.
        let skip = ca_only.skip_verify(true);
        assert_eq!(
            etcd.etcdctl_with(&skip, &["get", "k", "--print-value-only"])
                .trim(),
            "v",
            "{cert:?}"
        );
    }
}

#[test]
fn remove_member_leaves_two_live_members_with_a_leader() {
    let etcd = EtcdCluster::start(3);
    etcd.etcdctl(&["put", "before", "1"]);
    let cluster_id = etcd.cluster_id();
    let victim = etcd.leader();
    let port = etcd.client_port(victim);
    let name = format!("m{victim}");
    assert!(member_id(&etcd.etcdctl(&["member", "list", "-w", "json"]), &name).is_some());

    let status = etcd.remove_member(victim);
    assert!(
        status.is_some_and(|s| s.success()),
        "a removed member shuts down by itself: {status:?}"
    );
    assert!(etcd.is_removed(victim));
    assert!(!etcd.is_running(victim));
    assert_eq!(etcd.pid(victim), None);
    assert!(
        !port_accepts(port),
        "nothing listens on the removed member's port"
    );
    let live = etcd.live();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(!live.contains(&victim));
    assert_eq!(etcd.endpoints().len(), 3, "configured endpoints are kept");

    let leader = etcd.leader();
    assert_ne!(leader, victim);
    let list = etcd.etcdctl(&["member", "list", "-w", "json"]);
    assert_eq!(
        member_id(&list, &name),
        None,
        "gone from the membership: {list}"
    );
    for i in live {
        assert_eq!(etcd.status(i).cluster_id, cluster_id);
        assert!(member_id(&list, &format!("m{i}")).is_some(), "{list}");
    }
    etcd.etcdctl(&["put", "after", "2"]);
    assert_eq!(get_value(&etcd, "before"), "1");
    assert_eq!(get_value(&etcd, "after"), "2");

    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| etcd.restart(victim)));
    assert!(again.is_err(), "a removed member is never started again");
}

#[test]
fn pki_files_do_not_outlive_it() {
    let pki = Pki::new();
    let dir = pki.dir().to_path_buf();
    let caller = pki.client("caller");
    let mut certs = vec![pki.ca_file(), pki.other_ca_file()];
    let mut keys = Vec::new();
    for id in [
        pki.server(ServerCert::Valid),
        pki.server(ServerCert::Expired),
        pki.server(ServerCert::WrongHost),
        pki.root_client(),
        pki.anonymous_client(),
        pki.foreign_client(),
        caller.clone(),
    ] {
        certs.push(id.cert);
        keys.push(id.key);
    }
    for c in &certs {
        assert!(c.starts_with(&dir), "{}", c.display());
        let pem = fs::read_to_string(c).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----"),
            "{}",
            c.display()
        );
    }
    for k in &keys {
        let pem = fs::read_to_string(k).unwrap();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{}",
            k.display()
        );
    }
    let all: std::collections::HashSet<_> = certs.iter().chain(&keys).collect();
    assert_eq!(all.len(), certs.len() + keys.len(), "one file each");
    assert_ne!(pki.ca_pem(), pki.other_ca_pem());
    assert_eq!(pki.client_pem(), pki.root_client().pem());
    assert_ne!(pki.client_pem(), pki.foreign_client_pem());
    assert_ne!(caller.pem(), pki.client_pem());

    // Re-issuing keeps the paths and replaces both files.
    let server = pki.server(ServerCert::Valid);
    let before = server.pem();
    pki.reissue_server();
    assert_eq!(pki.server(ServerCert::Valid), server);
    let after = server.pem();
    assert_ne!(after.0, before.0);
    assert_ne!(after.1, before.1);

    drop(pki);
    assert!(!dir.exists(), "{} removed on drop", dir.display());
}
