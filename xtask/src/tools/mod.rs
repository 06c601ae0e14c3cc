//! `ensure_tools`: find the external programs a command needs, prove that each one can do its
//! job, and install what is missing or broken when that is safe (root on Debian/Ubuntu).
//!
//! Finding a binary is not enough: a `protoc` without protobuf's well-known types, or an `etcd`
//! that cannot start, fails minutes later in a build script or a test with a message that names
//! neither. So every tool is *exercised* before anything is built:
//!
//! | tool | used by | check |
//! |---|---|---|
//! | `protoc` | etcd-client's build script | compiles a file that imports `google/protobuf/descriptor.proto` |
//! | `etcd`, `etcdctl` | the real-etcd tests, the demo | a throwaway member starts on loopback and answers a put and a get |
//! | C++ compiler | `libfuzzer-sys` (fuzz step) | compiles, links and runs a program that uses the C++ standard library |
//! | clippy, rustfmt | `ci` | `cargo clippy --version`, `cargo fmt --version` |
//!
//! `protoc` comes from the `protoc-bin-vendored` crate unless `PROTOC` names another one, so the
//! build does not depend on the system's protobuf packaging (see [`protoc`]).

mod apt;
mod cxx;
mod etcd;
mod protoc;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::util::{Result, cargo, say};

pub use apt::{install as apt_install, is_root, usable as apt_usable};
pub use etcd::Etcd;
pub use protoc::Protoc;

/// What a command needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Need {
    /// `demo`: protoc; etcd when it can be had (the drill falls back to its in-memory etcd).
    Demo,
    /// `fuzz`: protoc and a C++ compiler.
    Fuzz,
    /// `ci`: everything: protoc, etcd and etcdctl, a C++ compiler, clippy and rustfmt.
    Ci,
}

impl Need {
    fn etcd(self) -> Want {
        match self {
            Need::Demo => Want::IfPossible,
            Need::Fuzz => Want::No,
            Need::Ci => Want::Required,
        }
    }

    fn cxx(self) -> bool {
        matches!(self, Need::Fuzz | Need::Ci)
    }

    fn rust_components(self) -> bool {
        self == Need::Ci
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    No,
    IfPossible,
    Required,
}

/// A tool found and proven to work, or what is wrong with it.
type Check<T> = std::result::Result<T, Fix>;

/// A missing or broken tool, and how to get a working one.
pub(crate) struct Fix {
    pub tool: &'static str,
    pub problem: String,
    /// Debian/Ubuntu packages that provide a working one.
    pub packages: &'static [&'static str],
    /// What to do where apt-get cannot be used.
    pub elsewhere: &'static str,
}

/// The tools a command runs with, each one checked.
pub struct Tools {
    pub protoc: Protoc,
    /// `None` only for `demo` where no working etcd could be had.
    pub etcd: Option<Etcd>,
}

impl Tools {
    /// Points a cargo command at the checked tools: `PROTOC` and `PROTOC_INCLUDE` for
    /// etcd-client's build script, and `ETCD_BIN` for the tests (unless the user set it, in
    /// which case it is what was checked).
    pub fn apply(&self, mut cmd: Command) -> Command {
        cmd.env("PROTOC", &self.protoc.bin);
        if let Some(include) = &self.protoc.include {
            cmd.env("PROTOC_INCLUDE", include);
        }
        if let Some(etcd) = &self.etcd {
            cmd.env("ETCD_BIN", &etcd.etcd);
        }
        cmd
    }
}

