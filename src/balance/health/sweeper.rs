//! The sweep timer: one task per cache that ends the ejections no pick, report or health read
//! noticed.
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

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio::time::sleep_until;

use super::Outliers;

/// Starts the sweep timer of the cache `outliers` belongs to, unless one already runs (a sync
/// task restarted in the same runtime keeps it). It ends when `stop` closes: the last handle of
/// the cache was dropped. Nothing starts outside a tokio runtime (the cache's sync task, started
/// first, needs one too).
pub(crate) fn spawn(outliers: Arc<Outliers>, stop: watch::Receiver<()>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if outliers
        .sweeper_running
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    // Made before the task is: a runtime that shuts down before polling it drops it, and with it
    // the claim, so the next start of the cache's task starts a timer again.
    let running = Running(outliers);
    runtime.spawn(run(running, stop));
}

/// The claim of the one sweep timer of a cache, given back when its task ends (or is dropped
/// unpolled).
struct Running(Arc<Outliers>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.sweeper_running.store(false, Ordering::Release);
    }
}

async fn run(running: Running, mut stop: watch::Receiver<()>) {
    let outliers = &running.0;
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
            // Nothing is ever sent: this resolves when the last handle drops the sender.
            _ = stop.changed() => break,
            () = outliers.sweep_moved() => {}
            () = timer => outliers.sweep_if_due(crate::balance::now()),
        }
    }
}
