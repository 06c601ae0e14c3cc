//! The channel under the etcd client: requests go only to endpoints with a live connection,
//! the way gRPC's own balancers route only over READY subchannels.
//!
//! etcd-client's default is tonic's balanced channel, which connects lazily and keeps routing
//! to an endpoint whose connection fails: a member that is down, removed from the cluster, or
//! a port nobody listens on gets its share of requests, and each of them fails. Here each
//! endpoint connects on its own and is picked (round-robin) only while connected. An endpoint
//! whose connection fails waits out a backoff (100 ms doubling to 1 s) and connects again. A
//! connection is dropped, to be made again, when a request on it fails before its answer began
//! (the request was refused or the connection broke), or when a request waited on it for
//! [`SUSPECT_AFTER`] without an answer and was given up (a hung member: its TCP connection
//! stays up, and HTTP/2 pings notice only after 15 s); an endpoint that hung is then avoided
//! for 5 s, doubling per hang in a row up to 40 s, unless no other endpoint is ready. When
//! every endpoint is waiting out its
//! backoff, a request fails at once with the last connection errors (a refusal says so
//! plainly), rather than waiting for the caller's timeout.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use etcd_client::{BalancedChannelBuilder, Channel as EtcdChannel};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response, Uri};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tower::{BoxError, Service};

/// The first wait after a failed connection; doubled per failure in a row.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two connection attempts to one endpoint.
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// A request given up after waiting this long for an answer marks its connection as hung.
const SUSPECT_AFTER: Duration = Duration::from_secs(1);
/// How long an endpoint that hung is avoided, doubled per hang in a row up to 8 times this.
const AVOID_HUNG_FIRST: Duration = Duration::from_secs(5);

/// Builds the [`Failover`] channel for `etcd_client::Client::connect_with_balanced_channel`.
pub(super) struct FailoverBuilder;

impl BalancedChannelBuilder for FailoverBuilder {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(EtcdChannel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let (updates, changes) = mpsc::channel(buffer_size.max(1));
        let failover = Failover {
            changes,
            endpoints: Vec::new(),
            next: 0,
            picked: None,
        };
        // etcd-client clones its channel into every client: the buffer makes one worker own
        // the endpoints. It spawns that worker, so this must run in a tokio runtime (it does:
        // etcd-client calls it from `connect`).
        let shared = tower::buffer::Buffer::new(failover, buffer_size.max(1));
        let channel = tower::util::BoxCloneSyncService::new(shared);
        Ok((EtcdChannel::Custom(channel), updates))
    }
}

/// Round-robin over the endpoints that are connected.
struct Failover {
    changes: mpsc::Receiver<Change<Uri, Endpoint>>,
    endpoints: Vec<Slot>,
    /// Where the round-robin looks first next time.
    next: usize,
    /// What `poll_ready` chose for the next `call`: an endpoint, or none (fail at once).
    picked: Option<Pick>,
}

enum Pick {
    Endpoint(usize),
    Unreachable,
}

/// One endpoint and its connection.
struct Slot {
    uri: Uri,
    endpoint: Endpoint,
    state: State,
    /// Connection failures in a row.
    failures: u32,
    /// What the last failed connection or request said.
    last_error: Option<Arc<tonic::transport::Error>>,
    /// Requests given up unanswered on this endpoint in a row (reset by an answer).
    hangs: u32,
    /// Until then the endpoint hung: it is picked only when no other endpoint is ready.
    avoid_until: Option<Instant>,
}

