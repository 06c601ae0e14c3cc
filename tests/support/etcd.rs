//! Real etcd processes for integration tests: a 1- or 3-member cluster on loopback ports, with
//! the faults the library must survive (kill, SIGSTOP, restart, compaction, wipe, restore from
//! an older backup, member removal) one call away, optionally secured with TLS, client
//! certificates and auth ([`Security`], in `etcd/security.rs`).
//!
//! Everything here blocks: process spawns and bounded polling loops. Every wait has a deadline,
//! every signal goes to a PID this harness spawned itself, and `Drop` (which also runs while a
//! failing test unwinds) SIGKILLs the members still alive and removes their data.
//!
//! Benches and examples include this file alone by `#[path]`, so its submodules are named by
//! `#[path]` too (relative to this file's directory either way), and nothing here needs a
//! dependency beyond `libc` and `serde_json`: the certificates come from `support::pki`.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "etcd/grpc_proxy.rs"]
pub mod grpc_proxy;
#[path = "etcd/process.rs"]
pub mod process;
#[path = "etcd/security.rs"]
pub mod security;

// A test binary uses only some of these.
#[allow(unused_imports)]
pub use grpc_proxy::GrpcProxy;
#[allow(unused_imports)]
pub use process::{
    Binaries, NOT_FOUND, binaries, free_port, port_accepts, tail, try_find_binaries_with,
};
use process::{clean_env, lock, run_bounded, signal, unique, wait_state};
#[allow(unused_imports)]
pub use security::{
    BCRYPT_COST, Credentials, Identity, ROOT_PASSWORD, ROOT_USER, Security, ServerCert, ServerTls,
    TlsFiles,
};

/// How long a (re)started member may take to answer a health check.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Wall-clock bound on one etcdctl run, on top of its own dial and command timeouts.
const ETCDCTL_WALL: Duration = Duration::from_secs(20);
/// How long `leader()` waits for some live member to be leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// Fresh starts that lose a port race (another process bound it between our probe and etcd's
/// bind) are retried on new ports this many times in all.
const START_ATTEMPTS: usize = 3;
/// How long a member removed from the cluster may take to exit on its own before the harness
/// SIGKILLs it.
pub const REMOVED_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// What `etcdctl endpoint status` reports about one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    pub cluster_id: u64,
    pub member_id: u64,
    pub leader: u64,
    pub revision: i64,
    pub raft_term: u64,
}

/// A snapshot file written by [`EtcdCluster::backup`], and the revision it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub path: PathBuf,
    pub revision: i64,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
    /// Removed from the cluster's membership by [`EtcdCluster::remove_member`]: never
    /// started again, and not part of `--initial-cluster` any more.
    removed: bool,
}

impl Member {
    fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL (to our own child's PID) and reap. No-op when not running.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.stopped = false;
    }

    fn pid(&mut self) -> Option<u32> {
        if self.running() {
            self.child.as_ref().map(|c| c.id())
        } else {
            None
        }
    }
}

/// A running etcd cluster of 1 or more members on loopback; members are addressed by index.
/// Methods take `&self` so a test can share the cluster (e.g. in an `Arc`) with its tasks.
pub struct EtcdCluster {
    bins: &'static Binaries,
    root: PathBuf,
    members: Mutex<Vec<Member>>,
    /// The `--initial-cluster-token` of the current incarnation.
    token: Mutex<String>,
    /// Flags given to every member on top of the harness's own.
    extra_flags: Vec<String>,
    /// TLS and auth of every member.
    security: Security,
    /// Whether the harness enabled auth on the current data (a wipe loses it): its etcdctl
    /// authenticates as root only then.
    auth_on: AtomicBool,
}

impl EtcdCluster {
    /// [`try_find_binaries_with`]: etcd and etcdctl from given `ETCD_BIN` and `PATH` values.
    pub fn try_find_binary_with(
        etcd_bin: Option<&OsStr>,
        path: Option<&OsStr>,
    ) -> Result<Binaries, String> {
        try_find_binaries_with(etcd_bin, path)
    }

    /// A one-member cluster.
    pub fn single() -> Self {
        Self::start(1)
    }

    /// A cluster of `members` members (1 or 3 in practice), all healthy on return.
    pub fn start(members: usize) -> Self {
        Self::start_with(binaries(), members)
    }

    /// A one-member cluster whose member also gets `flags` (e.g. `["--auth-token-ttl", "5"]`).
    pub fn single_with_flags(flags: &[&str]) -> Self {
        Self::start_with_flags(binaries(), 1, flags)
    }

