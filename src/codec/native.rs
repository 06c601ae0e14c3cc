//! The native wire format ([`KeyLayout::Native`](super::KeyLayout::Native)): one JSON object
//! per instance, read borrowing from the input where it can.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

use super::json::{push_json_meta, push_json_str};
use super::{DecodeError, json_error};
use crate::instance::{Instance, State};

/// A string that borrows from the input unless it had escapes.
#[derive(Deserialize)]
#[serde(transparent)]
pub(super) struct Str<'a>(#[serde(borrow)] pub(super) Cow<'a, str>);

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

pub(super) fn decode_native(
    service: &str,
    key_id: &str,
    value: &str,
) -> Result<Instance, DecodeError> {
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

pub(super) fn encode_native(instance: &Instance) -> Vec<u8> {
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
