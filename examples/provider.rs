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
//! Exit codes: 0 after a clean deregistration; 1 when registering failed (etcd unreachable, or the
//! key is held by another live instance and `--replace` was not given) or the lease could not be
//! revoked; 2 for a bad or missing argument. Set `RUST_LOG=etcd_discovery=debug` for the library's logs on stderr.
//!
//! go-zero's layout keeps keys at the root of the key space, named by lease; register as a go-zero
//! service with an empty namespace:
//!
//! ```sh
//! cargo run --example provider -- --endpoints http://127.0.0.1:2379 --namespace "" \
//!     --service user.rpc --addr 10.0.0.9:8080 --layout go-zero
//! ```

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use etcd_discovery::{Codec, EtcdBackend, EtcdOptions, Instance, KeyLayout, Registration};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
Registers one instance of a service in etcd and keeps it registered until SIGINT or SIGTERM.

Usage:
  provider --endpoints E[,E2...] --namespace N --service S --id I --addr HOST:PORT
           [--ttl SECS] [--layout native|go-zero|etcd-naming] [--tag T]... [--meta K=V]...
           [--weight W] [--replace]

Options:
  --endpoints E[,E2...]  etcd endpoints, comma-separated, like http://127.0.0.1:2379
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

Prints `registered S/ID at ADDR lease L key K` on stdout once registered, ID being the id
callers see (the key's last segment); status changes go to
stderr. Exit codes: 0 stopped cleanly, 1 registration or revoke failed, 2 bad arguments.
";

/// The options that take a value.
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

/// The parsed command line.
struct Args {
    endpoints: Vec<String>,
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

/// What the command line asks for: a run, or the help text.
enum Parsed {
    Run(Args),
    Help,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut args = args.into_iter();
    let mut endpoints = None;
    let mut namespace = None;
    let mut service = None;
    let mut id = None;
    let mut addr = None;
    let mut ttl = None;
    let mut layout = None;
    let mut tags = Vec::new();
    let mut meta = Vec::new();
    let mut weight = None;
    let mut replace = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--replace" => {
                if replace {
                    return Err("--replace given more than once".into());
                }
                replace = true;
                continue;
            }
            _ => {}
        }
        if !arg.starts_with("--") {
            return Err(format!("unexpected argument {arg:?}"));
        }
        // Both `--flag value` and `--flag=value`; a value taken from the next argument may not
        // look like a flag, so a forgotten value is an error rather than a swallowed flag.
        let name = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
        if name == "--replace" {
            return Err("--replace takes no value".into());
        }
        if !FLAGS.contains(&name) {
            return Err(format!("unknown option {name}"));
        }
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), value.to_owned()),
            None => {
                let value = match args.next() {
                    Some(v) if !v.starts_with("--") => v,
                    _ => return Err(format!("{arg} needs a value")),
                };
                (arg, value)
            }
        };
        match flag.as_str() {
            "--endpoints" => set_once(&mut endpoints, &flag, parse_endpoints(&value)?)?,
            "--namespace" => set_once(&mut namespace, &flag, value)?,
            "--service" => set_once(&mut service, &flag, value)?,
            "--id" => set_once(&mut id, &flag, value)?,
            "--addr" => set_once(&mut addr, &flag, value)?,
            "--ttl" => {
                let secs: u64 = value.parse().ok().filter(|s| *s >= 1).ok_or_else(|| {
                    format!("--ttl {value:?}: expected whole seconds, at least 1")
                })?;
                set_once(&mut ttl, &flag, Duration::from_secs(secs))?;
            }
            "--layout" => set_once(
                &mut layout,
                &flag,
                value
                    .parse::<KeyLayout>()
                    .map_err(|e| format!("--layout: {e}"))?,
            )?,
            "--tag" => tags.push(value),
            "--meta" => match value.split_once('=') {
                Some((k, v)) if !k.is_empty() => meta.push((k.to_owned(), v.to_owned())),
                _ => return Err(format!("--meta {value:?}: expected KEY=VALUE")),
            },
            "--weight" => {
                let w: u32 = value
                    .parse()
                    .map_err(|_| format!("--weight {value:?}: expected a whole number"))?;
                set_once(&mut weight, &flag, w)?;
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
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
        namespace,
        service,
        id,
        addr: addr.ok_or("missing --addr")?,
        ttl: ttl.unwrap_or(Duration::from_secs(10)),
        layout,
        tags,
        meta,
        weight,
        replace,
    }))
}

fn set_once<T>(slot: &mut Option<T>, flag: &str, value: T) -> Result<(), String> {
    if slot.replace(value).is_some() {
        return Err(format!("{flag} given more than once"));
    }
    Ok(())
}

fn parse_endpoints(value: &str) -> Result<Vec<String>, String> {
    let endpoints: Vec<String> = value.split(',').map(|e| e.trim().to_owned()).collect();
    if endpoints.iter().any(String::is_empty) {
        return Err(format!("--endpoints {value:?}: an endpoint is empty"));
    }
    Ok(endpoints)
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
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("provider: {error}\nRun `provider --help` for usage.");
            return ExitCode::from(2);
        }
    };
    let instance = match build_instance(&args) {
        Ok(instance) => instance,
        Err(error) => {
            eprintln!("provider: {error}\nRun `provider --help` for usage.");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Listen for signals before registering, so that a stop request during a slow registration
    // is honoured instead of killing the process with the lease half set up.
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            log(start, &format!("cannot listen for SIGTERM: {error}"));
            return ExitCode::FAILURE;
        }
    };
    let stop = async {
        let interrupt = async {
            // If SIGINT cannot be listened for, wait for SIGTERM alone rather than stop now.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = interrupt => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        }
    };
    tokio::pin!(stop);

    let backend = match EtcdBackend::connect(&args.endpoints, EtcdOptions::new()).await {
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
    {
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // Nobody is reading stdout; keep serving, the status still goes to stderr.
            log(start, &line);
        }
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