enum State {
    Idle,
    Connecting(BoxFuture<'static, Result<Channel, tonic::transport::Error>>),
    /// Connected, with what requests on the connection found out about it.
    Connected(Channel, Arc<Health>),
    /// Waiting before connecting again.
    Down(Pin<Box<Sleep>>),
}

/// Set by requests, read by the endpoint before it is picked again.
#[derive(Default)]
struct Health {
    /// A request failed on the connection, or was given up unanswered after [`SUSPECT_AFTER`].
    broken: AtomicBool,
    /// A request was given up unanswered after [`SUSPECT_AFTER`].
    hung: AtomicBool,
    /// A request was answered.
    answered: AtomicBool,
    /// The error of the request that failed, if one did.
    error: std::sync::Mutex<Option<Arc<tonic::transport::Error>>>,
}

impl Health {
    fn fail(&self, error: Option<Arc<tonic::transport::Error>>) {
        if let Some(error) = error {
            if let Ok(mut slot) = self.error.lock() {
                *slot = Some(error);
            }
        }
        self.broken.store(true, Ordering::Release);
    }
}

/// Marks the connection hung when dropped unanswered after [`SUSPECT_AFTER`].
struct Waiting {
    health: Arc<Health>,
    since: Instant,
    answered: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.answered && self.since.elapsed() >= SUSPECT_AFTER {
            self.health.hung.store(true, Ordering::Release);
            self.health.fail(None);
        }
    }
}

impl Slot {
    fn new(uri: Uri, endpoint: Endpoint) -> Self {
        Self {
            uri,
            endpoint,
            state: State::Idle,
            failures: 0,
            last_error: None,
            hangs: 0,
            avoid_until: None,
        }
    }

    /// Whether the endpoint hung lately: connecting to it may well succeed (the kernel
    /// accepts for a stopped process), answering is what it does not do.
    fn avoided(&self, now: Instant) -> bool {
        self.avoid_until.is_some_and(|until| now < until)
    }

    /// Moves the connection along; true when a request can be sent on it now.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            match &mut self.state {
                State::Idle => {
                    let endpoint = self.endpoint.clone();
                    self.state =
                        State::Connecting(Box::pin(async move { endpoint.connect().await }));
                }
                State::Connecting(connecting) => match connecting.as_mut().poll(cx) {
                    Poll::Pending => return false,
                    Poll::Ready(Ok(channel)) => {
                        tracing::debug!(endpoint = %self.uri, "connected to etcd");
                        self.failures = 0;
                        self.last_error = None;
                        self.state = State::Connected(channel, Arc::default());
                    }
                    Poll::Ready(Err(error)) => {
                        tracing::debug!(endpoint = %self.uri, %error, "connecting to etcd failed");
                        self.last_error = Some(Arc::new(error));
                        self.back_off();
                    }
                },
                State::Connected(channel, health) => {
                    if health.answered.swap(false, Ordering::AcqRel) {
                        self.hangs = 0;
                        self.avoid_until = None;
                    }
                    if health.hung.swap(false, Ordering::AcqRel) {
                        self.hangs = self.hangs.saturating_add(1);
                        let doublings = (self.hangs - 1).min(3);
                        let avoid = AVOID_HUNG_FIRST.saturating_mul(1 << doublings);
                        self.avoid_until = Some(Instant::now() + avoid);
                    }
                    if health.broken.load(Ordering::Acquire) {
                        tracing::debug!(endpoint = %self.uri, "connection to etcd broke or hangs");
                        if let Some(error) = health.error.lock().ok().and_then(|mut e| e.take()) {
                            self.last_error = Some(error);
                        }
                        self.back_off();
                        continue;
                    }
                    match channel.poll_ready(cx) {
                        Poll::Ready(Ok(())) => return true,
                        Poll::Pending => return false,
                        Poll::Ready(Err(error)) => {
                            self.last_error = Some(Arc::new(error));
                            self.back_off();
                        }
                    }
                }
                State::Down(sleep) => match sleep.as_mut().poll(cx) {
                    Poll::Pending => return false,
                    Poll::Ready(()) => self.state = State::Idle,
                },
            }
        }
    }

    fn back_off(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let doublings = self.failures.saturating_sub(1).min(16);
        let wait = RECONNECT_FIRST
            .saturating_mul(1 << doublings)
            .min(RECONNECT_MAX);
        self.state = State::Down(Box::pin(tokio::time::sleep(wait)));
    }

    fn waiting_out_backoff(&self) -> bool {
        matches!(self.state, State::Down(_))
    }
}

