//! [`EtcdOptions`]: how to connect to etcd (timeouts, keep-alive, leader, user, TLS).

use std::fmt;
use std::time::Duration;

use etcd_client::ConnectOptions;

#[cfg(feature = "tls")]
use super::tls::TlsOptions;

/// How to connect to etcd. Every setting has a default suited to production and accepted by
/// etcd's own defaults.
///
/// There is no request timeout here: whoever makes a request bounds it, so one setting has one
/// meaning. A cache bounds its lists and watch creations by
/// [`DiscoveryBuilder::request_timeout`](crate::DiscoveryBuilder::request_timeout), a
/// registration its calls by
/// [`RegistrationBuilder::request_timeout`](crate::RegistrationBuilder::request_timeout).
///
/// ```
/// use std::time::Duration;
/// use etcd_registry::backend::EtcdOptions;
///
/// let options = EtcdOptions::new()
///     .connect_timeout(Duration::from_secs(2))
///     .keep_alive(Duration::from_secs(10), Duration::from_secs(5))
///     .user("discovery", "secret");
/// # let _ = options;
/// ```
#[derive(Clone)]
pub struct EtcdOptions {
    connect_timeout: Duration,
    keep_alive_interval: Duration,
    keep_alive_timeout: Duration,
    require_leader: bool,
    user: Option<(String, String)>,
    permission_check_interval: Duration,
    #[cfg(feature = "tls")]
    tls: Option<TlsOptions>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: DEFAULT_KEEP_ALIVE_INTERVAL,
            keep_alive_timeout: DEFAULT_KEEP_ALIVE_TIMEOUT,
            require_leader: true,
            user: None,
            permission_check_interval: DEFAULT_PERMISSION_CHECK_INTERVAL,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("EtcdOptions");
        f.field("connect_timeout", &self.connect_timeout)
            .field("keep_alive_interval", &self.keep_alive_interval)
            .field("keep_alive_timeout", &self.keep_alive_timeout)
            .field("require_leader", &self.require_leader)
            .field("user", &self.user.as_ref().map(|(name, _)| name));
        #[cfg(feature = "tls")]
        f.field("tls", &self.tls);
        f.finish()
    }
}

impl EtcdOptions {
    /// The defaults: connect timeout 5 s, HTTP/2 keep-alive every 10 s with a 5 s timeout on
    /// connections with an open stream, leader required, no authentication.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bound on establishing a connection to one endpoint (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive: a ping every `interval` while a stream (a watch, a lease keep-alive)
    /// is open, the connection dropped when one is not answered within `timeout` (defaults 10 s
    /// and 5 s). This notices a hung member (or a network path that went dark) even while
    /// nothing else is sent. A member cut off from the rest of its cluster still answers pings:
    /// [`require_leader`](Self::require_leader) is what notices that.
    ///
    /// **etcd refuses pings more often than its `--grpc-keepalive-min-time` (default 5 s)**: it
    /// answers a client that pings faster with a GOAWAY (`too_many_pings`), which breaks every
    /// watch on the connection about every 15 s. Keep `interval` at or above that setting of your
    /// etcd; the default leaves room for timer jitter. A hung etcd is caught sooner by the
    /// cache's stall bound ([`DiscoveryBuilder::stall_timeout`](crate::DiscoveryBuilder::stall_timeout),
    /// 10 s by default) than by a shorter ping interval.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive_interval = interval;
        self.keep_alive_timeout = timeout;
        self
    }

    /// Whether requests and watches are refused by a member that has no leader (default true):
    /// such a member cannot answer authoritatively, so the cache freezes with
    /// [`NoLeader`](crate::FreezeCause::NoLeader) and tries another member.
    pub fn require_leader(mut self, require: bool) -> Self {
        self.require_leader = require;
        self
    }

    /// Authenticates as `name` with `password` (etcd's `--auth-token`, simple or JWT, is
    /// refreshed when it expires).
    ///
    /// The credentials are checked by [`EtcdBackend::connect`](super::EtcdBackend::connect)
    /// when etcd answers then, and otherwise on first use, so a process can start while etcd is
    /// down. Refused credentials are [`Error::Auth`](crate::Error::Auth) from `connect`, and a
    /// cache frozen with [`FreezeCause::Auth`](crate::FreezeCause::Auth) afterwards. The roles a
    /// caller and a provider need are in the [module documentation](super#authentication).
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// With a [`user`](Self::user): how often an open watch reads one key of its prefix to
    /// check that the user may still read it (default 10 s). etcd checks a watch's permission
    /// only when the watch is created and keeps it open after the user's role loses the
    /// permission; this check is what freezes the cache with
    /// [`FreezeCause::Auth`](crate::FreezeCause::Auth) then. Each check is one keys-only range
    /// read of at most one key, per cache. Values under 100 ms are taken as 100 ms.
    pub fn permission_check_interval(mut self, interval: Duration) -> Self {
        self.permission_check_interval = interval.max(Duration::from_millis(100));
        self
    }

    pub(super) fn permission_check_interval_value(&self) -> Duration {
        self.permission_check_interval
    }

    /// Connects with TLS (mutual TLS when `tls` holds a client identity); the endpoints must
    /// then be `https://` ones. Off by default.
    ///
    /// ```no_run
    /// use etcd_registry::backend::{EtcdOptions, TlsOptions};
    ///
    /// # fn run() -> Result<(), etcd_registry::Error> {
    /// let tls = TlsOptions::from_ca_file("/etc/etcd/ca.pem")?
    ///     .identity_files("/etc/etcd/client.pem", "/etc/etcd/client-key.pem")?;
    /// let options = EtcdOptions::new().tls(tls);
    /// # let _ = options;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Whether TLS is configured.
    pub(super) fn uses_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// The TLS settings, if any.
    #[cfg(feature = "tls")]
    pub(super) fn tls_options(&self) -> Option<&TlsOptions> {
        self.tls.as_ref()
    }

    /// The user to authenticate as, if any.
    pub(super) fn credentials(&self) -> Option<&(String, String)> {
        self.user.as_ref()
    }

    pub(super) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    /// etcd-client's options. The user is not among them: [`EtcdBackend`](super::EtcdBackend)
    /// authenticates itself, so that connecting does not need etcd to answer.
    pub(super) fn connect_options(&self) -> ConnectOptions {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.keep_alive_interval, self.keep_alive_timeout)
            // A connection with no open stream has no watch to watch over, and etcd does not
            // accept pings on one (its enforcement policy does not permit them without streams).
            .with_keep_alive_while_idle(false)
            .with_require_leader(self.require_leader)
            // Refreshes an expired token once credentials are set (by `update_user`).
            .with_auto_token_refresh(self.user.is_some());
        #[cfg(feature = "tls")]
        let options = match &self.tls {
            Some(tls) => options.with_tls(tls.to_client_config()),
            None => options,
        };
        options
    }
}

/// How often a watch of an authenticating backend checks its read permission.
pub(super) const DEFAULT_PERMISSION_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive ping interval: above etcd's default `--grpc-keepalive-min-time` (5 s).
pub(super) const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long an unanswered ping may take before the connection is dropped.
pub(super) const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
