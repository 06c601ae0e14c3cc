//! The sans-IO sync machine never panics on any sequence of inputs, and keeps its invariants
//! (freeze-never-clear, monotonic revisions, partial batches) on every snapshot it publishes.
//! See `etcd_registry_fuzz::machine` for the input format and the exact checks.
#![no_main]

use etcd_registry_fuzz::machine::{Step, run};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|steps: Vec<Step>| run(&steps));
