//! What the `provider` and `caller` examples share: a small command-line parser, the values both
//! take (`--endpoints`, `--layout`, and how to connect to etcd: [`ETCD_FLAGS`]), usage errors,
//! logging, SIGINT/SIGTERM and stdout lines.
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
//!
//! The etcd connection flags are the one exception: both examples take the same ones, so
//! [`etcd_args`] reads and checks them, and [`EtcdArgs::options`] turns them into
//! [`EtcdOptions`].

use std::ffi::OsString;
use std::fmt::{self, Display};
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

#[cfg(feature = "tls")]
use etcd_registry::backend::TlsOptions;
use etcd_registry::{EtcdOptions, KeyLayout};
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
    known: Vec<&'static str>,
}

/// Splits `args` (without the program name) into value flags and switches.
///
/// `value_flags` take a value (`--flag value` or `--flag=value`): the example's own list and
/// the shared ones, like `&[FLAGS, common::ETCD_FLAGS]`. `switches` take none. The error is a
/// one-line message for the user; usage errors are reported by [`usage_error`].
pub fn parse(
    args: impl IntoIterator<Item = String>,
    value_flags: &[&'static [&'static str]],
    switches: &'static [&'static str],
) -> Result<Parsed<Flags>, String> {
    let mut args = args.into_iter();
    let value_flags: Vec<&'static str> = value_flags.concat();
    let mut flags = Flags {
        values: Vec::new(),
        switches: Vec::new(),
        known: [value_flags.as_slice(), switches].concat(),
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
            self.known.contains(&flag),
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

/// The etcd connection flags both examples take, named as etcdctl names them; read them with
/// [`etcd_args`]. Their help text is [`etcd_options_help!`].
pub const ETCD_FLAGS: &[&str] = &["--cacert", "--cert", "--key", "--tls-server-name", "--user"];

/// The environment variable the password of `--user` is read from. Not a flag: the command
/// line of a process is visible to every user of the machine (`ps`).
pub const PASSWORD_VAR: &str = "ETCD_PASSWORD";

/// The help text of [`ETCD_FLAGS`], a literal for the examples' `concat!`.
macro_rules! etcd_options_help {
    () => {
        "\
etcd connection options (named as etcdctl's):
  --cacert FILE          CA of etcd's certificates (PEM); turns TLS on, with https:// endpoints
  --cert FILE            client certificate (PEM) for mutual TLS; with --key, needs --cacert
  --key FILE             the private key of --cert (PEM)
  --tls-server-name NAME the name etcd's certificate must carry, when it is not the endpoint's
                         host (an endpoint given by IP address); needs --cacert
  --user NAME            authenticate as NAME, with the password in the environment variable
                         ETCD_PASSWORD (never on the command line)
The TLS options need a build with `--features tls`.
"
    };
}
pub(crate) use etcd_options_help;

/// How to connect to etcd, as the command line says: checked, the PEM files not read yet.
pub struct EtcdArgs {
    #[cfg(feature = "tls")]
    tls: Option<TlsArgs>,
    /// The user name and password.
    user: Option<(String, String)>,
}

/// `--cacert`, `--cert`/`--key` and `--tls-server-name`.
#[cfg(feature = "tls")]
struct TlsArgs {
    cacert: String,
    identity: Option<(String, String)>,
    server_name: Option<String>,
}

/// Without the password.
impl fmt::Debug for EtcdArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("EtcdArgs");
        #[cfg(feature = "tls")]
        f.field(
            "tls",
            &self
                .tls
                .as_ref()
                .map(|tls| (&tls.cacert, &tls.identity, &tls.server_name)),
        );
        f.field("user", &self.user.as_ref().map(|(name, _)| name));
        f.finish()
    }
}

