//! A cache's sync task dropped with its thread's locals (a current-thread runtime kept in a
//! thread-local): its destructor must still tell the cache, and a restart must work. A file of
//! its own because the test pauses a tokio clock, which changes how tokio reads its clock for
//! the rest of the process.

mod support;

use etcd_registry::{Discovery, MemoryBackend};
use support::*;

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

    let users = cache_on_a_runtime_dropped_with_its_thread(&discovery, &etcd);

    let said = users.freshness();
    etcd.set_reachable(true);
    let restarted = restarts(&discovery, &etcd);
    assert!(
        task_ended(said) && restarted,
        "the task is gone with its runtime, yet the cache said {said:?}; asking for the \
         service again restarted it: {restarted}"
    );
}
