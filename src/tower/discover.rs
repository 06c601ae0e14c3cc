//! [`Discover`]: the instances of a cache as tower's `Discover` stream of services.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::tower::discover::Change;
use futures_util::{Stream, StreamExt};
use std::collections::VecDeque;

use crate::cache::ServiceCache;
use crate::diff::{Diff, InstanceChange};
use crate::instance::Instance;

type Diffs = Pin<Box<dyn Stream<Item = Diff> + Send>>;

/// The instances of a cache as a tower [`Discover`](::tower::discover::Discover): a stream of
/// `Change::Insert(id, service)` and `Change::Remove(id)`, keyed by instance id, with `make`
/// building each instance's service.
///
/// Made for tower's `Balance` (and tonic's `balance_channel`, through
/// [`crate::tonic::feed_balance_channel`]), which fail for good on a discover error and stop
/// updating when the stream ends. So this stream:
///
/// - **never yields `Err`** (its error type is `Infallible`);
/// - **never ends** while it lives (it holds a clone of the cache);
/// - **never removes while the cache is frozen** (a frozen snapshot keeps every instance);
/// - **leaves draining instances out**: an instance that starts draining is removed, one that
///   comes back up is inserted again; an instance whose value changes (address, metadata,
///   weight) is inserted again with a new service (tower replaces the service of a key
///   inserted twice).
///
/// ```
/// # use etcd_registry::{Discovery, MemoryBackend};
/// use etcd_registry::tower::Discover;
/// use futures_util::StreamExt;
/// use tower::discover::Change;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), etcd_registry::Error> {
/// # let etcd = MemoryBackend::new();
/// # etcd.put("user/u1", r#"{"addr":"10.0.0.1:80"}"#);
/// let users = Discovery::memory(etcd).build()?.service("user").await?;
/// let mut discover = Discover::new(&users, |instance| instance.addr().to_owned());
/// match discover.next().await {
///     Some(Ok(Change::Insert(id, service))) => assert_eq!((&*id, &*service), ("u1", "10.0.0.1:80")),
///     other => panic!("expected an insert: {other:?}"),
/// }
/// # Ok(()) }
/// ```
pub struct Discover<S> {
    diffs: Diffs,
    make: Arc<dyn Fn(&Instance) -> S + Send + Sync>,
    pending: VecDeque<Change<String, S>>,
    membership: Membership,
}

impl<S> Discover<S> {
    /// The instances of `cache` as services made by `make`.
    pub fn new<F>(cache: &ServiceCache, make: F) -> Self
    where
        F: Fn(&Instance) -> S + Send + Sync + 'static,
    {
        Self {
            diffs: Box::pin(cache.diffs().into_stream()),
            make: Arc::new(make),
            pending: VecDeque::new(),
            membership: Membership::default(),
        }
    }
}

/// The rules by which a balancer's set follows the diffs, shared by [`Discover`] and the tonic
/// feeder: an instance up is inserted, and inserted again with a new service on any change of
/// its value (the constructor may read any of it: the address, a scheme in the metadata); one
/// that drains or leaves etcd is removed, if it was inserted.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    /// The ids inserted and not removed since.
    inserted: HashSet<String>,
}

impl Membership {
    /// The changes `diff` makes to the set, in order, passed to `out`. `make` builds an
    /// instance's service; `None` (it cannot be built) leaves the instance out, removing the
    /// service it had.
    pub(crate) fn apply<S>(
        &mut self,
        diff: &Diff,
        mut make: impl FnMut(&Instance) -> Option<S>,
        mut out: impl FnMut(Change<String, S>),
    ) {
        for change in &diff.changes {
            let instance = match change {
                InstanceChange::Added(instance) | InstanceChange::Updated { new: instance, .. } => {
                    instance
                }
                InstanceChange::Removed(instance) => instance,
            };
            let id = instance.id();
            let service = match change {
                InstanceChange::Removed(_) => None,
                _ if !instance.is_up() => None,
                _ => make(instance),
            };
            match service {
                Some(service) => {
                    self.inserted.insert(id.to_owned());
                    out(Change::Insert(id.to_owned(), service));
                }
                None => {
                    if self.inserted.remove(id) {
                        out(Change::Remove(id.to_owned()));
                    }
                }
            }
        }
    }
}

impl<S> Stream for Discover<S> {
    type Item = Result<Change<String, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match self.diffs.poll_next_unpin(cx) {
                Poll::Ready(Some(diff)) => {
                    let this = &mut *self;
                    let make = &this.make;
                    let pending = &mut this.pending;
                    this.membership.apply(
                        &diff,
                        |instance| Some(make(instance)),
                        |change| pending.push_back(change),
                    );
                }
                // The diffs hold the cache, so they never end; if they did, so would this
                // stream, which is all tower can be told.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S> Unpin for Discover<S> {}

impl<S> fmt::Debug for Discover<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discover")
            .field("inserted", &self.membership.inserted.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}
