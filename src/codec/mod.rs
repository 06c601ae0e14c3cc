//! Key layouts and value codecs: how an [`Instance`] is written to and read from etcd.
//!
//! A [`Codec`] pairs a [`KeyLayout`] with a namespace. Every layout watches the same prefix for a
//! service: `{namespace}/{service}/`, or `{service}/` when the namespace is empty. Trailing `/`s
//! of the namespace are trimmed, so `/services` and `/services/` are the same namespace. Below
//! that prefix each key has exactly one more segment, and that segment is the instance's id.
//!
//! Keys and values come from etcd as bytes, so decoding never trusts them: a key outside the
//! prefix, a nested key, an empty id, text that is not UTF-8, a value over the size bound (checked
//! before any parsing), malformed JSON, or an instance that fails [`Instance`] validation each
//! give a typed [`DecodeError`]. Decoding never panics.
//!
//! # The native wire format ([`KeyLayout::Native`])
//!
//! Key: `{namespace}/{service}/{id}`. Value: one JSON object, which programs in any language may
//! write:
//!
//! ```json
//! {"id":"u1","addr":"10.0.0.7:8080","tags":["v2"],"meta":{"zone":"eu-1"},"weight":1,"state":"up"}
//! ```
//!
//! | field    | type                     | required | default            |
//! |----------|--------------------------|----------|--------------------|
//! | `addr`   | string, `host:port`      | yes      |                    |
//! | `id`     | string                   | no       | the key's last segment (if given, it must equal it) |
//! | `tags`   | array of strings         | no       | `[]`               |
//! | `meta`   | object of string values  | no       | `{}`               |
//! | `weight` | integer in 1..=1000000   | no       | `1`                |
//! | `state`  | `"up"` or `"draining"`   | no       | `"up"`             |
//!
//! A `null` optional field counts as absent (so Go's nil slices and maps are fine), and unknown
//! fields are ignored, so newer writers can add fields without breaking older readers. Encoding
//! always writes every field, in the order above.
//!
//! # go-zero ([`KeyLayout::GoZero`])
//!
//! go-zero's `discov` publisher writes key `{key}/{lease id in decimal}` with the bare
//! `host:port` as the value, e.g. `user.rpc/7587869531458359558` → `10.0.0.7:8080`. With an empty
//! namespace and service `user.rpc` this codec reads exactly those keys; the instance id is the
//! key's last segment (the lease id).
//!
//! # etcd's naming endpoints ([`KeyLayout::EtcdNaming`])
//!
//! etcd's Go package `client/v3/naming/endpoints` writes key `{target}/{addr}` with the value
//! `{"Op":0,"Addr":"10.0.0.7:8080","Metadata":…}`. `Op` 0 (or a missing `Op`) adds the endpoint
//! and `Op` 1 deletes it ([`Decoded::Delete`]). `Metadata` is arbitrary JSON: if it is an object,
//! each string value becomes a metadata entry as is and every other value is kept as its compact
//! JSON text; any other non-null value is kept, as compact JSON text, under the metadata key
//! `"metadata"`. Encoding writes the instance's metadata as a JSON object of strings, or `null`
//! when there is none. The instance id is the key's last segment (the address).
//!
//! # What the foreign layouts cannot carry
//!
//! go-zero and etcd-naming values carry only what the Go libraries carry: an address (and, for
//! etcd-naming, metadata). Tags, weight and state are dropped when encoding in those layouts, and
//! instances decoded from them have weight 1, state [`State::Up`](crate::State::Up) and no tags.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::instance::{Instance, InstanceError};

mod json;
mod naming;
mod native;

use naming::{decode_naming, encode_naming};
use native::{decode_native, encode_native};

/// The default bound on a value's size; larger values are rejected before they are parsed.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 64 * 1024;

/// How instances are laid out in etcd's key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum KeyLayout {
    /// This crate's own layout: key `{namespace}/{service}/{id}`, JSON value (see the
    /// [module docs](self) for the wire format).
    #[default]
    Native,
    /// go-zero's layout: key `{service}/{lease id}`, value the bare `host:port`.
    GoZero,
    /// etcd's `naming/endpoints` layout: key `{target}/{addr}`, JSON value `{"Op":0,"Addr":…}`.
    EtcdNaming,
}

impl KeyLayout {
    /// The layout's name as [`FromStr`](std::str::FromStr) reads it: `native`, `go-zero` or
    /// `etcd-naming`.
    pub fn name(self) -> &'static str {
        match self {
            KeyLayout::Native => "native",
            KeyLayout::GoZero => "go-zero",
            KeyLayout::EtcdNaming => "etcd-naming",
        }
    }
}

