//! [`Registration`]: the provider side. A lease, the instance's key under it, kept alive, and
//! put back whenever it is lost.
//!
//! Life of a registration:
//! 1. **Register**: grant a lease (TTL default 10 s) and put the instance's key under it in a
//!    transaction that refuses to overwrite a key held by another lease ([`Error::Conflict`],
//!    unless [`replace`](RegistrationBuilder::replace) is set).
//! 2. **Keep alive** every TTL/3, and watch the key: if someone deletes it, put it back.
//! 3. **Re-register** when the lease is lost (a keep-alive answers TTL 0, or none succeeded for a
//!    whole TTL): a new lease, the same key (in the go-zero layout the key carries the lease id,
//!    so it changes with the lease), with backoff and jitter between attempts, never a tight loop.
//! 4. **Deregister** revokes the lease: the key is gone from every cache at once.
//!
//! Dropping a `Registration` without calling [`deregister`](Registration::deregister) stops the
//! keep-alive: the key stays until its lease expires (one TTL), which is what a crashed provider
//! looks like to callers.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::Instrument;

use crate::backend::{
    Backend, BackendError, BackendErrorKind, EventKind, PutCondition, PutOutcome, WatchMessage,
    WatchStream,
};
use crate::backoff::{Backoff, BackoffConfig};
use crate::codec::{Codec, KeyLayout};
use crate::error::{Error, Result};
use crate::instance::{Instance, InstanceBuilder, State};

/// Where a registration stands; see [`Registration::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationStatus {
    /// The key is in etcd under this lease, kept alive.
    Registered {
        /// The lease.
        lease: i64,
    },
    /// Keep-alives are failing; the lease may still be alive (it has not been a whole TTL).
    Renewing {
        /// The lease being renewed.
        lease: i64,
    },
    /// The lease or the key was lost; re-registering with backoff.
    Lost,
    /// Registered again after a loss, under this lease (new, or the same one when only the key
    /// was put back). The next successful keep-alive reports [`Registered`](Self::Registered).
    Reregistered {
        /// The new lease.
        lease: i64,
    },
    /// Deregistered: the lease was revoked (or the registration was dropped).
    Deregistered,
    /// The registration's task ended without a deregister: the tokio runtime it ran on shut
    /// down, or it panicked (in a user's [`Backend`], say). Nothing keeps the lease alive any
    /// more, so the key expires within one TTL; register again to come back.
    TaskEnded,
}

impl RegistrationStatus {
    /// The lease the key is under, when there is one.
    pub fn lease(&self) -> Option<i64> {
        match *self {
            RegistrationStatus::Registered { lease }
            | RegistrationStatus::Renewing { lease }
            | RegistrationStatus::Reregistered { lease } => Some(lease),
            RegistrationStatus::Lost
            | RegistrationStatus::Deregistered
            | RegistrationStatus::TaskEnded => None,
        }
    }
}

impl fmt::Display for RegistrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistrationStatus::Registered { lease } => write!(f, "registered (lease {lease})"),
            RegistrationStatus::Renewing { lease } => {
                write!(f, "keep-alives failing; renewing lease {lease}")
            }
            RegistrationStatus::Lost => f.write_str("lease or key lost; registering again"),
            RegistrationStatus::Reregistered { lease } => {
                write!(f, "registered again (lease {lease})")
            }
            RegistrationStatus::Deregistered => f.write_str("deregistered"),
            RegistrationStatus::TaskEnded => {
                f.write_str("task ended; the key expires within one TTL")
            }
        }
    }
}

/// The default re-registration backoff for a lease of `ttl`: [`BackoffConfig::default`], its
/// cap lowered to a third of the TTL (never under its initial delay); see
/// [`RegistrationBuilder::backoff`].
fn default_backoff(ttl: Duration) -> BackoffConfig {
    let default = BackoffConfig::default();
    BackoffConfig {
        max: default.max.min(ttl / 3).max(default.initial),
        ..default
    }
}

