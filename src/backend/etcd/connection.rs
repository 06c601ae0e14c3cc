//! [`Connection`]: one etcd-client client and what the backend keeps beside it: the user it
//! authenticates as, the endpoints and TLS settings a failure is diagnosed with, and the last
//! diagnosis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, KvClient, WatchClient};
use tokio::sync::Mutex as AsyncMutex;

use super::auth::Auth;
use super::error::map_error;
use super::options::EtcdOptions;
#[cfg(feature = "tls")]
use super::tls::TlsOptions;
use super::{MAX_RESPONSE_BYTES, channel, diagnose};
use crate::Error;
use crate::backend::{BackendError, BackendErrorKind, TlsProblem};

/// One etcd-client client and what the backend keeps beside it.
pub(super) struct Connection {
    pub(super) client: Client,
    /// `client`'s key-value and watch clients, with the response size limit raised.
    pub(super) kv: KvClient,
    pub(super) watch: WatchClient,
    /// The user to authenticate as, when the backend does it (not for `from_client`).
    pub(super) auth: Option<Auth>,
    /// The endpoints and TLS settings, to [diagnose](diagnose::tls_problem) failed
    /// connections with (none for `from_client`).
    endpoints: Vec<String>,
    tls: Option<TlsSettings>,
    /// See [`EtcdOptions::permission_check_interval`].
    pub(super) permission_check_interval: Duration,
    /// The last diagnosis and when it was made: reused for [`DIAGNOSIS_TTL`], so a failing
    /// etcd is dialled for a diagnosis at most that often, and the cause reported stays put.
    diagnosis: Arc<AsyncMutex<Option<(Instant, Diagnosis)>>>,
}

/// What [`diagnose::tls_problem`] found: a problem and what showed it, or none.
type Diagnosis = Option<(TlsProblem, String)>;

/// How long a diagnosis of failed connections stands.
const DIAGNOSIS_TTL: Duration = Duration::from_secs(5);

#[cfg(feature = "tls")]
type TlsSettings = TlsOptions;
#[cfg(not(feature = "tls"))]
type TlsSettings = diagnose::TlsOptions;

#[cfg(feature = "tls")]
fn has_identity(tls: &TlsSettings) -> bool {
    tls.has_identity()
}
#[cfg(not(feature = "tls"))]
fn has_identity(tls: &TlsSettings) -> bool {
    match *tls {}
}

impl Connection {
    pub(super) fn new(client: Client, auth: Option<Auth>, endpoints: Vec<String>) -> Self {
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let watch = client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        Self {
            client,
            kv,
            watch,
            auth,
            endpoints,
            tls: None,
            permission_check_interval: super::options::DEFAULT_PERMISSION_CHECK_INTERVAL,
            diagnosis: Arc::default(),
        }
    }

    /// A client for `endpoints` (already [checked](super::endpoints::usable)). Nothing is dialled yet.
    pub(super) async fn open(endpoints: &[String], options: &EtcdOptions) -> Result<Self, Error> {
        let client = Client::connect_with_balanced_channel(
            endpoints,
            Some(options.connect_options()),
            channel::FailoverBuilder,
        )
        .await
        .map_err(|e| Error::Backend(map_error(e)))?;
        let auth = options
            .credentials()
            .map(|(user, password)| Auth::new(user.clone(), password.clone()));
        let mut connection = Self::new(client, auth, endpoints.to_vec());
        connection.permission_check_interval = options.permission_check_interval_value();
        #[cfg(feature = "tls")]
        {
            connection.tls = options.tls_options().cloned();
        }
        Ok(connection)
    }

    /// `error`, or the TLS problem behind it when it is a connection that failed in a way the
    /// transport does not explain (closed, reset, a broken pipe: not a refusal, which says
    /// plainly that nothing listens).
    pub(super) async fn explain(&self, error: BackendError) -> BackendError {
        let error = self.refine(error);
        let vague = error.kind == BackendErrorKind::Unavailable
            && !error.message.contains("refused")
            && !error.message.contains("no leader");
        if !vague {
            return error;
        }
        // One diagnosis at a time, on a task of its own: callers that fail meanwhile wait for
        // it, and it is kept for the next ones even if the caller that started it gave up.
        let (state, endpoints, tls) = (
            Arc::clone(&self.diagnosis),
            self.endpoints.clone(),
            self.tls.clone(),
        );
        let diagnosis = tokio::spawn(async move {
            let mut last = state.lock().await;
            if let Some((at, found)) = last.as_ref() {
                if at.elapsed() < DIAGNOSIS_TTL {
                    return found.clone();
                }
            }
            let found = diagnose::tls_problem(&endpoints, tls.as_ref()).await;
            *last = Some((Instant::now(), found.clone()));
            found
        });
        let found = diagnosis.await.ok().flatten();
        match found {
            Some((problem, detail)) => self.refine(BackendError::new(
                BackendErrorKind::Tls(problem),
                format!("{problem}: {detail}"),
            )),
            None => error,
        }
    }

    /// A refused client certificate is a missing one when we sent none: servers answer both
    /// with the same alert (etcd 3.4's Go sends `bad_certificate` for either).
    fn refine(&self, error: BackendError) -> BackendError {
        let sent_none = self.tls.as_ref().is_some_and(|tls| !has_identity(tls));
        match error.kind {
            BackendErrorKind::Tls(TlsProblem::ClientCertificateRejected) if sent_none => {
                let problem = TlsProblem::ClientCertificateRequired;
                let detail = error.message.split_once(": ").map_or("", |(_, rest)| rest);
                BackendError::new(
                    BackendErrorKind::Tls(problem),
                    format!("{problem}: {detail}"),
                )
            }
            _ => error,
        }
    }

    /// Authenticates (or, without a user, asks a member for its status) to find refused
    /// credentials and failed TLS handshakes now rather than on first use. An etcd that does
    /// not answer within the connect timeout is no error: the backend connects lazily.
    pub(super) async fn verify(&self, options: &EtcdOptions) -> Result<(), Error> {
        let check = async {
            match &self.auth {
                Some(auth) => auth.ensure(&self.client).await,
                None => self
                    .client
                    .maintenance_client()
                    .status()
                    .await
                    .map(drop)
                    .map_err(map_error),
            }
        };
        let checked = async {
            match check.await {
                Ok(()) => Ok(()),
                Err(error) => Err(self.explain(error).await),
            }
        };
        match tokio::time::timeout(options.connect_timeout_value(), checked).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => match (error.kind, &self.auth) {
                (BackendErrorKind::Tls(problem), _) => Err(Error::Tls {
                    problem,
                    // `Error::Tls` names the problem itself.
                    detail: error
                        .message
                        .strip_prefix(&format!("{problem}: "))
                        .unwrap_or(&error.message)
                        .to_owned(),
                }),
                (BackendErrorKind::Auth, Some(auth)) => Err(Error::Auth {
                    user: auth.user().to_owned(),
                    detail: auth.detail(&error).to_owned(),
                }),
                _ => {
                    tracing::debug!(%error, "etcd did not answer at connect; connecting lazily");
                    Ok(())
                }
            },
            Err(_) => {
                tracing::debug!(
                    "etcd did not answer within the connect timeout; connecting lazily"
                );
                Ok(())
            }
        }
    }
}
