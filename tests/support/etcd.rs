//! Real etcd processes for integration tests: a 1- or 3-member cluster on loopback ports, with
//! the faults the library must survive (kill, SIGSTOP, restart, compaction, wipe, restore from
//! an older backup) one call away.
//!
//! Everything here blocks: process spawns and bounded polling loops. Every wait has a deadline,
//! every signal goes to a PID this harness spawned itself, and `Drop` (which also runs while a
//! failing test unwinds) SIGKILLs the members still alive and removes their data.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a missing etcd binary panics with.
pub const NOT_FOUND: &str = "etcd not found: install it (Debian/Ubuntu: `apt-get install etcd-server etcd-client`) or set ETCD_BIN=/path/to/etcd; `cargo xtask ci` installs it for you";

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

/// The etcd and etcdctl binaries the harness runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub etcdctl: PathBuf,
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn search_path(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    let path = path?;
    std::env::split_paths(path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Finds etcd and etcdctl from the value of `ETCD_BIN` and of `PATH`, given explicitly so the
/// lookup is testable without touching the process environment. Same rules as `cargo xtask`:
/// an empty `ETCD_BIN` counts as unset, a bare name is looked up on `PATH`, and etcdctl is taken
/// from next to etcd first, then from `PATH`.
pub fn try_find_binaries_with(
    etcd_bin: Option<&OsStr>,
    path: Option<&OsStr>,
) -> Result<Binaries, String> {
    let etcd = match etcd_bin.filter(|v| !v.is_empty()) {
        Some(value) => {
            let p = PathBuf::from(value);
            let bare = p.components().count() == 1 && !p.is_absolute();
            let found = p
                .to_str()
                .filter(|_| bare)
                .and_then(|name| search_path(name, path));
            match found {
                Some(f) => f,
                None if is_executable(&p) => p,
                None => {
                    return Err(format!(
                        "{NOT_FOUND} (ETCD_BIN is set to `{}`, which is not an executable file)",
                        p.display()
                    ));
                }
            }
        }
        None => search_path("etcd", path).ok_or_else(|| NOT_FOUND.to_string())?,
    };
    let beside = etcd.parent().map(|dir| dir.join("etcdctl"));
    let etcdctl = beside
        .filter(|p| is_executable(p))
        .or_else(|| search_path("etcdctl", path))
        .ok_or_else(|| {
            format!(
                "etcdctl not found next to {} nor on PATH: install it (Debian/Ubuntu: `apt-get install etcd-server etcd-client`) or put it next to ETCD_BIN; `cargo xtask ci` installs it for you",
                etcd.display()
            )
        })?;
    Ok(Binaries { etcd, etcdctl })
}

/// The binaries from the real `ETCD_BIN` and `PATH`, looked up once; panics with install
/// instructions when they are missing.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Result<Binaries, String>> = OnceLock::new();
    let found = BINS.get_or_init(|| {
        try_find_binaries_with(
            std::env::var_os("ETCD_BIN").as_deref(),
            std::env::var_os("PATH").as_deref(),
        )
    });
    match found {
        Ok(b) => b,
        Err(msg) => panic!("{msg}"),
    }
}

/// A loopback port nobody listened on a moment ago and that this test binary never handed out
/// before (so two clusters in one process cannot be given the same port).
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let set = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if lock(set).insert(port) {
            return port;
        }
    }
    panic!("no unused loopback port after 1000 tries");
}

fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

/// Locks even after a panic poisoned the mutex: cleanup must still run.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The last `n` lines of a file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read: {e}>"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes the variables that would make etcd/etcdctl read extra flags or route through a
/// proxy: all traffic stays on 127.0.0.1.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str.starts_with("ETCD") || k_str.to_ascii_lowercase().ends_with("_proxy") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
}

/// Runs a command we spawned, bounded by `wall`; on timeout SIGKILLs that child. Returns stdout
/// on success, a description with stderr otherwise.
fn run_bounded(mut cmd: Command, wall: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn {what}: {e}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    // Drain both pipes on threads so a chatty child can never block on a full pipe.
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + wall;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("wait {what}: {e}")),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(stdout),
        Some(s) => Err(format!(
            "{what} failed ({s}): {}\nstdout: {}",
            stderr.trim(),
            stdout.trim()
        )),
        None => Err(format!(
            "{what} did not finish within {wall:?}: {}",
            stderr.trim()
        )),
    }
}

