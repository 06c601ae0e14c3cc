//! Decoding one key-value pair in the native layout never panics, and every instance it yields is
//! valid and survives a round trip. See `etcd_registry_fuzz::decode` for the input format.
#![no_main]

use etcd_registry::KeyLayout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| etcd_registry_fuzz::decode::run(KeyLayout::Native, data));
