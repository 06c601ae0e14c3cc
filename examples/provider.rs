//! A provider: registers one instance of a service in etcd and keeps it registered until it is
//! told to stop.
//!
//! ```sh
//! cargo run --example provider -- --endpoints http://127.0.0.1:2379 --namespace /services \
//!     --service user --id u1 --addr 10.0.0.7:8080 --ttl 10 --tag v2 --meta zone=eu-1
//! ```
//!
//! Once the instance is registered it prints one line to stdout (flushed, so a script can wait
//! for it), for example `registered user/u1 at 10.0.0.7:8080 lease 7587869531458359558 key
//! /services/user/u1`. Every later change of the registration's status (keep-alives failing,
//! lease lost, registered again) is one line on stderr. On SIGINT or SIGTERM it revokes the
//! lease, so the instance disappears from every caller at once, and exits 0.
//!
//! Exit codes: 0 after a clean deregistration; 1 when connecting or registering failed (etcd
//! unreachable, credentials or TLS refused, or the key is held by another live instance and
//! `--replace` was not given) or the lease could not be revoked; 2 for a bad or missing argument.
//! Set `RUST_LOG=etcd_registry=debug` for the library's logs on stderr.
//!
//! go-zero's layout keeps keys at the root of the key space, named by lease; register as a go-zero
//! service with an empty namespace:
//!
//! ```sh
//! cargo run --example provider -- --endpoints http://127.0.0.1:2379 --namespace "" \
//!     --service user.rpc --addr 10.0.0.9:8080 --layout go-zero
//! ```
//!
//! To an etcd with TLS (mutual TLS with `--cert` and `--key`) and authentication, build with
//! the `tls` feature; the password is read from the environment variable `ETCD_PASSWORD`, never
//! from the command line:
//!
//! ```sh
//! ETCD_PASSWORD=... cargo run --features tls --example provider -- \
//!     --endpoints https://127.0.0.1:2379 --cacert ca.pem --cert client.pem --key client-key.pem \
//!     --user user-service --namespace /services --service user --id u1 --addr 10.0.0.7:8080
//! ```
//!
//! The PEM files are read at start: one that cannot be read is a usage error (exit code 2). A
//! refused password or a failed TLS handshake is exit code 1, at connect or when registering.

mod common;

use std::ffi::OsString;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::Parsed;
use etcd_registry::{Codec, EtcdBackend, Instance, KeyLayout, Registration};

