//! An HTTP client through the registry: each request goes to one instance of `hello`, balanced
//! by p2c, with instances that keep failing ejected.
//!
//! ```sh
//! cargo run --example http_client --features tower
//! ```
//!
//! Self-contained: it starts two HTTP servers on loopback ports and registers them in the
//! in-process etcd model. Against a real etcd, build the discovery with
//! `Discovery::etcd(EtcdBackend::connect(["http://127.0.0.1:2379"], EtcdOptions::default()).await?)`
//! and let the servers register themselves (see the `provider` example).

use std::convert::Infallible;

use bytes::Bytes;
use etcd_registry::tower::Balanced;
use etcd_registry::{Codec, Discovery, Instance, KeyLayout, MemoryBackend};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{Service, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let etcd = MemoryBackend::new();
    for id in ["h1", "h2"] {
        let addr = serve(id).await?;
        let instance = Instance::builder("hello", addr).id(id).build()?;
        let codec = Codec::new(KeyLayout::Native, "/services");
        etcd.put(codec.key(&instance, 0), codec.encode_value(&instance));
    }

    // The client: one hyper client, each request's URI pointed at the picked instance.
    let discovery = Discovery::memory(etcd).namespace("/services").build()?;
    let hello = discovery.service("hello").await?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut balanced = Balanced::new(&hello, move |instance| {
        // An address that makes no URI leaves the request's own (relative) URI, which the
        // client refuses: an error of that instance, counted towards its ejection.
        let base = instance.uri().ok();
        client
            .clone()
            .map_request(move |mut request: http::Request<Empty<Bytes>>| {
                if let Some(base) = &base {
                    let mut parts = base.clone().into_parts();
                    parts.path_and_query = request.uri().path_and_query().cloned();
                    *request.uri_mut() = http::Uri::from_parts(parts).unwrap_or_default();
                }
                request
            })
    });
    for _ in 0..4 {
        let request = http::Request::get("/greet").body(Empty::new())?;
        let response = balanced.ready().await?.call(request).await?;
        let body = response.into_body().collect().await?.to_bytes();
        println!("{}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// An HTTP/1 server on a loopback port that answers `hello from ID`; its address.
async fn serve(id: &'static str) -> Result<String, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = hyper::service::service_fn(move |_request| async move {
                let body = Full::new(Bytes::from(format!("hello from {id}")));
                Ok::<_, Infallible>(http::Response::new(body))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), answer);
            tokio::spawn(connection);
        }
    });
    Ok(addr)
}
