//! The decode targets: one key-value pair, decoded by one layout's [`Codec`].
//!
//! # Input format
//!
//! `[head, key bytes…, value bytes…]`: the low 7 bits of `head` are the key's length (cut to
//! what is left), and its high bit says whether the codec's prefix for the service is put in
//! front of the key. With the bit set the fuzzer reaches the value parsers without having to
//! discover the prefix first; without it, it still tries raw keys (foreign, sibling, non-UTF-8).
//! Everything after the key is the value. An empty input is the empty key and value.
//!
//! Each input is decoded under the namespace [`NAMESPACE`] and under the empty namespace.

use etcd_registry::instance::Instance;
use etcd_registry::{Codec, DecodeError, Decoded, KeyLayout};

/// The namespace the targets decode under (besides the empty one).
pub const NAMESPACE: &str = "/services";

/// A small value bound, to check that oversize values are refused before they are parsed.
const SMALL_MAX: usize = 8;

/// The service each layout decodes for, as that layout's writers name services.
pub fn service(layout: KeyLayout) -> &'static str {
    match layout {
        KeyLayout::GoZero => "user.rpc",
        KeyLayout::EtcdNaming => "my-service",
        _ => "user",
    }
}

/// Splits an input into (whether to prefix the key, key, value).
pub fn split(data: &[u8]) -> (bool, &[u8], &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return (false, &[], &[]);
    };
    let len = usize::from(head & 0x7f).min(rest.len());
    let (key, value) = rest.split_at(len);
    (head & 0x80 != 0, key, value)
}

/// Builds an input in the format [`split`] reads (for seed corpora).
///
/// # Panics
/// If the key is longer than 127 bytes.
pub fn join(prefixed: bool, key: &[u8], value: &[u8]) -> Vec<u8> {
    let len = u8::try_from(key.len()).ok().filter(|l| *l < 0x80);
    let len = len.expect("a key of at most 127 bytes");
    let mut out = vec![len | if prefixed { 0x80 } else { 0 }];
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

/// The whole check of one decode target.
pub fn run(layout: KeyLayout, data: &[u8]) {
    let (prefixed, key, value) = split(data);
    for namespace in [NAMESPACE, ""] {
        let codec = Codec::new(layout, namespace);
        let service = service(layout);
        let key = if prefixed {
            let mut full = codec.prefix(service).into_bytes();
            full.extend_from_slice(key);
            full
        } else {
            key.to_vec()
        };
        check(&codec, namespace, service, &key, value);
    }
}

/// Decodes `key` → `value` with `codec` (made for `namespace`) and checks everything the codec
/// promises about the answer. Panics on a broken promise.
fn check(codec: &Codec, namespace: &str, service: &str, key: &[u8], value: &[u8]) {
    let layout = codec.layout();
    // Decoding never panics: this is the call the fuzzer exercises most.
    let got = codec.decode(service, key, value);

    // Trailing `/`s of the namespace are trimmed, so both spellings decode alike.
    let slashed = Codec::new(layout, format!("{namespace}/"));
    assert_eq!(
        slashed.decode(service, key, value),
        got,
        "namespace {namespace:?} + '/'"
    );

    // The key is checked first; its error is the decode error, and a good key names the id.
    let id = match codec.instance_id(service, key) {
        Err(key_error) => {
            assert_eq!(got, Err(key_error), "a bad key is the decode error");
            return;
        }
        Ok(id) => id,
    };

    // The size bound is applied before any parsing: past it, nothing else is looked at.
    let small = Codec::new(layout, namespace).with_max_value_size(SMALL_MAX);
    let small_got = small.decode(service, key, value);
    if value.len() > SMALL_MAX {
        let too_large = DecodeError::ValueTooLarge {
            len: value.len(),
            max: SMALL_MAX,
        };
        assert_eq!(small_got, Err(too_large));
    } else {
        assert_eq!(small_got, got, "a value within both bounds decodes alike");
    }

    match got {
        Ok(Decoded::Put(instance)) => check_put(codec, service, id, key, value, &instance),
        Ok(Decoded::Delete) => {
            assert_eq!(
                layout,
                KeyLayout::EtcdNaming,
                "only etcd-naming has deletes"
            )
        }
        Err(_) => {}
    }
}

fn check_put(codec: &Codec, service: &str, id: &str, key: &[u8], value: &[u8], i: &Instance) {
    // The instance is the service's, under the key's id.
    assert_eq!(i.service(), service);
    assert_eq!(i.id(), id);
    // It satisfies the library's limits: building it again gives it back.
    assert_eq!(
        i.to_builder().build().as_ref(),
        Ok(i),
        "decoded instance fails validation"
    );

    let encoded = codec.encode_value(i);
    match codec.layout() {
        KeyLayout::Native => {
            // The key it is written under is the one it was read from, and writing then reading
            // gives it back (every field survives).
            assert_eq!(codec.key(i, 0).as_bytes(), key);
        }
        KeyLayout::GoZero => {
            // go-zero carries the bare address and nothing else.
            assert_eq!(value, i.addr().as_bytes());
            assert_eq!(encoded, value);
            assert_default_extras(i);
            assert_eq!(i.metadata().len(), 0);
        }
        _ => {
            // etcd-naming carries the address and metadata only.
            assert_default_extras(i);
        }
    }
    // Writing then reading under the same key gives the same instance, in every layout (the
    // foreign layouts drop only what their decoder never fills in).
    assert_eq!(
        codec.decode(service, key, &encoded),
        Ok(Decoded::Put(i.clone())),
        "round trip through {:?}",
        String::from_utf8_lossy(&encoded)
    );
}

/// Tags, weight and state as a foreign layout's instance has them: none, 1, up.
fn assert_default_extras(i: &Instance) {
    assert_eq!(i.tags().len(), 0);
    assert_eq!(i.weight(), 1);
    assert!(i.is_up());
}
