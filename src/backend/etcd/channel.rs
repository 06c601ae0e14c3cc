//! The channel under the etcd client: requests go only to endpoints with a live connection,
//! the way gRPC's own balancers route only over READY subchannels.
//!
//! etcd-client's default is tonic's balanced channel, which connects lazily and keeps routing
//! to an endpoint whose connection fails: a member that is down, removed from the cluster, or
//! a port nobody listens on gets its share of requests, and each of them fails. Here each
//! endpoint connects on its own and is picked (round-robin) only while connected. An endpoint
//! whose connection fails waits out a backoff (100 ms doubling to 1 s) and connects again; a
//! connection that breaks under a request is dropped at once. When no endpoint is connected and
//! none is connecting, a request fails at once with the last connection errors (a refusal says
//! so plainly), rather than waiting for the caller's timeout.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// What the last failed connection said.
    last_error: Option<Arc<tonic::transport::Error>>,
}

enum State {
    Idle,
    Connecting(BoxFuture<'static, Result<Channel, tonic::transport::Error>>),
    /// Connected; `broken` is set by a request that failed on the connection.
    Connected(Channel, Arc<AtomicBool>),
    /// Waiting before connecting again.
    Down(Pin<Box<Sleep>>),
}

impl Slot {
    fn new(uri: Uri, endpoint: Endpoint) -> Self {
        Self {
            uri,
            endpoint,
            state: State::Idle,
            failures: 0,
            last_error: None,
        }
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
                        self.state = State::Connected(channel, Arc::new(AtomicBool::new(false)));
                    }
                    Poll::Ready(Err(error)) => {
                        tracing::debug!(endpoint = %self.uri, %error, "connecting to etcd failed");
                        self.last_error = Some(Arc::new(error));
                        self.back_off();
                    }
                },
                State::Connected(channel, broken) => {
                    if broken.load(Ordering::Acquire) {
                        tracing::debug!(endpoint = %self.uri, "connection to etcd broke");
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

    fn connecting(&self) -> bool {
        matches!(self.state, State::Idle | State::Connecting(_))
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
        if let Some(i) = (0..count)
            .map(|k| (self.next + k) % count)
            .find(|&i| ready[i])
        {
            self.next = (i + 1) % count;
            self.picked = Some(Pick::Endpoint(i));
            return Poll::Ready(Ok(()));
        }
        if !self.endpoints.is_empty() && !self.endpoints.iter().any(Slot::connecting) {
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
            state: State::Connected(channel, broken),
            ..
        }) = slot
        else {
            let error: BoxError = Box::new(self.unreachable());
            return Box::pin(std::future::ready(Err(error)));
        };
        let broken = Arc::clone(broken);
        let response = channel.call(request);
        Box::pin(async move {
            // A gRPC error is a response; an error here is the connection's.
            response.await.map_err(|error| {
                broken.store(true, Ordering::Release);
                BoxError::from(error)
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
    /// The first endpoint's error, so that what it says (a refused connection, a TLS verdict)
    /// can be found by walking the sources.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.errors
            .first()
            .map(|(_, error)| error.as_ref() as &(dyn StdError + 'static))
    }
}