/// Reads and checks the [`ETCD_FLAGS`] in `flags`. `env` looks up an environment variable
/// (`std::env::var_os` outside tests): the password of `--user` is [`PASSWORD_VAR`]'s value.
pub fn etcd_args(
    flags: &Flags,
    env: impl FnOnce(&str) -> Option<OsString>,
) -> Result<EtcdArgs, String> {
    let cacert = flags.once("--cacert")?;
    let cert = flags.once("--cert")?;
    let key = flags.once("--key")?;
    let server_name = flags.once("--tls-server-name")?;
    #[cfg(not(feature = "tls"))]
    for (flag, value) in [
        ("--cacert", cacert),
        ("--cert", cert),
        ("--key", key),
        ("--tls-server-name", server_name),
    ] {
        if value.is_some() {
            return Err(format!(
                "{flag}: this build has no TLS; build the example with `--features tls`"
            ));
        }
    }
    #[cfg(feature = "tls")]
    let tls = tls_args(cacert, cert, key, server_name)?;
    let user = flags
        .once("--user")?
        .map(|name| user(name, env))
        .transpose()?;
    Ok(EtcdArgs {
        #[cfg(feature = "tls")]
        tls,
        user,
    })
}

/// Mutual TLS needs a certificate and its key, and every TLS option needs the CA.
#[cfg(feature = "tls")]
fn tls_args(
    cacert: Option<&str>,
    cert: Option<&str>,
    key: Option<&str>,
    server_name: Option<&str>,
) -> Result<Option<TlsArgs>, String> {
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert.to_owned(), key.to_owned())),
        (None, None) => None,
        (Some(_), None) => return Err("--cert without --key: give both or neither".into()),
        (None, Some(_)) => return Err("--key without --cert: give both or neither".into()),
    };
    let Some(cacert) = cacert else {
        let flag = if identity.is_some() {
            "--cert and --key need"
        } else if server_name.is_some() {
            "--tls-server-name needs"
        } else {
            return Ok(None);
        };
        return Err(format!("{flag} --cacert (the CA of etcd's certificates)"));
    };
    if server_name == Some("") {
        return Err("--tls-server-name: the name is empty".into());
    }
    Ok(Some(TlsArgs {
        cacert: cacert.to_owned(),
        identity,
        server_name: server_name.map(str::to_owned),
    }))
}

/// `--user NAME`, with the password from [`PASSWORD_VAR`].
fn user(
    name: &str,
    env: impl FnOnce(&str) -> Option<OsString>,
) -> Result<(String, String), String> {
    if name.is_empty() {
        return Err("--user: the name is empty".into());
    }
    // etcdctl takes `--user name:password`; the value is not echoed, it may hold a password.
    if name.contains(':') {
        return Err(format!(
            "--user takes the name alone (no `:`): the password is read from the environment \
             variable {PASSWORD_VAR}, never from the command line"
        ));
    }
    let password = env(PASSWORD_VAR)
        .ok_or_else(|| {
            format!(
                "--user {name:?} needs its password in the environment variable \
                 {PASSWORD_VAR}, which is not set"
            )
        })?
        .into_string()
        .map_err(|_| format!("{PASSWORD_VAR} is not valid UTF-8"))?;
    if password.is_empty() {
        return Err(format!("--user {name:?}: {PASSWORD_VAR} is empty"));
    }
    Ok((name.to_owned(), password))
}

