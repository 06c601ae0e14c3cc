use super::*;
use crate::instance::{MAX_META, MAX_WEIGHT, State};
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
    let b =
        put(Codec::new(KeyLayout::Native, "/services/").decode("user", b"/services/user/u1", v));
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
