//! [`TlsOptions`]: the CA, client identity and server name of a TLS connection to etcd.

use std::fmt;
use std::path::Path;

use etcd_client::{Certificate, Identity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// TLS to etcd: the CA that signed etcd's server certificates, an optional client certificate
/// and key for mutual TLS (etcd's `--client-cert-auth`), and an optional server name. Given to
/// [`EtcdOptions::tls`](super::EtcdOptions::tls). TLS is rustls with the ring provider.
///
/// Only the given CA is trusted, not the system's roots: an etcd cluster has its own PKI.
/// Everything is PEM, checked when the options are built, so a file with no certificate or no
/// key is [`Error::Config`] here rather than a failed handshake later.
///
/// # Rotated certificates
///
/// Certificates that rotate on disk (cert-manager, Vault, a cron job) are read again by
/// building new options from the same files and handing them to
/// [`EtcdBackend::reload`](super::EtcdBackend::reload), on a timer or when a file watcher or a
/// `SIGHUP` says they changed. Requests from then on use the new certificates; a watch already
/// open keeps its connection (TLS checks certificates only in the handshake) until it breaks,
/// and reopens on the new one.
///
/// ```no_run
/// use etcd_registry::backend::{EtcdBackend, EtcdOptions, TlsOptions};
///
/// # async fn run() -> Result<(), etcd_registry::Error> {
/// let options = || -> Result<EtcdOptions, etcd_registry::Error> {
///     let tls = TlsOptions::from_ca_file("/etc/etcd/ca.pem")?
///         .identity_files("/etc/etcd/client.pem", "/etc/etcd/client-key.pem")?;
///     Ok(EtcdOptions::new().tls(tls))
/// };
/// let etcd = EtcdBackend::connect(["https://10.0.0.1:2379"], options()?).await?;
/// // Later, when the files have been replaced:
/// etcd.reload(options()?).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsOptions {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca", &format_args!("{} bytes of PEM", self.ca.len()))
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsOptions {
    /// Trusts the CA certificates in `ca_pem` (one or more PEM `CERTIFICATE` blocks).
    ///
    /// # Errors
    /// [`Error::Config`] when `ca_pem` holds no PEM certificate.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let ca = ca_pem.into();
        if CertificateDer::pem_slice_iter(&ca).next().is_none() {
            return Err(Error::Config(
                "the TLS CA holds no PEM certificate (a `-----BEGIN CERTIFICATE-----` block)"
                    .into(),
            ));
        }
        Ok(Self {
            ca,
            identity: None,
            domain: None,
        })
    }

    /// [`new`](Self::new) with the CA read from the PEM file at `path` (etcd's
    /// `--trusted-ca-file` on the server side, etcdctl's `--cacert`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file when it cannot be read or holds no certificate.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        Self::new(read(path)?).map_err(|e| in_file(e, &path.display()))
    }

    /// Presents `cert_pem` (the client certificate, then any intermediates) with the private
    /// key `key_pem` (PKCS#8, PKCS#1 or SEC1) to etcd: mutual TLS. etcd takes the certificate's
    /// common name as the user when no user/password is given.
    ///
    /// # Errors
    /// [`Error::Config`] when `cert_pem` holds no certificate or `key_pem` no private key.
    pub fn identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, Error> {
        let (cert, key) = (cert_pem.into(), key_pem.into());
        if CertificateDer::pem_slice_iter(&cert).next().is_none() {
            return Err(Error::Config(
                "the TLS client certificate holds no PEM certificate".into(),
            ));
        }
        if PrivateKeyDer::from_pem_slice(&key).is_err() {
            return Err(Error::Config(
                "the TLS client key holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
            ));
        }
        self.identity = Some((cert, key));
        Ok(self)
    }

    /// [`identity`](Self::identity) read from PEM files (etcdctl's `--cert` and `--key`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file that cannot be read or holds no certificate or key.
    pub fn identity_files(
        self,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        let (cert, key) = (read(cert_path)?, read(key_path)?);
        self.identity(cert, key).map_err(|e| {
            in_file(
                e,
                &format!("{} / {}", cert_path.display(), key_path.display()),
            )
        })
    }

    /// Checks the server's certificate against `name` instead of the endpoint's host: for
    /// endpoints given by IP address whose certificates name hosts, or a proxy in between.
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    /// Whether a client identity is set (mutual TLS).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    pub(super) fn ca_pem(&self) -> &[u8] {
        &self.ca
    }

    pub(super) fn identity_pem(&self) -> Option<(&[u8], &[u8])> {
        self.identity
            .as_ref()
            .map(|(c, k)| (c.as_slice(), k.as_slice()))
    }

    pub(super) fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    pub(super) fn to_client_config(&self) -> etcd_client::TlsOptions {
        let mut config =
            etcd_client::TlsOptions::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read TLS file {}: {e}", path.display())))
}

fn in_file(error: Error, file: &(impl fmt::Display + ?Sized)) -> Error {
    match error {
        Error::Config(message) => Error::Config(format!("{message} (in {file})")),
        other => other,
    }
}