impl EtcdArgs {
    /// The [`EtcdOptions`] to connect with, after reading the PEM files.
    ///
    /// # Errors
    /// [`Error::Config`](etcd_registry::Error::Config) naming a PEM file that cannot be read or
    /// holds no certificate or key: a usage error.
    pub fn options(&self) -> Result<EtcdOptions, etcd_registry::Error> {
        let mut options = EtcdOptions::new();
        if let Some((name, password)) = &self.user {
            options = options.user(name, password);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let mut config = TlsOptions::from_ca_file(&tls.cacert)?;
            if let Some((cert, key)) = &tls.identity {
                config = config.identity_files(cert, key)?;
            }
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name);
            }
            options = options.tls(config);
        }
        Ok(options)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const NO_FLAGS: &[&str] = &[];

    /// [`etcd_args`] on `args`, with `env` as the whole environment.
    fn etcd(args: &[&str], env: &[(&str, &str)]) -> Result<EtcdArgs, String> {
        let Parsed::Run(flags) = parse(
            args.iter().map(|a| (*a).to_owned()),
            &[NO_FLAGS, ETCD_FLAGS],
            &[],
        )?
        else {
            panic!("{args:?} asked for help");
        };
        etcd_args(&flags, |name| {
            env.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| OsString::from(value))
        })
    }

    #[test]
    fn no_etcd_flags_is_plain_http_without_a_user() {
        let args = etcd(&[], &[(PASSWORD_VAR, "ignored without --user")]).unwrap();
        assert!(args.user.is_none());
        #[cfg(feature = "tls")]
        assert!(args.tls.is_none());
        args.options().unwrap();
    }

    #[test]
    fn user_takes_the_password_from_the_environment() {
        let args = etcd(&["--user", "caller"], &[(PASSWORD_VAR, "s3cret")]).unwrap();
        assert_eq!(args.user, Some(("caller".into(), "s3cret".into())));
        // Neither the Debug of the arguments nor of the options shows the password.
        assert!(!format!("{args:?}").contains("s3cret"));
        assert!(!format!("{:?}", args.options().unwrap()).contains("s3cret"));
    }

    #[test]
    fn user_without_the_password_variable_is_a_usage_error() {
        let error = etcd(&["--user", "caller"], &[]).unwrap_err();
        assert!(error.contains("ETCD_PASSWORD"), "{error}");
        assert!(error.contains("not set"), "{error}");
        let error = etcd(&["--user=caller"], &[(PASSWORD_VAR, "")]).unwrap_err();
        assert!(error.contains("ETCD_PASSWORD is empty"), "{error}");
    }

    #[test]
    fn a_password_on_the_command_line_is_refused_and_not_echoed() {
        let error = etcd(&["--user", "caller:s3cret"], &[(PASSWORD_VAR, "x")]).unwrap_err();
        assert!(error.contains("ETCD_PASSWORD"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
        assert!(etcd(&["--user="], &[(PASSWORD_VAR, "x")]).is_err());
    }

    #[test]
    fn etcd_flags_may_be_given_once() {
        let error = etcd(&["--user", "a", "--user", "b"], &[(PASSWORD_VAR, "x")]).unwrap_err();
        assert_eq!(error, "--user given more than once");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_flags_are_kept_for_reading_later() {
        let args = etcd(
            &[
                "--cacert",
                "ca.pem",
                "--cert=client.pem",
                "--key",
                "client-key.pem",
                "--tls-server-name",
                "etcd.internal",
            ],
            &[],
        )
        .unwrap();
        let tls = args.tls.unwrap();
        assert_eq!(tls.cacert, "ca.pem");
        assert_eq!(
            tls.identity,
            Some(("client.pem".into(), "client-key.pem".into()))
        );
        assert_eq!(tls.server_name.as_deref(), Some("etcd.internal"));

        let tls = etcd(&["--cacert", "ca.pem"], &[]).unwrap().tls.unwrap();
        assert!(tls.identity.is_none() && tls.server_name.is_none());
    }

    #[cfg(feature = "tls")]
    #[test]
    fn cert_and_key_go_together() {
        for args in [
            &["--cacert", "ca.pem", "--cert", "client.pem"][..],
            &["--cacert", "ca.pem", "--key", "client-key.pem"],
            &["--cert", "client.pem"],
        ] {
            let error = etcd(args, &[]).unwrap_err();
            assert!(error.contains("give both or neither"), "{args:?}: {error}");
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_flags_need_cacert() {
        let error = etcd(&["--cert", "c.pem", "--key", "k.pem"], &[]).unwrap_err();
        assert_eq!(
            error,
            "--cert and --key need --cacert (the CA of etcd's certificates)"
        );
        let error = etcd(&["--tls-server-name", "etcd.internal"], &[]).unwrap_err();
        assert_eq!(
            error,
            "--tls-server-name needs --cacert (the CA of etcd's certificates)"
        );
        let error = etcd(&["--cacert", "ca.pem", "--tls-server-name="], &[]).unwrap_err();
        assert!(error.contains("empty"), "{error}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn an_unreadable_pem_file_is_a_config_error_naming_it() {
        let args = etcd(&["--cacert", "/nonexistent/ca.pem"], &[]).unwrap();
        match args.options() {
            Err(etcd_registry::Error::Config(message)) => {
                assert!(message.contains("/nonexistent/ca.pem"), "{message}")
            }
            other => panic!("expected Error::Config, got {other:?}"),
        }
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_flags_without_the_feature_say_how_to_build() {
        for flag in ["--cacert", "--cert", "--key", "--tls-server-name"] {
            let error = etcd(&[flag, "x"], &[]).unwrap_err();
            assert!(error.starts_with(flag), "{error}");
            assert!(error.contains("--features tls"), "{error}");
        }
    }
}
