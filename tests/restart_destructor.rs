//! A cache's sync task dropped with its thread's locals (a current-thread runtime kept in a
//! thread-local): its destructor must still tell the cache, and a restart must work. A file of
//! its own because the test pauses a tokio clock, which changes how tokio reads its clock for
//! the rest of the process.

mod support;

use std::cell::RefCell;
use std::time::Duration;

use etcd_registry::{Discovery, FreezeCause, Freshness, MemoryBackend};
use support::*;

const LONG: Duration = Duration::from_secs(10);

thread_local! {
    /// A runtime kept by its thread, dropped when the thread's locals are destroyed.
    static KEPT: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Issue (review): the driver's destructor read tokio's clock (for `Machine::take`'s
/// placeholder, and `Balancing::new` inside it) before telling the cache. With tokio's
/// `test-util` on and a clock paused anywhere in the process, that read asks for the current
/// runtime and panics once tokio's thread-local context is destroyed: a current-thread runtime
/// dropped with its thread's locals. tokio catches the panic of a task's drop, so `task_ended`
/// never ran: the cache kept its old freshness with no task, and stayed marked as running, so
/// asking for the service again never restarted it (invariant 12). `take` now reads no clock
/// and calls no user code.
#[test]
fn a_task_dropped_with_its_thread_s_locals_still_says_task_ended_and_restarts() {
    // Any runtime that ever paused its clock switches tokio's clock reads to the runtime's.
    drop(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a paused runtime"),
    );
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    let discovery = Discovery::memory(etcd.clone())
        .namespace(NS)
        .build()
        .expect("valid settings");

    let users = std::thread::spawn({
        let discovery = discovery.clone();
        let etcd = etcd.clone();
        move || {
            // Registered before tokio's context is first touched: destroyed after it.
            KEPT.with(|_| {});
            let rt = runtime();
            let users = rt.block_on(discovery.service("user")).expect("first list");
            assert!(users.freshness().is_live());
            // No watch stream open when the runtime goes (the memory backend's stream reads
            // tokio's clock in its own destructor): etcd unreachable, the task backing off.
            etcd.set_reachable(false);
            rt.block_on(wait_for(&users, LONG, "frozen", |s| {
                !s.freshness().is_live()
            }));
            KEPT.with(|kept| *kept.borrow_mut() = Some(rt));
            users
        }
    })
    .join()
    .expect("the thread");

    let said = users.freshness();
    etcd.set_reachable(true);
    let restarted = runtime().block_on(async {
        let again = discovery.service("user").await.expect("the service again");
        register(&etcd, "b", 2);
        let mut changes = again.changes();
        let found = tokio::time::timeout(
            LONG,
            changes.wait_for(|s| s.freshness().is_live() && ids(s) == list(&["a@1", "b@2"])),
        )
        .await;
        found.is_ok_and(|found| found.is_ok())
    });
    assert!(
        matches!(
            said,
            Freshness::Frozen {
                cause: FreezeCause::TaskEnded,
                ..
            }
        ) && restarted,
        "the task is gone with its runtime, yet the cache said {said:?}; asking for the \
         service again restarted it: {restarted}"
    );
}