    /// [`start`](Self::start) with given binaries instead of the ones `ETCD_BIN`/`PATH` name.
    pub fn start_with(bins: &'static Binaries, members: usize) -> Self {
        Self::start_with_flags(bins, members, &[])
    }

    /// A cluster of `members` members secured by `security`, all healthy on return; with
    /// `security.auth`, auth is enabled (user `root`, password [`ROOT_PASSWORD`]) before it
    /// returns. Every later (re)start of a member uses the same security.
    pub fn start_secure(members: usize, security: Security) -> Self {
        Self::start_full(binaries(), members, &[], security)
    }

    /// [`start_secure`](Self::start_secure) whose members also get `flags`.
    pub fn start_secure_with_flags(members: usize, security: Security, flags: &[&str]) -> Self {
        Self::start_full(binaries(), members, flags, security)
    }

    fn start_with_flags(bins: &'static Binaries, members: usize, flags: &[&str]) -> Self {
        Self::start_full(bins, members, flags, Security::default())
    }

    fn start_full(
        bins: &'static Binaries,
        members: usize,
        flags: &[&str],
        security: Security,
    ) -> Self {
        assert!(members >= 1, "a cluster needs at least one member");
        let root = std::env::temp_dir().join(unique("etcd-registry-test"));
        fs::create_dir_all(&root).expect("create etcd temp dir");
        // Built before anything is spawned so a panic below still runs Drop.
        let cluster = EtcdCluster {
            bins,
            root,
            members: Mutex::new(Vec::new()),
            token: Mutex::new(String::new()),
            extra_flags: flags.iter().map(|f| f.to_string()).collect(),
            security,
            auth_on: AtomicBool::new(false),
        };
        for attempt in 1..=START_ATTEMPTS {
            cluster.fresh_members(members);
            match cluster.wait_healthy(&(0..members).collect::<Vec<_>>()) {
                Ok(()) => {
                    if cluster.security.auth {
                        cluster.enable_auth();
                    }
                    return cluster;
                }
                Err(e) if e.port_taken && attempt < START_ATTEMPTS => {
                    // Someone else bound one of our ports: start over on new ones.
                    let mut ms = lock(&cluster.members);
                    for m in ms.iter_mut() {
                        m.kill();
                        let _ = fs::remove_dir_all(&m.data_dir);
                    }
                }
                Err(e) => panic!("{}", e.message),
            }
        }
        unreachable!()
    }

    /// Allocates ports and spawns every member as a brand-new cluster.
    fn fresh_members(&self, n: usize) {
        let token = unique("edt");
        let mut ms = lock(&self.members);
        ms.clear();
        for i in 0..n {
            let name = format!("m{i}");
            ms.push(Member {
                data_dir: self.root.join(&name),
                log: self.root.join(format!("{name}.log")),
                name,
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
                stopped: false,
                removed: false,
            });
        }
        let initial = initial_cluster(&ms);
        for m in ms.iter_mut() {
            self.spawn(m, &initial, &token, "new");
        }
        *lock(&self.token) = token;
    }

