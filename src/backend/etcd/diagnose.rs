//! Finds out why connections to etcd fail when the transport's error does not say.
//!
//! Some TLS failures reach the gRPC client only as "connection closed" or "broken pipe": with
//! TLS 1.3 the server judges the client's certificate after the client thinks the handshake is
//! done, and its alert races the first request; a TLS server spoken to in plain text just hangs
//! up. So when a request fails that way, this dials the configured endpoints itself, all at
//! once, each bounded by [`PER_ENDPOINT`], and watches what the server does. A problem is
//! reported only when the server shows it; a reset, a silence or an end of stream alone (a
//! member restarting, a hung one) proves nothing and reports nothing:
//!
//! - `https://`: a TLS handshake with the same settings, then one read, which is where a TLS
//!   1.3 server's verdict on the client certificate arrives. rustls's verdict on the server's
//!   certificate, or the server's alert, is the problem. A handshake the server hangs up on is
//!   [`NotTls`](TlsProblem::NotTls) only if the endpoint then answers a plain-text HTTP/2
//!   preface with HTTP/2.
//! - `http://`: the HTTP/2 preface in plain text. An etcd without TLS answers with a SETTINGS
//!   frame. If it does not, and the endpoint completes a TLS handshake (its certificate is not
//!   checked: nothing is sent over it), it is [`TlsRequired`](TlsProblem::TlsRequired). Without
//!   the `tls` feature there is no handshake to try, and nothing is reported.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;

#[cfg(feature = "tls")]
use super::tls::TlsOptions;
use crate::backend::TlsProblem;

/// TLS settings, in builds that have them.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(super) enum TlsOptions {}

/// How long one endpoint's diagnosis may take, connections included.
const PER_ENDPOINT: Duration = Duration::from_secs(2);

/// HTTP/2's connection preface and an empty SETTINGS frame (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// The first TLS problem (in the order of `endpoints`) a server showed, with what showed it;
/// `None` when no server showed one.
pub(super) async fn tls_problem(
    endpoints: &[String],
    tls: Option<&TlsOptions>,
) -> Option<(TlsProblem, String)> {
    let probes = endpoints.iter().map(|endpoint| async move {
        let found = tokio::time::timeout(PER_ENDPOINT, probe(endpoint, tls)).await;
        found
            .ok()
            .flatten()
            .map(|(problem, detail)| (problem, format!("{endpoint}: {detail}")))
    });
    join_all(probes).await.into_iter().flatten().next()
}

async fn probe(endpoint: &str, tls: Option<&TlsOptions>) -> Option<(TlsProblem, String)> {
    let uri = endpoint.parse::<Uri>().ok()?;
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16()?;
    match (uri.scheme_str(), tls) {
        #[cfg(feature = "tls")]
        (Some("https"), Some(tls)) => handshake::judge(&host, port, tls).await,
        (Some("http"), _) => {
            if speaks_plain_http2(&host, port).await? {
                return None;
            }
            #[cfg(feature = "tls")]
            if handshake::speaks_tls(&host, port).await {
                return Some((
                    TlsProblem::TlsRequired,
                    "no HTTP/2 in plain text, and a TLS handshake answered".to_owned(),
                ));
            }
            None
        }
        _ => None,
    }
}

/// Whether the server answers the plain-text HTTP/2 preface with a SETTINGS frame; `None`
/// when it cannot be reached at all.
async fn speaks_plain_http2(host: &str, port: u16) -> Option<bool> {
    let mut tcp = TcpStream::connect((host, port)).await.ok()?;
    if tcp.write_all(H2_PREFACE).await.is_err() {
        return Some(false);
    }
    let mut header = [0u8; 9];
    let read = tokio::time::timeout(PER_ENDPOINT / 2, tcp.read_exact(&mut header)).await;
    // A frame header: 3 bytes of length, then the type (4: SETTINGS).
    Some(matches!(read, Ok(Ok(_))) && header[3] == 4)
}

#[cfg(feature = "tls")]
mod handshake {
    //! The TLS side of the diagnosis, on rustls (as tonic uses it).

    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;

    use super::{PER_ENDPOINT, TlsOptions, TlsProblem, speaks_plain_http2};
    use crate::backend::etcd::error::problem_of;

    /// A handshake with `tls`, then one read for the server's verdict on our certificate.
    pub(super) async fn judge(
        host: &str,
        port: u16,
        tls: &TlsOptions,
    ) -> Option<(TlsProblem, String)> {
        let config = client_config(tls).ok()?;
        let name = ServerName::try_from(tls.domain().unwrap_or(host).to_owned()).ok()?;
        let tcp = TcpStream::connect((host, port)).await.ok()?;
        let mut stream = match TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        {
            Ok(stream) => stream,
            Err(error) => {
                if let Some(problem) = problem_of(&error) {
                    return Some((problem, error.to_string()));
                }
                // Hung up on: a plain-text server, if it speaks HTTP/2 in plain text.
                return match speaks_plain_http2(host, port).await {
                    Some(true) => Some((
                        TlsProblem::NotTls,
                        format!("{error}; the endpoint answers HTTP/2 in plain text"),
                    )),
                    _ => None,
                };
            }
        };
        // A TLS 1.3 server sends its verdict on the client certificate after our Finished;
        // an HTTP/2 server that accepted us sends its SETTINGS frame.
        let mut byte = [0u8; 1];
        match tokio::time::timeout(PER_ENDPOINT / 2, stream.read(&mut byte)).await {
            Ok(Err(error)) => problem_of(&error).map(|problem| (problem, error.to_string())),
            _ => None,
        }
    }

    /// Whether the endpoint completes a TLS handshake (its certificate unchecked).
    pub(super) async fn speaks_tls(host: &str, port: u16) -> bool {
        let Ok(tcp) = TcpStream::connect((host, port)).await else {
            return false;
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let Ok(builder) = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
        else {
            return false;
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        let Ok(name) = ServerName::try_from(host.to_owned()) else {
            return false;
        };
        let connecting = TlsConnector::from(Arc::new(config)).connect(name, tcp);
        matches!(
            tokio::time::timeout(PER_ENDPOINT / 2, connecting).await,
            Ok(Ok(_))
        )
    }

    /// Accepts any certificate: used only to see whether an endpoint speaks TLS at all.
    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// The rustls client configuration `tls` stands for (what tonic builds from it, plus ALPN).
    fn client_config(tls: &TlsOptions) -> Result<rustls::ClientConfig, rustls::Error> {
        let invalid = |what: &str| rustls::Error::General(format!("{what} does not parse"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(tls.ca_pem()) {
            roots.add(cert.map_err(|_| invalid("the CA"))?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match tls.identity_pem() {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| invalid("the client certificate"))?;
                let key =
                    PrivateKeyDer::from_pem_slice(key).map_err(|_| invalid("the client key"))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}