/// Configures a [`Registration`]; every setting has a default that suits production.
#[must_use = "a builder does nothing until .register() is called"]
pub struct RegistrationBuilder {
    backend: Arc<dyn Backend>,
    instance: Instance,
    namespace: String,
    layout: KeyLayout,
    ttl: Duration,
    replace: bool,
    /// `None`: the default, with its cap at a third of the TTL.
    backoff: Option<BackoffConfig>,
    request_timeout: Duration,
    seed: Option<u64>,
}

impl fmt::Debug for RegistrationBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrationBuilder")
            .field("instance", &self.instance)
            .field("namespace", &self.namespace)
            .field("layout", &self.layout)
            .field("ttl", &self.ttl)
            .field("replace", &self.replace)
            .finish_non_exhaustive()
    }
}

impl RegistrationBuilder {
    /// The key namespace (default none); must match the callers' [`DiscoveryBuilder::namespace`](crate::DiscoveryBuilder::namespace).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The key layout (default [`KeyLayout::Native`]). go-zero and etcd-naming layouts carry only
    /// the address (and etcd-naming the metadata), as the Go libraries do.
    pub fn layout(mut self, layout: KeyLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The lease TTL (default 10 s; etcd counts whole seconds, at least 1). Callers notice a
    /// crashed provider within one TTL; keep-alives go every TTL/3.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Take the key over even if another live lease holds it (default false: fail with
    /// [`Error::Conflict`]).
    pub fn replace(mut self, replace: bool) -> Self {
        self.replace = replace;
        self
    }

    /// Backoff between re-registration attempts (default: 100 ms, doubling up to 10 s or a
    /// third of the TTL, whichever is shorter, full jitter).
    ///
    /// The default's cap follows the TTL because of what etcd does after an outage: it keeps
    /// the leases it had and extends them by about one TTL when it is back, so an attempt that
    /// comes within that window moves the key to its new lease while the old one still holds
    /// it, and callers never see the instance go; a later attempt lets the old lease expire
    /// first, and the instance vanishes from every caller until then. A cap set here is kept
    /// as it is.
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Bound on each request to etcd, including the revoke of [`Registration::deregister`]
    /// (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Seeds the backoff jitter (default: random). Only for reproducible tests.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Registers the instance and starts keeping it alive.
    ///
    /// # Errors
    /// [`Error::Conflict`] when another live lease holds the key; [`Error::Backend`] when etcd
    /// could not be reached (nothing keeps running then: retry, or start without registering);
    /// [`Error::Config`] for a TTL under one second or a bad backoff.
    pub async fn register(self) -> Result<Registration> {
        if self.ttl < Duration::from_secs(1) {
            return Err(Error::Config(format!(
                "ttl {:?} is under etcd's minimum of one second",
                self.ttl
            )));
        }
        crate::backoff::check_setting("ttl", self.ttl).map_err(Error::Config)?;
        crate::backoff::check_setting("request_timeout", self.request_timeout)
            .map_err(Error::Config)?;
        let backoff = self.backoff.unwrap_or_else(|| default_backoff(self.ttl));
        backoff.validate().map_err(Error::Config)?;
        let seed = self.seed.unwrap_or_else(|| {
            RandomState::new().hash_one((self.instance.service(), self.instance.id()))
        });
        let codec = Codec::new(self.layout, self.namespace);
        let (status_tx, status_rx) = watch::channel(RegistrationStatus::Lost);
        let mut keeper = Keeper {
            backend: self.backend,
            codec,
            instance: self.instance,
            ttl: self.ttl,
            replace: self.replace,
            request_timeout: self.request_timeout,
            backoff: Backoff::new(backoff, seed),
            lease: 0,
            key: Vec::new(),
            revision: 0,
            pending_write: false,
            status: status_tx,
            // Nothing runs yet: a first registration that fails is an error, not a dead task.
            stopped: true,
        };
        let lease = keeper.register(true).await?;
        keeper.set_status(RegistrationStatus::Registered { lease });
        tracing::info!(
            service = keeper.instance.service(),
            id = keeper.instance.id(),
            key = %String::from_utf8_lossy(&keeper.key),
            lease,
            "registered"
        );
        let (commands, command_rx) = mpsc::channel(8);
        let span = tracing::info_span!(
            "etcd_registry::registration",
            service = keeper.instance.service(),
            id = keeper.instance.id()
        );
        keeper.stopped = false;
        tokio::spawn(keeper.run(command_rx).instrument(span));
        Ok(Registration {
            commands,
            status: status_rx,
        })
    }
}

/// A registered instance, kept alive in etcd until it is deregistered or dropped.
///
/// ```
/// use std::time::Duration;
/// use etcd_registry::{Discovery, Instance, MemoryBackend, Registration};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), etcd_registry::Error> {
/// let etcd = MemoryBackend::new(); // or Registration::builder(etcd_client, instance)
/// let instance = Instance::builder("user", "10.0.0.7:8080").id("user-7").build()?;
/// let registration = Registration::with_backend(etcd.clone(), instance)
///     .namespace("/services")
///     .ttl(Duration::from_secs(10))
///     .register()
///     .await?;
///
/// let users = Discovery::memory(etcd).namespace("/services").build()?.service("user").await?;
/// assert_eq!(users.snapshot().len(), 1);
///
/// registration.drain().await?;      // callers stop picking it
/// registration.deregister().await?; // revoke: gone from every cache at once
/// # Ok(()) }
/// ```
pub struct Registration {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<RegistrationStatus>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl Registration {
    /// Starts building a registration of `instance` through an etcd client the application
    /// already has (build it with `ConnectOptions::with_require_leader(true)`; see
    /// [`EtcdBackend::from_client`](crate::EtcdBackend::from_client)).
    #[cfg(feature = "etcd")]
    #[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
    pub fn builder(client: etcd_client::Client, instance: Instance) -> RegistrationBuilder {
        Self::with_backend(crate::backend::EtcdBackend::from_client(client), instance)
    }

