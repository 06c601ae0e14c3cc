//! The list / watch / resume / freeze state machine, free of IO.
//!
//! The machine never awaits, never reads a clock and never touches the network: the driver feeds
//! it [`Input`]s together with the current time, and carries out the [`Action`]s it returns. That
//! makes every transition testable without a runtime, and lets property tests and fuzzers drive it
//! with arbitrary sequences.
//!
//! ```text
//!            ┌──────── Failed ─────────┐ (freeze, back off)
//!            ▼                         │
//!  start ─▶ Listing ──Listed──▶ WatchStarting ──WatchStarted──▶ Verifying ──match──▶ Watching
//!            ▲  ▲                      ▲                          │                │  ▲  │
//!            │  ├──── keys differ ─────┼──────────────────────────┘                │  └──┘
//!            │  └── Compacted / history went back / cluster changed ──────────────┘ WatchBatch /
//!            │                         │                                             Progress
//!            └──── TimerFired ── Sleeping (relist, or resume the watch) ◀── Failed (any phase)
//! ```
//!
//! What it guarantees (the numbers are the invariants of ARCHITECTURE.md §4):
//! 1. A failure freezes the snapshot: the instance set changes only on an answer from etcd.
//! 2. A watch resumes at `revision + 1`; events at or below the applied revision are ignored.
//!    Only events and lists move the revision: a progress notification proves the watch is
//!    alive but moves nothing (older etcd releases can answer one ahead of undelivered events).
//! 3. All events of one watch message are applied before anything is published.
//! 4. The revision never goes down, except when a list proves etcd went back in time (a reset,
//!    counted in [`Stats::resets`]).
//! 5. A compacted watch leads to one relist, applied as one new snapshot.
//! 6. A header revision below the applied one, or a new cluster id, leads to a relist.
//! 7. An undecodable entry is skipped and counted; the rest of the batch applies.
//!
//! 11. A watch (resumed after an interruption, or opened after a list) is trusted only once
//!     etcd's keys at the applied revision are the ones the machine applied ([`Action::Verify`],
//!     asked once the watch is open, so both read the same etcd): an etcd wiped or restored
//!     under the same cluster id whose new history has passed that revision is noticed, and
//!     relisted.

mod apply;
mod history;
mod restart;

use restart::Checkpoint;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Event, Header, KeysAt, ListResponse, WatchMessage};
use crate::backoff::{Backoff, BackoffConfig};
use crate::balance::health::{Balancing, OutlierEjection};
use crate::codec::Codec;
use crate::instance::Instance;
use crate::snapshot::{FreezeCause, Freshness, Snapshot};

/// Up to this many keys under the prefix, the history check before a resumed watch reads the
/// values too and is exact; above it, keys only (a fraction of the bytes of a relist).
pub const EXACT_CHECK_MAX_KEYS: usize = 1000;

/// How long quarantined keys are remembered for "log once" before the set is cleared.
const MAX_QUARANTINED: usize = 4096;

/// Something that happened, fed to [`Machine::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A list answered.
    Listed(ListResponse),
    /// A watch was accepted by the server; the header is from its creation response.
    WatchStarted(Header),
    /// One watch response: its events (all of one or more whole revisions).
    WatchBatch {
        /// The response header.
        header: Header,
        /// The events.
        events: Vec<Event>,
    },
    /// A progress notification: the watch is alive. (etcd means "every event up to
    /// `header.revision` was delivered", but releases before 3.4.24/3.5.8 can break that
    /// promise, so the machine takes it as proof of life only.)
    Progress(Header),
    /// The watch was cancelled because its start revision was compacted.
    Compacted {
        /// The oldest revision still available.
        compact_revision: i64,
    },
    /// The current list or watch failed (error, broken stream, stall, timeout).
    Failed(FreezeCause),
    /// The sleep asked for by [`Action::Sleep`] is over.
    TimerFired,
    /// The answer to [`Action::Verify`]: the keys under the prefix as of the applied revision.
    Verified(KeysAt),
    /// The answer to [`Action::Verify`] was that etcd has not reached the applied revision: its
    /// history is shorter than the one applied (etcd went back in time).
    HistoryShorter,
}

