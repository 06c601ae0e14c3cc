//! `etcd grpc-proxy` in front of a test cluster.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::process::{clean_env, free_port, port_accepts, tail, unique};
use super::{EtcdCluster, POLL, START_TIMEOUT, url};

/// `etcd grpc-proxy` in front of a cluster, on its own loopback port (plain http, also in front
/// of a TLS cluster). It answers every request but never a watch progress request. Ended by its
/// PID when dropped.
pub struct GrpcProxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl GrpcProxy {
    /// `http://127.0.0.1:<port>`, for a client.
    pub fn endpoint(&self) -> String {
        url(self.port)
    }

    /// The proxy's log, for a failing test.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EtcdCluster {
    /// Starts `etcd grpc-proxy start` in front of every member; waits until it accepts.
    pub fn grpc_proxy(&self) -> GrpcProxy {
        let port = free_port();
        let log = self.root.join(format!("{}.log", unique("grpc-proxy")));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open grpc-proxy log");
        let err = out.try_clone().expect("clone log handle");
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| {
                e.split_once("://")
                    .map_or(e.as_str(), |(_, a)| a)
                    .to_owned()
            })
            .collect();
        // Towards the members the proxy is a client: it presents the harness's TLS credentials
        // (a request's own auth token is passed through), with a client certificate without a
        // CN, the only kind it accepts.
        let mut creds = self.credentials().without_user();
        if let Some(tls) = self.security.tls.as_ref().filter(|t| t.client_cert_auth) {
            creds.client = Some(tls.pki.anonymous_client());
        }
        let mut cmd = Command::new(&self.bins.etcd);
        clean_env(&mut cmd);
        cmd.args(["grpc-proxy", "start"])
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg(format!("--listen-addr=127.0.0.1:{port}"))
            .args(creds.args())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} grpc-proxy: {e}", self.bins.etcd.display()));
        let mut proxy = GrpcProxy { child, port, log };
        let deadline = Instant::now() + START_TIMEOUT;
        while !port_accepts(port) {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("grpc-proxy exited ({status}):\n{}", proxy.log_tail(20));
            }
            assert!(
                Instant::now() < deadline,
                "grpc-proxy not accepting within {START_TIMEOUT:?}:\n{}",
                proxy.log_tail(20)
            );
            std::thread::sleep(POLL);
        }
        proxy
    }
}
