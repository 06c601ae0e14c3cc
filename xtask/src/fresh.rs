//! `cargo xtask fresh-check`: the README's two commands on a machine that has never seen this
//! project, made on the spot.
//!
//! 1. A minimal Debian root (`debootstrap --variant=minbase`, plus `gcc libc6-dev ca-certificates
//!    git`, which rustup's toolchain needs to link and cargo to fetch) is built once and cached.
//! 2. Each run lays a fresh overlay on top of it, so the cached root itself is never changed and
//!    every run starts from the same nothing.
//! 3. Inside a private mount namespace (`unshare --mount`: every mount disappears with the run,
//!    even if it is killed) the overlay gets `/proc`, `/sys`, `/dev`, the host's DNS settings and
//!    locally added CA certificates (the machine's network, not the project's tools), the host's
//!    Rust toolchain read-only and the rustup proxies, but an empty `CARGO_HOME`; the repository
//!    is cloned into it at the chosen revision.
//! 4. `cargo xtask demo` and `cargo xtask ci` run there as root, as a new contributor would run
//!    them; the wall time of each and the Debian packages each one installed are reported.
//!
//! Linux only, as root (mounts and chroot), and the machine needs a Debian mirror to reach.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::USAGE;
use crate::tools::is_root;
use crate::util::{Result, run, say, which};

/// The steps that run inside the mount namespace: mounts, chroot, the two commands.
const SCRIPT: &str = include_str!("fresh_check.sh");

/// Packages added to `minbase`: a C toolchain for rustc to link with, certificates for
/// cargo's downloads, git to clone the repository. This is what rustup itself needs.
const BASE_PACKAGES: &str = "gcc,libc6-dev,ca-certificates,git";

struct Options {
    suite: String,
    mirror: Option<String>,
    rev: String,
    only: Option<String>,
    rebuild_base: bool,
    keep: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        suite: "bookworm".to_string(),
        mirror: None,
        rev: "HEAD".to_string(),
        only: None,
        rebuild_base: false,
        keep: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match arg.as_str() {
            "--suite" => o.suite = value("--suite")?,
            "--mirror" => o.mirror = Some(value("--mirror")?),
            "--rev" => o.rev = value("--rev")?,
            "--only" => {
                let only = value("--only")?;
                if only != "demo" && only != "ci" {
                    return Err(format!("--only takes `demo` or `ci`, not `{only}`"));
                }
                o.only = Some(only);
            }
            "--rebuild-base" => o.rebuild_base = true,
            "--keep" => o.keep = true,
            other => {
                return Err(format!(
                    "fresh-check: unknown argument `{other}`\n\n{USAGE}"
                ));
            }
        }
    }
    Ok(o)
}

pub fn fresh_check(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    if !cfg!(target_os = "linux") {
        return Err("fresh-check needs Linux (debootstrap, overlayfs, mount namespaces)".into());
    }
    if !is_root() {
        return Err(
            "fresh-check needs root (debootstrap, mounts, chroot): run it with sudo".into(),
        );
    }
    for tool in ["unshare", "mount", "chroot"] {
        if which(tool).is_none() {
            return Err(format!(
                "fresh-check needs `{tool}` (util-linux, coreutils)"
            ));
        }
    }
    if which("debootstrap").is_none() {
        if !crate::tools::apt_usable() {
            return Err("fresh-check needs debootstrap: install it (Debian/Ubuntu: `apt-get install debootstrap`)".into());
        }
        crate::tools::apt_install(&["debootstrap"])?;
    }
    let source = crate::util::project_root();
    let commit = git_rev(&source, &o.rev)?;
    warn_if_dirty(&source);

    let base = cache_dir()?.join(format!("fresh-root-{}", o.suite));
    if o.rebuild_base || !base.join(COMPLETE).is_file() {
        let mirror = match &o.mirror {
            Some(m) => m.clone(),
            None => host_mirror(&o.suite)?,
        };
        build_base(&base, &o.suite, &mirror)?;
    } else {
        say!(
            "fresh-check: using the cached base root {} (--rebuild-base to make it anew)",
            base.display()
        );
    }

    let (rustup_home, cargo_bin) = rust_toolchain()?;
    let run_dir = env::temp_dir().join(format!("etcd-registry-fresh-{}", std::process::id()));
    fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let commands = match o.only.as_deref() {
        Some(one) => one.to_string(),
        None => "demo ci".to_string(),
    };
    say!(
        "fresh-check: commit {commit}, commands: {commands}, run dir {}",
        run_dir.display()
    );
    let script = run_dir.join("fresh_check.sh");
    fs::write(&script, SCRIPT).map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "bash"])
        .arg(&script)
        .env("FRESH_BASE", &base)
        .env("FRESH_RUN", &run_dir)
        .env("FRESH_SOURCE", &source)
        .env("FRESH_COMMIT", &commit)
        .env("FRESH_RUSTUP_HOME", &rustup_home)
        .env("FRESH_CARGO_BIN", &cargo_bin)
        .env("FRESH_COMMANDS", &commands);
    let result = run(&mut cmd);
    if o.keep {
        say!(
            "fresh-check: kept {} (upper/ holds everything the run wrote)",
            run_dir.display()
        );
    } else if let Err(e) = fs::remove_dir_all(&run_dir) {
        say!("fresh-check: could not remove {}: {e}", run_dir.display());
    }
    result
}

