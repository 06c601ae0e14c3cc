//! The tower integration over the in-memory etcd model, under paused tokio time, with
//! in-process inner services whose behaviour each test sets per instance: the typed error when
//! there is nothing to pick, outcome classification (HTTP status, gRPC status in headers and in
//! trailers, transport errors), ejection and probing through the service, the retry of a failed
//! connection, services dropped with their instance (never while frozen), and the `Discover`
//! stream.

#[path = "../support/mod.rs"]
mod support;

mod discover;
mod errors;
mod lifecycle;
mod outcomes;
mod retry;
mod routing;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use etcd_registry::tower::{
    Balanced, BoxError, Classifier, Discover, NoInstance, NoInstanceReason, Route, RoutingKey,
};
use etcd_registry::{
    Discovery, Instance, InstanceHealth, MemoryBackend, Selector, ServiceCache, State,
};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use support::*;
use tower::discover::Change;
use tower::{Service, ServiceExt};

const LONG: Duration = Duration::from_secs(120);

/// What an instance's inner service does with a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    /// 200, plain HTTP.
    Ok,
    /// 503, plain HTTP.
    Http503,
    /// A gRPC response whose status (this code) comes in the trailers.
    GrpcTrailers(i32),
    /// A trailers-only gRPC response with this code.
    GrpcHeaders(i32),
    /// `Err` from the call that is not about the connection (a timeout, say).
    Transport,
    /// `Err` from the call with an I/O error inside: the connection broke.
    Broken,
    /// A gRPC response that ends without any status.
    GrpcNoStatus,
    /// A gRPC response whose body fails.
    BodyError,
    /// `Err` from `poll_ready`: the request is never sent.
    NotReady,
}

type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The instances' behaviours and what they saw, shared by every inner service of a test.
#[derive(Default)]
struct Fleet {
    behaviour: Mutex<HashMap<String, Behaviour>>,
    /// Requests that reached each instance's `call`.
    served: Mutex<BTreeMap<String, usize>>,
    /// `poll_ready` calls of each instance's service.
    readied: Mutex<BTreeMap<String, usize>>,
    /// Inner services alive (made and not dropped), by instance.
    alive: Mutex<HashMap<String, Arc<()>>>,
    made: AtomicUsize,
}

impl Fleet {
    fn set(&self, id: &str, behaviour: Behaviour) {
        self.behaviour
            .lock()
            .expect("lock")
            .insert(id.to_owned(), behaviour);
    }

    fn behaviour(&self, id: &str) -> Behaviour {
        self.behaviour
            .lock()
            .expect("lock")
            .get(id)
            .copied()
            .unwrap_or(Behaviour::Ok)
    }

    fn served(&self, id: &str) -> usize {
        self.served
            .lock()
            .expect("lock")
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    fn readied(&self, id: &str) -> usize {
        self.readied
            .lock()
            .expect("lock")
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// How many inner services of `id` are alive (the pool's and in-flight clones).
    fn alive(&self, id: &str) -> usize {
        self.alive
            .lock()
            .expect("lock")
            .get(id)
            .map_or(0, |token| Arc::strong_count(token) - 1)
    }

    /// The inner service of `instance`.
    fn make(self: &Arc<Self>, instance: &Instance) -> Inner {
        self.made.fetch_add(1, Ordering::Relaxed);
        let token = Arc::clone(
            self.alive
                .lock()
                .expect("lock")
                .entry(instance.id().to_owned())
                .or_default(),
        );
        Inner {
            id: instance.id().to_owned(),
            fleet: Arc::clone(self),
            _alive: token,
        }
    }
}

#[derive(Clone)]
struct Inner {
    id: String,
    fleet: Arc<Fleet>,
    _alive: Arc<()>,
}

impl Service<http::Request<()>> for Inner {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        *self
            .fleet
            .readied
            .lock()
            .expect("lock")
            .entry(self.id.clone())
            .or_default() += 1;
        match self.fleet.behaviour(&self.id) {
            Behaviour::NotReady => std::task::Poll::Ready(Err("connection refused".into())),
            _ => std::task::Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, _request: http::Request<()>) -> Self::Future {
        *self
            .fleet
            .served
            .lock()
            .expect("lock")
            .entry(self.id.clone())
            .or_default() += 1;
        let behaviour = self.fleet.behaviour(&self.id);
        let id = self.id.clone();
        Box::pin(async move {
            let body = Full::new(Bytes::from(id))
                .map_err(|never: Infallible| -> BoxError { match never {} });
            let grpc = || http::Response::builder().header("content-type", "application/grpc");
            let response = match behaviour {
                Behaviour::Ok | Behaviour::NotReady => http::Response::new(body.boxed()),
                Behaviour::Http503 => http::Response::builder()
                    .status(503)
                    .body(body.boxed())
                    .expect("valid"),
                Behaviour::GrpcHeaders(code) => grpc()
                    .header("grpc-status", code.to_string())
                    .body(body.boxed())
                    .expect("valid"),
                Behaviour::GrpcTrailers(code) => {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert(
                        "grpc-status",
                        code.to_string().parse().expect("a valid header value"),
                    );
                    let body = body.with_trailers(async move { Some(Ok(trailers)) });
                    grpc().body(body.boxed()).expect("valid")
                }
                Behaviour::Transport => return Err("deadline has elapsed".into()),
                Behaviour::Broken => {
                    let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
                    return Err(BoxError::from(reset));
                }
                Behaviour::GrpcNoStatus => grpc().body(body.boxed()).expect("valid"),
                Behaviour::BodyError => {
                    let frames = futures_util::stream::iter([
                        Ok(http_body::Frame::data(Bytes::from_static(b"partial"))),
                        Err::<http_body::Frame<Bytes>, BoxError>("stream reset".into()),
                    ]);
                    grpc()
                        .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
                        .expect("valid")
                }
            };
            Ok(response)
        })
    }
}

fn put(etcd: &MemoryBackend, instance: &Instance) {
    let codec = codec();
    etcd.put(codec.key(instance, 0), codec.encode_value(instance));
}

fn spec(id: &str) -> etcd_registry::InstanceBuilder {
    Instance::builder("user", format!("{id}:80")).id(id)
}

/// A balanced service over `users` by `route`, its inner services made by `fleet`.
fn routed(users: &ServiceCache, fleet: &Arc<Fleet>, route: Route) -> Balanced<Inner> {
    let fleet = Arc::clone(fleet);
    Balanced::builder(users)
        .route(route)
        .service(move |instance| fleet.make(instance))
}

fn balanced(users: &ServiceCache, fleet: &Arc<Fleet>) -> Balanced<Inner> {
    let fleet = Arc::clone(fleet);
    Balanced::new(users, move |instance| fleet.make(instance))
}

/// Sends one request; the instance that answered (the body, read to the end), or the error.
async fn send(
    service: &mut Balanced<Inner>,
    request: http::Request<()>,
) -> Result<String, BoxError> {
    let response = service.ready().await?.call(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8(body.to_vec()).expect("utf-8"))
}

async fn get(service: &mut Balanced<Inner>) -> Result<String, BoxError> {
    send(service, http::Request::new(())).await
}

fn health(users: &ServiceCache, id: &str) -> InstanceHealth {
    users
        .health()
        .into_iter()
        .find(|h| h.instance.id() == id)
        .expect("the instance is in the snapshot")
}

fn no_instance(error: &BoxError) -> NoInstanceReason {
    error
        .downcast_ref::<NoInstance>()
        .unwrap_or_else(|| panic!("not a NoInstance: {error}"))
        .reason()
}
