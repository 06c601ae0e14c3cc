//! A caller: follows one service in etcd and prints a line for every snapshot of its instances.
//!
//! ```sh
//! cargo run --example caller -- --endpoints http://127.0.0.1:2379 --namespace /services \
//!     --service user --json
//! ```
//!
//! It starts even when etcd is down: the cache starts frozen and fills in when etcd answers, and
//! the process keeps running through outages. Each published snapshot is one line on stdout,
//! flushed at once (stdout may be a pipe). With `--json` the line is one JSON object, instances
//! sorted by id:
//!
//! ```json
//! {"revision":42,"freshness":"live","instances":[{"id":"u1","addr":"10.0.0.7:8080"}]}
//! ```
//!
//! `freshness` is `"live"` while the watch follows etcd and `"frozen"` while etcd is away; a
//! frozen snapshot keeps the last known instances. A line is printed when the instances, the
//! revision or the freshness change. The empty snapshot from before the first list is not
//! printed, unless etcd stays unreachable past the first-list bound (10 s): then it is printed
//! once (`"revision":0`, `"frozen"`, no instances) and the reason goes to stderr. Snapshots
//! published faster than they are printed are coalesced: the latest one is printed.
//!
//! Services registered by go-zero live at the root of the key space:
//!
//! ```sh
//! cargo run --example caller -- --endpoints http://127.0.0.1:2379 --namespace "" \
//!     --service user.rpc --layout go-zero
//! ```
//!
//! To an etcd with TLS (mutual TLS with `--cert` and `--key`) and authentication, build with
//! the `tls` feature; the password is read from the environment variable `ETCD_PASSWORD`, never
//! from the command line:
//!
//! ```sh
//! ETCD_PASSWORD=... cargo run --features tls --example caller -- \
//!     --endpoints https://127.0.0.1:2379 --cacert ca.pem --cert client.pem --key client-key.pem \
//!     --user caller --namespace /services --service user
//! ```
//!
//! The PEM files are read at start: one that cannot be read is a usage error. A refused
//! password or a failed TLS handshake is a runtime failure when etcd answers at start; later,
//! the snapshot freezes on it and the caller keeps trying.
//!
//! Exit codes: 0 on SIGINT or SIGTERM (or when stdout is closed); 1 on a runtime failure; 2 for
//! a bad or missing argument. Set `RUST_LOG=etcd_registry=debug` for the library's logs on
//! stderr.

mod common;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use common::Parsed;
use etcd_registry::{Discovery, Error, EtcdBackend, Freshness, KeyLayout, Snapshot};
use serde::Serialize;

const USAGE: &str = concat!(
    "\
Follows one service in etcd and prints a line for every snapshot of its instances.

Usage:
  caller --endpoints E[,E2...] --namespace N --service S
         [--layout native|go-zero|etcd-naming] [--json] [--stall-timeout SECS]
         [--cacert FILE [--cert FILE --key FILE] [--tls-server-name NAME]] [--user NAME]

Options:
  --endpoints E[,E2...]  etcd endpoints, comma-separated, like http://127.0.0.1:2379
                         (https://127.0.0.1:2379 with --cacert)
  --namespace N          key namespace, like /services; \"\" for none (go-zero keys)
  --service S            service name, like user or user.rpc
  --layout L             native (default), go-zero or etcd-naming
  --json                 one JSON object per line:
                         {\"revision\":R,\"freshness\":\"live\"|\"frozen\",\"instances\":[{\"id\":..,\"addr\":..}]}
  --stall-timeout SECS   how long a silent watch may last before the snapshot freezes
                         (default 10; fractions allowed)
  -h, --help             this help

",
    common::etcd_options_help!(),
    "
Exit codes: 0 on SIGINT/SIGTERM, 1 runtime failure (also a refused password or TLS
handshake at start), 2 bad arguments (also an unreadable PEM file).
"
);

/// How long etcd may stay unreachable at start before the empty snapshot is printed anyway.
const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The options that take a value, each at most once; with them [`common::ETCD_FLAGS`].
const FLAGS: &[&str] = &[
    "--endpoints",
    "--namespace",
    "--service",
    "--layout",
    "--stall-timeout",
];

/// The options that take no value.
const SWITCHES: &[&str] = &["--json"];

/// The parsed command line.
struct Args {
    endpoints: Vec<String>,
    etcd: common::EtcdArgs,
    namespace: String,
    service: String,
    layout: KeyLayout,
    json: bool,
    stall_timeout: Option<Duration>,
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
    let layout = flags.once_as("--layout", common::parse_layout)?;
    let stall_timeout = flags.once_as("--stall-timeout", parse_stall_timeout)?;
    Ok(Parsed::Run(Args {
        endpoints: endpoints.ok_or("missing --endpoints")?,
        etcd,
        namespace: namespace
            .ok_or("missing --namespace (use --namespace \"\" for none)")?
            .to_owned(),
        service: service.ok_or("missing --service")?.to_owned(),
        layout: layout.unwrap_or(KeyLayout::Native),
        json: flags.switch("--json"),
        stall_timeout,
    }))
}

/// `--stall-timeout SECS`: a positive number of seconds, fractions allowed.
fn parse_stall_timeout(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("--stall-timeout {value:?}: expected a positive number of seconds"))
}

/// One `--json` line. A struct rather than `json!` so the fields come out in the documented
/// order (`json!` builds a map, which serde_json sorts by key).
#[derive(Serialize)]
struct JsonLine<'a> {
    revision: i64,
    freshness: &'static str,
    instances: Vec<JsonInstance<'a>>,
}

#[derive(Serialize)]
struct JsonInstance<'a> {
    id: &'a str,
    addr: &'a str,
}