/// Finds and checks what `need` asks for. Missing or broken tools are installed with apt-get
/// when running as root on Debian/Ubuntu, then checked again; otherwise the error says exactly
/// what to install.
pub fn ensure_tools(need: Need) -> Result<Tools> {
    if need.rust_components() {
        check_rust_components()?;
    }
    let mut installed: Vec<&'static str> = Vec::new();
    loop {
        let protoc = protoc::find()?;
        let etcd = match need.etcd() {
            Want::No => None,
            Want::IfPossible | Want::Required => Some(etcd::find()?),
        };
        let cxx = if need.cxx() { Some(cxx::find()?) } else { None };

        let mut fixes = Vec::new();
        let protoc = take(protoc, &mut fixes);
        let etcd = etcd.and_then(|c| take(c, &mut fixes));
        if let Some(c) = cxx {
            take(c, &mut fixes);
        }
        if fixes.is_empty() {
            let protoc = protoc.ok_or("internal: protoc checked but not returned")?;
            report(&protoc, etcd.as_ref(), need);
            return Ok(Tools { protoc, etcd });
        }
        for f in &fixes {
            say!("ensure_tools: {}: {}", f.tool, f.problem);
        }
        let packages = packages_of(&fixes);
        // The demo runs without etcd: don't stop it for an optional tool that cannot be had,
        // or that still does not work after installing.
        let only_optional =
            need.etcd() == Want::IfPossible && fixes.iter().all(|f| f.tool.starts_with("etcd"));
        if only_optional && (!installed.is_empty() || !apt::usable()) {
            say!("ensure_tools: going on without etcd ({})", fixes[0].problem);
            let protoc = protoc.ok_or("internal: protoc checked but not returned")?;
            report(&protoc, None, need);
            return Ok(Tools { protoc, etcd: None });
        }
        if !installed.is_empty() {
            return Err(format!(
                "installed {} with apt-get, but it still does not work:\n{}",
                installed.join(" "),
                describe_fixes(&fixes)
            ));
        }
        if !apt::usable() {
            return Err(apt::manual_instructions(&packages, &elsewhere_of(&fixes)));
        }
        say!(
            "ensure_tools: root on Debian/Ubuntu: installing {} with apt-get",
            packages.join(" ")
        );
        apt::install(&packages)?;
        installed = packages;
    }
}

fn take<T>(check: Check<T>, fixes: &mut Vec<Fix>) -> Option<T> {
    check.map_err(|fix| fixes.push(fix)).ok()
}

fn packages_of(fixes: &[Fix]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for p in fixes.iter().flat_map(|f| f.packages.iter().copied()) {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

fn elsewhere_of(fixes: &[Fix]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for f in fixes {
        if !out.contains(&f.elsewhere) {
            out.push(f.elsewhere);
        }
    }
    out
}

fn describe_fixes(fixes: &[Fix]) -> String {
    fixes
        .iter()
        .map(|f| format!("    {}: {}", f.tool, f.problem))
        .collect::<Vec<_>>()
        .join("\n")
}

fn report(protoc: &Protoc, etcd: Option<&Etcd>, need: Need) {
    say!(
        "ensure_tools: protoc  {} ({}, {})",
        protoc.bin.display(),
        protoc.version,
        protoc.origin
    );
    match etcd {
        Some(e) => {
            say!("ensure_tools: etcd    {} ({})", e.etcd.display(), e.version);
            say!("ensure_tools: etcdctl {}", e.etcdctl.display());
        }
        None if need.etcd() != Want::No => say!("ensure_tools: etcd    none"),
        None => {}
    }
}

/// clippy and rustfmt come with the Rust toolchain (rustup's default profile), not with apt:
/// they cannot be installed here, only named.
fn check_rust_components() -> Result<()> {
    let mut missing = Vec::new();
    for (sub, component) in [("clippy", "clippy"), ("fmt", "rustfmt")] {
        let works = cargo([sub, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !works {
            missing.push(component);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the Rust toolchain lacks {}; install with:\n    rustup component add {}",
        missing.join(" and "),
        missing.join(" ")
    ))
}

/// A scratch directory for one check, removed when dropped.
pub(crate) struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Result<Scratch> {
        // Unique per call: checks and their tests run side by side in one process.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "etcd-registry-xtask-{}-{n}-{what}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` to completion with its output captured; `Err` carries what it printed.
pub(crate) fn output_of(cmd: &mut Command) -> std::result::Result<String, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if text.is_empty() {
                text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            Err(format!(
                "`{program}` failed ({}): {}",
                crate::util::exit_description(out.status),
                last_lines(&text, 6)
            ))
        }
        Err(e) => Err(format!("cannot run `{program}`: {e}")),
    }
}

/// The last `n` lines of `text`, for error messages that stay readable.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
