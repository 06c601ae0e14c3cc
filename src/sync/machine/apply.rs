//! Applying what etcd answered: a list, as a whole new state (kept as a diff, so unchanged
//! instances keep their allocation), and a watch message's events, each above the applied
//! revision. An entry that does not decode is skipped, counted and logged once.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Action, Entry, MAX_QUARANTINED, Machine, Phase};
use crate::backend::{Event, EventKind, KeyValue, ListResponse};
use crate::codec::Decoded;
use crate::instance::Instance;

impl Machine {
    pub(super) fn on_listed(&mut self, list: ListResponse) -> Action {
        let header = list.header;
        if self.listed {
            self.stats.relists += 1;
            // Taken before the test: a list that is a reset for both reasons must not leave the
            // flag set for a later, unrelated relist.
            let rewritten = std::mem::take(&mut self.rewritten);
            if self.went_back(header) || rewritten {
                self.stats.resets += 1;
                tracing::warn!(
                    service = %self.service,
                    from_revision = self.revision,
                    to_revision = header.revision,
                    cluster_id = header.cluster_id,
                    "etcd went back in time (restored from a backup or replaced); the snapshot resets to its state"
                );
                // `regressions` stays: only a healthy watch clears it. If the watch keeps
                // disagreeing with the list (endpoints of two clusters behind one client), the
                // next disagreement backs off instead of relisting at once, forever.
            }
        }
        let mut fresh = BTreeMap::new();
        for kv in list.kvs {
            let instance = self.decode_instance(&kv);
            let entry = Entry {
                mod_revision: kv.mod_revision,
                create_revision: kv.create_revision,
                lease: kv.lease,
                instance,
            };
            fresh.insert(kv.key.into_boxed_slice(), entry);
        }
        // Taken first: a list is the one that republishes, whatever else changed.
        let republish = std::mem::take(&mut self.republish);
        if republish || fresh != self.entries || header.revision != self.revision {
            self.changed = true;
            self.entries = fresh;
        }
        // The first list always publishes, even an empty one: its freshness turns live below.
        self.revision = header.revision;
        self.cluster_id = Some(header.cluster_id);
        self.listed = true;
        self.set_live();
        // Checked too: etcd may be wiped between this list and the watch's creation, and the
        // watch would then follow a history the list never saw.
        self.phase = Phase::WatchStarting { check: true };
        Action::Watch {
            from_revision: self.revision.saturating_add(1),
        }
    }

    pub(super) fn apply_events(&mut self, events: Vec<Event>) {
        let mut top = self.revision;
        for event in events {
            let rev = event.kv.mod_revision;
            if rev <= self.revision {
                self.stats.events_skipped += 1;
                continue;
            }
            top = top.max(rev);
            self.stats.events_applied += 1;
            // Even an event that leaves the instances as they were moves the revision, and the
            // published revision promises every change up to it is included: publish.
            self.changed = true;
            match event.kind {
                EventKind::Put => {
                    let instance = self.decode_instance(&event.kv);
                    let entry = Entry {
                        mod_revision: rev,
                        create_revision: event.kv.create_revision,
                        lease: event.kv.lease,
                        instance,
                    };
                    // An entry that no longer decodes no longer describes a reachable instance:
                    // it goes from the snapshot, exactly as a relist would drop it, so watch and
                    // list agree; the key stays known, for verifying etcd's history.
                    self.entries.insert(event.kv.key.into_boxed_slice(), entry);
                }
                EventKind::Delete => {
                    self.quarantined.remove(&*event.kv.key);
                    self.entries.remove(&*event.kv.key);
                }
            }
        }
        self.revision = top;
    }

    /// What `kv` describes now: its instance (the one already held, when equal, so unchanged
    /// instances keep their allocation), or `None` when it describes none.
    fn decode_instance(&mut self, kv: &KeyValue) -> Option<Arc<Instance>> {
        let Some(Decoded::Put(instance)) = self.decode(kv) else {
            return None;
        };
        let held = self
            .entries
            .get(&*kv.key)
            .and_then(|entry| entry.instance.as_ref());
        Some(match held {
            Some(old) if **old == instance => old.clone(),
            _ => Arc::new(instance),
        })
    }

    fn decode(&mut self, kv: &KeyValue) -> Option<Decoded> {
        match self.codec.decode(&self.service, &kv.key, &kv.value) {
            Ok(decoded) => {
                if !self.quarantined.is_empty() {
                    self.quarantined.remove(&*kv.key);
                }
                Some(match decoded {
                    Decoded::Put(instance) => Decoded::Put(instance.share_service(&self.service)),
                    Decoded::Delete => Decoded::Delete,
                })
            }
            Err(error) => {
                self.stats.decode_errors += 1;
                if self.quarantined.len() >= MAX_QUARANTINED {
                    self.quarantined.clear();
                }
                if self.quarantined.insert(kv.key.clone().into_boxed_slice()) {
                    tracing::warn!(
                        service = %self.service,
                        key = %String::from_utf8_lossy(&kv.key),
                        revision = kv.mod_revision,
                        %error,
                        "skipping an entry that does not decode"
                    );
                }
                None
            }
        }
    }
}
