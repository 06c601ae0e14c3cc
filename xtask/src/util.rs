//! Small helpers shared by the commands: locating binaries, building and
//! running child processes, and reporting how they ended.

use std::env;
use std::ffi::{OsStr, OsString};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// `println!` that ignores write errors: `cargo xtask ci | head` must not
/// panic when the reader goes away (println! panics on a closed pipe).
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use say;

/// Every fallible operation in xtask reports a human-readable message.
pub type Result<T, E = String> = std::result::Result<T, E>;

/// The repository root: the parent of the xtask crate.
///
/// `cargo run` sets `CARGO_MANIFEST_DIR` for the process it starts; the
/// compile-time value is the fallback when the binary is run directly.
pub fn project_root() -> PathBuf {
    let xtask_dir = env::var_os("CARGO_MANIFEST_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    match xtask_dir.parent() {
        Some(parent) => parent.to_path_buf(),
        None => xtask_dir,
    }
}

/// The cargo binary to use: `$CARGO` (set by cargo for `cargo run`) or `cargo`.
pub fn cargo_bin() -> OsString {
    env::var_os("CARGO")
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| OsString::from("cargo"))
}

/// A `cargo <args>` command. Colour is forced only when our own stdout is a
/// terminal (and the user has not chosen a setting), so logs stay clean.
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(cargo_bin());
    cmd.args(args);
    if std::io::stdout().is_terminal() && env::var_os("CARGO_TERM_COLOR").is_none() {
        cmd.env("CARGO_TERM_COLOR", "always");
    }
    cmd
}

/// Looks `name` up on `PATH`, returning the first executable file found.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .flat_map(|dir| candidates(&dir, name))
        .find(|p| is_executable(p))
}

#[cfg(windows)]
fn candidates(dir: &Path, name: &str) -> Vec<PathBuf> {
    vec![dir.join(format!("{name}.exe")), dir.join(name)]
}

#[cfg(not(windows))]
fn candidates(dir: &Path, name: &str) -> Vec<PathBuf> {
    vec![dir.join(name)]
}

/// True if `path` is a regular file we may execute.
pub fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// Resolves a tool given through an environment variable such as `PROTOC`.
///
/// A bare name (no path separator) is looked up on `PATH`, as a process
/// spawn would do; anything else must be an existing file. `Ok(None)` means
/// the variable is unset; an error means it is set but points nowhere, which
/// would break the build in a confusing way later, so we say so now.
pub fn tool_from_env(var: &str) -> Result<Option<PathBuf>> {
    let Some(value) = env::var_os(var).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(&value);
    let bare = path.components().count() == 1 && !path.is_absolute();
    if let Some(found) = path.to_str().filter(|_| bare).and_then(which) {
        return Ok(Some(found));
    }
    if path.is_file() {
        Ok(Some(path))
    } else {
        Err(format!(
            "{var} is set to `{}`, which is not a file; point it at the binary or unset it",
            path.display()
        ))
    }
}

/// A shell-like rendering of a command, for logs and error messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter(|(k, _)| *k != "CARGO_TERM_COLOR")
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())))
        .collect();
    let program = Path::new(cmd.get_program());
    // `$CARGO` is usually a long toolchain path; show the familiar name.
    let shown = if cmd.get_program() == cargo_bin() {
        "cargo".into()
    } else {
        program.to_string_lossy()
    };
    parts.push(shown.into_owned());
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// How a finished process ended, in words.
pub fn exit_description(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    "unknown exit status".to_string()
}

/// Runs `cmd` with inherited stdio, echoing it first; non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = spawn_and_wait(cmd)?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed with {}",
            describe(cmd),
            exit_description(status)
        ))
    }
}

/// Runs `cmd` with inherited stdio, echoing it first, and returns its status.
pub fn spawn_and_wait(cmd: &mut Command) -> Result<ExitStatus> {
    say!("$ {}", describe(cmd));
    cmd.status()
        .map_err(|e| format!("could not start `{}`: {e}", describe(cmd)))
}
