//! The [`Backend`] contract served over the model, as this client sees it: every call goes
//! through the injected faults (latency, stall, outage), unlike the inherent methods of the
//! same names, which model other clients and always work.

use std::pin::{Pin, pin};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::store::{Item, State};
use super::{MEMBER_ID, MemoryBackend, Shared, TxnOp};
use crate::backend::{
    Backend, BackendError, BackendErrorKind, KeysAt, ListResponse, ProgressRequester, PutCondition,
    PutOutcome, Watch,
};

impl MemoryBackend {
    /// Runs `answer` as a server call: after the latency, once not stalled, if reachable.
    async fn serve<T>(
        &self,
        answer: impl FnOnce(&mut State) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        loop {
            let mut resumed = pin!(self.shared.resumed.notified());
            // Registered before the stall is checked, so a resume in between is not missed.
            resumed.as_mut().enable();
            {
                let mut state = self.lock();
                if !state.stalled {
                    if !state.reachable {
                        return Err(BackendError::unavailable("etcd is unreachable"));
                    }
                    return answer(&mut state);
                }
            }
            resumed.await;
        }
    }
}

impl Backend for MemoryBackend {
    fn list(&self, prefix: &[u8]) -> BoxFuture<'_, Result<ListResponse, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(async move {
            self.serve(|state| {
                Ok(ListResponse {
                    header: state.header(),
                    kvs: state.range(&prefix),
                })
            })
            .await
        })
    }

    fn probe(&self, _prefix: &[u8]) -> BoxFuture<'_, Result<u64, BackendError>> {
        Box::pin(async move { self.serve(|_| Ok(MEMBER_ID)).await })
    }

    fn keys_at(
        &self,
        prefix: &[u8],
        revision: i64,
        with_values: bool,
    ) -> BoxFuture<'_, Result<KeysAt, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(async move {
            self.serve(|state| {
                Ok(KeysAt {
                    header: state.header(),
                    keys: state.keys_at(&prefix, revision, with_values)?,
                })
            })
            .await
        })
    }

    fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
    ) -> BoxFuture<'_, Result<Watch, BackendError>> {
        let prefix = prefix.to_vec();
        Box::pin(async move {
            let (header, rx, id) = self
                .serve(|state| Ok(state.open_watch(prefix, from_revision)))
                .await?;
            let shared = Arc::downgrade(&self.shared);
            Ok(Watch {
                header,
                stream: Box::pin(MemoryWatchStream {
                    rx,
                    shared: shared.clone(),
                    id,
                }),
                progress: Arc::new(MemoryProgress { shared, id }),
                member_id: MEMBER_ID,
            })
        })
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, BackendError>> {
        Box::pin(async move {
            self.serve(|state| {
                let id = state.grant(ttl, Instant::now());
                self.ensure_reaper(state);
                Ok(id)
            })
            .await
        })
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, BackendError>> {
        Box::pin(async move {
            let ttl = self
                .serve(|state| match state.keep_alive(lease, Instant::now()) {
                    Ok(ttl) => Ok(ttl),
                    // etcd answers a keep-alive of an unknown lease with TTL 0.
                    Err(e) if e.kind == BackendErrorKind::Rejected => Ok(Duration::ZERO),
                    Err(e) => Err(e),
                })
                .await?;
            self.shared.reaper_wake.notify_one();
            Ok(ttl)
        })
    }

    fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        condition: PutCondition,
    ) -> BoxFuture<'_, Result<PutOutcome, BackendError>> {
        let (key, value) = (key.to_vec(), value.to_vec());
        Box::pin(async move {
            self.serve(|state| self.answer_put(state, key, value, lease, condition))
                .await
        })
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.serve(|state| match state.revoke(lease) {
                Ok(_) => Ok(()),
                Err(e) if e.kind == BackendErrorKind::Rejected => Ok(()),
                Err(e) => Err(e),
            })
            .await
        })
    }
}

/// The lease and write half of the contract, as this client sees it: every call goes through the
/// injected faults (latency, stall, outage), unlike the inherent methods of the same names, which
/// model other clients and always work.
impl MemoryBackend {
    fn answer_put(
        &self,
        state: &mut State,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
        condition: PutCondition,
    ) -> Result<PutOutcome, BackendError> {
        let current = state.kvs.get(&key).map(|stored| stored.to_key_value(&key));
        let holds = match condition {
            PutCondition::Absent => current.is_none(),
            PutCondition::ModRevision(revision) => current
                .as_ref()
                .is_some_and(|kv| kv.mod_revision == revision),
            PutCondition::Always => true,
        };
        if !holds {
            return Ok(PutOutcome::Refused { current });
        }
        let ops = vec![TxnOp::put_with_lease(key, value, lease)];
        state.validate(&ops)?;
        let revision = state.apply(ops).unwrap_or(state.revision);
        Ok(PutOutcome::Written { revision })
    }
}

/// The stream of one watch; dropping it closes the watch.
struct MemoryWatchStream {
    rx: UnboundedReceiver<Item>,
    shared: Weak<Shared>,
    id: Option<u64>,
}

impl Stream for MemoryWatchStream {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Drop for MemoryWatchStream {
    fn drop(&mut self) {
        if let (Some(id), Some(shared)) = (self.id, self.shared.upgrade()) {
            shared.lock().close_watch(id);
        }
    }
}

/// Asks one watch for progress notifications.
struct MemoryProgress {
    shared: Weak<Shared>,
    id: Option<u64>,
}

impl ProgressRequester for MemoryProgress {
    fn request_progress(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            match self.shared.upgrade() {
                Some(shared) => shared.lock().request_progress(self.id),
                None => Err(BackendError::unavailable("the backend is gone")),
            }
        })
    }
}
