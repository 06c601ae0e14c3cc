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
//! instances decoded from them have weight 1, state [`State::Up`] and no tags.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

use crate::instance::{Instance, InstanceError, State};

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

// ---------------------------------------------------------------------------------------------
// Native layout

/// A string that borrows from the input unless it had escapes.
#[derive(Deserialize)]
#[serde(transparent)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

/// JSON object entries in input order, without building a map.
struct Pairs<'a>(Vec<(Str<'a>, Str<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Pairs<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for PairsVisitor<'a> {
            type Value = Pairs<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of string values")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut pairs = Vec::new();
                while let Some(entry) = map.next_entry::<Str<'a>, Str<'a>>()? {
                    pairs.push(entry);
                }
                Ok(Pairs(pairs))
            }
        }

        deserializer.deserialize_map(PairsVisitor(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct NativeValue<'a> {
    #[serde(default, borrow)]
    id: Option<Str<'a>>,
    #[serde(default, borrow)]
    addr: Option<Str<'a>>,
    #[serde(default, borrow)]
    tags: Option<Vec<Str<'a>>>,
    #[serde(default, borrow)]
    meta: Option<Pairs<'a>>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    state: Option<State>,
}

fn decode_native(service: &str, key_id: &str, value: &str) -> Result<Instance, DecodeError> {
    let v: NativeValue<'_> = serde_json::from_str(value).map_err(json_error)?;
    let addr = v.addr.ok_or(DecodeError::MissingAddr)?;
    if let Some(Str(id)) = v.id {
        if id != key_id {
            return Err(DecodeError::IdMismatch {
                key_id: key_id.to_owned(),
                value_id: id.into_owned(),
            });
        }
    }
    let mut b = Instance::builder(service, addr.0.into_owned()).id(key_id);
    if let Some(tags) = v.tags {
        b = b.tags(tags.into_iter().map(|Str(t)| t.into_owned()));
    }
    if let Some(Pairs(meta)) = v.meta {
        for (Str(k), Str(v)) in meta {
            b = b.meta(k.into_owned(), v.into_owned());
        }
    }
    if let Some(weight) = v.weight {
        b = b.weight(weight);
    }
    if let Some(state) = v.state {
        b = b.state(state);
    }
    Ok(b.build()?)
}

fn encode_native(instance: &Instance) -> Vec<u8> {
    let mut out = String::with_capacity(96 + instance.id().len() + instance.addr().len());
    out.push_str("{\"id\":");
    push_json_str(&mut out, instance.id());
    out.push_str(",\"addr\":");
    push_json_str(&mut out, instance.addr());
    out.push_str(",\"tags\":[");
    for (i, tag) in instance.tags().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, tag);
    }
    out.push_str("],\"meta\":");
    push_json_meta(&mut out, instance);
    let _ = write!(
        out,
        ",\"weight\":{},\"state\":\"{}\"}}",
        instance.weight(),
        instance.state()
    );
    out.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// etcd-naming layout

#[derive(Deserialize)]
struct NamingValue<'a> {
    #[serde(default, rename = "Op", alias = "op")]
    op: Option<u64>,
    #[serde(default, borrow, rename = "Addr", alias = "addr")]
    addr: Option<Str<'a>>,
    #[serde(default, rename = "Metadata", alias = "metadata")]
    metadata: Option<serde_json::Value>,
}

fn decode_naming(service: &str, id: &str, value: &str) -> Result<Decoded, DecodeError> {
    let v: NamingValue<'_> = serde_json::from_str(value).map_err(json_error)?;
    match v.op.unwrap_or(0) {
        0 => {}
        1 => return Ok(Decoded::Delete),
        op => return Err(DecodeError::UnknownOp(op)),
    }
    let addr = v.addr.ok_or(DecodeError::MissingAddr)?;
    let mut b = Instance::builder(service, addr.0.into_owned()).id(id);
    match v.metadata {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (k, v) in map {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => serde_json::to_string(&other).map_err(json_error)?,
                };
                b = b.meta(k, v);
            }
        }
        Some(other) => {
            b = b.meta(
                "metadata",
                serde_json::to_string(&other).map_err(json_error)?,
            );
        }
    }
    Ok(Decoded::Put(b.build()?))
}

