//! etcd-client's errors sorted into the kinds the cache and registrations act on, with the
//! messages a person needs: the whole chain of causes, and what a failed TLS handshake means.

use std::error::Error as StdError;

use crate::backend::{BackendError, BackendErrorKind, TlsProblem};

/// Whether etcd said the lease does not exist (expired or revoked).
pub(super) fn lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        _ => false,
    }
}

/// Sorts etcd-client's errors into the kinds the cache and registrations act on.
pub(super) fn map_error(error: etcd_client::Error) -> BackendError {
    use etcd_client::Error as E;
    use tonic::Code;
    let kind = match &error {
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable if status.message().contains("no leader") => {
                BackendErrorKind::NoLeader
            }
            Code::Unavailable | Code::Aborted | Code::Cancelled | Code::Unknown => {
                if status.message().contains("no leader") {
                    BackendErrorKind::NoLeader
                } else {
                    BackendErrorKind::Unavailable
                }
            }
            Code::DeadlineExceeded => BackendErrorKind::Timeout,
            Code::OutOfRange | Code::ResourceExhausted
                if status.message().contains("message length too large")
                    || status.message().contains("larger than max") =>
            {
                BackendErrorKind::TooLarge
            }
            Code::Unauthenticated | Code::PermissionDenied => BackendErrorKind::Auth,
            // etcd answers a wrong password, a missing or outdated token and a user on a
            // cluster without authentication with these codes, not with `Unauthenticated`.
            Code::InvalidArgument | Code::FailedPrecondition
                if AUTH_MESSAGES.iter().any(|m| status.message().contains(m)) =>
            {
                BackendErrorKind::Auth
            }
            Code::OutOfRange
                if status
                    .message()
                    .contains("required revision has been compacted") =>
            {
                BackendErrorKind::Compacted
            }
            Code::OutOfRange
                if status
                    .message()
                    .contains("required revision is a future revision") =>
            {
                BackendErrorKind::FutureRevision
            }
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange => BackendErrorKind::Rejected,
            _ => BackendErrorKind::Other,
        },
        E::TransportError(_) | E::IoError(_) => BackendErrorKind::Unavailable,
        E::WatchError(_) | E::LeaseKeepAliveError(_) => BackendErrorKind::Unavailable,
        E::InvalidArgs(_) | E::InvalidUri(_) | E::EndpointError(_) => BackendErrorKind::Rejected,
        _ => BackendErrorKind::Other,
    };
    // A failed handshake reaches us as a transport error, or as a gRPC status (Unavailable,
    // Unknown) that carries the transport error as its source. etcd-client's own error type
    // names no source: look into what it wraps.
    let inner: Option<&(dyn StdError + 'static)> = match &error {
        E::GRpcStatus(status) => Some(status),
        E::TransportError(transport) => Some(transport),
        E::IoError(io) => Some(io),
        _ => None,
    };
    let kind = match (kind, inner.and_then(problem_of)) {
        (BackendErrorKind::Unavailable | BackendErrorKind::Other, Some(problem)) => {
            BackendErrorKind::Tls(problem)
        }
        (kind, _) => kind,
    };
    let text = match inner {
        Some(inner) => chain(inner),
        None => chain(&error),
    };
    let message = match kind {
        BackendErrorKind::Tls(problem) => format!("{problem}: {text}"),
        _ => text,
    };
    BackendError::new(kind, message)
}

/// What etcd's authentication errors say (etcd `api/v3rpc/rpctypes/error.go`).
const AUTH_MESSAGES: [&str; 6] = [
    "authentication failed",
    "user name is empty",
    "revision of auth store is old",
    "authentication is not enabled",
    "invalid auth token",
    "permission denied",
];

/// `error` and its sources, joined by ": ", each said once: "transport error" alone tells
/// nothing; the connection refused or the certificate expired under it does.
pub(super) fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut message = error.to_string();
    for source in sources(error).skip(1) {
        let text = source.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// `error`, then its sources. `io::Error::source` skips the error it wraps (it returns that
/// error's source), so an `io::Error` is looked into with `get_ref`: that is where rustls puts
/// its verdict.
pub(super) fn sources<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&e: &&'a (dyn StdError + 'static)| {
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        }
    })
    .take(32)
}

/// What went wrong in a TLS handshake, if the error shows it: rustls's own verdict on the
/// server's certificate, or the alert the server sent about ours.
pub(super) fn problem_of(error: &(dyn StdError + 'static)) -> Option<TlsProblem> {
    for source in sources(error) {
        #[cfg(feature = "tls")]
        if let Some(tls) = source.downcast_ref::<rustls::Error>() {
            return Some(rustls_problem(tls));
        }
        // An alert read by the HTTP/2 connection rather than by the handshake arrives as text.
        let text = source.to_string();
        if let Some(rest) = text.split("received fatal alert: ").nth(1) {
            let end = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            return Some(alert_problem(&rest[..end]));
        }
    }
    None
}

/// The problem a TLS alert from the server names (its name as rustls prints it).
fn alert_problem(alert: &str) -> TlsProblem {
    match alert {
        "CertificateRequired" => TlsProblem::ClientCertificateRequired,
        "BadCertificate"
        | "UnknownCA"
        | "CertificateExpired"
        | "CertificateUnknown"
        | "UnsupportedCertificate"
        | "CertificateRevoked"
        | "AccessDenied" => TlsProblem::ClientCertificateRejected,
        _ => TlsProblem::Other,
    }
}

/// rustls's verdict, sorted.
#[cfg(feature = "tls")]
fn rustls_problem(error: &rustls::Error) -> TlsProblem {
    use rustls::{CertificateError as Cert, Error as R};
    match error {
        R::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer | Cert::BadSignature => TlsProblem::UnknownIssuer,
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => TlsProblem::WrongHost,
            Cert::Expired
            | Cert::ExpiredContext { .. }
            | Cert::NotValidYet
            | Cert::NotValidYetContext { .. } => TlsProblem::Expired,
            _ => TlsProblem::Other,
        },
        R::AlertReceived(alert) => alert_problem(&format!("{alert:?}")),
        R::InvalidMessage(_) | R::InappropriateMessage { .. } => TlsProblem::NotTls,
        _ => TlsProblem::Other,
    }
}
