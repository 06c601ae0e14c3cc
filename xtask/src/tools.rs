//! `ensure_tools`: find the external programs the build and tests need, and
//! install them with apt-get when that is safe to do (root on Debian/Ubuntu).
//!
//! * `protoc` — the `etcd-client` build script compiles etcd's protobufs.
//! * `etcd` + `etcdctl` — the integration tests start a real etcd.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{Result, run, say, tool_from_env, which};

/// Which tools a command needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Only `protoc`: enough to build the crate (demo, fuzz).
    Protoc,
    /// `protoc`, `etcd` and `etcdctl`: everything `ci` runs.
    All,
}

/// What callers need to know once the tools are in place. `etcd` may be
/// absent when only `protoc` was needed.
pub struct Tools {
    pub etcd: Option<PathBuf>,
}

struct Probe {
    protoc: Option<PathBuf>,
    etcd: Option<PathBuf>,
    etcdctl: Option<PathBuf>,
}

fn probe() -> Result<Probe> {
    let protoc = match tool_from_env("PROTOC")? {
        Some(p) => Some(p),
        None => which("protoc"),
    };
    let (etcd, etcdctl) = match tool_from_env("ETCD_BIN")? {
        Some(etcd) => {
            let beside = etcd.parent().map(|dir| dir.join(exe("etcdctl")));
            let etcdctl = beside.filter(|p| p.is_file()).or_else(|| which("etcdctl"));
            (Some(etcd), etcdctl)
        }
        None => (which("etcd"), which("etcdctl")),
    };
    Ok(Probe {
        protoc,
        etcd,
        etcdctl,
    })
}

fn exe(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

/// (tool, Debian package) pairs for what `need` requires but `found` lacks.
fn missing(found: &Probe, need: Need) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if found.protoc.is_none() {
        out.push(("protoc", "protobuf-compiler"));
    }
    if need == Need::All {
        if found.etcd.is_none() {
            out.push(("etcd", "etcd-server"));
        }
        if found.etcdctl.is_none() {
            out.push(("etcdctl", "etcd-client"));
        }
    }
    out
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists() && which("apt-get").is_some()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Finds the tools `need` asks for, installing missing ones via apt-get when
/// running as root on Debian/Ubuntu; otherwise fails with the command to run.
pub fn ensure_tools(need: Need) -> Result<Tools> {
    let mut found = probe()?;
    let lacking = missing(&found, need);
    if !lacking.is_empty() {
        let tools: Vec<&str> = lacking.iter().map(|(t, _)| *t).collect();
        let packages: Vec<&str> = lacking.iter().map(|(_, p)| *p).collect();
        say!("ensure_tools: missing {}", tools.join(", "));
        if !is_debian() {
            return Err(manual_instructions(&tools));
        }
        if !is_root() {
            return Err(format!(
                "missing {}; install with:\n    sudo apt-get update && sudo apt-get install -y --no-install-recommends {}",
                tools.join(", "),
                packages.join(" ")
            ));
        }
        say!(
            "ensure_tools: running as root on Debian/Ubuntu, installing {} with apt-get",
            packages.join(" ")
        );
        apt_install(&packages)?;
        found = probe()?;
        let still: Vec<&str> = missing(&found, need).iter().map(|(t, _)| *t).collect();
        if !still.is_empty() {
            return Err(format!(
                "apt-get installed {} but {} still cannot be found on PATH",
                packages.join(" "),
                still.join(", ")
            ));
        }
    }
    let Some(protoc) = &found.protoc else {
        return Err("protoc not found".to_string());
    };
    say!("ensure_tools: protoc  {}", protoc.display());
    for (name, path) in [("etcd   ", &found.etcd), ("etcdctl", &found.etcdctl)] {
        match path {
            Some(p) => say!("ensure_tools: {name} {}", p.display()),
            None => say!("ensure_tools: {name} not found (optional here)"),
        }
    }
    Ok(Tools { etcd: found.etcd })
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let mut update = Command::new("apt-get");
    update
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut install)
}

fn manual_instructions(tools: &[&str]) -> String {
    let wants_protoc = tools.contains(&"protoc");
    let wants_etcd = tools.iter().any(|t| t.starts_with("etcd"));
    let line = match (wants_protoc, wants_etcd) {
        (true, true) => {
            "install protoc and etcd v3.4+ (with etcdctl), then put them on PATH \
             or set PROTOC=/path/to/protoc and ETCD_BIN=/path/to/etcd"
        }
        (true, false) => "install protoc, then put it on PATH or set PROTOC=/path/to/protoc",
        _ => {
            "install etcd v3.4+ (with etcdctl), then put them on PATH \
             or set ETCD_BIN=/path/to/etcd (etcdctl next to it)"
        }
    };
    format!("missing {}; {line}", tools.join(", "))
}