impl std::fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A layout name that is not `native`, `go-zero` or `etcd-naming`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key layout {0:?}: expected native, go-zero or etcd-naming")]
pub struct ParseLayoutError(pub String);

impl std::str::FromStr for KeyLayout {
    type Err = ParseLayoutError;

    /// Reads `native`, `go-zero` or `etcd-naming` (as from a command line or a config file).
    ///
    /// ```
    /// use etcd_registry::KeyLayout;
    /// assert_eq!("go-zero".parse(), Ok(KeyLayout::GoZero));
    /// assert_eq!(KeyLayout::EtcdNaming.to_string(), "etcd-naming");
    /// assert!("zk".parse::<KeyLayout>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [KeyLayout::Native, KeyLayout::GoZero, KeyLayout::EtcdNaming]
            .into_iter()
            .find(|layout| layout.name() == s)
            .ok_or_else(|| ParseLayoutError(s.to_owned()))
    }
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
    /// The key is not UTF-8.
    #[error("key is not UTF-8")]
    KeyNotUtf8,
    /// The key does not start with the service's prefix (it may belong to another service, such
    /// as a sibling whose name extends this one's).
    #[error("key {key:?} is not under prefix {prefix:?}")]
    ForeignKey {
        /// The key.
        key: String,
        /// The prefix it should have started with.
        prefix: String,
    },
    /// The key is exactly the service's prefix: its id segment is empty.
    #[error("key {key:?} has an empty id segment")]
    EmptyId {
        /// The key.
        key: String,
    },
    /// The key has more than one segment below the service's prefix.
    #[error("key {key:?} has more than one segment below the service prefix")]
    NestedKey {
        /// The key.
        key: String,
    },
    /// The value is larger than the codec's bound; it was not parsed.
    #[error("value is {len} bytes; the limit is {max}")]
    ValueTooLarge {
        /// The value's length in bytes.
        len: usize,
        /// The codec's bound in bytes.
        max: usize,
    },
    /// The value is not UTF-8.
    #[error("value is not UTF-8")]
    ValueNotUtf8,
    /// The value is not JSON of the shape the layout expects.
    #[error("value is not valid JSON for this layout: {0}")]
    Json(String),
    /// The value has no address (`addr` in the native layout, `Addr` in etcd-naming).
    #[error("value has no address")]
    MissingAddr,
    /// A native value's `id` differs from the id segment of its key.
    #[error("value's id {value_id:?} differs from the key's id {key_id:?}")]
    IdMismatch {
        /// The id from the key's last segment.
        key_id: String,
        /// The id from the value.
        value_id: String,
    },
    /// An etcd-naming value has an `Op` other than 0 (add) or 1 (delete).
    #[error("unknown etcd-naming operation {0}")]
    UnknownOp(u64),
    /// The decoded fields do not make a valid [`Instance`].
    #[error("invalid instance: {0}")]
    Invalid(#[from] InstanceError),
}

fn json_error(err: serde_json::Error) -> DecodeError {
    DecodeError::Json(err.to_string())
}

/// Encodes and decodes instances in one [`KeyLayout`] under one namespace.
///
/// ```
/// use etcd_registry::{Codec, Decoded, Instance, KeyLayout};
///
/// let codec = Codec::new(KeyLayout::Native, "/services");
/// let instance = Instance::builder("user", "10.0.0.7:8080")
///     .id("u1")
///     .tag("v2")
///     .meta("zone", "eu-1")
///     .build()?;
///
/// let key = codec.key(&instance, 0);
/// let value = codec.encode_value(&instance);
/// assert_eq!(key, "/services/user/u1");
/// assert_eq!(codec.prefix("user"), "/services/user/");
/// assert_eq!(
///     value,
///     br#"{"id":"u1","addr":"10.0.0.7:8080","tags":["v2"],"meta":{"zone":"eu-1"},"weight":1,"state":"up"}"#
/// );
///
/// assert_eq!(codec.decode("user", key.as_bytes(), &value)?, Decoded::Put(instance));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Codec {
    layout: KeyLayout,
    namespace: Arc<str>,
    max_value_size: usize,
}

impl Codec {
    /// A codec for `layout` under `namespace` (may be empty; trailing `/`s are trimmed), with the
    /// value bound [`DEFAULT_MAX_VALUE_SIZE`].
    pub fn new(layout: KeyLayout, namespace: impl Into<String>) -> Self {
        let ns: String = namespace.into();
        Self {
            layout,
            namespace: ns.trim_end_matches('/').into(),
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
        }
    }