    /// Starts building a registration of `instance` over any [`Backend`].
    pub fn with_backend(backend: impl Backend, instance: Instance) -> RegistrationBuilder {
        RegistrationBuilder {
            backend: Arc::new(backend),
            instance,
            namespace: String::new(),
            layout: KeyLayout::Native,
            ttl: Duration::from_secs(10),
            replace: false,
            backoff: None,
            request_timeout: Duration::from_secs(5),
            seed: None,
        }
    }

    /// Where the registration stands now, and every change: a `tokio::sync::watch` receiver.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Changes the instance's tags, metadata, weight or state; the service, id and address stay.
    ///
    /// # Errors
    /// [`Error::Config`] when the change touches the service, id or address; [`Error::Instance`]
    /// when the result is invalid; [`Error::Backend`] when etcd could not be written: the change
    /// is kept, and written as soon as etcd answers again.
    pub async fn update(
        &self,
        change: impl FnOnce(InstanceBuilder) -> InstanceBuilder + Send + 'static,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Update {
            change: Box::new(change),
            reply,
        })
        .await?;
        answer.await.map_err(|_| Error::Shutdown)?
    }

    /// Marks the instance [`Draining`](State::Draining): callers stop picking it for new work
    /// while it finishes what it has. Deregister when done.
    ///
    /// # Errors
    /// As for [`update`](Self::update).
    pub async fn drain(&self) -> Result<()> {
        self.update(|b| b.state(State::Draining)).await
    }

    /// Revokes the lease: the key disappears from etcd, and from every cache, at once. The
    /// keep-alive stops whatever the outcome.
    ///
    /// # Errors
    /// [`Error::Backend`] when the revoke did not reach etcd within the request timeout; the key
    /// then stays until its lease expires (one TTL).
    pub async fn deregister(self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Deregister { reply }).await?;
        answer.await.map_err(|_| Error::Shutdown)?
    }

    async fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .await
            .map_err(|_| Error::Shutdown)
    }
}

type Change = Box<dyn FnOnce(InstanceBuilder) -> InstanceBuilder + Send>;