impl From<WatchMessage> for Input {
    fn from(msg: WatchMessage) -> Self {
        match msg {
            WatchMessage::Events { header, events } => Input::WatchBatch { header, events },
            WatchMessage::Progress { header } => Input::Progress(header),
            WatchMessage::Compacted { compact_revision } => Input::Compacted { compact_revision },
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone)]
pub enum Action {
    /// List the prefix (dropping any current watch).
    List,
    /// Read the keys under the prefix as of this revision (the applied one), keys only, and
    /// feed [`Input::Verified`]; a compacted revision is [`Input::Compacted`], a future one
    /// [`Input::HistoryShorter`]. Asked before resuming a watch after an interruption.
    Verify {
        /// The revision to read at.
        revision: i64,
        /// Whether to read the values too (for up to [`EXACT_CHECK_MAX_KEYS`] keys): then the
        /// check is exact; keys only, it cannot see a key rewritten with another value at the
        /// very same revisions under the same lease.
        with_values: bool,
    },
    /// Watch the prefix from this revision (dropping any current watch).
    Watch {
        /// The first revision to deliver.
        from_revision: i64,
    },
    /// Wait this long, then feed [`Input::TimerFired`].
    Sleep(Duration),
    /// Make this snapshot visible to readers.
    Publish(Arc<Snapshot>),
}

/// Counters of what the machine did; all only go up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Successful lists after the first (compaction, reset or detected regression).
    pub relists: u64,
    /// Lists that showed etcd went back in time or changed cluster: the snapshot's revision went
    /// down with them.
    pub resets: u64,
    /// Watches established after the first one.
    pub watch_restarts: u64,
    /// Watch events applied (duplicates at or below the applied revision are not counted).
    pub events_applied: u64,
    /// Events ignored because they were at or below the applied revision.
    pub events_skipped: u64,
    /// Entries that could not be decoded.
    pub decode_errors: u64,
    /// Failures that froze or kept the snapshot frozen.
    pub failures: u64,
    /// Checks of etcd's history before resuming a watch: one keys-only read each.
    pub verifications: u64,
}

/// What one input did.
enum Stepped {
    /// It does not apply in this phase; nothing changed.
    Ignored,
    /// It was taken, and calls for this action (if any).
    Accepted(Option<Action>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a list.
    Listing,
    /// Waiting for the keys at the applied revision, to trust a resumed watch.
    Verifying,
    /// Waiting for a watch to be accepted; `check`: then verify etcd's history before trusting
    /// it (a watch resumed after an interruption).
    WatchStarting { check: bool },
    /// Following a watch that was accepted at `since`.
    Watching { since: Instant },
    /// Waiting out a backoff; then list again, or watch again.
    Sleeping { relist: bool },
}

/// One key under the prefix, as last applied.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    /// The revision of the key's last change.
    mod_revision: i64,
    /// The revision the key was created at, and its lease: with `mod_revision`, what a
    /// keys-only read at the applied revision must show for the history to be the same one.
    create_revision: i64,
    lease: i64,
    /// `None` for a key that is there but describes no instance (it does not decode, or it
    /// decodes as a delete).
    instance: Option<Arc<Instance>>,
}

/// The sans-IO list/watch machine for one service.
#[derive(Debug)]
pub struct Machine {
    service: Arc<str>,
    codec: Codec,
    backoff: Backoff,
    phase: Phase,
    /// Every key under the prefix as last applied, with what it decoded to.
    entries: BTreeMap<Box<[u8]>, Entry>,
    /// The last revision applied; 0 before the first list.
    revision: i64,
    cluster_id: Option<u64>,
    freshness: Freshness,
    published: Arc<Snapshot>,
    /// The instance set changed since the last publish.
    changed: bool,
    /// Regressions seen since the last healthy watch; the second one in a row backs off first.
    regressions: u32,
    /// A verification found etcd's keys at the applied revision differ: the next list is a
    /// reset even if its revision is higher.
    rewritten: bool,
    listed: bool,
    watched: bool,
    quarantined: HashSet<Box<[u8]>>,
    stats: Stats,
    /// Balancing settings and the ejected count, shared by every snapshot of this cache.
    balancing: Arc<Balancing>,
    /// A snapshot after the first list was published: instances seen from now on are new.
    first_published: bool,
    /// Inside [`handle_all`](Self::handle_all). Still set on a machine parked by a task that
    /// ended in the middle of it (a panic in a user's tracing subscriber, say): what it applied
    /// since its last completed step may be half of a batch (see
    /// [`continue_from`](Self::continue_from)).
    stepping: bool,
    /// What the last completed `handle_all` left: the history a restart is checked against
    /// when the machine was interrupted mid-step.
    checkpoint: Checkpoint,
    /// The next successful list publishes a whole snapshot even if it matches what is held.
    republish: bool,
}

