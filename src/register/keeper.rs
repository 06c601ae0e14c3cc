//! The task behind a [`Registration`]: the first registration, then keep-alives every TTL/3, a
//! watch on its own key (put back when someone deletes it), re-registration with backoff when
//! the lease is lost, and the handle's commands (update, deregister).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};

use super::{Registration, RegistrationStatus};
use crate::backend::{
    Backend, BackendError, BackendErrorKind, EventKind, PutCondition, PutOutcome, WatchMessage,
    WatchStream,
};
use crate::backoff::Backoff;
use crate::codec::{Codec, KeyLayout};
use crate::error::{Error, Result};
use crate::in_span::InSpan;
use crate::instance::{Instance, InstanceBuilder};

pub(super) type Change = Box<dyn FnOnce(InstanceBuilder) -> InstanceBuilder + Send>;

pub(super) enum Command {
    Update {
        change: Change,
        reply: oneshot::Sender<Result<()>>,
    },
    Deregister {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The task behind a [`Registration`].
pub(super) struct Keeper {
    backend: Arc<dyn Backend>,
    codec: Codec,
    instance: Instance,
    ttl: Duration,
    replace: bool,
    request_timeout: Duration,
    backoff: Backoff,
    /// The current lease (0 before the first grant).
    lease: i64,
    /// The key written under it.
    key: Vec<u8>,
    /// The revision of our last write of the key; its watch starts right after it, so nothing
    /// that happens to the key in between is missed.
    revision: i64,
    /// An update that could not be written yet; written after the next successful keep-alive
    /// (or with the next re-registration, which writes the current instance anyway).
    pending_write: bool,
    status: watch::Sender<RegistrationStatus>,
    /// Set when the task ends because it was told to (deregister, or the handle dropped);
    /// dropping a keeper that was not stopped means its task died.
    stopped: bool,
}

impl Keeper {
    /// Registers `instance` (the first lease and write, whose failure is the caller's error),
    /// then spawns the task that keeps it registered.
    pub(super) async fn start(
        backend: Arc<dyn Backend>,
        codec: Codec,
        instance: Instance,
        ttl: Duration,
        replace: bool,
        request_timeout: Duration,
        backoff: Backoff,
    ) -> Result<Registration> {
        let (status_tx, status_rx) = watch::channel(RegistrationStatus::Lost);
        let mut keeper = Keeper {
            backend,
            codec,
            instance,
            ttl,
            replace,
            request_timeout,
            backoff,
            lease: 0,
            key: Vec::new(),
            revision: 0,
            pending_write: false,
            status: status_tx,
            // Nothing runs yet: a first registration that fails is an error, not a dead task.
            stopped: true,
        };
        let lease = keeper.register(true).await?;
        keeper.set_status(RegistrationStatus::Registered { lease });
        tracing::info!(
            service = keeper.instance.service(),
            id = keeper.instance.id(),
            key = %String::from_utf8_lossy(&keeper.key),
            lease,
            "registered"
        );
        let (commands, command_rx) = mpsc::channel(8);
        let span = tracing::info_span!(
            "etcd_registry::registration",
            service = keeper.instance.service(),
            id = keeper.instance.id()
        );
        keeper.stopped = false;
        tokio::spawn(InSpan::new(keeper.run(command_rx), span));
        Ok(Registration {
            commands,
            status: status_rx,
        })
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if !self.stopped {
            // Told first, logged last: the subscriber is user code and may panic.
            self.status.send_replace(RegistrationStatus::TaskEnded);
            tracing::warn!(
                lease = self.lease,
                "the registration's task ended without a deregister; the key expires within one TTL"
            );
        }
    }
}

/// Why the keep-alive phase ended.
enum Exit {
    /// Deregistered or dropped: stop.
    Stop,
    /// The lease or the key is lost: register again.
    Lost,
}

impl Keeper {
    fn set_status(&self, status: RegistrationStatus) {
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }

    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        match timeout(self.request_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::new(
                BackendErrorKind::Timeout,
                format!("{what} took longer than {:?}", self.request_timeout),
            )),
        }
    }

    /// Grants a lease and writes the key under it. On the first registration a key held by a
    /// foreign lease is an error; later, it is a loss to retry.
    async fn register(&mut self, first: bool) -> Result<i64> {
        let mut previous = self.lease;
        let lease = self
            .call("lease grant", self.backend.grant(self.ttl))
            .await?;
        if previous != 0 && self.codec.layout() == KeyLayout::GoZero {
            // The key carries the lease id, so the new key is another key: writing it while the
            // old lease still holds the old one would show callers the instance twice. Drop the
            // old one first (a moment with none beats a moment with two).
            if self
                .call("lease revoke", self.backend.revoke(previous))
                .await
                .is_ok()
            {
                previous = 0;
            }
        }
        let revision = match self.write(lease, previous).await {
            Ok(revision) => revision,
            Err(error) => {
                // Do not leave the fresh lease behind; it holds nothing.
                let _ = self.call("lease revoke", self.backend.revoke(lease)).await;
                if !first {
                    tracing::warn!(%error, "re-registration refused");
                }
                return Err(error);
            }
        };
        self.key = self.codec.key(&self.instance, lease).into_bytes();
        self.lease = lease;
        self.revision = revision;
        self.pending_write = false;
        if previous != 0 {
            // The old lease may still be alive (etcd refreshes leases across a leader change):
            // revoke it so it holds nothing we no longer keep alive. In the go-zero layout its
            // key is a different one, which this removes too.
            if let Err(error) = self
                .call("lease revoke", self.backend.revoke(previous))
                .await
            {
                tracing::debug!(%error, lease = previous, "could not revoke the previous lease");
            }
        }
        self.backoff.reset();
        Ok(lease)
    }

