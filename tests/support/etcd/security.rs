//! Security of a test cluster: TLS on the client URLs (optionally requiring client
//! certificates) and etcd's own authentication. What a member is started with, what an
//! etcdctl run presents, and turning auth on with a `root` user, plus thin etcdctl wrappers for
//! least-privilege users and roles.
//!
//! The certificates themselves come from a [`TlsFiles`] (`support::pki::Pki` in this crate's
//! tests): this file only names paths, so the harness builds where rcgen is not a dependency
//! (the grpc example's tests include the harness too).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::EtcdCluster;

/// The user the harness enables auth with and authenticates as afterwards.
pub const ROOT_USER: &str = "root";
/// Password of [`ROOT_USER`] on every auth cluster.
pub const ROOT_PASSWORD: &str = "root-password-of-the-test-harness";
/// bcrypt cost of the passwords etcd stores on an auth cluster (etcd's default is 10). Every
/// etcdctl run with `--user` authenticates once, and the harness polls with etcdctl: the lowest
/// cost etcd accepts keeps that cheap. It changes how long etcd takes to check a password,
/// nothing else.
pub const BCRYPT_COST: &str = "4";

/// Which server certificate a TLS cluster presents on its client URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerCert {
    /// Signed by the CA, valid now, for `127.0.0.1` and `localhost`.
    Valid,
    /// Signed by the CA, for `127.0.0.1` and `localhost`, but no longer valid.
    Expired,
    /// Signed by the CA, valid now, for `etcd.wrong.example` only.
    WrongHost,
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl Identity {
    /// The certificate and key as PEM text, read from the files now.
    pub fn pem(&self) -> (String, String) {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        };
        (read(&self.cert), read(&self.key))
    }
}

/// Where a TLS cluster finds its PEM files. Implemented by `support::pki::Pki`; a cluster keeps
/// its `Arc` so the files live as long as the members reading them.
pub trait TlsFiles: Send + Sync {
    /// The CA that signed the server certificates and the client certificates etcd trusts.
    fn ca_file(&self) -> PathBuf;
    /// Server certificate `which` and its key.
    fn server(&self, which: ServerCert) -> Identity;
    /// A client certificate with CN [`ROOT_USER`] signed by the CA: what the harness's own
    /// etcdctl presents to a cluster that requires client certificates.
    fn root_client(&self) -> Identity;
    /// A client certificate without a CN signed by the CA: what the harness's grpc-proxy
    /// presents (etcd 3.4's proxy refuses a certificate with a CN).
    fn anonymous_client(&self) -> Identity;
}

/// TLS on the client URLs (`https://127.0.0.1:<port>`); peer URLs stay plain http.
#[derive(Clone)]
pub struct ServerTls {
    /// Where the certificates are.
    pub pki: Arc<dyn TlsFiles>,
    /// Which server certificate the members present.
    pub cert: ServerCert,
    /// `--client-cert-auth --trusted-ca-file=<ca>`: clients must present a certificate signed
    /// by the CA. (etcd 3.4 requires client certificates whenever `--trusted-ca-file` is given,
    /// `--client-cert-auth` or not, so without this the CA is not passed to the members.)
    pub client_cert_auth: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("ca", &self.pki.ca_file())
            .field("cert", &self.cert)
            .field("client_cert_auth", &self.client_cert_auth)
            .finish()
    }
}

/// How a cluster is secured. `Security::default()` is what [`EtcdCluster::start`] runs: plain
/// http, no auth.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// TLS on the client URLs, if any.
    pub tls: Option<ServerTls>,
    /// Whether the harness enables auth (user `root`, role `root`) once the cluster is healthy.
    pub auth: bool,
}

impl Security {
    /// TLS with server certificate `cert`, no client certificates required, no auth.
    pub fn tls(pki: Arc<dyn TlsFiles>, cert: ServerCert) -> Self {
        Security {
            tls: Some(ServerTls {
                pki,
                cert,
                client_cert_auth: false,
            }),
            auth: false,
        }
    }

    /// TLS with the valid server certificate, and clients must present a certificate signed by
    /// the CA (`--client-cert-auth`); no auth.
    pub fn mutual_tls(pki: Arc<dyn TlsFiles>) -> Self {
        Security {
            tls: Some(ServerTls {
                pki,
                cert: ServerCert::Valid,
                client_cert_auth: true,
            }),
            auth: false,
        }
    }

