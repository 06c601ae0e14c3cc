//! What the `provider` and `caller` examples share: a small command-line parser, the values both
//! take (`--endpoints`, `--layout`), usage errors, logging, SIGINT/SIGTERM and stdout lines.
//!
//! This is a module, not an example: cargo builds `examples/*.rs` and `examples/*/main.rs` as
//! examples, and each of the two declares `mod common;`.
//!
//! The parser knows only the syntax; each example reads its values from the [`Flags`] it
//! returns, converts them, and reports what is missing:
//!
//! - `--flag value` and `--flag=value` for the value flags; a value taken from the next argument
//!   may not start with `--`, so a forgotten value is an error rather than a swallowed flag
//!   (`--flag=--x` is still possible);
//! - switches (`--json`, `--replace`) take no value and may be given once;
//! - `-h` / `--help` anywhere before a usage error asks for the help text;
//! - anything else (an unknown `--option`, a bare word, `-x`) is an error.

use std::fmt::Display;
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use etcd_registry::KeyLayout;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// What the command line asks for: a run with `T`, or the help text.
pub enum Parsed<T> {
    Run(T),
    Help,
}

/// The flags found on a command line, in the order they were given.
pub struct Flags {
    /// Every value flag given, with its value; a flag given twice appears twice.
    values: Vec<(&'static str, String)>,
    /// The switches given, each at most once.
    switches: Vec<&'static str>,
    /// The value flags and switches the parser was told about, to catch a misspelt lookup.
    known: [&'static [&'static str]; 2],
}

/// Splits `args` (without the program name) into value flags and switches.
///
/// `value_flags` take a value (`--flag value` or `--flag=value`); `switches` take none. The
/// error is a one-line message for the user; usage errors are reported by [`usage_error`].
pub fn parse(
    args: impl IntoIterator<Item = String>,
    value_flags: &'static [&'static str],
    switches: &'static [&'static str],
) -> Result<Parsed<Flags>, String> {
    let mut args = args.into_iter();
    let mut flags = Flags {
        values: Vec::new(),
        switches: Vec::new(),
        known: [value_flags, switches],
    };
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        if let Some(&switch) = switches.iter().find(|s| **s == arg) {
            if flags.switches.contains(&switch) {
                return Err(format!("{switch} given more than once"));
            }
            flags.switches.push(switch);
            continue;
        }
        if !arg.starts_with("--") {
            return Err(format!("unexpected argument {arg:?}"));
        }
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (arg.as_str(), None),
        };
        if switches.contains(&name) {
            return Err(format!("{name} takes no value"));
        }
        let Some(&flag) = value_flags.iter().find(|f| **f == name) else {
            return Err(format!("unknown option {name}"));
        };
        let value = match inline_value {
            Some(value) => value.to_owned(),
            None => match args.next() {
                Some(value) if !value.starts_with("--") => value,
                _ => return Err(format!("{flag} needs a value")),
            },
        };
        flags.values.push((flag, value));
    }
    Ok(Parsed::Run(flags))
}

impl Flags {
    /// Whether the switch `flag` was given.
    pub fn switch(&self, flag: &str) -> bool {
        self.check_known(flag);
        self.switches.contains(&flag)
    }

    /// The value of `flag`, which may be given at most once; `None` if it was not given.
    pub fn once(&self, flag: &str) -> Result<Option<&str>, String> {
        let mut values = self.all(flag);
        let value = values.next();
        if values.next().is_some() {
            return Err(format!("{flag} given more than once"));
        }
        Ok(value)
    }

    /// [`once`](Self::once), then `convert` on the value if there is one. The conversion's error
    /// should name the flag and the value, like `--ttl "0": expected whole seconds, at least 1`.
    pub fn once_as<T>(
        &self,
        flag: &str,
        convert: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        self.once(flag)?.map(convert).transpose()
    }

    /// Every value of the repeatable `flag`, in the order given.
    pub fn all(&self, flag: &str) -> impl Iterator<Item = &str> {
        self.check_known(flag);
        self.values
            .iter()
            .filter(move |(f, _)| *f == flag)
            .map(|(_, value)| value.as_str())
    }

    /// A lookup of a flag the parser was not told about is a bug in the example, not the user's
    /// mistake: it would always read as "not given".
    fn check_known(&self, flag: &str) {
        debug_assert!(
            self.known.iter().any(|list| list.contains(&flag)),
            "{flag} is not in the example's flag lists"
        );
    }
}

/// `--endpoints E[,E2...]`: comma-separated, each trimmed, none empty.
pub fn parse_endpoints(value: &str) -> Result<Vec<String>, String> {
    let endpoints: Vec<String> = value.split(',').map(|e| e.trim().to_owned()).collect();
    if endpoints.iter().any(String::is_empty) {
        return Err(format!("--endpoints {value:?}: an endpoint is empty"));
    }
    Ok(endpoints)
}

/// `--layout native|go-zero|etcd-naming`.
pub fn parse_layout(value: &str) -> Result<KeyLayout, String> {
    value
        .parse::<KeyLayout>()
        .map_err(|e| format!("--layout: {e}"))
}

/// Reports a usage error on stderr, with a pointer to `--help`, and gives exit code 2.
pub fn usage_error(program: &str, error: impl Display) -> ExitCode {
    eprintln!("{program}: {error}\nRun `{program} --help` for usage.");
    ExitCode::from(2)
}

/// The library's logs on stderr, filtered by `RUST_LOG` (nothing by default), coloured only on a
/// terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A future that completes on the first SIGINT or SIGTERM, with the signal's name.
///
/// SIGTERM is listened for at once, so a SIGTERM that arrives before the future is first awaited
/// is not lost; failing to listen for it is the error. If SIGINT cannot be listened for, the
/// future waits for SIGTERM alone rather than complete at once.
pub fn stop_signal() -> std::io::Result<impl Future<Output = &'static str>> {
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        let interrupt = async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = interrupt => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        }
    })
}

/// Writes `line` and a newline to stdout and flushes it at once, since stdout may be a pipe that a
/// script reads line by line.
pub fn print_line(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}
