//! A metrics recorder whose handles count, each counter and gauge one `AtomicU64` as an
//! exporter's are (`metrics-exporter-prometheus` keeps them in `metrics-util`'s
//! `AtomicStorage`), and which keeps `(metric name and labels, value)` of every handle it
//! registered so that tests can read the totals.
//!
//! Tests install it globally (`metrics::set_global_recorder`); a bench makes a cache under it
//! with `metrics::with_local_recorder` (a cache registers its handles when it is made). Benches
//! include this file alone by `#[path]`.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Counts through the handles it hands out; see the module docs.
pub struct Recorder {
    handles: Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

impl Recorder {
    pub const fn new() -> Self {
        Self {
            handles: Mutex::new(Vec::new()),
        }
    }

    fn handle(&self, key: &metrics::Key) -> Arc<AtomicU64> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let value = Arc::new(AtomicU64::new(0));
        self.handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name, value.clone()));
        value
    }

    /// The sum of the counters whose name and labels contain every one of `parts`.
    pub fn total(&self, parts: &[&str]) -> u64 {
        let handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        handles
            .iter()
            .filter(|(name, _)| parts.iter().all(|p| name.contains(p)))
            .map(|(_, v)| v.load(Ordering::Relaxed))
            .sum()
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.handle(key))
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.handle(key))
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}
