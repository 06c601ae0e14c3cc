//! Metric names, in one place.
//!
//! The crate records through the [`metrics`](https://docs.rs/metrics) facade, so the metrics go
//! wherever the application installed a recorder (Prometheus, StatsD, …) and cost nothing when
//! none is installed. Every metric carries a `service` label. The crate root's *Observability*
//! section lists these names together with the tracing span names and event targets.

/// Gauge: instances in the current snapshot.
pub const INSTANCES: &str = "etcd_registry_instances";
/// Gauge: 1 while the snapshot is frozen (etcd unreachable), 0 while live.
pub const FROZEN: &str = "etcd_registry_frozen";
/// Counter: relists after the first list (compaction, reset, regression).
pub const RELISTS: &str = "etcd_registry_relists_total";
/// Counter: times etcd was found to have gone back in time or changed cluster.
pub const RESETS: &str = "etcd_registry_resets_total";
/// Counter: watches re-established after the first.
pub const WATCH_RESTARTS: &str = "etcd_registry_watch_restarts_total";
/// Counter: watch events applied.
pub const EVENTS_APPLIED: &str = "etcd_registry_events_applied_total";
/// Counter: entries that could not be decoded and were skipped.
pub const DECODE_ERRORS: &str = "etcd_registry_decode_errors_total";
/// Counter: list or watch failures.
pub const FAILURES: &str = "etcd_registry_failures_total";
/// Counter: snapshots published.
pub const PUBLISHES: &str = "etcd_registry_publishes_total";
/// Counter: reported outcomes of picks, labelled `outcome` (`success`, `failure`, `dropped`).
pub const PICKS: &str = "etcd_registry_picks_total";
/// Counter: instances ejected by outlier ejection.
pub const EJECTIONS: &str = "etcd_registry_ejections_total";
/// Gauge: instances ejected now. An ejection that ends leaves it at the next sweep: the
/// first report, `health()` read, or pick that meets an ejected instance after the end, and
/// at the latest the cache's sweep timer,
/// [`sweep_interval`](crate::OutlierEjection::sweep_interval) (default 10 s) after the end.
pub const EJECTED: &str = "etcd_registry_ejected";

use crate::sync::machine::Stats;

/// Records what changed between two stats readings of `service`.
pub(crate) fn record_stats(service: &str, before: &Stats, after: &Stats) {
    let pairs = [
        (RELISTS, before.relists, after.relists),
        (RESETS, before.resets, after.resets),
        (WATCH_RESTARTS, before.watch_restarts, after.watch_restarts),
        (EVENTS_APPLIED, before.events_applied, after.events_applied),
        (DECODE_ERRORS, before.decode_errors, after.decode_errors),
        (FAILURES, before.failures, after.failures),
    ];
    for (name, was, is) in pairs {
        if is > was {
            metrics::counter!(name, "service" => service.to_owned()).increment(is - was);
        }
    }
}

/// Records a published snapshot of `service`.
pub(crate) fn record_publish(service: &str, instances: usize, frozen: bool) {
    metrics::gauge!(INSTANCES, "service" => service.to_owned()).set(instances as f64);
    metrics::gauge!(FROZEN, "service" => service.to_owned()).set(if frozen { 1.0 } else { 0.0 });
    metrics::counter!(PUBLISHES, "service" => service.to_owned()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crate root's docs are the one list of observability names; it must not drift from
    /// the names the code records under.
    #[test]
    fn the_crate_docs_list_every_metric_and_span() {
        let docs = include_str!("lib.rs");
        let metrics = [
            INSTANCES,
            FROZEN,
            RELISTS,
            RESETS,
            WATCH_RESTARTS,
            EVENTS_APPLIED,
            DECODE_ERRORS,
            FAILURES,
            PUBLISHES,
            PICKS,
            EJECTIONS,
            EJECTED,
        ];
        for name in metrics {
            assert!(
                docs.contains(&format!("| `{name}` |")),
                "{name} is not listed"
            );
        }
        let listed = docs.matches("| `etcd_registry_").count();
        assert_eq!(
            listed,
            metrics.len(),
            "the docs list a metric that does not exist"
        );
        for (span, source) in [
            ("etcd_registry::cache", include_str!("sync/driver.rs")),
            (
                "etcd_registry::registration",
                include_str!("register/keeper.rs"),
            ),
        ] {
            assert!(
                docs.contains(&format!("| `{span}` |")),
                "{span} is not listed"
            );
            assert!(
                source.contains(&format!("\"{span}\"")),
                "{span} is not recorded"
            );
        }
    }
}