    fn spawn(&self, m: &mut Member, initial_cluster: &str, token: &str, state: &str) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open member log");
        let log2 = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(&self.bins.etcd);
        clean_env(&mut cmd);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(self.client_url(m.client_port))
            .arg("--advertise-client-urls")
            .arg(self.client_url(m.client_port))
            .arg("--listen-peer-urls")
            .arg(url(m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(url(m.peer_port))
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(token)
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--auto-compaction-retention", "0"])
            .args(self.security.member_flags())
            .args(&self.extra_flags)
            .args(["--logger", "zap", "--log-outputs"])
            .arg(&m.log)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bins.etcd.display()));
        m.child = Some(child);
        m.stopped = false;
    }

    /// Waits, up to [`START_TIMEOUT`] in all, until each listed member accepts TCP and answers
    /// `endpoint health` (which needs a leader). Fails early if a member exits.
    fn wait_healthy(&self, idxs: &[usize]) -> Result<(), StartError> {
        let deadline = Instant::now() + START_TIMEOUT;
        for &i in idxs {
            loop {
                let (endpoint, addr, log, exited) = {
                    let mut ms = lock(&self.members);
                    let m = &mut ms[i];
                    let exited = match m.child.as_mut() {
                        Some(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
                        None => Some("never started".into()),
                    };
                    let addr = SocketAddr::from(([127, 0, 0, 1], m.client_port));
                    (self.client_url(m.client_port), addr, m.log.clone(), exited)
                };
                if let Some(status) = exited {
                    let tail = tail(&log, 30);
                    return Err(StartError {
                        port_taken: tail.contains("address already in use"),
                        message: format!("etcd member m{i} exited ({status}); log tail:\n{tail}"),
                    });
                }
                let healthy = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    && self
                        .run_etcdctl(
                            Some(&endpoint),
                            &[
                                "--dial-timeout=1s",
                                "--command-timeout=1s",
                                "endpoint",
                                "health",
                            ],
                        )
                        .is_ok();
                if healthy {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(StartError {
                        port_taken: false,
                        message: format!(
                            "etcd member m{i} not healthy within {START_TIMEOUT:?}; log tail:\n{}",
                            tail(&log, 30)
                        ),
                    });
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    fn wait_healthy_or_panic(&self, idxs: &[usize]) {
        if let Err(e) = self.wait_healthy(idxs) {
            panic!("{}", e.message);
        }
    }

    /// Runs etcdctl with the harness's own [`credentials`](Self::credentials) when it talks to
    /// `endpoints`; without endpoints (a local `snapshot` command) with none.
    fn run_etcdctl(&self, endpoints: Option<&str>, args: &[&str]) -> Result<String, String> {
        self.run_etcdctl_as(&self.credentials(), endpoints, args)
    }

    fn run_etcdctl_as(
        &self,
        creds: &Credentials,
        endpoints: Option<&str>,
        args: &[&str],
    ) -> Result<String, String> {
        let mut cmd = Command::new(&self.bins.etcdctl);
        clean_env(&mut cmd);
        cmd.env("ETCDCTL_API", "3");
        if let Some(e) = endpoints {
            // Defaults first: a later `--command-timeout=...` in `args` overrides them.
            cmd.arg(format!("--endpoints={e}"))
                .arg("--dial-timeout=2s")
                .arg("--command-timeout=5s")
                .args(creds.args());
        }
        cmd.args(args);
        run_bounded(cmd, ETCDCTL_WALL)
    }

    /// `<scheme>://127.0.0.1:<port>`: https on a TLS cluster.
    fn client_url(&self, port: u16) -> String {
        format!("{}://127.0.0.1:{port}", self.security.scheme())
    }

    // ---- members -------------------------------------------------------------------------

    /// Number of members.
    pub fn len(&self) -> usize {
        lock(&self.members).len()
    }

    /// `http://127.0.0.1:<client port>` of member `i` (`https://` on a TLS cluster).
    pub fn endpoint(&self, i: usize) -> String {
        self.client_url(lock(&self.members)[i].client_port)
    }

    /// Client port of member `i`.
    pub fn client_port(&self, i: usize) -> u16 {
        lock(&self.members)[i].client_port
    }

    /// Every member's endpoint, dead, alive or removed: what a client under test is
    /// configured with.
    pub fn endpoints(&self) -> Vec<String> {
        lock(&self.members)
            .iter()
            .map(|m| self.client_url(m.client_port))
            .collect()
    }

    /// Endpoints of members that are running and not SIGSTOPped.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.live().into_iter().map(|i| self.endpoint(i)).collect()
    }

    /// Indices of members that are running and not SIGSTOPped (a removed member never is).
    pub fn live(&self) -> Vec<usize> {
        let mut ms = lock(&self.members);
        (0..ms.len())
            .filter(|&i| ms[i].running() && !ms[i].stopped)
            .collect()
    }

    /// PID of member `i` while its process exists (also while stopped).
    pub fn pid(&self, i: usize) -> Option<u32> {
        lock(&self.members)[i].pid()
    }

    /// Whether member `i`'s process exists (a SIGSTOPped member is still running).
    pub fn is_running(&self, i: usize) -> bool {
        lock(&self.members)[i].running()
    }

    /// Whether member `i` is SIGSTOPped.
    pub fn is_stopped(&self, i: usize) -> bool {
        lock(&self.members)[i].stopped
    }

    /// Whether member `i` was removed from the cluster by [`remove_member`](Self::remove_member).
    pub fn is_removed(&self, i: usize) -> bool {
        lock(&self.members)[i].removed
    }

    /// Data directory of member `i` (changes after `restore_from`).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        lock(&self.members)[i].data_dir.clone()
    }

    /// The harness's temp directory, removed on drop.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Member `i`'s log (etcd's own log plus its stdout/stderr), appended across restarts.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        tail(&lock(&self.members)[i].log, lines)
    }

    /// SIGKILLs member `i` and waits until it is reaped. No-op if it is not running.
    pub fn kill(&self, i: usize) {
        lock(&self.members)[i].kill();
    }

    /// SIGSTOPs member `i` and waits until the kernel reports it stopped: it keeps its sockets
    /// (connects succeed) but answers nothing.
    pub fn stop(&self, i: usize) {
        let mut ms = lock(&self.members);
        let pid = ms[i]
            .pid()
            .unwrap_or_else(|| panic!("stop: member m{i} is not running"));
        signal(pid, libc::SIGSTOP);
        ms[i].stopped = true;
        wait_state(pid, |s| s == 'T', "stopped");
    }

    /// SIGCONTs member `i` and waits until it is no longer in the stopped state.
    pub fn cont(&self, i: usize) {
        let mut ms = lock(&self.members);
        let pid = ms[i]
            .pid()
            .unwrap_or_else(|| panic!("cont: member m{i} is not running"));
        signal(pid, libc::SIGCONT);
        ms[i].stopped = false;
        wait_state(pid, |s| s != 'T', "continued");
    }

    /// Starts member `i` again on the same data dir and ports (SIGKILLing it first if it still
    /// runs) and waits until it is healthy. Panics for a removed member.
    pub fn restart(&self, i: usize) {
        {
            let mut ms = lock(&self.members);
            assert!(
                !ms[i].removed,
                "restart: member m{i} was removed from the cluster"
            );
            ms[i].kill();
            let initial = initial_cluster(&ms);
            let token = lock(&self.token).clone();
            self.spawn(&mut ms[i], &initial, &token, "existing");
        }
        self.wait_healthy_or_panic(&[i]);
    }

    /// Removes member `i` from the cluster's membership (`etcdctl member remove`, asked of the
    /// other live members; etcd refuses that until the member asked has been connected to its
    /// peers for 5 s, so right after a start this retries for up to that long), then waits for
    /// its process: etcd shuts a member down, with status 0, once it learns it was removed. A member that has not exited within [`REMOVED_EXIT_TIMEOUT`] (or
    /// is SIGSTOPped, so cannot) is SIGKILLed; either way it is reaped. On return `live()` no
    /// longer lists it, it is never started again, and the members left agree on a leader.
    /// Returns its exit status when it exited on its own, `None` when the harness ended it or
    /// it was not running.
    pub fn remove_member(&self, i: usize) -> Option<ExitStatus> {
        let name = {
            let ms = lock(&self.members);
            assert!(!ms[i].removed, "remove_member: m{i} was removed already");
            ms[i].name.clone()
        };
        let others: Vec<String> = self
            .live()
            .into_iter()
            .filter(|&j| j != i)
            .map(|j| self.endpoint(j))
            .collect();
        assert!(
            !others.is_empty(),
            "remove_member: no other live member to remove m{i} through"
        );
        let others = others.join(",");
        let list = self
            .run_etcdctl(Some(&others), &["member", "list", "-w", "json"])
            .unwrap_or_else(|e| panic!("member list: {e}"));
        let id = member_id(&list, &name)
            .unwrap_or_else(|| panic!("no member named {name} in member list: {list}"));
        // etcd refuses a removal (`--strict-reconfig-check`) until the member asked has been
        // connected to its peers for 5 s: right after a start, that takes retries.
        let hex = format!("{id:x}");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.run_etcdctl(Some(&others), &["member", "remove", &hex]) {
                Ok(out) => {
                    assert!(
                        out.contains("removed from cluster"),
                        "member remove said: {out}"
                    );
                    break;
                }
                Err(e) if e.contains("unhealthy cluster") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    // A timed-out attempt may have gone through after all.
                    let list = self
                        .run_etcdctl(Some(&others), &["member", "list", "-w", "json"])
                        .unwrap_or_else(|e| panic!("member list: {e}"));
                    if member_id(&list, &name).is_some() {
                        panic!("member remove {hex} ({name}): {e}");
                    }
                    break;
                }
            }
        }

        let deadline = Instant::now() + REMOVED_EXIT_TIMEOUT;
        let exited = loop {
            {
                let mut ms = lock(&self.members);
                let m = &mut ms[i];
                let status = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                let gone = m.child.is_none() || status.is_some();
                if gone || m.stopped || Instant::now() >= deadline {
                    // Reaps an exited child; SIGKILLs one still running.
                    m.kill();
                    m.removed = true;
                    break status;
                }
            }
            std::thread::sleep(POLL);
        };
        self.leader();
        exited
    }

    // ---- cluster queries -----------------------------------------------------------------

    /// Runs etcdctl (API v3) against the live members; panics with stderr on failure.
    #[track_caller]
    pub fn etcdctl(&self, args: &[&str]) -> String {
        self.try_etcdctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"))
    }

    /// Runs etcdctl (API v3) against the live members; `Err` carries stderr.
    pub fn try_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let eps = self.live_endpoints();
        if eps.is_empty() {
            return Err("no live etcd member".into());
        }
        self.run_etcdctl(Some(&eps.join(",")), args)
    }

    /// Runs etcdctl against member `i` only, whatever its state; panics on failure.
    #[track_caller]
    pub fn etcdctl_at(&self, i: usize, args: &[&str]) -> String {
        self.try_etcdctl_at(i, args)
            .unwrap_or_else(|e| panic!("etcdctl at m{i} {args:?}: {e}"))
    }

    /// Runs etcdctl against member `i` only, whatever its state.
    pub fn try_etcdctl_at(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let ep = self.endpoint(i);
        self.run_etcdctl(Some(&ep), args)
    }

    /// `endpoint status` of member `i`.
    pub fn try_status(&self, i: usize) -> Result<MemberStatus, String> {
        let out = self.try_etcdctl_at(i, &["endpoint", "status", "-w", "json"])?;
        parse_status(&out).ok_or_else(|| format!("unexpected endpoint status output: {out}"))
    }

    /// `endpoint status` of member `i`; panics on failure.
    #[track_caller]
    pub fn status(&self, i: usize) -> MemberStatus {
        self.try_status(i)
            .unwrap_or_else(|e| panic!("status of m{i}: {e}"))
    }

    /// The cluster id, as a live member reports it.
    pub fn cluster_id(&self) -> u64 {
        let i = *self.live().first().expect("no live etcd member");
        self.status(i).cluster_id
    }

    /// Index of the leader, once every live member names the same leader and that leader is a
    /// live member reporting itself leader. Retries up to 10 s (an election may be under way,
    /// and a follower learns the winner only from its first append) and panics after that.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            let live = self.live();
            let last: Vec<_> = live.iter().map(|&i| (i, self.try_status(i))).collect();
            let agreed = last.iter().all(|(_, s)| {
                matches!((s, &last[0].1), (Ok(a), Ok(b)) if a.leader != 0 && a.leader == b.leader)
            });
            if agreed && !last.is_empty() {
                let found = last.iter().find_map(|(i, s)| match s {
                    Ok(s) if s.leader == s.member_id => Some(*i),
                    _ => None,
                });
                if let Some(i) = found {
                    return i;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "live members do not agree on a live leader within {LEADER_TIMEOUT:?}: {last:?}"
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The cluster's current revision (a linearizable read's header revision).
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&[
            "get",
            "",
            "--prefix",
            "--keys-only",
            "--limit=1",
            "-w",
            "json",
        ]);
        header_revision(&out).unwrap_or_else(|| panic!("no header revision in: {out}"))
    }

    /// Compacts the keyspace up to `revision`.
    pub fn compact(&self, revision: i64) {
        self.etcdctl(&["compact", &revision.to_string()]);
    }

    // ---- disasters -----------------------------------------------------------------------

    /// Single member only: kills it, deletes its data and starts a brand-new cluster on the
    /// same ports (revision back to 1, new cluster id). An auth cluster gets auth enabled
    /// again (that takes revisions too).
    pub fn wipe_and_restart_empty(&self) {
        {
            let mut ms = lock(&self.members);
            assert_eq!(ms.len(), 1, "wipe_and_restart_empty is for a single member");
            ms[0].kill();
            let _ = fs::remove_dir_all(&ms[0].data_dir);
            self.auth_on.store(false, Ordering::SeqCst);
            let token = unique("edt");
            let initial = initial_cluster(&ms);
            self.spawn(&mut ms[0], &initial, &token, "new");
            *lock(&self.token) = token;
        }
        self.wait_healthy_or_panic(&[0]);
        if self.security.auth {
            self.enable_auth();
        }
    }

    /// Single member only: kills it, deletes its data and starts it again with unchanged flags
    /// (same name, peer URL and cluster token), as an operator rebuilding a member would: the
    /// cluster id stays the same while the revision starts over at 1 (plus what enabling auth
    /// again takes on an auth cluster).
    pub fn wipe_and_restart_same_identity(&self) {
        {
            let mut ms = lock(&self.members);
            assert_eq!(
                ms.len(),
                1,
                "wipe_and_restart_same_identity is for a single member"
            );
            ms[0].kill();
            let _ = fs::remove_dir_all(&ms[0].data_dir);
            self.auth_on.store(false, Ordering::SeqCst);
            let token = lock(&self.token).clone();
            let initial = initial_cluster(&ms);
            self.spawn(&mut ms[0], &initial, &token, "new");
        }
        self.wait_healthy_or_panic(&[0]);
        if self.security.auth {
            self.enable_auth();
        }
    }

    /// Saves a snapshot of a live member to a new file in the harness's temp dir.
    pub fn backup(&self) -> Backup {
        let path = self.root.join(format!("{}.db", unique("backup")));
        self.backup_to(&path)
    }

    /// Saves a snapshot of a live member to `path`.
    pub fn backup_to(&self, path: &Path) -> Backup {
        let i = *self.live().first().expect("no live etcd member");
        let file = path.to_str().expect("utf-8 backup path");
        self.etcdctl_at(i, &["snapshot", "save", file]);
        let out = self
            .run_etcdctl(None, &["snapshot", "status", file, "-w", "json"])
            .unwrap_or_else(|e| panic!("snapshot status: {e}"));
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("snapshot status json ({e}): {out}"));
        let revision = v["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no revision in snapshot status: {out}"));
        Backup {
            path: path.to_path_buf(),
            revision,
        }
    }

    /// Single member only: kills it and starts it on the same ports from `backup`, restored into
    /// a new data dir with a new cluster token; models etcd restored from an older backup
    /// (revision goes back, cluster id changes). Users, roles and whether auth is on come back
    /// as they were in the backup.
    pub fn restore_from(&self, backup: &Backup) {
        {
            let mut ms = lock(&self.members);
            assert_eq!(ms.len(), 1, "restore_from is for a single member");
            ms[0].kill();
            let token = unique("edt");
            let initial = initial_cluster(&ms);
            let new_dir = self.root.join(unique("m0-restored"));
            let file = backup.path.to_str().expect("utf-8 backup path");
            let peer = url(ms[0].peer_port);
            let dir = new_dir.to_str().expect("utf-8 data dir");
            let args = [
                "snapshot",
                "restore",
                file,
                "--name",
                ms[0].name.as_str(),
                "--data-dir",
                dir,
                "--initial-cluster",
                initial.as_str(),
                "--initial-advertise-peer-urls",
                peer.as_str(),
                "--initial-cluster-token",
                token.as_str(),
            ];
            self.run_etcdctl(None, &args)
                .unwrap_or_else(|e| panic!("snapshot restore: {e}"));
            let _ = fs::remove_dir_all(&ms[0].data_dir);
            ms[0].data_dir = new_dir;
            self.spawn(&mut ms[0], &initial, &token, "existing");
            *lock(&self.token) = token;
        }
        self.wait_healthy_or_panic(&[0]);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let mut ms = lock(&self.members);
        if std::thread::panicking() {
            // The test failed: its captured output is shown, so show what etcd said too.
            for m in ms.iter() {
                eprintln!("--- {} log tail ---\n{}", m.name, tail(&m.log, 15));
            }
        }
        for m in ms.iter_mut() {
            m.kill();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

struct StartError {
    port_taken: bool,
    message: String,
}

fn initial_cluster(ms: &[Member]) -> String {
    ms.iter()
        .filter(|m| !m.removed)
        .map(|m| format!("{}={}", m.name, url(m.peer_port)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses the first entry of `etcdctl endpoint status -w json`.
pub fn parse_status(json: &str) -> Option<MemberStatus> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let s = &v.get(0)?["Status"];
    let h = &s["header"];
    Some(MemberStatus {
        cluster_id: h["cluster_id"].as_u64()?,
        member_id: h["member_id"].as_u64()?,
        leader: s["leader"].as_u64()?,
        revision: h["revision"].as_i64()?,
        raft_term: h["raft_term"].as_u64()?,
    })
}

/// The id of the member called `name` in `etcdctl member list -w json` (etcd 3.4 prints ids
/// as decimal numbers; `member remove` wants hex).
pub fn member_id(json: &str, name: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)?["ID"]
        .as_u64()
}

/// `header.revision` of an etcdctl `-w json` response.
pub fn header_revision(json: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["header"]["revision"].as_i64()
}