enum Command {
    Update {
        change: Change,
        reply: oneshot::Sender<Result<()>>,
    },
    Deregister {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The task behind a [`Registration`].
struct Keeper {
    backend: Arc<dyn Backend>,
    codec: Codec,
    instance: Instance,
    ttl: Duration,
    replace: bool,
    request_timeout: Duration,
    backoff: Backoff,
    /// The current lease (0 before the first grant).
    lease: i64,
    /// The key written under it.
    key: Vec<u8>,
    /// The revision of our last write of the key; its watch starts right after it, so nothing
    /// that happens to the key in between is missed.
    revision: i64,
    /// An update that could not be written yet; written after the next successful keep-alive
    /// (or with the next re-registration, which writes the current instance anyway).
    pending_write: bool,
    status: watch::Sender<RegistrationStatus>,
    /// Set when the task ends because it was told to (deregister, or the handle dropped);
    /// dropping a keeper that was not stopped means its task died.
    stopped: bool,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if !self.stopped {
            tracing::warn!(
                lease = self.lease,
                "the registration's task ended without a deregister; the key expires within one TTL"
            );
            self.status.send_replace(RegistrationStatus::TaskEnded);
        }
    }
}

/// Why the keep-alive phase ended.
enum Exit {
    /// Deregistered or dropped: stop.
    Stop,
    /// The lease or the key is lost: register again.
    Lost,
}

impl Keeper {
    fn set_status(&self, status: RegistrationStatus) {
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }

    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        match timeout(self.request_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::new(
                BackendErrorKind::Timeout,
                format!("{what} took longer than {:?}", self.request_timeout),
            )),
        }
    }

    /// Grants a lease and writes the key under it. On the first registration a key held by a
    /// foreign lease is an error; later, it is a loss to retry.
    async fn register(&mut self, first: bool) -> Result<i64> {
        let mut previous = self.lease;
        let lease = self
            .call("lease grant", self.backend.grant(self.ttl))
            .await?;
        if previous != 0 && self.codec.layout() == KeyLayout::GoZero {
            // The key carries the lease id, so the new key is another key: writing it while the
            // old lease still holds the old one would show callers the instance twice. Drop the
            // old one first (a moment with none beats a moment with two).
            if self
                .call("lease revoke", self.backend.revoke(previous))
                .await
                .is_ok()
            {
                previous = 0;
            }
        }
        let revision = match self.write(lease, previous).await {
            Ok(revision) => revision,
            Err(error) => {
                // Do not leave the fresh lease behind; it holds nothing.
                let _ = self.call("lease revoke", self.backend.revoke(lease)).await;
                if !first {
                    tracing::warn!(%error, "re-registration refused");
                }
                return Err(error);
            }
        };
        self.key = self.codec.key(&self.instance, lease).into_bytes();
        self.lease = lease;
        self.revision = revision;
        self.pending_write = false;
        if previous != 0 {
            // The old lease may still be alive (etcd refreshes leases across a leader change):
            // revoke it so it holds nothing we no longer keep alive. In the go-zero layout its
            // key is a different one, which this removes too.
            if let Err(error) = self
                .call("lease revoke", self.backend.revoke(previous))
                .await
            {
                tracing::debug!(%error, lease = previous, "could not revoke the previous lease");
            }
        }
        self.backoff.reset();
        Ok(lease)
    }

    /// Puts the instance's key under `lease`, refusing a key held by a lease that is not ours
    /// (`previous` is our last lease) unless `replace` is set. Returns the write's revision.
    async fn write(&self, lease: i64, previous: i64) -> Result<i64> {
        let key = self.codec.key(&self.instance, lease).into_bytes();
        let value = self.codec.encode_value(&self.instance);
        let condition = if self.replace {
            PutCondition::Always
        } else {
            PutCondition::Absent
        };
        let outcome = self
            .call("put", self.backend.put(&key, &value, lease, condition))
            .await?;
        let current = match outcome {
            PutOutcome::Written { revision } => return Ok(revision),
            PutOutcome::Refused { current: None } => {
                // Deleted between the check and now: the next attempt will find it absent.
                return Err(Error::Backend(BackendError::new(
                    BackendErrorKind::Rejected,
                    "the key changed during registration",
                )));
            }
            PutOutcome::Refused {
                current: Some(current),
            } => current,
        };
        let ours = current.lease == lease || (previous != 0 && current.lease == previous);
        if !ours {
            return Err(Error::Conflict {
                key: String::from_utf8_lossy(&key).into_owned(),
                holder_lease: current.lease,
            });
        }
        // Our own key under our old lease: move it to the new lease, unless it changed since.
        match self
            .call(
                "put",
                self.backend.put(
                    &key,
                    &value,
                    lease,
                    PutCondition::ModRevision(current.mod_revision),
                ),
            )
            .await?
        {
            PutOutcome::Written { revision } => Ok(revision),
            PutOutcome::Refused { .. } => Err(Error::Backend(BackendError::new(
                BackendErrorKind::Rejected,
                "the key changed during registration",
            ))),
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            match self.keep_alive(&mut commands).await {
                Exit::Stop => break,
                Exit::Lost => {}
            }
            self.set_status(RegistrationStatus::Lost);
            tracing::info!(lease = self.lease, "registration lost; registering again");
            // Re-register with backoff, still answering commands. A command does not restart
            // the wait: each attempt has one deadline.
            loop {
                let attempt = Instant::now() + self.backoff.next_delay();
                loop {
                    tokio::select! {
                        command = commands.recv() => match command {
                            None => return self.stopped(),
                            Some(Command::Deregister { reply }) => {
                                let _ = reply.send(self.revoke().await);
                                return self.stopped();
                            }
                            Some(Command::Update { change, reply }) => {
                                // Kept for the next attempt, which writes the current instance.
                                let _ = reply.send(self.apply_change(change).map(|_| ()));
                            }
                        },
                        _ = sleep_until(attempt) => break,
                    }
                }
                match self.register(false).await {
                    Ok(lease) => {
                        tracing::info!(lease, "registered again");
                        self.set_status(RegistrationStatus::Reregistered { lease });
                        break;
                    }
                    Err(error) => tracing::debug!(%error, "re-registration failed; backing off"),
                }
            }
        }
        self.stopped();
    }

    fn stopped(&mut self) {
        self.stopped = true;
        self.set_status(RegistrationStatus::Deregistered);
        tracing::info!("registration stopped");
    }

    async fn revoke(&self) -> Result<()> {
        if self.lease == 0 {
            return Ok(());
        }
        self.call("lease revoke", self.backend.revoke(self.lease))
            .await
            .map_err(Error::Backend)
    }

    fn apply_change(&mut self, change: Change) -> Result<bool> {
        let changed = change(self.instance.to_builder()).build()?;
        if changed.service() != self.instance.service()
            || changed.id() != self.instance.id()
            || changed.addr() != self.instance.addr()
        {
            return Err(Error::Config(
                "update may change tags, metadata, weight and state, not the service, id or address"
                    .into(),
            ));
        }
        let differs = changed != self.instance;
        self.instance = changed;
        Ok(differs)
    }

    /// Keeps the lease alive and the key in place until the registration stops or is lost.
    async fn keep_alive(&mut self, commands: &mut mpsc::Receiver<Command>) -> Exit {
        let every = self.ttl / 3;
        let mut next_renewal = Instant::now() + every;
        let mut renewed = Instant::now();
        let mut own_key: Option<WatchStream> = self.watch_own_key().await;
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => return Exit::Stop,
                    Some(Command::Deregister { reply }) => {
                        let result = self.revoke().await;
                        if result.is_ok() {
                            tracing::info!(lease = self.lease, "deregistered: lease revoked");
                        }
                        let _ = reply.send(result);
                        return Exit::Stop;
                    }
                    Some(Command::Update { change, reply }) => {
                        let result = match self.apply_change(change) {
                            Ok(true) => self.rewrite().await,
                            Ok(false) => Ok(()),
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(result);
                    }
                },
                _ = sleep_until(next_renewal) => {
                    next_renewal = Instant::now() + every;
                    match self.call("keep-alive", self.backend.keep_alive(self.lease)).await {
                        Ok(ttl) if !ttl.is_zero() => {
                            renewed = Instant::now();
                            self.set_status(RegistrationStatus::Registered { lease: self.lease });
                            if self.pending_write && self.rewrite().await.is_ok() {
                                tracing::info!("wrote the update made while etcd was away");
                            }
                        }
                        Ok(_) => {
                            tracing::warn!(lease = self.lease, "etcd says the lease is gone");
                            return Exit::Lost;
                        }
                        Err(error) => {
                            if renewed.elapsed() >= self.ttl {
                                tracing::warn!(%error, lease = self.lease, "no keep-alive for a whole TTL: the lease is gone");
                                return Exit::Lost;
                            }
                            tracing::info!(%error, lease = self.lease, "keep-alive failed; retrying");
                            self.set_status(RegistrationStatus::Renewing { lease: self.lease });
                            next_renewal = Instant::now() + (every / 3).max(Duration::from_millis(100));
                        }
                    }
                    if own_key.is_none() {
                        own_key = self.watch_own_key().await;
                    }
                },
                message = next_message(&mut own_key) => match message {
                    Some(Ok(WatchMessage::Events { events, .. })) => {
                        let taken = events.iter().rfind(|e| e.kv.key == self.key);
                        match taken {
                            Some(event) if event.kind == EventKind::Delete => {
                                tracing::warn!("our key was deleted; putting it back");
                                if !self.put_back().await {
                                    return Exit::Lost;
                                }
                            }
                            Some(event) if event.kv.lease != self.lease => {
                                tracing::warn!(holder = event.kv.lease, "our key was taken over by another lease");
                                return Exit::Lost;
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(WatchMessage::Compacted { .. })) => {
                        // The history since our write is gone: follow the key from now on,
                        // then look at it as it is, so nothing between the two is missed.
                        self.revision = 0;
                        own_key = self.watch_own_key().await;
                        if !self.put_back().await {
                            return Exit::Lost;
                        }
                    }
                    Some(Ok(WatchMessage::Progress { .. })) => {}
                    Some(Err(_)) | None => own_key = None,
                },
            }
        }
    }

    /// Writes the key again under the current lease (after an update). On failure the write
    /// stays pending and is retried after the next successful keep-alive.
    async fn rewrite(&mut self) -> Result<()> {
        let value = self.codec.encode_value(&self.instance);
        let put = self
            .backend
            .put(&self.key, &value, self.lease, PutCondition::Always);
        match self.call("put", put).await {
            Ok(outcome) => {
                if let PutOutcome::Written { revision } = outcome {
                    self.revision = revision;
                }
                self.pending_write = false;
                Ok(())
            }
            Err(error) => {
                self.pending_write = true;
                Err(Error::Backend(error))
            }
        }
    }

    /// Puts a deleted key back under the current lease; false when the lease is gone too, or
    /// another lease holds the key.
    async fn put_back(&mut self) -> bool {
        let value = self.codec.encode_value(&self.instance);
        let put = self
            .backend
            .put(&self.key, &value, self.lease, PutCondition::Absent);
        match self.call("put", put).await {
            Ok(PutOutcome::Written { revision }) => {
                self.revision = revision;
                self.set_status(RegistrationStatus::Reregistered { lease: self.lease });
                true
            }
            Ok(PutOutcome::Refused { current }) => current.is_some_and(|kv| kv.lease == self.lease),
            Err(error) => {
                tracing::info!(%error, "could not put the key back");
                false
            }
        }
    }

    /// Watches our own key from just after our last write of it; `None` if the watch could not
    /// be made (retried at the next renewal).
    async fn watch_own_key(&self) -> Option<WatchStream> {
        // 0 asks for "from now": after a compaction, when there is no write of ours to follow.
        let from = match self.revision {
            0 => 0,
            revision => revision.saturating_add(1),
        };
        match self
            .call("watch", self.backend.watch(&self.key, from))
            .await
        {
            Ok(watch) => Some(watch.stream),
            Err(error) => {
                tracing::debug!(%error, "could not watch our own key");
                None
            }
        }
    }
}

async fn next_message(
    stream: &mut Option<WatchStream>,
) -> Option<Result<WatchMessage, BackendError>> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
