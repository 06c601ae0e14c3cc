//! Whether etcd's history is the one the machine applied (invariants 6 and 11 of
//! ARCHITECTURE.md §4): a response whose header went back or names another cluster, and the
//! check of etcd's keys at the applied revision before a watch is trusted.

use std::time::Instant;

use super::{Action, EXACT_CHECK_MAX_KEYS, Entry, Machine, Phase};
use crate::backend::{Header, KeysAt};
use crate::codec::Decoded;
use crate::snapshot::FreezeCause;

impl Machine {
    /// Whether etcd's keys at the applied revision are exactly the ones applied: the same keys,
    /// each created and last changed at the same revisions, under the same lease, and (for up
    /// to [`EXACT_CHECK_MAX_KEYS`] keys) with values that decode to what is held. Above that
    /// the read is keys only, and a key rewritten at the very same revisions under the same
    /// lease with another value is the one case it cannot tell apart. Both sides are in key
    /// order.
    pub(super) fn holds(&self, keys: &KeysAt) -> bool {
        let keys_only = self.entries.len() > EXACT_CHECK_MAX_KEYS;
        keys.keys.len() == self.entries.len()
            && keys
                .keys
                .iter()
                .zip(&self.entries)
                .all(|(theirs, (key, ours))| {
                    *theirs.key == **key
                        && theirs.mod_revision == ours.mod_revision
                        && theirs.create_revision == ours.create_revision
                        && theirs.lease == ours.lease
                        && (keys_only || self.same_value(key, theirs.value.as_deref(), ours))
                })
    }

    /// Whether etcd's value of `key` describes what `ours` holds; a value asked for and
    /// missing is a difference.
    fn same_value(&self, key: &[u8], theirs: Option<&[u8]>, ours: &Entry) -> bool {
        let Some(value) = theirs else {
            return false;
        };
        match (self.codec.decode(&self.service, key, value), &ours.instance) {
            (Ok(Decoded::Put(instance)), Some(held)) => instance == **held,
            (Ok(Decoded::Put(_)), None) => false,
            (Ok(Decoded::Delete) | Err(_), held) => held.is_none(),
        }
    }

    /// Whether a response says etcd's history is not the one we applied.
    pub(super) fn went_back(&self, header: Header) -> bool {
        self.cluster_id.is_some_and(|id| id != header.cluster_id) || header.revision < self.revision
    }

    pub(super) fn on_regression(&mut self, now: Instant, header: Header) -> Action {
        tracing::warn!(
            service = %self.service,
            applied = self.revision,
            header_revision = header.revision,
            cluster_id = ?self.cluster_id,
            header_cluster_id = header.cluster_id,
            "etcd's history does not follow the applied revision (restored, replaced, or a lagging member); relisting"
        );
        self.regressions += 1;
        if self.regressions == 1 {
            self.phase = Phase::Listing;
            Action::List
        } else {
            // The list just before said history was fine, yet the watch disagrees again: a member
            // that lags behind. Relisting at once would spin, so back off first; no watch is
            // open meanwhile, so the snapshot is frozen.
            self.freeze(now, FreezeCause::HistoryBehind);
            let delay = self.backoff.next_delay();
            self.phase = Phase::Sleeping { relist: true };
            Action::Sleep(delay)
        }
    }
}