/// One snapshot as one line, JSON or human-readable.
fn render(snapshot: &Snapshot, json: bool) -> Result<String, serde_json::Error> {
    let mut instances: Vec<_> = snapshot.instances().iter().collect();
    instances.sort_by(|a, b| a.id().cmp(b.id()));
    if json {
        return serde_json::to_string(&JsonLine {
            revision: snapshot.revision(),
            freshness: if snapshot.freshness().is_live() {
                "live"
            } else {
                "frozen"
            },
            instances: instances
                .iter()
                .map(|i| JsonInstance {
                    id: i.id(),
                    addr: i.addr(),
                })
                .collect(),
        });
    }
    let freshness = match snapshot.freshness() {
        Freshness::Live => "live".to_owned(),
        Freshness::Frozen { cause, .. } => format!("FROZEN ({cause})"),
    };
    let mut line = format!(
        "{} rev {} {freshness}: {} instance{}",
        snapshot.service(),
        snapshot.revision(),
        instances.len(),
        if instances.len() == 1 { "" } else { "s" },
    );
    for (n, i) in instances.iter().enumerate() {
        line.push_str(if n == 0 { ": " } else { ", " });
        line.push_str(i.id());
        line.push('=');
        line.push_str(i.addr());
        if !i.is_up() {
            line.push_str(&format!(" ({})", i.state()));
        }
    }
    Ok(line)
}

/// Why the caller stops printing.
enum Stop {
    /// Nobody reads stdout any more: a normal end for a pipe (`caller | head -3`).
    StdoutClosed,
    /// Writing failed for another reason.
    Failed(String),
}

fn emit(snapshot: &Snapshot, json: bool) -> Result<(), Stop> {
    let line = render(snapshot, json).map_err(|e| Stop::Failed(format!("cannot encode: {e}")))?;
    common::print_line(&line).map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => Stop::StdoutClosed,
        _ => Stop::Failed(format!("cannot write to stdout: {e}")),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1), |name| std::env::var_os(name)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => return common::usage_error("caller", error),
    };
    // Reads the PEM files, if any.
    let options = match args.etcd.options() {
        Ok(options) => options,
        Err(error) => return common::usage_error("caller", error),
    };
    common::init_logging();

    let stop = match common::stop_signal() {
        Ok(stop) => stop,
        Err(error) => {
            eprintln!("caller: cannot listen for SIGTERM: {error}");
            return ExitCode::FAILURE;
        }
    };
    tokio::pin!(stop);

    // The connection is made lazily: this succeeds while etcd is down. When etcd answers, a
    // refused password or TLS handshake fails here.
    let backend = match EtcdBackend::connect(&args.endpoints, options).await {
        Ok(backend) => backend,
        Err(error) => {
            eprintln!("caller: cannot connect to etcd: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = Discovery::with_backend(backend)
        .namespace(args.namespace.as_str())
        .layout(args.layout)
        .first_list_timeout(FIRST_LIST_TIMEOUT);
    if let Some(timeout) = args.stall_timeout {
        builder = builder.stall_timeout(timeout);
    }
    let discovery = match builder.build() {
        Ok(discovery) => discovery,
        Err(error) => return common::usage_error("caller", error),
    };
    // `service_now` hands the cache out before its first list, so an etcd that is down at start
    // does not stop the caller: the cache fills in when etcd answers.
    let cache = match discovery.service_now(&args.service) {
        Ok(cache) => cache,
        Err(error @ Error::Config(_)) => return common::usage_error("caller", error),
        Err(error) => {
            eprintln!("caller: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut changes = cache.changes();
    // Waits for the first list on the same cache, only to tell how long etcd has been away.
    let first_list = discovery.service(&args.service);
    tokio::pin!(first_list);
    let mut first_list_pending = true;

    // Whatever is already published (a first list that beat us here) is printed first.
    let mut printed = false;
    let current = changes.borrow_and_update().clone();
    let mut outcome = Ok(());
    if current.revision() > 0 {
        outcome = emit(&current, args.json);
        printed = true;
    }
    while outcome.is_ok() {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    outcome = Err(Stop::Failed("the cache stopped".into()));
                    break;
                }
                let snapshot = changes.borrow_and_update().clone();
                if snapshot.revision() > 0 {
                    outcome = emit(&snapshot, args.json);
                    printed = true;
                }
            }
            result = &mut first_list, if first_list_pending => {
                first_list_pending = false;
                if let Err(error) = result {
                    eprintln!("caller: {error}; still trying");
                    // Say so on stdout too, once: etcd has been unreachable since the start.
                    let snapshot = changes.borrow().clone();
                    if !printed && snapshot.revision() == 0 {
                        outcome = emit(&snapshot, args.json);
                        printed = true;
                    }
                }
            }
            _ = &mut stop => break,
        }
    }
    match outcome {
        Ok(()) | Err(Stop::StdoutClosed) => ExitCode::SUCCESS,
        Err(Stop::Failed(error)) => {
            eprintln!("caller: {error}");
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
    ];

    #[test]
    fn takes_the_etcd_flags() {
        let line = [REQUIRED, &["--user", "caller"]].concat();
        let Ok(Parsed::Run(parsed)) = parse_args(args(&line), |_| Some("pw".into())) else {
            panic!("not parsed");
        };
        assert_eq!(parsed.service, "user");
        assert!(parsed.etcd.options().is_ok());
        let error = parse_args(args(&line), |_| None).err().unwrap();
        assert!(error.contains("ETCD_PASSWORD"), "{error}");
        #[cfg(feature = "tls")]
        {
            let line = [REQUIRED, &["--cacert", "ca.pem", "--key", "k.pem"]].concat();
            let error = parse_args(args(&line), |_| None).err().unwrap();
            assert!(error.contains("both or neither"), "{error}");
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