    /// Plain http with auth enabled.
    pub fn auth() -> Self {
        Security {
            tls: None,
            auth: true,
        }
    }

    /// The same, with auth enabled too.
    pub fn with_auth(mut self) -> Self {
        self.auth = true;
        self
    }

    /// `https` with TLS, `http` without.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Flags every member gets for this security, before the test's own extra flags.
    pub(super) fn member_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(tls) = &self.tls {
            let server = tls.pki.server(tls.cert);
            flags.push(format!("--cert-file={}", server.cert.display()));
            flags.push(format!("--key-file={}", server.key.display()));
            if tls.client_cert_auth {
                flags.push("--client-cert-auth".into());
                flags.push(format!("--trusted-ca-file={}", tls.pki.ca_file().display()));
            }
        }
        if self.auth {
            flags.push(format!("--bcrypt-cost={BCRYPT_COST}"));
        }
        flags
    }

    /// What the harness's own etcdctl presents: the CA; the CN-root client certificate when
    /// the server requires one; `--insecure-skip-tls-verify` when the server's certificate is
    /// expired or for another host (only the client under test should trip over it); and the
    /// root user once `auth_on`.
    pub(super) fn harness_credentials(&self, auth_on: bool) -> Credentials {
        let mut creds = Credentials::default();
        if let Some(tls) = &self.tls {
            creds.cacert = Some(tls.pki.ca_file());
            if tls.client_cert_auth {
                creds.client = Some(tls.pki.root_client());
            }
            creds.insecure_skip_tls_verify = tls.cert != ServerCert::Valid;
        }
        if auth_on {
            creds.user = Some((ROOT_USER.into(), ROOT_PASSWORD.into()));
        }
        creds
    }
}

/// What one etcdctl run presents to the cluster. `Credentials::default()` presents nothing:
/// no CA (the system roots), no client certificate, no user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `--cacert`.
    pub cacert: Option<PathBuf>,
    /// `--cert` and `--key`.
    pub client: Option<Identity>,
    /// `--user=name:password`.
    pub user: Option<(String, String)>,
    /// `--insecure-skip-tls-verify`.
    pub insecure_skip_tls_verify: bool,
}

impl Credentials {
    /// The same, trusting the CA in `cacert`.
    pub fn with_cacert(mut self, cacert: PathBuf) -> Self {
        self.cacert = Some(cacert);
        self
    }

    /// The same, presenting client certificate `client`.
    pub fn with_client(mut self, client: Identity) -> Self {
        self.client = Some(client);
        self
    }

    /// The same, authenticating as `name` with `password`.
    pub fn with_user(mut self, name: &str, password: &str) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// The same, without a user.
    pub fn without_user(mut self) -> Self {
        self.user = None;
        self
    }

    /// The same, without a client certificate.
    pub fn without_client(mut self) -> Self {
        self.client = None;
        self
    }

    /// The same, with or without `--insecure-skip-tls-verify`.
    pub fn skip_verify(mut self, skip: bool) -> Self {
        self.insecure_skip_tls_verify = skip;
        self
    }

    /// The etcdctl flags.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(ca) = &self.cacert {
            args.push(format!("--cacert={}", ca.display()));
        }
        if let Some(id) = &self.client {
            args.push(format!("--cert={}", id.cert.display()));
            args.push(format!("--key={}", id.key.display()));
        }
        if let Some((name, password)) = &self.user {
            args.push(format!("--user={name}:{password}"));
        }
        if self.insecure_skip_tls_verify {
            args.push("--insecure-skip-tls-verify".into());
        }
        args
    }
}

impl EtcdCluster {
    /// The security the cluster was started with.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// Password of user `root` once auth is on.
    pub fn root_password(&self) -> &str {
        ROOT_PASSWORD
    }

    /// Whether auth is enabled on the cluster's current data (a wipe turns it off until the
    /// harness enables it again).
    pub fn auth_enabled(&self) -> bool {
        self.auth_on.load(Ordering::SeqCst)
    }

    /// What the harness's own etcdctl presents right now (see [`Security`]); a starting point
    /// for a test's own [`Credentials`].
    pub fn credentials(&self) -> Credentials {
        self.security.harness_credentials(self.auth_enabled())
    }

