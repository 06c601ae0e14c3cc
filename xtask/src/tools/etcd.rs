//! `etcd` and `etcdctl`, which the real-etcd tests and the demo start and drive.
//!
//! The check starts a throwaway single member on free loopback ports in a temporary directory,
//! writes and reads one key with etcdctl, and ends that member by its PID.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Check, Fix, Scratch, last_lines, output_of};
use crate::util::{Result, tool_from_env, which};

/// An etcd and etcdctl pair that served a put and a get.
pub struct Etcd {
    pub etcd: PathBuf,
    pub etcdctl: PathBuf,
    /// e.g. `etcd Version: 3.4.23`.
    pub version: String,
}

const PACKAGES: &[&str] = &["etcd-server", "etcd-client"];
const ELSEWHERE: &str = "install etcd v3.4 or newer with etcdctl (macOS: `brew install etcd`), \
     then put both on PATH or set ETCD_BIN=/path/to/etcd (etcdctl next to it)";
/// How long the throwaway member may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn find() -> Result<Check<Etcd>> {
    if let Some(etcd) = tool_from_env("ETCD_BIN")? {
        let beside = etcd.parent().map(|dir| dir.join(exe("etcdctl")));
        let etcdctl = beside.filter(|p| p.is_file()).or_else(|| which("etcdctl"));
        let Some(etcdctl) = etcdctl else {
            return Err(format!(
                "ETCD_BIN is `{}` but there is no etcdctl next to it or on PATH",
                etcd.display()
            ));
        };
        return exercise(&etcd, &etcdctl)
            .map(|version| {
                Ok(Etcd {
                    etcd: etcd.clone(),
                    etcdctl,
                    version,
                })
            })
            .map_err(|why| {
                format!(
                    "ETCD_BIN is `{}`, which does not work: {why}",
                    etcd.display()
                )
            });
    }
    let (Some(etcd), Some(etcdctl)) = (which("etcd"), which("etcdctl")) else {
        let missing = match (which("etcd"), which("etcdctl")) {
            (None, None) => "etcd and etcdctl are not on PATH",
            (None, Some(_)) => "etcd is not on PATH",
            _ => "etcdctl is not on PATH",
        };
        return Ok(Err(fix(missing.to_string())));
    };
    Ok(match exercise(&etcd, &etcdctl) {
        Ok(version) => Ok(Etcd {
            etcd,
            etcdctl,
            version,
        }),
        Err(why) => Err(fix(format!("{} does not work: {why}", etcd.display()))),
    })
}

fn fix(problem: String) -> Fix {
    Fix {
        tool: "etcd",
        problem,
        packages: PACKAGES,
        elsewhere: ELSEWHERE,
    }
}

fn exe(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

/// Ends the member it holds, by its PID, when dropped.
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a member, puts a key, reads it back. Returns etcd's version line.
fn exercise(etcd: &Path, etcdctl: &Path) -> std::result::Result<String, String> {
    let version = output_of(Command::new(etcd).arg("--version"))?;
    let version = version
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let scratch = Scratch::new("etcd").map_err(|e| e.to_string())?;
    let (client, peer) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log_path = scratch.0.join("etcd.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(etcd)
        .arg("--name=xtask-check")
        .arg(format!("--data-dir={}", scratch.0.join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=xtask-check={peer_url}"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", etcd.display()))?;
    let mut member = Member(child);
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={client_url}"))
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args);
        output_of(&mut cmd)
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let last = match ctl(&["put", "xtask-check", "ok"]) {
            Ok(_) => break,
            Err(e) => e,
        };
        let exited = member.0.try_wait().map_err(|e| e.to_string())?;
        if exited.is_some() || Instant::now() >= deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let how = match exited {
                Some(status) => format!("it exited ({})", crate::util::exit_description(status)),
                None => format!("it did not answer within {START_TIMEOUT:?}"),
            };
            return Err(format!(
                "{how}; etcdctl said: {last}\netcd's log ends:\n{}",
                last_lines(&log, 8)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = ctl(&["get", "xtask-check", "--print-value-only"])?;
    if got.trim() != "ok" {
        return Err(format!("wrote `ok` but read back `{}`", got.trim()));
    }
    drop(member);
    Ok(version)
}

/// A loopback port nobody listens on right now.
fn free_port() -> std::result::Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An `etcd` that answers `--version` but dies at start: the check says how it ended and
    /// shows its log, instead of waiting out the start timeout.
    #[test]
    fn an_etcd_that_dies_at_start_is_reported_with_its_log() {
        let dir = Scratch::new("etcd-test").expect("scratch dir");
        let fake = dir.0.join("etcd");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'etcd Version: 0.0.0'; exit 0; }\n\
             echo 'cannot access data dir: permission denied' >&2\nexit 3\n",
        )
        .expect("write fake etcd");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let started = Instant::now();
        let why = exercise(&fake, Path::new("false")).expect_err("it exits at once");
        assert!(why.contains("exit code 3"), "{why}");
        assert!(why.contains("permission denied"), "{why}");
        assert!(started.elapsed() < START_TIMEOUT, "waited out the timeout");
    }

    /// `cargo xtask ci` installs etcd before the tests run, so this holds wherever ci passed.
    #[cfg(unix)]
    #[test]
    fn the_etcd_found_serves_a_put_and_a_get() {
        let etcd = find()
            .expect("no configuration error")
            .unwrap_or_else(|fix| {
                panic!("{}: run `cargo xtask ci`, which installs it", fix.problem)
            });
        assert!(etcd.version.contains("etcd Version"), "{}", etcd.version);
    }
}
