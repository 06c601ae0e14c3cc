//! Test certificates, made at test time with rcgen so that no private key is ever committed:
//! a CA, an unrelated second CA, server certificates (valid, expired, for the wrong host) and
//! client certificates, as PEM files in a fresh temp directory that is removed on drop.
//!
//! Every server certificate is for `127.0.0.1` (IP) and `localhost` except the wrong-host one,
//! which names only `etcd.wrong.example` (never resolved: it only appears in the certificate).
//! Keys are ECDSA P-256, in PKCS#8 PEM.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};

use super::etcd::process::unique;
use super::etcd::{Identity, ROOT_USER, ServerCert, TlsFiles};

/// The only name in the [`ServerCert::WrongHost`] certificate.
pub const WRONG_HOST: &str = "etcd.wrong.example";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A CA and the certificates it (or an unrelated CA) issued, as PEM files in a temp directory
/// that lives as long as this value.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    other_ca: CertifiedIssuer<'static, KeyPair>,
}

/// Which way a leaf certificate is used.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    /// `serverAuth` and `clientAuth`: etcd's gRPC gateway dials its own server with the server
    /// certificate, which `--client-cert-auth` then checks as a client certificate.
    Server,
    /// `clientAuth`.
    Client,
}

/// Validity of a certificate, in days from now (negative: in the past).
#[derive(Clone, Copy)]
struct Validity {
    from: i64,
    to: i64,
}

const VALID_NOW: Validity = Validity { from: -1, to: 365 };
const EXPIRED: Validity = Validity { from: -30, to: -1 };

impl Pki {
    /// Makes both CAs, the three server certificates, the CN-`root` client certificate, a
    /// client certificate without a CN, and a CN-`root` client certificate signed by the other
    /// CA, in a fresh temp directory.
    pub fn new() -> Self {
        let ca = new_ca("etcd-registry test CA");
        let other_ca = new_ca("etcd-registry unrelated test CA");
        let dir = std::env::temp_dir().join(unique("etcd-registry-pki"));
        fs::create_dir_all(&dir).expect("create pki temp dir");
        // Built right after the directory so that Drop removes it if writing a file fails.
        let pki = Pki { dir, ca, other_ca };
        write(&pki.ca_file(), &pki.ca.pem());
        write(&pki.other_ca_file(), &pki.other_ca.pem());
        for which in [
            ServerCert::Valid,
            ServerCert::Expired,
            ServerCert::WrongHost,
        ] {
            pki.issue_server(which);
        }
        pki.client(ROOT_USER);
        issue(
            &pki.ca,
            &pki.anonymous_client(),
            None,
            &[],
            Leaf::Client,
            VALID_NOW,
        );
        issue(
            &pki.other_ca,
            &pki.foreign_client(),
            Some(ROOT_USER),
            &[],
            Leaf::Client,
            VALID_NOW,
        );
        pki
    }

