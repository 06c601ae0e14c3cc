//! The sweep timer: ends the ejections no pick, report or health read noticed.
//!
//! An ejection ends at the first clock read past its end wherever a clock is read anyway (see
//! [`Outliers::sweep_due`]). A caller with no traffic reads none, so without this timer its
//! ejected count, the `etcd_registry_ejected` gauge and the instance's return event would wait
//! for its next request, however late. The timer sleeps until
//! [`sweep_interval`](super::OutlierEjection::sweep_interval) after the earliest end not yet
//! swept, and sweeps then unless something else did first. While nothing is ejected it waits on
//! a [`Notify`](tokio::sync::Notify) and costs nothing; an ejection that ends earlier than it
//! sleeps for wakes it. Like Envoy's `interval` sweeps, but only while there is something to
//! sweep, and the in-line sweeps keep every end exact for callers that do pick.
//!
//! It runs inside the cache's sync task, beside the sync loop (see
//! [`driver::spawn`](crate::sync::driver::spawn)): it starts, ends and restarts with that
//! task, so a cache has exactly one timer while it has a sync task.

use std::sync::Arc;

use tokio::time::sleep_until;

use super::Outliers;

/// Sweeps the ejections of the cache `outliers` belongs to on time, for ever: the sync task
/// that runs it drops it when it ends.
pub(crate) async fn run(outliers: Arc<Outliers>) {
    loop {
        let due = outliers.timer_due();
        let timer = async {
            match due {
                Some(at) => sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = outliers.sweep_moved() => {}
            () = timer => outliers.sweep_if_due(crate::balance::now()),
        }
    }
}