    /// Puts the instance's key under `lease`, refusing a key held by a lease that is not ours
    /// (`previous` is our last lease) unless `replace` is set. Returns the write's revision.
    async fn write(&self, lease: i64, previous: i64) -> Result<i64> {
        let key = self.codec.key(&self.instance, lease).into_bytes();
        let value = self.codec.encode_value(&self.instance);
        let condition = if self.replace {
            PutCondition::Always
        } else {
            PutCondition::Absent
        };
        let outcome = self
            .call("put", self.backend.put(&key, &value, lease, condition))
            .await?;
        let current = match outcome {
            PutOutcome::Written { revision } => return Ok(revision),
            PutOutcome::Refused { current: None } => {
                // Deleted between the check and now: the next attempt will find it absent.
                return Err(Error::Backend(BackendError::new(
                    BackendErrorKind::Rejected,
                    "the key changed during registration",
                )));
            }
            PutOutcome::Refused {
                current: Some(current),
            } => current,
        };
        let ours = current.lease == lease || (previous != 0 && current.lease == previous);
        if !ours {
            return Err(Error::Conflict {
                key: String::from_utf8_lossy(&key).into_owned(),
                holder_lease: current.lease,
            });
        }
        // Our own key under our old lease: move it to the new lease, unless it changed since.
        match self
            .call(
                "put",
                self.backend.put(
                    &key,
                    &value,
                    lease,
                    PutCondition::ModRevision(current.mod_revision),
                ),
            )
            .await?
        {
            PutOutcome::Written { revision } => Ok(revision),
            PutOutcome::Refused { .. } => Err(Error::Backend(BackendError::new(
                BackendErrorKind::Rejected,
                "the key changed during registration",
            ))),
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            match self.keep_alive(&mut commands).await {
                Exit::Stop => break,
                Exit::Lost => {}
            }
            self.set_status(RegistrationStatus::Lost);
            tracing::info!(lease = self.lease, "registration lost; registering again");
            // Re-register with backoff, still answering commands. A command does not restart
            // the wait: each attempt has one deadline.
            loop {
                let attempt = Instant::now() + self.backoff.next_delay();
                loop {
                    tokio::select! {
                        command = commands.recv() => match command {
                            None => return self.stopped(),
                            Some(Command::Deregister { reply }) => {
                                let _ = reply.send(self.revoke().await);
                                return self.stopped();
                            }
                            Some(Command::Update { change, reply }) => {
                                // Kept for the next attempt, which writes the current instance.
                                let _ = reply.send(self.apply_change(change).map(|_| ()));
                            }
                        },
                        _ = sleep_until(attempt) => break,
                    }
                }
                match self.register(false).await {
                    Ok(lease) => {
                        tracing::info!(lease, "registered again");
                        self.set_status(RegistrationStatus::Reregistered { lease });
                        break;
                    }
                    Err(error) => tracing::debug!(%error, "re-registration failed; backing off"),
                }
            }
        }
        self.stopped();
    }

    fn stopped(&mut self) {
        self.stopped = true;
        self.set_status(RegistrationStatus::Deregistered);
        tracing::info!("registration stopped");
    }

    async fn revoke(&self) -> Result<()> {
        if self.lease == 0 {
            return Ok(());
        }
        self.call("lease revoke", self.backend.revoke(self.lease))
            .await
            .map_err(Error::Backend)
    }

    fn apply_change(&mut self, change: Change) -> Result<bool> {
        let changed = change(self.instance.to_builder()).build()?;
        if changed.service() != self.instance.service()
            || changed.id() != self.instance.id()
            || changed.addr() != self.instance.addr()
        {
            return Err(Error::Config(
                "update may change tags, metadata, weight and state, not the service, id or address"
                    .into(),
            ));
        }
        let differs = changed != self.instance;
        self.instance = changed;
        Ok(differs)
    }