    /// The temp directory holding every file; removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ca.pem`: the CA that signed the server certificates and the trusted client ones.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> String {
        read(&self.ca_file())
    }

    /// `other_ca.pem`: an unrelated CA that signed nothing the server presents.
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.join("other_ca.pem")
    }

    /// The unrelated CA certificate as PEM text.
    pub fn other_ca_pem(&self) -> String {
        read(&self.other_ca_file())
    }

    /// Server certificate `which` and its key.
    pub fn server(&self, which: ServerCert) -> Identity {
        let stem = match which {
            ServerCert::Valid => "server",
            ServerCert::Expired => "server-expired",
            ServerCert::WrongHost => "server-wrong-host",
        };
        self.identity(stem)
    }

    /// Server certificate `which` and its key as PEM text.
    pub fn server_pem(&self, which: ServerCert) -> (String, String) {
        self.server(which).pem()
    }

    /// Issues the valid server certificate again, over the same files: a new key, a new serial
    /// number, the same names. For a certificate-rotation test (etcd reads its certificate
    /// files on every new connection). Each file is replaced by a rename, so a reader sees the
    /// old or the new file whole, though for a moment the old certificate next to the new key.
    pub fn reissue_server(&self) {
        self.issue_server(ServerCert::Valid);
    }

    /// A client certificate with CN `cn` signed by the CA (`clientAuth`), made now; issuing
    /// the same CN again replaces it. etcd takes the CN as the user name of a request that
    /// carries no auth token.
    pub fn client(&self, cn: &str) -> Identity {
        let id = self.identity(&format!("client-{}", file_safe(cn)));
        issue(&self.ca, &id, Some(cn), &[], Leaf::Client, VALID_NOW);
        id
    }

    /// A client certificate without a CN (an empty subject) signed by the CA, made by
    /// [`new`](Self::new): etcd 3.4's grpc-proxy refuses a client certificate with a CN (the
    /// server would take it as the user of every request the proxy forwards).
    pub fn anonymous_client(&self) -> Identity {
        self.identity("client-anonymous")
    }

    /// The client certificate with CN `root` made by [`new`](Self::new).
    pub fn root_client(&self) -> Identity {
        self.identity(&format!("client-{ROOT_USER}"))
    }

    /// The CN-`root` client certificate and key as PEM text.
    pub fn client_pem(&self) -> (String, String) {
        self.root_client().pem()
    }

    /// A client certificate with CN `root` signed by the unrelated CA: a server that trusts
    /// only [`ca_file`](Self::ca_file) must reject it.
    pub fn foreign_client(&self) -> Identity {
        self.identity("client-other-ca")
    }

    /// The foreign client certificate and key as PEM text.
    pub fn foreign_client_pem(&self) -> (String, String) {
        self.foreign_client().pem()
    }

    fn identity(&self, stem: &str) -> Identity {
        Identity {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}-key.pem")),
        }
    }

    fn issue_server(&self, which: ServerCert) {
        let (names, validity): (&[&str], _) = match which {
            ServerCert::Valid => (&["127.0.0.1", "localhost"], VALID_NOW),
            ServerCert::Expired => (&["127.0.0.1", "localhost"], EXPIRED),
            ServerCert::WrongHost => (&[WRONG_HOST], VALID_NOW),
        };
        issue(
            &self.ca,
            &self.server(which),
            Some(names[0]),
            names,
            Leaf::Server,
            validity,
        );
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl TlsFiles for Pki {
    fn ca_file(&self) -> PathBuf {
        Pki::ca_file(self)
    }

    fn server(&self, which: ServerCert) -> Identity {
        Pki::server(self, which)
    }

    fn root_client(&self) -> Identity {
        Pki::root_client(self)
    }

    fn anonymous_client(&self) -> Identity {
        Pki::anonymous_client(self)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `cn` with everything but ASCII letters, digits, `-` and `_` replaced, for a file name.
fn file_safe(cn: &str) -> String {
    cn.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Writes `text` to `path` through a temp file and a rename.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("pem.tmp");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Sets `params`' validity relative to now.
fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    // rcgen's time type, without naming the `time` crate (not a dependency of ours).
    let now = date_time_ymd(1970, 1, 1) + since_epoch;
    let at = |days: i64| {
        let span = DAY * u32::try_from(days.unsigned_abs()).expect("days fit u32");
        if days < 0 { now - span } else { now + span }
    };
    params.not_before = at(validity.from);
    params.not_after = at(validity.to);
}

fn new_ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, Validity { from: -1, to: 3650 });
    let key = KeyPair::generate().expect("generate CA key");
    CertifiedIssuer::self_signed(params, key).expect("self-sign CA")
}

/// Issues a leaf certificate with CN `cn` (or an empty subject) and subject alternative names
/// `sans` (an IP literal becomes an IP SAN) on a new key, signed by `issuer`, into `id`'s files.
fn issue(
    issuer: &Issuer<'static, KeyPair>,
    id: &Identity,
    cn: Option<&str>,
    sans: &[&str],
    usage: Leaf,
    validity: Validity,
) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("valid subject alternative names");
    // rcgen's default subject is a CN of its own.
    params.distinguished_name = DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match usage {
        Leaf::Server => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Leaf::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    set_validity(&mut params, validity);
    let key = KeyPair::generate().expect("generate key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("sign leaf certificate");
    write(&id.key, &key.serialize_pem());
    write(&id.cert, &cert.pem());
}
