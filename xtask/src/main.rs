//! Developer tasks for etcd-registry, run as `cargo xtask <command>`.
//!
//! Std-only on purpose: xtask is built before anything else, so it must
//! compile in seconds and never be the reason a check is slow or broken.

mod ci;
mod fresh;
mod tools;
mod util;

use std::process::ExitCode;

use tools::{Need, ensure_tools};
use util::{Result, cargo, exit_description, say, spawn_and_wait};

const USAGE: &str = "\
Usage: cargo xtask <command>

Commands:
  ci               Check everything, stopping at the first failure:
                   tools (protoc, etcd, etcdctl, c++), fmt, clippy, docs, tests,
                   benches (--test mode), fuzz targets (FUZZ_SECONDS each, default 20)
  fuzz [SECONDS]   Run every fuzz target for SECONDS each (default 60)
  demo [ARGS...]   Run the outage_drill example (release build); passes
                   --etcd <path> when an etcd binary is available; installs etcd
                   where it can (root on Debian/Ubuntu)
  fresh-check [--suite NAME] [--mirror URL] [--rev REV] [--only demo|ci]
              [--rebuild-base] [--keep]
                   Run `demo` and `ci` as root in a throwaway Debian root
                   (debootstrap minbase, default suite bookworm, cached base,
                   fresh overlay per run) with only the Rust toolchain mounted
                   in; reports each one's wall time and what it installed.
                   Linux, root, about 20 minutes.
  help             Show this message

Environment:
  PROTOC          protoc to use instead of the vendored one (PROTOC_INCLUDE: its includes)
  ETCD_BIN        etcd binary to use (etcdctl is looked for next to it)
  CXX             C++ compiler for the fuzz step's libFuzzer (default c++)
  FUZZ_SECONDS    per-target fuzzing time in `ci`
  CARGO           cargo binary to use (set automatically by `cargo xtask`)
";

const DEFAULT_FUZZ_SECONDS: u64 = 60;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: &[String]) -> Result<ExitCode> {
    let root = util::project_root();
    std::env::set_current_dir(&root)
        .map_err(|e| format!("cannot enter the repository root {}: {e}", root.display()))?;

    let Some((command, rest)) = args.split_first() else {
        say!("{}", USAGE.trim_end());
        return Ok(ExitCode::SUCCESS);
    };
    match command.as_str() {
        "ci" => {
            no_extra_args("ci", rest)?;
            ci::ci()?;
            Ok(ExitCode::SUCCESS)
        }
        "fuzz" => {
            let seconds = match rest {
                [] => DEFAULT_FUZZ_SECONDS,
                [s] => ci::parse_seconds(s)?,
                _ => return Err(format!("fuzz takes at most one argument\n\n{USAGE}")),
            };
            ci::fuzz(seconds)?;
            Ok(ExitCode::SUCCESS)
        }
        "demo" => demo(rest),
        "fresh-check" => {
            fresh::fresh_check(rest)?;
            Ok(ExitCode::SUCCESS)
        }
        "help" | "-h" | "--help" => {
            say!("{}", USAGE.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    }
}

fn no_extra_args(command: &str, rest: &[String]) -> Result<()> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "`{command}` takes no arguments (got `{}`)\n\n{USAGE}",
            rest.join(" ")
        ))
    }
}

/// Builds and runs the outage drill example, exiting with its exit code.
fn demo(args: &[String]) -> Result<ExitCode> {
    let tools = ensure_tools(Need::Demo)?;
    let mut cmd = tools.apply(cargo([
        "run",
        "--release",
        "--example",
        "outage_drill",
        "--",
    ]));
    let user_chose_etcd = args
        .iter()
        .any(|a| a == "--etcd" || a.starts_with("--etcd="));
    match (&tools.etcd, user_chose_etcd) {
        (Some(etcd), false) => {
            cmd.arg("--etcd").arg(&etcd.etcd);
        }
        (None, false) => {
            say!("demo: no etcd binary found, the drill uses its in-memory backend")
        }
        (_, true) => {}
    }
    cmd.args(args);
    let status = spawn_and_wait(&mut cmd)?;
    if status.success() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("demo: outage_drill ended with {}", exit_description(status));
    // Propagate the example's own exit code; a signal death maps to 128+n
    // like a shell would report it.
    let code = status.code().or_else(|| signal_code(status)).unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

#[cfg(unix)]
fn signal_code(status: std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal().map(|s| 128 + s)
}

#[cfg(not(unix))]
fn signal_code(_: std::process::ExitStatus) -> Option<i32> {
    None
}