    /// The harness's TLS credentials (CA, client certificate if required, skip-verify for a
    /// bad server certificate) with user `name` instead of root.
    pub fn credentials_as(&self, name: &str, password: &str) -> Credentials {
        self.credentials().with_user(name, password)
    }

    /// Runs etcdctl against the live members presenting `creds` instead of the harness's own;
    /// `Err` carries stderr.
    pub fn try_etcdctl_with(&self, creds: &Credentials, args: &[&str]) -> Result<String, String> {
        let eps = self.live_endpoints();
        if eps.is_empty() {
            return Err("no live etcd member".into());
        }
        self.run_etcdctl_as(creds, Some(&eps.join(",")), args)
    }

    /// Runs etcdctl against `endpoints` (comma-separated URLs, e.g. `http://` ones to a TLS
    /// cluster) presenting `creds`. Endpoints cannot be overridden through `args`: etcdctl
    /// appends a second `--endpoints` to the first.
    pub fn try_etcdctl_against(
        &self,
        endpoints: &str,
        creds: &Credentials,
        args: &[&str],
    ) -> Result<String, String> {
        self.run_etcdctl_as(creds, Some(endpoints), args)
    }

    /// [`try_etcdctl_with`](Self::try_etcdctl_with); panics with stderr on failure.
    #[track_caller]
    pub fn etcdctl_with(&self, creds: &Credentials, args: &[&str]) -> String {
        self.try_etcdctl_with(creds, args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?} with {creds:?}: {e}"))
    }

    /// Runs etcdctl against member `i` only, presenting `creds`.
    pub fn try_etcdctl_at_with(
        &self,
        i: usize,
        creds: &Credentials,
        args: &[&str],
    ) -> Result<String, String> {
        let ep = self.endpoint(i);
        self.run_etcdctl_as(creds, Some(&ep), args)
    }

    /// Creates user `root` with [`ROOT_PASSWORD`], grants it role `root` and enables auth; the
    /// harness's etcdctl authenticates as root from then on.
    pub(super) fn enable_auth(&self) {
        self.etcdctl(&[
            "user",
            "add",
            ROOT_USER,
            &format!("--new-user-password={ROOT_PASSWORD}"),
            "--interactive=false",
        ]);
        self.etcdctl(&["user", "grant-role", ROOT_USER, "root"]);
        let out = self.etcdctl(&["auth", "enable"]);
        assert!(
            out.contains("Authentication Enabled"),
            "auth enable said: {out}"
        );
        self.auth_on.store(true, Ordering::SeqCst);
    }

    /// `user add <name>` with `password`.
    #[track_caller]
    pub fn add_user(&self, name: &str, password: &str) {
        self.etcdctl(&[
            "user",
            "add",
            name,
            &format!("--new-user-password={password}"),
            "--interactive=false",
        ]);
    }

    /// `role add <name>`.
    #[track_caller]
    pub fn add_role(&self, name: &str) {
        self.etcdctl(&["role", "add", name]);
    }

    /// Lets `role` read every key under `prefix`.
    #[track_caller]
    pub fn grant_read_prefix(&self, role: &str, prefix: &str) {
        self.grant_prefix(role, "read", prefix);
    }

    /// Lets `role` read and write every key under `prefix`.
    #[track_caller]
    pub fn grant_readwrite_prefix(&self, role: &str, prefix: &str) {
        self.grant_prefix(role, "readwrite", prefix);
    }

    #[track_caller]
    fn grant_prefix(&self, role: &str, perm: &str, prefix: &str) {
        self.etcdctl(&[
            "role",
            "grant-permission",
            role,
            "--prefix=true",
            perm,
            prefix,
        ]);
    }

    /// Takes back what `role` was granted on `prefix` (read and write alike).
    #[track_caller]
    pub fn revoke_prefix(&self, role: &str, prefix: &str) {
        self.etcdctl(&["role", "revoke-permission", role, "--prefix=true", prefix]);
    }

    /// Gives `user` role `role`.
    #[track_caller]
    pub fn grant_role(&self, user: &str, role: &str) {
        self.etcdctl(&["user", "grant-role", user, role]);
    }
}