/// Process state letter from `/proc/<pid>/stat` ('T' = stopped), if the process exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// Sends `signal` (`libc::SIGSTOP`, say) to exactly `pid`. Through the system call, not the
/// `kill` command: a minimal machine has no procps.
fn signal(pid: u32, signal: libc::c_int) {
    let target = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let result = unsafe { libc::kill(target, signal) };
    assert_eq!(
        result,
        0,
        "kill({pid}, {signal}) failed: {}",
        std::io::Error::last_os_error()
    );
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

    fn start_with_flags(bins: &'static Binaries, members: usize, flags: &[&str]) -> Self {
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
        };
        for attempt in 1..=START_ATTEMPTS {
            cluster.fresh_members(members);
            match cluster.wait_healthy(&(0..members).collect::<Vec<_>>()) {
                Ok(()) => return cluster,
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
            .arg(url(m.client_port))
            .arg("--advertise-client-urls")
            .arg(url(m.client_port))
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
                    (url(m.client_port), addr, m.log.clone(), exited)
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

    fn run_etcdctl(&self, endpoints: Option<&str>, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.bins.etcdctl);
        clean_env(&mut cmd);
        cmd.env("ETCDCTL_API", "3");
        if let Some(e) = endpoints {
            // Defaults first: a later `--command-timeout=...` in `args` overrides them.
            cmd.arg(format!("--endpoints={e}"))
                .arg("--dial-timeout=2s")
                .arg("--command-timeout=5s");
        }
        cmd.args(args);
        run_bounded(cmd, ETCDCTL_WALL)
    }

    // ---- members -------------------------------------------------------------------------

    /// Number of members.
    pub fn len(&self) -> usize {
        lock(&self.members).len()
    }

    /// `http://127.0.0.1:<client port>` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        url(lock(&self.members)[i].client_port)
    }

    /// Client port of member `i`.
    pub fn client_port(&self, i: usize) -> u16 {
        lock(&self.members)[i].client_port
    }

    /// Every member's endpoint, dead or alive: what a client under test is configured with.
    pub fn endpoints(&self) -> Vec<String> {
        lock(&self.members)
            .iter()
            .map(|m| url(m.client_port))
            .collect()
    }

    /// Endpoints of members that are running and not SIGSTOPped.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.live().into_iter().map(|i| self.endpoint(i)).collect()
    }

    /// Indices of members that are running and not SIGSTOPped.
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
    /// runs) and waits until it is healthy.
    pub fn restart(&self, i: usize) {
        {
            let mut ms = lock(&self.members);
            ms[i].kill();
            let initial = initial_cluster(&ms);
            let token = lock(&self.token).clone();
            self.spawn(&mut ms[i], &initial, &token, "existing");
        }
        self.wait_healthy_or_panic(&[i]);
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
    /// same ports (revision back to 1, new cluster id).
    pub fn wipe_and_restart_empty(&self) {
        {
            let mut ms = lock(&self.members);
            assert_eq!(ms.len(), 1, "wipe_and_restart_empty is for a single member");
            ms[0].kill();
            let _ = fs::remove_dir_all(&ms[0].data_dir);
            let token = unique("edt");
            let initial = initial_cluster(&ms);
            self.spawn(&mut ms[0], &initial, &token, "new");
            *lock(&self.token) = token;
        }
        self.wait_healthy_or_panic(&[0]);
    }

    /// Single member only: kills it, deletes its data and starts it again with unchanged flags
    /// (same name, peer URL and cluster token), as an operator rebuilding a member would: the
    /// cluster id stays the same while the revision starts over at 1.
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
            let token = lock(&self.token).clone();
            let initial = initial_cluster(&ms);
            self.spawn(&mut ms[0], &initial, &token, "new");
        }
        self.wait_healthy_or_panic(&[0]);
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
    /// (revision goes back, cluster id changes).
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

/// `etcd grpc-proxy` in front of a cluster, on its own loopback port. It answers every request
/// but never a watch progress request. Ended by its PID when dropped.
pub struct GrpcProxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl GrpcProxy {
    /// `http://127.0.0.1:<port>`, for a client.
    pub fn endpoint(&self) -> String {
        url(self.port)
    }

    /// The proxy's log, for a failing test.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EtcdCluster {
    /// Starts `etcd grpc-proxy start` in front of every member; waits until it accepts.
    pub fn grpc_proxy(&self) -> GrpcProxy {
        let port = free_port();
        let log = self.root.join(format!("{}.log", unique("grpc-proxy")));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open grpc-proxy log");
        let err = out.try_clone().expect("clone log handle");
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_owned())
            .collect();
        let mut cmd = Command::new(&self.bins.etcd);
        clean_env(&mut cmd);
        cmd.args(["grpc-proxy", "start"])
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg(format!("--listen-addr=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} grpc-proxy: {e}", self.bins.etcd.display()));
        let mut proxy = GrpcProxy { child, port, log };
        let deadline = Instant::now() + START_TIMEOUT;
        while !port_accepts(port) {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("grpc-proxy exited ({status}):\n{}", proxy.log_tail(20));
            }
            assert!(
                Instant::now() < deadline,
                "grpc-proxy not accepting within {START_TIMEOUT:?}:\n{}",
                proxy.log_tail(20)
            );
            std::thread::sleep(POLL);
        }
        proxy
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
        .map(|m| format!("{}={}", m.name, url(m.peer_port)))
        .collect::<Vec<_>>()
        .join(",")
}

fn wait_state(pid: u32, ok: impl Fn(char) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match proc_state(pid) {
            Some(s) if ok(s) => return,
            None => return, // gone: nothing left to wait for
            Some(_) if Instant::now() >= deadline => {
                panic!("process {pid} not {what} within 5s")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
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

/// `header.revision` of an etcdctl `-w json` response.
pub fn header_revision(json: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["header"]["revision"].as_i64()
}

/// Whether something accepts TCP connections on loopback `port` right now.
pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}
