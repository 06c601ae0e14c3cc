//! Key layouts and value codecs: how an [`Instance`] is written to and read from etcd.

use std::sync::Arc;

use crate::instance::Instance;

/// The default bound on a value's size; larger values are rejected before they are parsed.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 64 * 1024;

/// How instances are laid out in etcd's key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum KeyLayout {
    /// This crate's own layout: key `{namespace}/{service}/{id}`, JSON value.
    #[default]
    Native,
    /// go-zero's layout: key `{service}/{lease id}`, value the bare `host:port`.
    GoZero,
    /// etcd's `naming/endpoints` layout: key `{target}/{addr}`, JSON value `{"Op":0,"Addr":…}`.
    EtcdNaming,
}

/// What one key-value pair means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The key holds this instance.
    Put(Instance),
    /// The key says the instance is gone (etcd-naming `Op: 1`).
    Delete,
}

/// Why a key or value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Placeholder.
    #[error("todo")]
    Todo,
}

/// Encodes and decodes instances in one [`KeyLayout`] under one namespace.
#[derive(Debug, Clone)]
pub struct Codec {
    layout: KeyLayout,
    namespace: Arc<str>,
    max_value_size: usize,
}

impl Codec {
    /// A codec for `layout` under `namespace` (may be empty).
    pub fn new(layout: KeyLayout, namespace: impl Into<String>) -> Self {
        let ns: String = namespace.into();
        Self { layout, namespace: ns.trim_end_matches('/').into(), max_value_size: DEFAULT_MAX_VALUE_SIZE }
    }
    /// The prefix watched for `service`.
    pub fn prefix(&self, service: &str) -> String {
        if self.namespace.is_empty() { format!("{service}/") } else { format!("{}/{service}/", self.namespace) }
    }
    /// Decodes one key-value pair of `service`.
    pub fn decode(&self, _service: &str, _key: &[u8], _value: &[u8]) -> Result<Decoded, DecodeError> {
        let _ = (self.layout, self.max_value_size);
        Err(DecodeError::Todo)
    }
}