impl Machine {
    /// A machine for `service`, decoding with `codec`. `seed` seeds the backoff jitter: give each
    /// process a different one, or their retries line up after an outage.
    pub fn new(
        service: impl Into<Arc<str>>,
        codec: Codec,
        backoff: BackoffConfig,
        seed: u64,
        now: Instant,
    ) -> Self {
        let service = service.into();
        let freshness = Freshness::Frozen {
            since: now,
            cause: FreezeCause::NotListed,
        };
        let balancing = Balancing::new_at(service.clone(), OutlierEjection::default(), None, now);
        let published = Arc::new(Snapshot::new(
            service.clone(),
            0,
            freshness,
            Arc::default(),
            Arc::default(),
            balancing.clone(),
        ));
        Self::unapplied(
            service,
            codec,
            Backoff::new(backoff, seed),
            freshness,
            published,
            balancing,
        )
    }

    /// A machine that has applied nothing, about to list, with the given parts.
    fn unapplied(
        service: Arc<str>,
        codec: Codec,
        backoff: Backoff,
        freshness: Freshness,
        published: Arc<Snapshot>,
        balancing: Arc<Balancing>,
    ) -> Self {
        Self {
            published,
            balancing,
            first_published: false,
            service,
            codec,
            backoff,
            phase: Phase::Listing,
            entries: BTreeMap::new(),
            revision: 0,
            cluster_id: None,
            freshness,
            changed: false,
            regressions: 0,
            rewritten: false,
            listed: false,
            watched: false,
            quarantined: HashSet::new(),
            stats: Stats::default(),
            stepping: false,
            checkpoint: Checkpoint::default(),
            republish: false,
        }
    }

    /// The first action: list.
    pub fn start(&mut self) -> Vec<Action> {
        self.phase = Phase::Listing;
        vec![Action::List]
    }

    /// The last applied revision (0 before the first list).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The last published snapshot: before the first list, an empty frozen one (or, for a
    /// restarted sync task, the cache's snapshot it continued from).
    pub fn published(&self) -> &Arc<Snapshot> {
        &self.published
    }

    /// What the machine did so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Uses `balancing` (outlier ejection and slow start settings, the ejected count and the
    /// health registry) for the snapshots from now on. (The not-listed snapshot made by `new`
    /// keeps the default one: it holds no instance.)
    pub(crate) fn with_balancing(mut self, balancing: Arc<Balancing>) -> Self {
        self.balancing = balancing;
        self
    }

    /// The key prefix this machine follows.
    pub(crate) fn prefix(&self) -> Vec<u8> {
        self.codec.prefix(&self.service).into_bytes()
    }

    /// Whether the first list succeeded.
    pub fn has_listed(&self) -> bool {
        self.listed
    }