const USAGE: &str = concat!(
    "\
Registers one instance of a service in etcd and keeps it registered until SIGINT or SIGTERM.

Usage:
  provider --endpoints E[,E2...] --namespace N --service S --id I --addr HOST:PORT
           [--ttl SECS] [--layout native|go-zero|etcd-naming] [--tag T]... [--meta K=V]...
           [--weight W] [--replace]
           [--cacert FILE [--cert FILE --key FILE] [--tls-server-name NAME]] [--user NAME]

Options:
  --endpoints E[,E2...]  etcd endpoints, comma-separated, like http://127.0.0.1:2379
                         (https://127.0.0.1:2379 with --cacert)
  --namespace N          key namespace, like /services; \"\" for none (go-zero keys)
  --service S            service name, like user or user.rpc
  --id I                 instance id, stable across restarts (native layout only, where it is
                         required; go-zero keys by lease and etcd-naming by address)
  --addr HOST:PORT       the address callers connect to
  --ttl SECS             lease TTL in whole seconds, at least 1 (default 10)
  --layout L             native (default), go-zero or etcd-naming
  --tag T                a tag; repeatable (native layout only)
  --meta K=V             a metadata entry; repeatable (native and etcd-naming layouts)
  --weight W             relative weight, 1..=1000000 (default 1; native layout only)
  --replace              take the key over even if another live lease holds it (default:
                         fail with exit code 1)
  -h, --help             this help

",
    common::etcd_options_help!(),
    "
Prints `registered S/ID at ADDR lease L key K` on stdout once registered, ID being the id
callers see (the key's last segment); status changes go to stderr. Exit codes: 0 stopped
cleanly, 1 connect, registration or revoke failed (also a refused password or TLS handshake),
2 bad arguments (also an unreadable PEM file).
"
);

/// The options that take a value; `--tag` and `--meta` may be repeated, the others not. With
/// them [`common::ETCD_FLAGS`].
const FLAGS: &[&str] = &[
    "--endpoints",
    "--namespace",
    "--service",
    "--id",
    "--addr",
    "--ttl",
    "--layout",
    "--tag",
    "--meta",
    "--weight",
];

/// The options that take no value.
const SWITCHES: &[&str] = &["--replace"];

/// The parsed command line.
struct Args {
    endpoints: Vec<String>,
    etcd: common::EtcdArgs,
    namespace: String,
    service: String,
    id: Option<String>,
    addr: String,
    ttl: Duration,
    layout: KeyLayout,
    tags: Vec<String>,
    meta: Vec<(String, String)>,
    weight: Option<u32>,
    replace: bool,
}

/// `env` looks up an environment variable (`std::env::var_os`): see [`common::etcd_args`].
fn parse_args(
    args: impl IntoIterator<Item = String>,
    env: impl FnOnce(&str) -> Option<OsString>,
) -> Result<Parsed<Args>, String> {
    let Parsed::Run(flags) = common::parse(args, &[FLAGS, common::ETCD_FLAGS], SWITCHES)? else {
        return Ok(Parsed::Help);
    };
    // Every value given is checked before anything is reported missing.
    let endpoints = flags.once_as("--endpoints", common::parse_endpoints)?;
    let etcd = common::etcd_args(&flags, env)?;
    let namespace = flags.once("--namespace")?;
    let service = flags.once("--service")?;
    let id = flags.once("--id")?.map(str::to_owned);
    let addr = flags.once("--addr")?;
    let ttl = flags.once_as("--ttl", parse_ttl)?;
    let layout = flags.once_as("--layout", common::parse_layout)?;
    let tags: Vec<String> = flags.all("--tag").map(str::to_owned).collect();
    let meta = flags
        .all("--meta")
        .map(parse_meta)
        .collect::<Result<Vec<_>, _>>()?;
    let weight = flags.once_as("--weight", parse_weight)?;

    let endpoints = endpoints.ok_or("missing --endpoints")?;
    let namespace = namespace.ok_or("missing --namespace (use --namespace \"\" for none)")?;
    let service = service.ok_or("missing --service")?;
    let layout = layout.unwrap_or(KeyLayout::Native);
    // The foreign layouts carry less than an instance has; refuse what would be silently
    // dropped rather than let the user believe it was registered.
    let dropped = match layout {
        KeyLayout::Native => {
            if id.is_none() {
                return Err("missing --id (required in the native layout)".into());
            }
            None
        }
        KeyLayout::GoZero if id.is_some() => Some("--id (its keys are named by lease)"),
        KeyLayout::EtcdNaming if id.is_some() => Some("--id (its keys are named by address)"),
        KeyLayout::GoZero if !meta.is_empty() => Some("--meta"),
        _ if !tags.is_empty() => Some("--tag"),
        _ if weight.is_some() => Some("--weight"),
        _ => None,
    };
    if let Some(what) = dropped {
        return Err(format!("the {} layout cannot carry {what}", layout.name()));
    }
    Ok(Parsed::Run(Args {
        endpoints,
        etcd,
        namespace: namespace.to_owned(),
        service: service.to_owned(),
        id,
        addr: addr.ok_or("missing --addr")?.to_owned(),
        ttl: ttl.unwrap_or(Duration::from_secs(10)),
        layout,
        tags,
        meta,
        weight,
        replace: flags.switch("--replace"),
    }))
}

/// `--ttl SECS`: whole seconds, at least 1.
fn parse_ttl(value: &str) -> Result<Duration, String> {
    let secs: u64 = value
        .parse()
        .ok()
        .filter(|s| *s >= 1)
        .ok_or_else(|| format!("--ttl {value:?}: expected whole seconds, at least 1"))?;
    Ok(Duration::from_secs(secs))
}

/// `--meta K=V`: a non-empty key; the value may be empty.
fn parse_meta(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("--meta {value:?}: expected KEY=VALUE")),
    }
}

/// `--weight W`: a whole number; its range is the instance builder's to check.
fn parse_weight(value: &str) -> Result<u32, String> {
    value
        .parse()
        .map_err(|_| format!("--weight {value:?}: expected a whole number"))
}

fn build_instance(args: &Args) -> Result<Instance, String> {
    let mut builder = Instance::builder(args.service.as_str(), args.addr.as_str())
        .tags(args.tags.iter().cloned());
    if let Some(id) = &args.id {
        builder = builder.id(id.as_str());
    }
    for (k, v) in &args.meta {
        builder = builder.meta(k.as_str(), v.as_str());
    }
    if let Some(weight) = args.weight {
        builder = builder.weight(weight);
    }
    builder
        .build()
        .map_err(|e| format!("invalid instance: {e}"))
}