/// Marks a base root whose debootstrap finished.
const COMPLETE: &str = ".etcd-registry-base-complete";

fn build_base(base: &Path, suite: &str, mirror: &str) -> Result<()> {
    let partial = base.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    let _ = fs::remove_dir_all(base);
    if let Some(parent) = base.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    say!("fresh-check: building a {suite} minbase root from {mirror} (once; a few minutes)");
    // In a mount namespace of its own, so the /proc and /sys debootstrap mounts while it
    // configures packages can never outlive it.
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "debootstrap",
        "--variant=minbase",
    ])
    .arg(format!("--include={BASE_PACKAGES}"))
    .arg(suite)
    .arg(&partial)
    .arg(mirror);
    run(&mut cmd)?;
    fs::write(partial.join(COMPLETE), suite)
        .map_err(|e| format!("cannot mark {} complete: {e}", partial.display()))?;
    fs::rename(&partial, base).map_err(|e| {
        format!(
            "cannot move {} to {}: {e}",
            partial.display(),
            base.display()
        )
    })
}

/// The Debian mirror this machine's apt uses for `suite`, from `/etc/apt/sources.list` and
/// `/etc/apt/sources.list.d/*.{list,sources}`, so the fresh root installs from the same place.
fn host_mirror(suite: &str) -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let found = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => mirror_in_deb822(&text, suite),
            _ => mirror_in_one_line(&text, suite),
        };
        if let Some(m) = found {
            return Ok(m);
        }
    }
    Err(format!(
        "no Debian mirror for `{suite}` in this machine's apt sources; pass --mirror URL"
    ))
}

/// `deb [options] URI SUITE COMPONENTS...` lines.
fn mirror_in_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("deb")?;
        if !rest.starts_with([' ', '\t']) {
            return None; // deb-src, or not a source line
        }
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == suite).then(|| uri.to_string())
    })
}

/// deb822 stanzas: `Types: deb`, `URIs: …`, `Suites: …` separated by blank lines.
fn mirror_in_deb822(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
            })
        };
        let is_deb = field("Types")?.split_whitespace().any(|t| t == "deb");
        let has_suite = field("Suites")?.split_whitespace().any(|s| s == suite);
        let uri = field("URIs")?.split_whitespace().next()?.to_string();
        (is_deb && has_suite).then_some(uri)
    })
}

fn cache_dir() -> Result<PathBuf> {
    let base = env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(base.join("etcd-registry"))
}

/// `RUSTUP_HOME` (mounted read-only into the root) and the directory of the rustup proxies
/// (`cargo`, `rustc`, … are copied from it).
fn rust_toolchain() -> Result<(PathBuf, PathBuf)> {
    let home = env::var_os("HOME").map(PathBuf::from);
    let rustup_home = env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".rustup")))
        .filter(|p| p.join("toolchains").is_dir())
        .ok_or("no rustup installation found (RUSTUP_HOME or ~/.rustup): fresh-check mounts the toolchain rustup installed")?;
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(|c| PathBuf::from(c).join("bin"))
        .or_else(|| home.map(|h| h.join(".cargo").join("bin")))
        .filter(|p| p.join("rustup").is_file())
        .ok_or("no rustup proxies found (CARGO_HOME/bin or ~/.cargo/bin)")?;
    Ok((rustup_home, cargo_bin))
}

fn git_rev(repo: &Path, rev: &str) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!("`{rev}` is not a commit of {}", repo.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn warn_if_dirty(repo: &Path) {
    let dirty = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty {
        say!(
            "fresh-check: note: uncommitted changes are not part of the check (it clones a commit)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mirror_in_deb822_sources() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_in_deb822(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_in_deb822(text, "bookworm-security").as_deref(),
            Some("http://mirror.example/debian-security")
        );
        assert_eq!(mirror_in_deb822(text, "trixie"), None);
        assert_eq!(
            mirror_in_deb822("Types: deb-src\nURIs: x\nSuites: bookworm\n", "bookworm"),
            None
        );
    }

    #[test]
    fn finds_the_mirror_in_one_line_sources() {
        let text = "# deb http://old.example/debian bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            mirror_in_one_line(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn arguments_are_checked() {
        assert!(parse(&["--only".into(), "bench".into()]).is_err());
        assert!(parse(&["--suite".into()]).is_err());
        assert!(parse(&["--frobnicate".into()]).is_err());
        let o = parse(&["--only".into(), "ci".into(), "--keep".into()]).expect("valid");
        assert_eq!(
            (o.only.as_deref(), o.keep, o.suite.as_str()),
            (Some("ci"), true, "bookworm")
        );
    }
}