    /// Keeps the lease alive and the key in place until the registration stops or is lost.
    async fn keep_alive(&mut self, commands: &mut mpsc::Receiver<Command>) -> Exit {
        let every = self.ttl / 3;
        let mut next_renewal = Instant::now() + every;
        let mut renewed = Instant::now();
        let mut own_key: Option<WatchStream> = self.watch_own_key().await;
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => return Exit::Stop,
                    Some(Command::Deregister { reply }) => {
                        let result = self.revoke().await;
                        if result.is_ok() {
                            tracing::info!(lease = self.lease, "deregistered: lease revoked");
                        }
                        let _ = reply.send(result);
                        return Exit::Stop;
                    }
                    Some(Command::Update { change, reply }) => {
                        let result = match self.apply_change(change) {
                            Ok(true) => self.rewrite().await,
                            Ok(false) => Ok(()),
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(result);
                    }
                },
                _ = sleep_until(next_renewal) => {
                    next_renewal = Instant::now() + every;
                    match self.call("keep-alive", self.backend.keep_alive(self.lease)).await {
                        Ok(ttl) if !ttl.is_zero() => {
                            renewed = Instant::now();
                            self.set_status(RegistrationStatus::Registered { lease: self.lease });
                            if self.pending_write && self.rewrite().await.is_ok() {
                                tracing::info!("wrote the update made while etcd was away");
                            }
                        }
                        Ok(_) => {
                            tracing::warn!(lease = self.lease, "etcd says the lease is gone");
                            return Exit::Lost;
                        }
                        Err(error) => {
                            if renewed.elapsed() >= self.ttl {
                                tracing::warn!(%error, lease = self.lease, "no keep-alive for a whole TTL: the lease is gone");
                                return Exit::Lost;
                            }
                            tracing::info!(%error, lease = self.lease, "keep-alive failed; retrying");
                            self.set_status(RegistrationStatus::Renewing { lease: self.lease });
                            next_renewal = Instant::now() + (every / 3).max(Duration::from_millis(100));
                        }
                    }
                    if own_key.is_none() {
                        own_key = self.watch_own_key().await;
                    }
                },
                message = next_message(&mut own_key) => match message {
                    Some(Ok(WatchMessage::Events { events, .. })) => {
                        let taken = events.iter().rfind(|e| e.kv.key == self.key);
                        match taken {
                            Some(event) if event.kind == EventKind::Delete => {
                                tracing::warn!("our key was deleted; putting it back");
                                if !self.put_back().await {
                                    return Exit::Lost;
                                }
                            }
                            Some(event) if event.kv.lease != self.lease => {
                                tracing::warn!(holder = event.kv.lease, "our key was taken over by another lease");
                                return Exit::Lost;
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(WatchMessage::Compacted { .. })) => {
                        // The history since our write is gone: follow the key from now on,
                        // then look at it as it is, so nothing between the two is missed.
                        self.revision = 0;
                        own_key = self.watch_own_key().await;
                        if !self.put_back().await {
                            return Exit::Lost;
                        }
                    }
                    Some(Ok(WatchMessage::Progress { .. })) => {}
                    Some(Err(_)) | None => own_key = None,
                },
            }
        }
    }

    /// Writes the key again under the current lease (after an update). On failure the write
    /// stays pending and is retried after the next successful keep-alive.
    async fn rewrite(&mut self) -> Result<()> {
        let value = self.codec.encode_value(&self.instance);
        let put = self
            .backend
            .put(&self.key, &value, self.lease, PutCondition::Always);
        match self.call("put", put).await {
            Ok(outcome) => {
                if let PutOutcome::Written { revision } = outcome {
                    self.revision = revision;
                }
                self.pending_write = false;
                Ok(())
            }
            Err(error) => {
                self.pending_write = true;
                Err(Error::Backend(error))
            }
        }
    }

    /// Puts a deleted key back under the current lease; false when the lease is gone too, or
    /// another lease holds the key.
    async fn put_back(&mut self) -> bool {
        let value = self.codec.encode_value(&self.instance);
        let put = self
            .backend
            .put(&self.key, &value, self.lease, PutCondition::Absent);
        match self.call("put", put).await {
            Ok(PutOutcome::Written { revision }) => {
                self.revision = revision;
                self.set_status(RegistrationStatus::Reregistered { lease: self.lease });
                true
            }
            Ok(PutOutcome::Refused { current }) => current.is_some_and(|kv| kv.lease == self.lease),
            Err(error) => {
                tracing::info!(%error, "could not put the key back");
                false
            }
        }
    }

    /// Watches our own key from just after our last write of it; `None` if the watch could not
    /// be made (retried at the next renewal).
    async fn watch_own_key(&self) -> Option<WatchStream> {
        // 0 asks for "from now": after a compaction, when there is no write of ours to follow.
        let from = match self.revision {
            0 => 0,
            revision => revision.saturating_add(1),
        };
        match self
            .call("watch", self.backend.watch(&self.key, from))
            .await
        {
            Ok(watch) => Some(watch.stream),
            Err(error) => {
                tracing::debug!(%error, "could not watch our own key");
                None
            }
        }
    }
}

async fn next_message(
    stream: &mut Option<WatchStream>,
) -> Option<Result<WatchMessage, BackendError>> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
