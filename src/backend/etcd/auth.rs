//! Authentication with a user and password, done by the backend rather than at connect, so that
//! a process can start while etcd is down, and redone when etcd stops accepting the token.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use etcd_client::Client;
use tokio::sync::Mutex as AsyncMutex;

use super::error::map_error;
use crate::backend::{BackendError, BackendErrorKind};

/// How a refusal of credentials begins, before the user name.
const REFUSED: &str = "etcd refused the credentials of user ";

/// A user's credentials and whether the connection's client holds a token for them.
pub(super) struct Auth {
    user: String,
    password: String,
    /// The client authenticated once; from then on etcd-client keeps the credentials and
    /// [`refresh`](Self::refresh) renews the token.
    done: AtomicBool,
    /// One authentication at a time: callers that find it under way wait for its outcome.
    lock: AsyncMutex<()>,
    /// Tokens obtained so far: a call that saw generation `g` refused refreshes only if no
    /// other call has since (concurrent refusals authenticate once, not once each).
    generation: AtomicU64,
}

impl Auth {
    pub(super) fn new(user: String, password: String) -> Self {
        Self {
            user,
            password,
            done: AtomicBool::new(false),
            lock: AsyncMutex::new(()),
            generation: AtomicU64::new(0),
        }
    }

    /// The user name.
    pub(super) fn user(&self) -> &str {
        &self.user
    }

    /// Authenticates `client` unless it already is.
    ///
    /// # Errors
    /// [`Auth`](BackendErrorKind::Auth) naming the user when etcd refuses the credentials;
    /// the transport's error when etcd cannot be reached.
    pub(super) async fn ensure(&self, client: &Client) -> Result<(), BackendError> {
        if self.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.lock.lock().await;
        if self.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let credentials = Some((self.user.clone(), self.password.clone()));
        match client.clone().update_user(credentials).await {
            Ok(()) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.done.store(true, Ordering::Release);
                tracing::debug!(user = %self.user, "authenticated to etcd");
                Ok(())
            }
            Err(error) => Err(self.refused(map_error(error))),
        }
    }

    /// Which token the client holds now; pass it to [`refresh`](Self::refresh) when etcd
    /// refuses a request made with it.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Gets a new token for `client`: etcd refused the one of generation `seen` (expired, or
    /// issued before a change of users or roles: etcd's "revision of auth store is old").
    /// Nothing to do when another call has renewed it since.
    pub(super) async fn refresh(&self, client: &Client, seen: u64) -> Result<(), BackendError> {
        if !self.done.load(Ordering::Acquire) {
            return self.ensure(client).await;
        }
        let _one_at_a_time = self.lock.lock().await;
        if self.generation() != seen {
            return Ok(());
        }
        client
            .refresh_token()
            .await
            .map_err(|error| self.refused(map_error(error)))?;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// What etcd said in a refusal made by [`ensure`](Self::ensure) or
    /// [`refresh`](Self::refresh), without the user name those put in front.
    pub(super) fn detail<'e>(&self, error: &'e BackendError) -> &'e str {
        error
            .message
            .strip_prefix(REFUSED)
            .and_then(|rest| rest.strip_prefix(&format!("{:?}: ", self.user)))
            .unwrap_or(&error.message)
    }

    /// An error of authenticating: one etcd answered (wrong password, unknown user,
    /// authentication not enabled) becomes [`Auth`](BackendErrorKind::Auth) naming the user;
    /// one of reaching etcd stays what it is.
    fn refused(&self, error: BackendError) -> BackendError {
        // `map_error` sorts etcd's answers about credentials (a wrong password, an unknown
        // user, authentication not enabled) into `Auth`; anything else (a member restarting,
        // too many requests) is not about the credentials.
        match error.kind {
            BackendErrorKind::Auth => BackendError::new(
                BackendErrorKind::Auth,
                format!("{REFUSED}{:?}: {}", self.user, error.message),
            ),
            _ => error,
        }
    }
}

/// Whether a fresh token may cure `error`: etcd refused the one sent (expired, or older than
/// the last change of users and roles), or saw none.
pub(super) fn token_refused(error: &BackendError) -> bool {
    error.kind == BackendErrorKind::Auth
        && [
            "invalid auth token",
            "auth store is old",
            "user name is empty",
        ]
        .iter()
        .any(|text| error.message.contains(text))
}