    /// Feeds one input at time `now`.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        self.handle_all(now, std::iter::once(input))
    }

    /// Feeds several inputs that arrived together, publishing at most one snapshot at the end.
    ///
    /// Inputs that no longer apply (events from a watch the machine already left, say) are
    /// ignored, so the driver may pass whatever it read in one go. The action returned is the
    /// one the last accepted input called for: an input that moved the machine on without
    /// needing IO (a watch acknowledged, say) leaves nothing to do.
    pub fn handle_all(
        &mut self,
        now: Instant,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Vec<Action> {
        self.stepping = true;
        let mut next = None;
        for input in inputs {
            if let Stepped::Accepted(action) = self.step(now, input) {
                next = action;
            }
        }
        let mut actions = Vec::with_capacity(2);
        if let Some(snapshot) = self.publish(now) {
            actions.push(Action::Publish(snapshot));
        }
        actions.extend(next);
        self.checkpoint = Checkpoint {
            listed: self.listed,
            watched: self.watched,
            cluster_id: self.cluster_id,
            rewritten: self.rewritten,
        };
        self.stepping = false;
        actions
    }

    fn step(&mut self, now: Instant, input: Input) -> Stepped {
        use Stepped::Accepted;
        match (self.phase, input) {
            (Phase::Listing, Input::Listed(list)) => Accepted(Some(self.on_listed(list))),
            (Phase::WatchStarting { check }, Input::WatchStarted(header)) => {
                if self.went_back(header) {
                    return Accepted(Some(self.on_regression(now, header)));
                }
                if check {
                    // The watch is open on whatever etcd runs now: check that one holds what
                    // was applied before trusting the watch. (Checked after the watch opened,
                    // not before: an etcd wiped in between would break a watch opened first,
                    // but not one opened after the check.)
                    self.phase = Phase::Verifying;
                    self.stats.verifications += 1;
                    return Accepted(Some(Action::Verify {
                        revision: self.revision,
                        with_values: self.entries.len() <= EXACT_CHECK_MAX_KEYS,
                    }));
                }
                self.watch_trusted(now);
                Accepted(None)
            }
            (Phase::Watching { .. }, Input::WatchBatch { header, events }) => {
                if self.went_back(header) {
                    return Accepted(Some(self.on_regression(now, header)));
                }
                self.apply_events(events);
                self.set_live();
                Accepted(None)
            }
            (Phase::Watching { .. }, Input::Progress(header)) => {
                if self.went_back(header) {
                    return Accepted(Some(self.on_regression(now, header)));
                }
                // Proof of life only: the resume revision does not move. etcd before 3.4.24 and
                // 3.5.8 can answer a progress request for a watcher still catching up with a
                // revision ahead of events it has not delivered yet (etcd issue 15220), and
                // moving up to it would skip them. The cost: a prefix quiet across a compaction
                // relists on its next reconnect instead of resuming.
                self.set_live();
                Accepted(None)
            }
            (
                Phase::Verifying | Phase::WatchStarting { .. } | Phase::Watching { .. },
                Input::Compacted { compact_revision },
            ) => {
                tracing::info!(
                    service = %self.service,
                    revision = self.revision,
                    compact_revision,
                    "watch history compacted past the applied revision; relisting"
                );
                self.phase = Phase::Listing;
                Accepted(Some(Action::List))
            }
            (
                Phase::Listing
                | Phase::Verifying
                | Phase::WatchStarting { .. }
                | Phase::Watching { .. },
                Input::Failed(cause),
            ) => Accepted(Some(self.on_failed(now, cause))),
            (Phase::Sleeping { relist }, Input::TimerFired) => {
                Accepted(Some(if relist || !self.listed {
                    self.phase = Phase::Listing;
                    Action::List
                } else {
                    // Whatever interrupted the watch, etcd may have been wiped or restored
                    // meanwhile under the same cluster id: resume, but check what etcd holds at
                    // the applied revision before trusting the watch.
                    self.phase = Phase::WatchStarting { check: true };
                    Action::Watch {
                        from_revision: self.revision.saturating_add(1),
                    }
                }))
            }
            (Phase::Verifying, Input::Verified(keys)) => {
                if self.went_back(keys.header) {
                    return Accepted(Some(self.on_regression(now, keys.header)));
                }
                if self.holds(&keys) {
                    self.watch_trusted(now);
                    return Accepted(None);
                }
                Accepted(Some({
                    tracing::warn!(
                        service = %self.service,
                        revision = self.revision,
                        cluster_id = keys.header.cluster_id,
                        "etcd holds other keys at the applied revision than were applied: its history was rewritten under the same identity (wiped or restored); relisting"
                    );
                    self.rewritten = true;
                    self.phase = Phase::Listing;
                    Action::List
                }))
            }
            (Phase::Verifying, Input::HistoryShorter) => {
                tracing::warn!(
                    service = %self.service,
                    revision = self.revision,
                    "etcd has not reached the applied revision: its history went back; relisting"
                );
                self.phase = Phase::Listing;
                Accepted(Some(Action::List))
            }
            (phase, input) => {
                tracing::trace!(service = %self.service, ?phase, ?input, "input ignored in this phase");
                Stepped::Ignored
            }
        }
    }

    /// The open watch is on the history that was applied: follow it.
    fn watch_trusted(&mut self, now: Instant) {
        if self.watched {
            self.stats.watch_restarts += 1;
        }
        self.watched = true;
        self.regressions = 0;
        self.phase = Phase::Watching { since: now };
        self.set_live();
    }

    fn on_failed(&mut self, now: Instant, cause: FreezeCause) -> Action {
        self.stats.failures += 1;
        if let Phase::Watching { since } = self.phase {
            if now.saturating_duration_since(since) >= self.backoff.config().reset_after {
                self.backoff.reset();
            }
        }
        self.freeze(now, cause);
        // A history check refused for what retrying cannot change (an answer over the size
        // limit, an unexpected error) would be asked again forever: list instead, which is
        // authoritative on its own.
        let relist = match self.phase {
            Phase::Listing => true,
            Phase::Verifying => matches!(cause, FreezeCause::ResponseTooLarge | FreezeCause::Other),
            _ => false,
        };
        let delay = self.backoff.next_delay();
        tracing::debug!(service = %self.service, %cause, ?delay, relist, "backing off");
        self.phase = Phase::Sleeping { relist };
        Action::Sleep(delay)
    }

    /// Freezes, or, when frozen already, reports the latest cause (frozen `since` stays): the
    /// cause says why the cache is frozen now, so a wrong certificate met once etcd is back is
    /// not hidden behind the outage that began it, nor behind `NotListed`.
    fn freeze(&mut self, now: Instant, cause: FreezeCause) {
        match self.freshness {
            Freshness::Live => {
                tracing::info!(service = %self.service, %cause, revision = self.revision, "frozen: keeping the last known instances");
                self.freshness = Freshness::Frozen { since: now, cause };
            }
            Freshness::Frozen {
                since,
                cause: current,
            } if current != cause => {
                tracing::debug!(service = %self.service, %cause, "still frozen, now because of this");
                self.freshness = Freshness::Frozen { since, cause };
            }
            Freshness::Frozen { .. } => {}
        }
    }

    fn set_live(&mut self) {
        if !self.freshness.is_live() && self.listed {
            tracing::info!(service = %self.service, revision = self.revision, "live: following etcd again");
            self.freshness = Freshness::Live;
        }
    }

    /// A new snapshot if the instances, the revision of the last applied change, or the
    /// freshness changed since the last one. (A progress notification alone publishes nothing,
    /// so idle caches do not wake their subscribers.)
    fn publish(&mut self, now: Instant) -> Option<Arc<Snapshot>> {
        let snapshot = if self.changed {
            let instances: Arc<[Arc<Instance>]> = self
                .entries
                .values()
                .filter_map(|entry| entry.instance.clone())
                .collect();
            // Health lives in the balancing registry, by instance id; the slots carry it over.
            let health = self.balancing.slots(&instances, now, !self.first_published);
            Snapshot::new(
                self.service.clone(),
                self.revision,
                self.freshness,
                instances,
                health,
                self.balancing.clone(),
            )
        } else if self.freshness != self.published.freshness() {
            // Before the first list, the revision of the snapshot this machine started from
            // (see `continue_from`), not 0.
            let revision = if self.listed {
                self.revision
            } else {
                self.published.revision()
            };
            self.published.with(revision, self.freshness)
        } else {
            return None;
        };
        self.changed = false;
        if self.listed {
            self.first_published = true;
        }
        self.published = Arc::new(snapshot);
        Some(self.published.clone())
    }
}

#[cfg(test)]
mod tests;