fn encode_naming(instance: &Instance) -> Vec<u8> {
    let mut out = String::with_capacity(48 + instance.addr().len());
    out.push_str("{\"Op\":0,\"Addr\":");
    push_json_str(&mut out, instance.addr());
    out.push_str(",\"Metadata\":");
    if instance.metadata().len() == 0 {
        out.push_str("null");
    } else {
        push_json_meta(&mut out, instance);
    }
    out.push('}');
    out.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// JSON writing: by hand, so encoding is infallible and allocation-light.

/// Appends the instance's metadata as a JSON object of strings.
fn push_json_meta(out: &mut String, instance: &Instance) {
    out.push('{');
    for (i, (k, v)) in instance.metadata().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, k);
        out.push(':');
        push_json_str(out, v);
    }
    out.push('}');
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::{MAX_META, MAX_WEIGHT};
    use proptest::prelude::*;

    const WIRE_EXAMPLE: &str = r#"{"id":"u1","addr":"10.0.0.7:8080","tags":["v2"],"meta":{"zone":"eu-1"},"weight":1,"state":"up"}"#;

    fn native() -> Codec {
        Codec::new(KeyLayout::Native, "/services")
    }

    fn put(d: Result<Decoded, DecodeError>) -> Instance {
        match d {
            Ok(Decoded::Put(i)) => i,
            other => panic!("expected a put, got {other:?}"),
        }
    }

    fn full_instance(service: &str) -> Instance {
        Instance::builder(service, "10.0.0.7:8080")
            .id("u1")
            .tags(["v2", "canary"])
            .meta("zone", "eu-1")
            .meta("note", "quote\" back\\slash\nnewline\u{1}ctl tab\t é ☃ 🦀")
            .weight(42)
            .state(State::Draining)
            .build()
            .unwrap()
    }

    // ---- prefixes and keys ------------------------------------------------------------------

    #[test]
    fn prefix_trims_namespace_slashes_and_handles_empty_namespace() {
        assert_eq!(native().prefix("user"), "/services/user/");
        assert_eq!(
            Codec::new(KeyLayout::Native, "/services/").prefix("user"),
            "/services/user/"
        );
        assert_eq!(
            Codec::new(KeyLayout::Native, "/services/").namespace(),
            "/services"
        );
        assert_eq!(
            Codec::new(KeyLayout::GoZero, "").prefix("user.rpc"),
            "user.rpc/"
        );
        let c = Codec::new(KeyLayout::EtcdNaming, "a/b").with_max_value_size(10);
        assert_eq!(c.layout(), KeyLayout::EtcdNaming);
        assert_eq!(c.max_value_size(), 10);
        assert_eq!(native().max_value_size(), DEFAULT_MAX_VALUE_SIZE);
        assert_eq!(DEFAULT_MAX_VALUE_SIZE, 65_536);
    }

    #[test]
    fn both_namespace_spellings_decode_the_same_key() {
        let v = br#"{"addr":"10.0.0.7:8080"}"#;
        let a = put(native().decode("user", b"/services/user/u1", v));
        let b = put(Codec::new(KeyLayout::Native, "/services/").decode(
            "user",
            b"/services/user/u1",
            v,
        ));
        assert_eq!(a, b);
        assert_eq!(a.id(), "u1");
    }

    #[test]
    fn key_errors_are_typed() {
        let c = native();
        let v = br#"{"addr":"10.0.0.7:8080"}"#;
        assert_eq!(
            c.decode("user", b"/other/user/u1", v),
            Err(DecodeError::ForeignKey {
                key: "/other/user/u1".into(),
                prefix: "/services/user/".into()
            })
        );
        assert_eq!(
            c.decode("user", b"/servicesX/user/u1", v),
            Err(DecodeError::ForeignKey {
                key: "/servicesX/user/u1".into(),
                prefix: "/services/user/".into()
            })
        );
        assert_eq!(
            c.decode("user", b"/services/user", v),
            Err(DecodeError::ForeignKey {
                key: "/services/user".into(),
                prefix: "/services/user/".into()
            })
        );
        assert_eq!(
            c.decode("user", b"/services/user/a/b", v),
            Err(DecodeError::NestedKey {
                key: "/services/user/a/b".into()
            })
        );
        assert_eq!(
            c.decode("user", b"/services/user/u1/", v),
            Err(DecodeError::NestedKey {
                key: "/services/user/u1/".into()
            })
        );
        assert_eq!(
            c.decode("user", b"/services/user/", v),
            Err(DecodeError::EmptyId {
                key: "/services/user/".into()
            })
        );
        assert_eq!(
            c.decode("user", b"/services/user/\xff\xfe", v),
            Err(DecodeError::KeyNotUtf8)
        );
        assert_eq!(
            c.decode("user", b"", v),
            Err(DecodeError::ForeignKey {
                key: String::new(),
                prefix: "/services/user/".into()
            })
        );
    }

    #[test]
    fn sibling_service_never_matches() {
        let c = Codec::new(KeyLayout::GoZero, "");
        assert_eq!(
            c.decode(
                "user.rpc",
                b"user.rpcx/7587869531458359558",
                b"10.0.0.7:8080"
            ),
            Err(DecodeError::ForeignKey {
                key: "user.rpcx/7587869531458359558".into(),
                prefix: "user.rpc/".into()
            })
        );
        let n = native();
        assert!(matches!(
            n.decode("user", b"/services/users/u1", br#"{"addr":"a:1"}"#),
            Err(DecodeError::ForeignKey { .. })
        ));
        // A service whose name is a prefix of another's: the longer one still decodes its own.
        assert_eq!(
            put(c.decode("user.rpcx", b"user.rpcx/1", b"10.0.0.7:8080")).service(),
            "user.rpcx"
        );
    }

    #[test]
    fn instance_id_matches_decoded_id_in_every_layout() {
        let inst = full_instance("user");
        for layout in [KeyLayout::Native, KeyLayout::GoZero, KeyLayout::EtcdNaming] {
            let c = Codec::new(layout, "/ns");
            let key = c.key(&inst, 99);
            let id = c.instance_id("user", key.as_bytes()).unwrap();
            let decoded = put(c.decode("user", key.as_bytes(), &c.encode_value(&inst)));
            assert_eq!(decoded.id(), id, "{layout:?}");
        }
        assert_eq!(
            native().instance_id("user", b"/services/user/a/b"),
            Err(DecodeError::NestedKey {
                key: "/services/user/a/b".into()
            })
        );
    }

    // ---- native -----------------------------------------------------------------------------

    #[test]
    fn native_round_trip_keeps_every_field() {
        let c = native();
        let inst = full_instance("user");
        let key = c.key(&inst, 12345);
        assert_eq!(key, "/services/user/u1");
        let value = c.encode_value(&inst);
        assert_eq!(put(c.decode("user", key.as_bytes(), &value)), inst);
        // The encoded value is plain JSON that any parser reads back to the same fields.
        let parsed: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({
                "id": "u1",
                "addr": "10.0.0.7:8080",
                "tags": ["v2", "canary"],
                "meta": {
                    "note": "quote\" back\\slash\nnewline\u{1}ctl tab\t é ☃ 🦀",
                    "zone": "eu-1"
                },
                "weight": 42,
                "state": "draining"
            })
        );
    }

    #[test]
    fn native_encodes_the_documented_wire_example_exactly() {
        let inst = Instance::builder("user", "10.0.0.7:8080")
            .id("u1")
            .tag("v2")
            .meta("zone", "eu-1")
            .build()
            .unwrap();
        assert_eq!(
            String::from_utf8(native().encode_value(&inst)).unwrap(),
            WIRE_EXAMPLE
        );
    }

    #[test]
    fn native_decodes_the_documented_wire_example_exactly() {
        let got = put(native().decode("user", b"/services/user/u1", WIRE_EXAMPLE.as_bytes()));
        assert_eq!(got.service(), "user");
        assert_eq!(got.id(), "u1");
        assert_eq!(got.addr(), "10.0.0.7:8080");
        assert_eq!(got.tags().collect::<Vec<_>>(), ["v2"]);
        assert_eq!(got.metadata().collect::<Vec<_>>(), [("zone", "eu-1")]);
        assert_eq!(got.weight(), 1);
        assert_eq!(got.state(), State::Up);
    }

    #[test]
    fn native_minimal_value_gets_defaults() {
        let got = put(native().decode("user", b"/services/user/u9", br#"{"addr":"[::1]:9000"}"#));
        let want = Instance::builder("user", "[::1]:9000")
            .id("u9")
            .build()
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(got.weight(), 1);
        assert_eq!(got.state(), State::Up);
        assert_eq!(got.tags().len(), 0);
        assert_eq!(got.metadata().len(), 0);
    }

    #[test]
    fn native_nulls_count_as_absent() {
        let v = br#"{"id":null,"addr":"a:1","tags":null,"meta":null,"weight":null,"state":null}"#;
        let got = put(native().decode("user", b"/services/user/u1", v));
        assert_eq!(
            got,
            Instance::builder("user", "a:1").id("u1").build().unwrap()
        );
    }

    #[test]
    fn native_ignores_unknown_fields() {
        let v = br#"{"version":3,"addr":"10.0.0.7:8080","extra":{"nested":[1,2,{"x":null}]},"state":"draining","future":"yes"}"#;
        let got = put(native().decode("user", b"/services/user/u1", v));
        assert_eq!(got.addr(), "10.0.0.7:8080");
        assert_eq!(got.state(), State::Draining);
        assert_eq!(got.id(), "u1");
    }

    #[test]
    fn native_escaped_strings_decode() {
        let v = br#"{"addr":"10.0.0.7:8080","tags":["a\"b","\u00e9"],"meta":{"k\n":"v\\"}}"#;
        let got = put(native().decode("user", b"/services/user/u1", v));
        assert_eq!(got.tags().collect::<Vec<_>>(), ["a\"b", "é"]);
        assert_eq!(got.meta("k\n"), Some("v\\"));
    }

    #[test]
    fn native_duplicate_meta_keys_last_wins() {
        let v = br#"{"addr":"a:1","meta":{"k":"1","k":"2"}}"#;
        assert_eq!(
            put(native().decode("user", b"/services/user/u1", v)).meta("k"),
            Some("2")
        );
    }

    #[test]
    fn native_value_errors_are_typed() {
        let c = native();
        let key = b"/services/user/u1";
        let dec = |v: &[u8]| c.decode("user", key, v);
        assert_eq!(dec(br#"{"id":"u1"}"#), Err(DecodeError::MissingAddr));
        assert_eq!(dec(br#"{"addr":null}"#), Err(DecodeError::MissingAddr));
        assert!(matches!(dec(b"not json"), Err(DecodeError::Json(_))));
        assert!(matches!(dec(b""), Err(DecodeError::Json(_))));
        assert!(matches!(dec(b"\x00\x01garbage"), Err(DecodeError::Json(_))));
        assert!(matches!(
            dec(br#""10.0.0.7:8080""#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            dec(br#"{"addr":"a:1"} trailing"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            dec(br#"{"addr":"a:1","weight":-1}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            dec(br#"{"addr":"a:1","weight":1.5}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            dec(br#"{"addr":"a:1","state":"paused"}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            dec(br#"{"addr":"a:1","tags":"v2"}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            dec(br#"{"addr":"a:1","meta":{"k":1}}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(dec(br#"{"addr":7}"#), Err(DecodeError::Json(_))));
        assert_eq!(dec(b"{\"addr\":\"\xff\"}"), Err(DecodeError::ValueNotUtf8));
        assert_eq!(
            dec(br#"{"addr":"a:1","weight":0}"#),
            Err(DecodeError::Invalid(InstanceError::BadWeight { weight: 0 }))
        );
        assert_eq!(
            dec(format!(r#"{{"addr":"a:1","weight":{}}}"#, MAX_WEIGHT + 1).as_bytes()),
            Err(DecodeError::Invalid(InstanceError::BadWeight {
                weight: MAX_WEIGHT + 1
            }))
        );
        assert_eq!(
            dec(br#"{"addr":"10.0.0.7"}"#),
            Err(DecodeError::Invalid(InstanceError::BadAddr {
                addr: "10.0.0.7".into(),
                reason: "no port"
            }))
        );
        assert_eq!(
            dec(br#"{"addr":""}"#),
            Err(DecodeError::Invalid(InstanceError::Empty { field: "addr" }))
        );
        assert_eq!(
            dec(br#"{"id":"u2","addr":"a:1"}"#),
            Err(DecodeError::IdMismatch {
                key_id: "u1".into(),
                value_id: "u2".into()
            })
        );
        let many: Vec<String> = (0..=MAX_META).map(|i| format!(r#""k{i}":"v""#)).collect();
        assert!(matches!(
            dec(format!(r#"{{"addr":"a:1","meta":{{{}}}}}"#, many.join(",")).as_bytes()),
            Err(DecodeError::Invalid(InstanceError::TooMany {
                field: "meta",
                ..
            }))
        ));
    }

    #[test]
    fn invalid_service_name_is_an_instance_error() {
        let c = Codec::new(KeyLayout::Native, "");
        assert_eq!(
            c.decode("", b"/u1", br#"{"addr":"a:1"}"#),
            Err(DecodeError::Invalid(InstanceError::Empty {
                field: "service"
            }))
        );
        assert!(matches!(
            c.decode("a/b", b"a/b/u1", br#"{"addr":"a:1"}"#),
            Err(DecodeError::Invalid(InstanceError::BadChar {
                field: "service",
                ..
            }))
        ));
        assert!(matches!(
            c.decode("s", b"s/u\x01", br#"{"addr":"a:1"}"#),
            Err(DecodeError::Invalid(InstanceError::BadChar {
                field: "id",
                ..
            }))
        ));
    }

    #[test]
    fn oversize_value_is_rejected_before_parsing() {
        let key = b"/services/user/u1";
        // Invalid JSON, so a parse would report Json: ValueTooLarge proves it was not parsed.
        let big = vec![b'{'; DEFAULT_MAX_VALUE_SIZE + 1];
        for layout in [KeyLayout::Native, KeyLayout::GoZero, KeyLayout::EtcdNaming] {
            assert_eq!(
                Codec::new(layout, "/services").decode("user", key, &big),
                Err(DecodeError::ValueTooLarge {
                    len: DEFAULT_MAX_VALUE_SIZE + 1,
                    max: DEFAULT_MAX_VALUE_SIZE
                }),
                "{layout:?}"
            );
        }
        // Exactly at the bound is parsed.
        let mut at_bound = br#"{"addr":"a:1"}"#.to_vec();
        at_bound.resize(DEFAULT_MAX_VALUE_SIZE, b' ');
        assert_eq!(put(native().decode("user", key, &at_bound)).addr(), "a:1");
        // A custom bound applies too.
        let small = native().with_max_value_size(8);
        assert_eq!(
            small.decode("user", key, br#"{"addr":"a:1"}"#),
            Err(DecodeError::ValueTooLarge { len: 14, max: 8 })
        );
    }

    // ---- go-zero ----------------------------------------------------------------------------

    #[test]
    fn go_zero_reads_what_go_zero_writes() {
        let c = Codec::new(KeyLayout::GoZero, "");
        let got = put(c.decode(
            "user.rpc",
            b"user.rpc/7587869531458359558",
            b"10.0.0.7:8080",
        ));
        assert_eq!(got.service(), "user.rpc");
        assert_eq!(got.id(), "7587869531458359558");
        assert_eq!(got.addr(), "10.0.0.7:8080");
        assert_eq!(got.weight(), 1);
        assert_eq!(got.state(), State::Up);
        assert_eq!(got.tags().len(), 0);
        assert_eq!(got.metadata().len(), 0);
    }

    #[test]
    fn go_zero_round_trip() {
        let c = Codec::new(KeyLayout::GoZero, "");
        let inst = Instance::builder("user.rpc", "10.0.0.7:8080")
            .id("7587869531458359558")
            .build()
            .unwrap();
        let key = c.key(&inst, 7587869531458359558);
        assert_eq!(key, "user.rpc/7587869531458359558");
        let value = c.encode_value(&inst);
        assert_eq!(value, b"10.0.0.7:8080");
        assert_eq!(put(c.decode("user.rpc", key.as_bytes(), &value)), inst);
    }

    #[test]
    fn go_zero_drops_what_it_cannot_carry() {
        let c = Codec::new(KeyLayout::GoZero, "/ns/");
        let inst = full_instance("user");
        let key = c.key(&inst, 5);
        assert_eq!(key, "/ns/user/5");
        assert_eq!(c.encode_value(&inst), b"10.0.0.7:8080");
        let got = put(c.decode("user", key.as_bytes(), &c.encode_value(&inst)));
        assert_eq!(
            got,
            Instance::builder("user", "10.0.0.7:8080")
                .id("5")
                .build()
                .unwrap()
        );
    }

    #[test]
    fn go_zero_value_errors_are_typed() {
        let c = Codec::new(KeyLayout::GoZero, "");
        let dec = |v: &[u8]| c.decode("user.rpc", b"user.rpc/1", v);
        assert_eq!(
            dec(b"not an address"),
            Err(DecodeError::Invalid(InstanceError::BadAddr {
                addr: "not an address".into(),
                reason: "no port"
            }))
        );
        assert_eq!(
            dec(b"10.0.0.7:0"),
            Err(DecodeError::Invalid(InstanceError::BadAddr {
                addr: "10.0.0.7:0".into(),
                reason: "port 0"
            }))
        );
        assert_eq!(
            dec(b""),
            Err(DecodeError::Invalid(InstanceError::Empty { field: "addr" }))
        );
        assert_eq!(dec(b"\xc3\x28:80"), Err(DecodeError::ValueNotUtf8));
        assert!(matches!(
            dec(br#"{"addr":"10.0.0.7:8080"}"#),
            Err(DecodeError::Invalid(InstanceError::BadAddr { .. }))
        ));
    }

    // ---- etcd naming ------------------------------------------------------------------------

    fn naming() -> Codec {
        Codec::new(KeyLayout::EtcdNaming, "")
    }

    #[test]
    fn etcd_naming_round_trip() {
        let c = naming();
        let inst = Instance::builder("foo/bar", "10.0.0.7:8080").build();
        // A target with '/' is not a valid service name; use a one-segment target.
        assert!(inst.is_err());
        let inst = Instance::builder("my-service", "10.0.0.7:8080")
            .meta("zone", "eu-1")
            .meta("odd", "a\"b")
            .build()
            .unwrap();
        let key = c.key(&inst, 77);
        assert_eq!(key, "my-service/10.0.0.7:8080");
        let value = c.encode_value(&inst);
        assert_eq!(
            String::from_utf8(value.clone()).unwrap(),
            r#"{"Op":0,"Addr":"10.0.0.7:8080","Metadata":{"odd":"a\"b","zone":"eu-1"}}"#
        );
        assert_eq!(put(c.decode("my-service", key.as_bytes(), &value)), inst);
    }

    #[test]
    fn etcd_naming_writes_null_metadata_when_empty_and_drops_the_rest() {
        let c = naming();
        let inst = Instance::builder("svc", "[::1]:9000")
            .tag("t")
            .weight(9)
            .state(State::Draining)
            .build()
            .unwrap();
        let value = c.encode_value(&inst);
        assert_eq!(value, br#"{"Op":0,"Addr":"[::1]:9000","Metadata":null}"#);
        let got = put(c.decode("svc", c.key(&inst, 0).as_bytes(), &value));
        assert_eq!(got, Instance::builder("svc", "[::1]:9000").build().unwrap());
    }

    #[test]
    fn etcd_naming_ops() {
        let c = naming();
        let key = b"svc/10.0.0.7:8080";
        assert_eq!(
            c.decode(
                "svc",
                key,
                br#"{"Op":1,"Addr":"10.0.0.7:8080","Metadata":null}"#
            ),
            Ok(Decoded::Delete)
        );
        // A delete needs no usable address.
        assert_eq!(c.decode("svc", key, br#"{"Op":1}"#), Ok(Decoded::Delete));
        let got = put(c.decode("svc", key, br#"{"Addr":"10.0.0.7:8080"}"#));
        assert_eq!(
            got,
            Instance::builder("svc", "10.0.0.7:8080").build().unwrap()
        );
        assert_eq!(
            put(c.decode("svc", key, br#"{"Op":null,"Addr":"10.0.0.7:8080"}"#)).addr(),
            "10.0.0.7:8080"
        );
        assert_eq!(
            c.decode("svc", key, br#"{"Op":2,"Addr":"10.0.0.7:8080"}"#),
            Err(DecodeError::UnknownOp(2))
        );
        assert!(matches!(
            c.decode("svc", key, br#"{"Op":-1,"Addr":"10.0.0.7:8080"}"#),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn etcd_naming_id_is_the_key_segment_and_addr_comes_from_the_value() {
        let got = put(naming().decode("svc", b"svc/e1", br#"{"Op":0,"Addr":"host-1:443"}"#));
        assert_eq!(got.id(), "e1");
        assert_eq!(got.addr(), "host-1:443");
    }

    #[test]
    fn etcd_naming_metadata_forms() {
        let c = naming();
        let key = b"svc/a:1";
        let meta = |v: &str| -> Vec<(String, String)> {
            put(c.decode("svc", key, v.as_bytes()))
                .metadata()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(meta(r#"{"Op":0,"Addr":"a:1"}"#), pairs(&[]));
        assert_eq!(meta(r#"{"Op":0,"Addr":"a:1","Metadata":null}"#), pairs(&[]));
        assert_eq!(meta(r#"{"Op":0,"Addr":"a:1","Metadata":{}}"#), pairs(&[]));
        assert_eq!(
            meta(
                r#"{"Op":0,"Addr":"a:1","Metadata":{"zone":"eu-1","weight":3,"tls":true,"n":null,"list":[1, "x"],"obj":{"a" : 1}}}"#
            ),
            pairs(&[
                ("list", r#"[1,"x"]"#),
                ("n", "null"),
                ("obj", r#"{"a":1}"#),
                ("tls", "true"),
                ("weight", "3"),
                ("zone", "eu-1"),
            ])
        );
        assert_eq!(
            meta(r#"{"Op":0,"Addr":"a:1","Metadata":"plain"}"#),
            pairs(&[("metadata", r#""plain""#)])
        );
        assert_eq!(
            meta(r#"{"Op":0,"Addr":"a:1","Metadata":[1, 2]}"#),
            pairs(&[("metadata", "[1,2]")])
        );
        assert_eq!(
            meta(r#"{"Op":0,"Addr":"a:1","Metadata":12.5}"#),
            pairs(&[("metadata", "12.5")])
        );
        assert_eq!(
            meta(r#"{"Op":0,"Addr":"a:1","Metadata":false}"#),
            pairs(&[("metadata", "false")])
        );
    }

    #[test]
    fn etcd_naming_value_errors_are_typed() {
        let c = naming();
        let dec = |v: &[u8]| c.decode("svc", b"svc/a:1", v);
        assert_eq!(dec(br#"{"Op":0}"#), Err(DecodeError::MissingAddr));
        assert_eq!(dec(br#"{}"#), Err(DecodeError::MissingAddr));
        assert!(matches!(dec(b"10.0.0.7:8080"), Err(DecodeError::Json(_))));
        assert!(matches!(dec(b"\x01\x02\x03"), Err(DecodeError::Json(_))));
        assert_eq!(dec(b"\xff"), Err(DecodeError::ValueNotUtf8));
        assert_eq!(
            dec(br#"{"Op":0,"Addr":"nope"}"#),
            Err(DecodeError::Invalid(InstanceError::BadAddr {
                addr: "nope".into(),
                reason: "no port"
            }))
        );
        assert_eq!(
            dec(br#"{"Op":0,"Addr":"a:1","Metadata":{"":"x"}}"#),
            Err(DecodeError::Invalid(InstanceError::Empty {
                field: "meta key"
            }))
        );
    }

    #[test]
    fn errors_display_something_useful() {
        assert_eq!(
            DecodeError::ValueTooLarge {
                len: 70000,
                max: 65536
            }
            .to_string(),
            "value is 70000 bytes; the limit is 65536"
        );
        assert_eq!(
            DecodeError::Invalid(InstanceError::BadWeight { weight: 0 }).to_string(),
            "invalid instance: weight 0 is outside 1..=1000000"
        );
    }

    // ---- properties -------------------------------------------------------------------------

    fn layouts() -> impl Strategy<Value = KeyLayout> {
        prop_oneof![
            Just(KeyLayout::Native),
            Just(KeyLayout::GoZero),
            Just(KeyLayout::EtcdNaming)
        ]
    }

    proptest! {
        #[test]
        fn decode_never_panics(
            layout in layouts(),
            key in proptest::collection::vec(any::<u8>(), 0..40),
            value in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let c = Codec::new(layout, "/ns");
            let _ = c.decode("svc", &key, &value);
            let mut prefixed = b"/ns/svc/".to_vec();
            prefixed.extend_from_slice(&key);
            let _ = c.decode("svc", &prefixed, &value);
        }

        #[test]
        fn decode_never_panics_on_json_like_values(
            layout in layouts(),
            value in r#"[{}\[\]":,a-z0-9 .\\-]{0,60}"#,
        ) {
            let c = Codec::new(layout, "");
            let _ = c.decode("svc", b"svc/x", value.as_bytes());
        }

        #[test]
        fn native_round_trips_arbitrary_text(
            tags in proptest::collection::vec(any::<String>(), 0..4),
            meta in proptest::collection::btree_map("[^\u{0}]{1,8}", any::<String>(), 0..4),
            weight in 1..=MAX_WEIGHT,
            draining in any::<bool>(),
        ) {
            let mut b = Instance::builder("svc", "host-1:80")
                .id("i-1")
                .tags(tags)
                .weight(weight)
                .state(if draining { State::Draining } else { State::Up });
            for (k, v) in meta {
                b = b.meta(k, v);
            }
            let inst = b.build().unwrap();
            let c = Codec::new(KeyLayout::Native, "ns");
            let key = c.key(&inst, 0);
            prop_assert_eq!(put(c.decode("svc", key.as_bytes(), &c.encode_value(&inst))), inst);
        }
    }
}
