//! An in-process model of etcd.
use futures_util::future::BoxFuture;
use super::{Backend, BackendError, ListResponse, Watch};

/// An in-process model of etcd.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {}

impl Backend for MemoryBackend {
    fn list(&self, _prefix: &[u8]) -> BoxFuture<'_, Result<ListResponse, BackendError>> {
        Box::pin(async { Err(BackendError::unavailable("todo")) })
    }
    fn watch(&self, _prefix: &[u8], _from: i64) -> BoxFuture<'_, Result<Watch, BackendError>> {
        Box::pin(async { Err(BackendError::unavailable("todo")) })
    }
}