    /// Sets the largest value, in bytes, that [`decode`](Self::decode) parses; larger values
    /// give [`DecodeError::ValueTooLarge`] without being looked at.
    #[must_use]
    pub fn with_max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// The key layout.
    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    /// The namespace, without trailing `/` (empty when keys start with the service name).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The largest value, in bytes, that [`decode`](Self::decode) parses.
    pub fn max_value_size(&self) -> usize {
        self.max_value_size
    }

    /// The prefix watched for `service`: `{namespace}/{service}/`, or `{service}/` when the
    /// namespace is empty.
    pub fn prefix(&self, service: &str) -> String {
        if self.namespace.is_empty() {
            format!("{service}/")
        } else {
            format!("{}/{service}/", self.namespace)
        }
    }

    /// The key `instance` is written under: its service's [prefix](Self::prefix) followed by the
    /// instance id (native), `lease_id` in decimal (go-zero), or the address (etcd-naming).
    /// `lease_id` is used only by the go-zero layout.
    pub fn key(&self, instance: &Instance, lease_id: i64) -> String {
        let mut key = self.prefix(instance.service());
        match self.layout {
            KeyLayout::Native => key.push_str(instance.id()),
            KeyLayout::GoZero => {
                // Writing to a String cannot fail.
                let _ = write!(key, "{lease_id}");
            }
            KeyLayout::EtcdNaming => key.push_str(instance.addr()),
        }
        key
    }

    /// The value `instance` is written as: the full native JSON object, the bare address
    /// (go-zero), or `{"Op":0,"Addr":…,"Metadata":…}` (etcd-naming). The foreign layouts drop
    /// what they cannot carry; see the [module docs](self).
    pub fn encode_value(&self, instance: &Instance) -> Vec<u8> {
        match self.layout {
            KeyLayout::Native => encode_native(instance),
            KeyLayout::GoZero => instance.addr().as_bytes().to_vec(),
            KeyLayout::EtcdNaming => encode_naming(instance),
        }
    }

    /// The instance id a key of `service` names: its segment below the service's prefix. This
    /// is the id of the instance [`decode`](Self::decode) returns for the key, in every layout,
    /// so it identifies the instance a delete event removes.
    ///
    /// # Errors
    /// [`DecodeError::KeyNotUtf8`], [`ForeignKey`](DecodeError::ForeignKey),
    /// [`EmptyId`](DecodeError::EmptyId) or [`NestedKey`](DecodeError::NestedKey).
    pub fn instance_id<'k>(&self, service: &str, key: &'k [u8]) -> Result<&'k str, DecodeError> {
        let key = std::str::from_utf8(key).map_err(|_| DecodeError::KeyNotUtf8)?;
        let Some(id) = self.strip_prefix(service, key) else {
            return Err(DecodeError::ForeignKey {
                key: key.to_owned(),
                prefix: self.prefix(service),
            });
        };
        if id.is_empty() {
            return Err(DecodeError::EmptyId {
                key: key.to_owned(),
            });
        }
        if id.contains('/') {
            return Err(DecodeError::NestedKey {
                key: key.to_owned(),
            });
        }
        Ok(id)
    }

    /// Decodes one key-value pair of `service`. The instance's service is `service` and its id
    /// is the key's last segment.
    ///
    /// # Errors
    /// A [`DecodeError`] if the key is not one segment below `service`'s prefix, the value is
    /// larger than [`max_value_size`](Self::max_value_size), not UTF-8, or malformed for the
    /// layout, or the instance it describes is invalid.
    pub fn decode(&self, service: &str, key: &[u8], value: &[u8]) -> Result<Decoded, DecodeError> {
        let id = self.instance_id(service, key)?;
        if value.len() > self.max_value_size {
            return Err(DecodeError::ValueTooLarge {
                len: value.len(),
                max: self.max_value_size,
            });
        }
        let value = std::str::from_utf8(value).map_err(|_| DecodeError::ValueNotUtf8)?;
        match self.layout {
            KeyLayout::Native => decode_native(service, id, value).map(Decoded::Put),
            KeyLayout::GoZero => Ok(Decoded::Put(
                Instance::builder(service, value).id(id).build()?,
            )),
            KeyLayout::EtcdNaming => decode_naming(service, id, value),
        }
    }

    /// The rest of `key` after `service`'s prefix, without building the prefix.
    fn strip_prefix<'k>(&self, service: &str, key: &'k str) -> Option<&'k str> {
        let rest = if self.namespace.is_empty() {
            key
        } else {
            key.strip_prefix(&*self.namespace)?.strip_prefix('/')?
        };
        rest.strip_prefix(service)?.strip_prefix('/')
    }
}

#[cfg(test)]
mod tests;
