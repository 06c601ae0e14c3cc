//! Finds out why connections to etcd fail when the transport's error does not say.
//!
//! Some TLS failures reach the gRPC client only as "connection closed" or "broken pipe": with
//! TLS 1.3 the server judges the client's certificate after the client thinks the handshake is
//! done, and its alert races the first request; a TLS server spoken to in plain text just hangs
//! up. So when a request fails that way, this dials the endpoints itself (one TCP connection
//! each, bounded by a timeout) and watches what the server does:
//!
//! - `https://`: a TLS handshake with the same settings, then one read, which is where a TLS
//!   1.3 server's verdict on the client certificate arrives;
//! - `http://`: the HTTP/2 preface; an etcd without TLS answers with a SETTINGS frame, one with
//!   TLS hangs up or answers with a TLS alert.

#[cfg(feature = "tls")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "tls")]
use rustls::pki_types::pem::PemObject;
#[cfg(feature = "tls")]
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
#[cfg(feature = "tls")]
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;

#[cfg(feature = "tls")]
use super::error::{problem_of, sources};
#[cfg(feature = "tls")]
use super::tls::TlsOptions;
use crate::backend::TlsProblem;

/// TLS settings, in builds that have them.
#[cfg(not(feature = "tls"))]
pub(super) enum TlsOptions {}

/// How long one endpoint's diagnosis may take, connection included.
const PER_ENDPOINT: Duration = Duration::from_secs(2);

/// HTTP/2's connection preface and an empty SETTINGS frame (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// The first TLS problem found at `endpoints`, with what showed it; `None` when every endpoint
/// that could be reached completed its handshake (or none could be reached).
pub(super) async fn tls_problem(
    endpoints: &[String],
    tls: Option<&TlsOptions>,
) -> Option<(TlsProblem, String)> {
    for endpoint in endpoints {
        let Ok(uri) = endpoint.parse::<Uri>() else {
            continue;
        };
        let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
            continue;
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let found = match (uri.scheme_str(), tls) {
            #[cfg(feature = "tls")]
            (Some("https"), Some(tls)) => {
                tokio::time::timeout(PER_ENDPOINT, handshake(&host, port, tls)).await
            }
            (Some("http"), _) => tokio::time::timeout(PER_ENDPOINT, preface(&host, port)).await,
            _ => continue,
        };
        if let Ok(Some(problem)) = found {
            return Some((problem.0, format!("{endpoint}: {}", problem.1)));
        }
    }
    None
}

#[cfg(feature = "tls")]
/// A TLS handshake with `tls`, then one read for the server's verdict on our certificate.
async fn handshake(host: &str, port: u16, tls: &TlsOptions) -> Option<(TlsProblem, String)> {
    let config = match client_config(tls) {
        Ok(config) => config,
        Err(error) => return Some((TlsProblem::Other, error)),
    };
    let name = tls.domain().unwrap_or(host);
    let Ok(name) = ServerName::try_from(name.to_owned()) else {
        return Some((
            TlsProblem::WrongHost,
            format!("{name:?} is not a server name"),
        ));
    };
    let tcp = TcpStream::connect((host, port)).await.ok()?;
    let mut stream = match TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(stream) => stream,
        Err(error) => return Some(judge(&error)),
    };
    // A TLS 1.3 server sends its verdict on the client certificate after our Finished. With
    // nothing asked, an HTTP/2 server sends its SETTINGS frame: either way one read tells.
    let mut byte = [0u8; 1];
    match tokio::time::timeout(PER_ENDPOINT / 2, stream.read(&mut byte)).await {
        Ok(Err(error)) => Some(judge(&error)),
        // Data, end of stream or silence: the handshake was accepted.
        _ => None,
    }
}

/// The HTTP/2 preface in plain text: does the server answer like HTTP/2?
async fn preface(host: &str, port: u16) -> Option<(TlsProblem, String)> {
    let mut tcp = TcpStream::connect((host, port)).await.ok()?;
    tcp.write_all(H2_PREFACE).await.ok()?;
    let mut header = [0u8; 9];
    let read = tokio::time::timeout(PER_ENDPOINT / 2, tcp.read(&mut header)).await;
    let tls_required = || {
        Some((
            TlsProblem::TlsRequired,
            "the server hung up on a plain-text HTTP/2 preface (it serves TLS)".to_owned(),
        ))
    };
    match read {
        // A TLS record of type alert (21).
        Ok(Ok(n)) if n > 0 && header[0] == 21 => tls_required(),
        Ok(Ok(0)) | Ok(Err(_)) => tls_required(),
        _ => None,
    }
}

#[cfg(feature = "tls")]
/// The problem an error of the handshake or of the first read shows.
fn judge(error: &std::io::Error) -> (TlsProblem, String) {
    let problem = problem_of(error).unwrap_or_else(|| {
        if sources(error).any(|e| e.to_string().contains("eof")) {
            TlsProblem::NotTls
        } else {
            TlsProblem::Other
        }
    });
    (problem, error.to_string())
}

#[cfg(feature = "tls")]
/// The rustls client configuration `tls` stands for (what tonic builds from it, plus ALPN).
fn client_config(tls: &TlsOptions) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(tls.ca_pem()) {
        let cert = cert.map_err(|e| format!("CA: {e}"))?;
        roots.add(cert).map_err(|e| format!("CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match tls.identity_pem() {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("client key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client identity: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
