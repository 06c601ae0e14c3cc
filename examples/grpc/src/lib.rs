//! A tonic Greeter registered in etcd by its servers and called through
//! [`etcd_registry::tonic::channel`] by its clients.
//!
//! - `greeter_server` serves the Greeter on a loopback port, registers itself in etcd once it
//!   listens, prints `listening ADDR id ID`, and on SIGTERM or SIGINT drains, deregisters and
//!   exits 0.
//! - `greeter_client` follows the servers in etcd and says hello through a balanced channel.
//!
//! Both are configured through environment variables (see [`ETCD_ENV`] and the binaries' own
//! docs), read by the helpers here. `tests/drill.rs` runs three servers against a real etcd
//! that goes away, loses a server while away and comes back, and compares this crate's balanced
//! channel with tonic's own `Channel::balance_channel`.
#![deny(missing_docs)]

use std::fmt::Display;
use std::future::Future;
use std::io::Write as _;
use std::str::FromStr;

use tokio::signal::unix::{SignalKind, signal};

/// The generated Greeter messages, client (`greeter_client::GreeterClient`) and server
/// (`greeter_server::{Greeter, GreeterServer}`).
#[allow(missing_docs)]
pub mod pb {
    tonic::include_proto!("helloworld");
}

/// The key namespace the servers register under and the clients watch.
pub const NAMESPACE: &str = "/services";

/// The service name of the greeters in etcd.
pub const SERVICE: &str = "greeter";

/// The environment variable with the etcd endpoints, comma-separated (default
/// [`DEFAULT_ETCD`]).
pub const ETCD_ENV: &str = "GREETER_ETCD";

/// The etcd endpoint used when [`ETCD_ENV`] is not set.
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";

/// Any error, for the binaries' `main`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The etcd endpoints from [`ETCD_ENV`], or [`DEFAULT_ETCD`].
pub fn etcd_endpoints() -> Vec<String> {
    let value = std::env::var(ETCD_ENV).unwrap_or_default();
    let endpoints: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if endpoints.is_empty() {
        vec![DEFAULT_ETCD.to_owned()]
    } else {
        endpoints
    }
}

/// The environment variable `name` parsed as a `T`, or `default` when it is unset or empty.
///
/// # Errors
/// When it is set but does not parse (or is not UTF-8): the message names the variable.
pub fn env_or<T>(name: &str, default: T) -> Result<T, String>
where
    T: FromStr,
    T::Err: Display,
{
    match std::env::var(name) {
        Ok(value) if value.is_empty() => Ok(default),
        Ok(value) => value
            .parse()
            .map_err(|error| format!("{name}={value:?}: {error}")),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(error) => Err(format!("{name}: {error}")),
    }
}

/// Writes `line` and a newline to stdout and flushes it at once: stdout may be a pipe that a
/// script (or the drill) reads line by line.
///
/// # Errors
/// When stdout cannot be written (closed, say).
pub fn print_line(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

/// A future that resolves with the name of the first of SIGINT and SIGTERM to arrive. The
/// handlers are installed by this call, so a signal that arrives before the future is awaited
/// is not lost.
///
/// # Errors
/// When the SIGTERM handler cannot be installed.
pub fn stop_signal() -> std::io::Result<impl Future<Output = &'static str>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        }
    })
}
