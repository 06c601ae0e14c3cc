//! The processes the harness runs and how: finding etcd and etcdctl, loopback ports, a child
//! run with a wall-clock bound and a clean environment, signals to our own children, and the
//! small helpers (unique names, log tails, poison-proof locks) around them.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a missing etcd binary panics with.
pub const NOT_FOUND: &str = "etcd not found: install it (Debian/Ubuntu: `apt-get install etcd-server etcd-client`) or set ETCD_BIN=/path/to/etcd; `cargo xtask ci` installs it for you";

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

/// `prefix-<pid>-<counter>-<nanos>`: a name no other call in any process gets, for temp
/// directories and files.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

/// Locks even after a panic poisoned the mutex: cleanup must still run.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last `n` lines of a file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read: {e}>"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes the variables that would make etcd/etcdctl read extra flags or route through a
/// proxy: all traffic stays on 127.0.0.1.
pub fn clean_env(cmd: &mut Command) {
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
pub fn run_bounded(mut cmd: Command, wall: Duration) -> Result<String, String> {
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
pub fn signal(pid: u32, signal: libc::c_int) {
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

/// Waits up to 5 s until the state letter of `pid` (see `/proc/<pid>/stat`) satisfies `ok`, or
/// the process is gone; panics otherwise.
pub fn wait_state(pid: u32, ok: impl Fn(char) -> bool, what: &str) {
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

/// Whether something accepts TCP connections on loopback `port` right now.
pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}
