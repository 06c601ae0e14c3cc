//! etcd's naming endpoints ([`KeyLayout::EtcdNaming`](super::KeyLayout::EtcdNaming)):
//! `{"Op":0,"Addr":…,"Metadata":…}`.

use serde::Deserialize;

use super::json::{push_json_meta, push_json_str};
use super::native::Str;
use super::{DecodeError, Decoded, json_error};
use crate::instance::Instance;

#[derive(Deserialize)]
struct NamingValue<'a> {
    #[serde(default, rename = "Op", alias = "op")]
    op: Option<u64>,
    #[serde(default, borrow, rename = "Addr", alias = "addr")]
    addr: Option<Str<'a>>,
    #[serde(default, rename = "Metadata", alias = "metadata")]
    metadata: Option<serde_json::Value>,
}

pub(super) fn decode_naming(service: &str, id: &str, value: &str) -> Result<Decoded, DecodeError> {
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

pub(super) fn encode_naming(instance: &Instance) -> Vec<u8> {
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
