//! A Greeter server that registers itself in etcd once it listens.
//!
//! Environment: `GREETER_ETCD` (etcd endpoints, comma-separated; default
//! `http://127.0.0.1:2379`), `GREETER_ID` (instance id; default `greeter-PID`),
//! `GREETER_ADDR` (where to listen; default `127.0.0.1:0`, a free loopback port),
//! `GREETER_TTL` (lease TTL in whole seconds; default 10).
//!
//! Prints `listening ADDR id ID` on stdout (flushed) once it serves and is registered. On
//! SIGTERM or SIGINT it marks itself draining,
//! gives callers [`DRAIN_GRACE`] to stop picking it, revokes its lease, finishes the requests
//! in flight and exits 0. Exit code 1: it could not listen or register, or the lease could not
//! be revoked (the key then expires within one TTL).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use etcd_registry::{EtcdBackend, EtcdOptions, Instance, Registration};
use etcd_registry_grpc_example::pb::greeter_server::{Greeter, GreeterServer};
use etcd_registry_grpc_example::pb::{HelloReply, HelloRequest};
use etcd_registry_grpc_example::{BoxError, NAMESPACE, SERVICE, env_or, etcd_endpoints};
use etcd_registry_grpc_example::{print_line, stop_signal};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// How long callers get to see the instance draining before its lease is revoked.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Answers `hello NAME from ID`.
struct Hello {
    id: String,
}

#[tonic::async_trait]
impl Greeter for Hello {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let message = format!("hello {} from {}", request.into_inner().name, self.id);
        Ok(Response::new(HelloReply { message }))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("greeter_server: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> Result<(), BoxError> {
    let id = env_or("GREETER_ID", format!("greeter-{}", std::process::id()))?;
    let addr = env_or("GREETER_ADDR", SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let ttl = Duration::from_secs(env_or("GREETER_TTL", 10)?);
    let stop = stop_signal()?; // first, so that a stop during start-up is not lost

    // Listen first: callers may find the instance as soon as it is registered.
    let incoming = TcpIncoming::bind(addr)?;
    let addr = incoming.local_addr()?;
    let greeter = GreeterServer::new(Hello { id: id.clone() });
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(greeter)
            .serve_with_incoming_shutdown(incoming, async { stopped.await.unwrap_or(()) }),
    );

    let etcd = EtcdBackend::connect(etcd_endpoints(), EtcdOptions::new()).await?;
    let instance = Instance::builder(SERVICE, addr.to_string())
        .id(id.as_str())
        .build()?;
    let registration = Registration::with_backend(etcd, instance)
        .namespace(NAMESPACE)
        .ttl(ttl)
        .register()
        .await?;
    print_line(&format!("listening {addr} id {id}"))?;

    eprintln!(
        "greeter_server {addr}: {}: draining, then deregistering",
        stop.await
    );
    match registration.drain().await {
        Ok(()) => tokio::time::sleep(DRAIN_GRACE).await, // callers stop picking it
        Err(error) => eprintln!("greeter_server {addr}: could not mark draining: {error}"),
    }
    let deregistered = registration.deregister().await;
    let _ = shutdown.send(()); // the server is still running: it holds the receiver
    server.await??; // finishes the requests in flight
    Ok(deregistered?)
}
