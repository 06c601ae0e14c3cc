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

use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::Backend;
use crate::backoff::{Backoff, BackoffConfig};
use crate::codec::{Codec, KeyLayout};
use crate::error::{Error, Result};
use crate::instance::{Instance, InstanceBuilder, State};

mod keeper;

use keeper::{Command, Keeper};

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
        Keeper::start(
            self.backend,
            codec,
            self.instance,
            self.ttl,
            self.replace,
            self.request_timeout,
            Backoff::new(backoff, seed),
        )
        .await
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
