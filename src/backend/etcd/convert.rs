//! etcd-client's responses as the crate's own types: watch messages, headers, key-values, and
//! the progress requests of a watch stream.

use futures_util::future::BoxFuture;
use tokio::sync::Mutex as AsyncMutex;

use super::error::map_error;
use crate::backend::{
    BackendError, BackendErrorKind, Event, EventKind, Header, KeyValue, ProgressRequester,
    WatchMessage,
};
use etcd_client::{EventType, WatchResponse};

/// Asks etcd for a progress notification on one watch stream.
pub(super) struct Progress {
    pub(super) sender: AsyncMutex<etcd_client::WatchRequestSender>,
}

impl ProgressRequester for Progress {
    fn request_progress(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.sender
                .lock()
                .await
                .request_progress()
                .await
                .map_err(map_error)
        })
    }
}

/// Turns one etcd watch response into a message; `None` for responses that carry nothing (a
/// late creation acknowledgement).
pub(super) fn message(response: WatchResponse) -> Option<Result<WatchMessage, BackendError>> {
    if response.compact_revision() > 0 {
        return Some(Ok(WatchMessage::Compacted {
            compact_revision: response.compact_revision(),
        }));
    }
    if response.canceled() {
        return Some(Err(cancelled(&response)));
    }
    if response.created() {
        return None;
    }
    let header = match header(response.header()) {
        Ok(header) => header,
        Err(e) => return Some(Err(e)),
    };
    if response.events().is_empty() {
        return Some(Ok(WatchMessage::Progress { header }));
    }
    let events = response
        .events()
        .iter()
        .filter_map(|event| {
            let kv = key_value(event.kv()?);
            let kind = match event.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            };
            Some(Event { kind, kv })
        })
        .collect();
    Some(Ok(WatchMessage::Events { header, events }))
}

pub(super) fn cancelled(response: &WatchResponse) -> BackendError {
    let reason = response.cancel_reason();
    let kind = if reason.contains("no leader") {
        BackendErrorKind::NoLeader
    } else if reason.contains("permission") || reason.contains("auth") {
        BackendErrorKind::Auth
    } else {
        BackendErrorKind::Unavailable
    };
    BackendError::new(kind, format!("watch cancelled by etcd: {reason}"))
}

pub(super) fn header(header: Option<&etcd_client::ResponseHeader>) -> Result<Header, BackendError> {
    let header = header.ok_or_else(|| {
        BackendError::new(BackendErrorKind::Other, "etcd response without a header")
    })?;
    Ok(Header {
        revision: header.revision(),
        cluster_id: header.cluster_id(),
    })
}

pub(super) fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}