impl Failover {
    /// Takes in the endpoints etcd-client adds and removes.
    fn apply_changes(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(change)) = self.changes.poll_recv(cx) {
            match change {
                Change::Insert(uri, endpoint) => {
                    self.endpoints.retain(|slot| slot.uri != uri);
                    self.endpoints.push(Slot::new(uri, endpoint));
                }
                Change::Remove(uri) => self.endpoints.retain(|slot| slot.uri != uri),
            }
        }
    }

    fn unreachable(&self) -> Unreachable {
        Unreachable {
            errors: self
                .endpoints
                .iter()
                .filter_map(|slot| Some((slot.uri.clone(), slot.last_error.clone()?)))
                .collect(),
        }
    }
}

impl Service<Request<Body>> for Failover {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.apply_changes(cx);
        // Every endpoint is driven, so that all connect at once and a down one never holds up
        // the others.
        let ready: Vec<bool> = self
            .endpoints
            .iter_mut()
            .map(|s| s.poll_ready(cx))
            .collect();
        let count = ready.len();
        let now = Instant::now();
        let order = || (0..count).map(|k| (self.next + k) % count);
        let fresh = order().find(|&i| ready[i] && !self.endpoints[i].avoided(now));
        if let Some(i) = fresh.or_else(|| order().find(|&i| ready[i])) {
            self.next = (i + 1) % count;
            self.picked = Some(Pick::Endpoint(i));
            return Poll::Ready(Ok(()));
        }
        // Connecting, or connected and busy: worth waiting for. All in backoff: say so now.
        if !self.endpoints.is_empty() && self.endpoints.iter().all(Slot::waiting_out_backoff) {
            self.picked = Some(Pick::Unreachable);
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let slot = match self.picked.take() {
            Some(Pick::Endpoint(i)) => self.endpoints.get_mut(i),
            Some(Pick::Unreachable) | None => None,
        };
        let Some(Slot {
            state: State::Connected(channel, health),
            ..
        }) = slot
        else {
            let error: BoxError = Box::new(self.unreachable());
            return Box::pin(std::future::ready(Err(error)));
        };
        let mut waiting = Waiting {
            health: Arc::clone(health),
            since: Instant::now(),
            answered: false,
        };
        let response = channel.call(request);
        Box::pin(async move {
            let result = response.await;
            waiting.answered = true;
            if result.is_ok() {
                waiting.health.answered.store(true, Ordering::Release);
            }
            // A gRPC error is a response; an error here is the connection's.
            result.map_err(|error| {
                let error = Arc::new(error);
                waiting.health.fail(Some(Arc::clone(&error)));
                BoxError::from(Failed(error))
            })
        })
    }
}

/// No endpoint could be connected to: each endpoint's last error.
#[derive(Debug)]
struct Unreachable {
    errors: Vec<(Uri, Arc<tonic::transport::Error>)>,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no etcd endpoint could be connected to")?;
        for (uri, error) in &self.errors {
            write!(f, "; {uri}: {}", super::error::chain(error.as_ref()))?;
        }
        Ok(())
    }
}

impl StdError for Unreachable {
    /// An endpoint's error that shows a TLS problem, else the first: walking the sources finds
    /// what it says (a TLS verdict, a refused connection).
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        let errors = || {
            self.errors
                .iter()
                .map(|(_, e)| e.as_ref() as &(dyn StdError + 'static))
        };
        errors()
            .find(|error| super::error::problem_of(*error).is_some())
            .or_else(|| errors().next())
    }
}

/// A request's connection error, shared with the endpoint that records it.
#[derive(Debug)]
struct Failed(Arc<tonic::transport::Error>);

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for Failed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.0.as_ref())
    }
}
