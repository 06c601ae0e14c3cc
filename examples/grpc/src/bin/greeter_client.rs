//! A Greeter client that finds the servers in etcd and says hello through a balanced channel.
//!
//! Environment: `GREETER_ETCD` (etcd endpoints, comma-separated; default
//! `http://127.0.0.1:2379`), `GREETER_CALLS` (how many calls; default 10), `GREETER_EVERY_MS`
//! (pause between calls; default 500), `GREETER_NAME` (who to greet; default `world`).
//!
//! Prints one line per call (the reply, or the error) and a summary. Each call may take
//! [`CALL_TIMEOUT`]. Exit code 0 when every call succeeded; 1 when one failed, or when etcd
//! could not list the servers within 10 s.

use std::process::ExitCode;
use std::time::Duration;

use etcd_registry::{Discovery, EtcdBackend, EtcdOptions};
use etcd_registry_grpc_example::pb::HelloRequest;
use etcd_registry_grpc_example::pb::greeter_client::GreeterClient;
use etcd_registry_grpc_example::print_line;
use etcd_registry_grpc_example::{BoxError, NAMESPACE, SERVICE, env_or, etcd_endpoints};

/// The longest one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> ExitCode {
    match call().await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("greeter_client: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Says hello `GREETER_CALLS` times; returns how many calls failed.
async fn call() -> Result<u32, BoxError> {
    let calls: u32 = env_or("GREETER_CALLS", 10)?;
    let every = Duration::from_millis(env_or("GREETER_EVERY_MS", 500)?);
    let name = env_or("GREETER_NAME", "world".to_owned())?;

    let etcd = EtcdBackend::connect(etcd_endpoints(), EtcdOptions::new()).await?;
    let discovery = Discovery::with_backend(etcd).namespace(NAMESPACE).build()?;
    let greeters = discovery.service(SERVICE).await?; // waits for the first list, bounded
    let mut client = GreeterClient::new(etcd_registry::tonic::channel(&greeters));

    let mut failed = 0;
    for n in 1..=calls {
        let request = HelloRequest { name: name.clone() };
        let (ok, line) = match tokio::time::timeout(CALL_TIMEOUT, client.say_hello(request)).await {
            Ok(Ok(reply)) => (true, reply.into_inner().message),
            Ok(Err(status)) => (false, format!("failed: {status}")),
            Err(_) => (false, format!("failed: no answer within {CALL_TIMEOUT:?}")),
        };
        failed += u32::from(!ok);
        print_line(&format!("{n}: {line}"))?;
        tokio::time::sleep(every).await;
    }
    print_line(&format!("{failed} of {calls} calls failed"))?;
    Ok(failed)
}