/// Writes one line to stderr. A closed stderr is not worth dying for: the line is dropped.
fn log(start: Instant, what: &str) {
    let _ = writeln!(
        std::io::stderr().lock(),
        "[{:7.1}s] provider: {what}",
        start.elapsed().as_secs_f64()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let start = Instant::now();
    let args = match parse_args(std::env::args().skip(1), |name| std::env::var_os(name)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => return common::usage_error("provider", error),
    };
    let instance = match build_instance(&args) {
        Ok(instance) => instance,
        Err(error) => return common::usage_error("provider", error),
    };
    // Reads the PEM files, if any.
    let options = match args.etcd.options() {
        Ok(options) => options,
        Err(error) => return common::usage_error("provider", error),
    };
    common::init_logging();

    // Listen for signals before registering, so that a stop request during a slow registration
    // is honoured instead of killing the process with the lease half set up.
    let stop = match common::stop_signal() {
        Ok(stop) => stop,
        Err(error) => {
            log(start, &format!("cannot listen for SIGTERM: {error}"));
            return ExitCode::FAILURE;
        }
    };
    tokio::pin!(stop);

    // Succeeds while etcd is down (registering then waits for it); when etcd answers, a refused
    // password or TLS handshake fails here.
    let backend = match EtcdBackend::connect(&args.endpoints, options).await {
        Ok(backend) => backend,
        Err(error) => {
            log(start, &format!("cannot connect to etcd: {error}"));
            return ExitCode::FAILURE;
        }
    };
    let codec = Codec::new(args.layout, args.namespace.as_str());
    let register = Registration::with_backend(backend, instance.clone())
        .namespace(args.namespace.as_str())
        .layout(args.layout)
        .ttl(args.ttl)
        .replace(args.replace)
        .register();
    let registration = tokio::select! {
        result = register => match result {
            Ok(registration) => registration,
            Err(error) => {
                log(start, &format!("registration failed: {error}"));
                return ExitCode::FAILURE;
            }
        },
        signal = &mut stop => {
            // Whatever lease was granted holds nothing we keep alive; it expires within a TTL.
            log(start, &format!("{signal} before the registration completed; stopping"));
            return ExitCode::SUCCESS;
        }
    };

    let mut status = registration.status();
    let lease = status.borrow_and_update().lease();
    let lease_text = lease.map_or_else(|| "unknown".to_owned(), |l| l.to_string());
    let key = codec.key(&instance, lease.unwrap_or(0));
    // The id callers see is the key's last segment: the instance id in the native layout, the
    // lease in go-zero's, the address in etcd-naming's.
    let seen_id = key.rsplit('/').next().unwrap_or(&key);
    let line = format!(
        "registered {}/{seen_id} at {} lease {lease_text} key {key}",
        instance.service(),
        instance.addr()
    );
    if common::print_line(&line).is_err() {
        // Nobody is reading stdout; keep serving, the status still goes to stderr.
        log(start, &line);
    }

    let status_log = tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let now = *status.borrow_and_update();
            log(start, &now.to_string());
        }
    });

    let signal = stop.await;
    status_log.abort();
    log(start, &format!("{signal}: deregistering"));
    match registration.deregister().await {
        Ok(()) => {
            log(start, "deregistered: lease revoked");
            ExitCode::SUCCESS
        }
        Err(error) => {
            log(
                start,
                &format!("could not revoke the lease ({error}); the key stays until it expires"),
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter().map(|a| (*a).to_owned())
    }

    const REQUIRED: &[&str] = &[
        "--endpoints",
        "http://127.0.0.1:2379",
        "--namespace",
        "/services",
        "--service",
        "user",
        "--id",
        "u1",
        "--addr",
        "127.0.0.1:8080",
    ];

    #[test]
    fn takes_the_etcd_flags() {
        let line = [REQUIRED, &["--user", "user-service"]].concat();
        let Ok(Parsed::Run(parsed)) = parse_args(args(&line), |_| Some("pw".into())) else {
            panic!("not parsed");
        };
        assert_eq!(parsed.id.as_deref(), Some("u1"));
        assert!(parsed.etcd.options().is_ok());
        let error = parse_args(args(&line), |_| None).err().unwrap();
        assert!(error.contains("ETCD_PASSWORD"), "{error}");
        #[cfg(feature = "tls")]
        {
            let line = [REQUIRED, &["--tls-server-name", "etcd.internal"]].concat();
            let error = parse_args(args(&line), |_| None).err().unwrap();
            assert!(error.contains("needs --cacert"), "{error}");
        }
    }

    #[test]
    fn help_names_the_etcd_flags() {
        for flag in common::ETCD_FLAGS.iter().chain(FLAGS) {
            assert!(
                USAGE.contains(&format!("  {flag} ")),
                "{flag} missing from USAGE"
            );
        }
        assert!(USAGE.contains("ETCD_PASSWORD"));
    }
}
