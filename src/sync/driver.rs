//! The tokio task that runs a [`Machine`] against a [`Backend`].
//!
//! It carries out the machine's actions (list, history check, watch, sleep, publish), turns
//! what the backend says into the machine's inputs, and detects a hung etcd: a watch that is idle
//! for half the stall bound gets a progress request, one still silent at three quarters a unary
//! probe (etcd's gRPC proxy never answers progress requests), and one with no answer at all by
//! the bound is reported as [`FreezeCause::Stalled`]. It is the only part of the sync loop that
//! awaits.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep, sleep, sleep_until, timeout};

use crate::backend::{
    Backend, BackendError, BackendErrorKind, KeysAt, ListResponse, Watch, WatchMessage,
};
use crate::cache::Shared;
use crate::in_span::InSpan;
use crate::metrics;
use crate::snapshot::FreezeCause;
use crate::sync::machine::{Action, Input, Machine};

/// Most watch messages applied together before one publish.
const MAX_BATCH: usize = 1024;

/// Timing of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DriverConfig {
    /// Bound on one list or one watch creation.
    pub(crate) request_timeout: Duration,
    /// Bound on a silent watch: idle for half of it → progress request; silent for all of it →
    /// stalled.
    pub(crate) stall_timeout: Duration,
}

/// What the driver is waiting for.
enum Op {
    Idle,
    List(
        BoxFuture<'static, Result<ListResponse, BackendError>>,
        Pin<Box<Sleep>>,
    ),
    /// A history check, with the resumed watch it is for: held, not read, until the check
    /// says it can be trusted.
    Verify(
        BoxFuture<'static, Result<KeysAt, BackendError>>,
        Pin<Box<Sleep>>,
        Option<Box<Streaming>>,
    ),
    Connect(
        BoxFuture<'static, Result<Watch, BackendError>>,
        Pin<Box<Sleep>>,
    ),
    Stream(Box<Streaming>),
    Sleep(Pin<Box<Sleep>>),
}

struct Streaming {
    watch: Watch,
    last_heard: Instant,
    /// What was asked since the watch was last heard from.
    asked: Asked,
}

/// What an idle watch's liveness check has asked so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Nothing,
    /// A progress request, at half the stall bound.
    Progress,
}

/// Whether this etcd answers progress requests. etcd's gRPC proxy and releases before 3.4 take
/// them and never answer: learned from one unanswered request that a probe then contradicts,
/// kept for the life of the cache's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProgressSupport {
    Answered,
    Unanswered,
}

/// What one wait produced.
enum Outcome {
    Inputs(Vec<Input>),
    Established(Watch),
}

/// Runs the sync loop of one service until `stop`'s sender is dropped (the last handle of the
/// cache went away).
///
/// If the task ends any other way (its runtime shuts down, or it panics) its destructor freezes
/// the cache with [`FreezeCause::TaskEnded`], so the cache never claims to be live with nobody
/// keeping it so.
///
/// `beside` runs in the same task for as long as the sync loop does, and never ends on its
/// own: the cache's sweep timer (see [`sweeper`](crate::balance::health::sweeper)), which so
/// starts, ends and restarts with the task.
pub(crate) fn spawn(
    backend: Arc<dyn Backend>,
    machine: Machine,
    prefix: Vec<u8>,
    config: DriverConfig,
    shared: Arc<Shared>,
    stop: watch::Receiver<()>,
    beside: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::Error> {
    let runtime = runtime()?;
    let service = shared.service.clone();
    let sync = Driver {
        backend,
        machine,
        prefix: prefix.into(),
        config,
        shared,
        stopped: false,
        progress_support: ProgressSupport::Answered,
        op: Op::Idle,
    }
    .run(stop);
    // Made after the driver, whose destructor then tells the cache should the application's
    // subscriber panic here.
    let span = tracing::info_span!("etcd_registry::cache", service = %service);
    runtime.spawn(InSpan::new(
        async move {
            tokio::select! {
                biased;
                () = sync => {}
                () = beside => {}
            }
        },
        span,
    ));
    Ok(())
}

/// The runtime a cache's task is spawned on: the current one.
///
/// # Errors
/// [`Error::Config`](crate::Error::Config) outside a tokio runtime.
pub(crate) fn runtime() -> Result<tokio::runtime::Handle, crate::Error> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        crate::Error::Config(
            "a cache runs a task: call Discovery::service or service_now inside a tokio runtime"
                .into(),
        )
    })
}

struct Driver {
    backend: Arc<dyn Backend>,
    machine: Machine,
    /// The request or wait under way. A field, not a local of `run`: a task dropped mid-await
    /// drops `run`'s locals before the driver, and dropping a request or a watch stream runs
    /// backend code (and the application's subscriber, through the transport's logs) that must
    /// come after the cache is told (see the `Drop` below). Not yet so for an idle watch's
    /// progress request and liveness probe, awaited inside `follow` (`tests/drop_order.rs`).
    op: Op,
    prefix: Arc<[u8]>,
    config: DriverConfig,
    shared: Arc<Shared>,
    /// Set when the loop ends because it was told to; otherwise dropping the driver means the
    /// task died.
    stopped: bool,
    progress_support: ProgressSupport,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.stopped {
            // Nothing before `task_ended` may panic: a destructor's panic would leave the cache
            // marked as running, never restarted. `take` cannot.
            let machine = self.machine.take();
            self.shared.task_ended(Some(machine));
        }
    }
}

impl Driver {
    async fn run(mut self, mut stop: watch::Receiver<()>) {
        tracing::debug!("sync loop started");
        let mut error = None;
        let mut actions = self.machine.start();
        loop {
            for action in actions.drain(..) {
                self.act(action);
            }
            let outcome = tokio::select! {
                biased;
                // Nothing is ever sent: this resolves when the last handle drops the sender.
                _ = stop.changed() => break,
                outcome = wait(&mut self.op, &self.config, &mut error, Probe {
                    backend: &self.backend,
                    prefix: &self.prefix,
                    support: &mut self.progress_support,
                }) => outcome,
            };
            if let Some(error) = error.take() {
                let cause = match &outcome {
                    Outcome::Inputs(inputs) => inputs.iter().rev().find_map(|input| match input {
                        Input::Failed(cause) => Some(*cause),
                        _ => None,
                    }),
                    Outcome::Established(_) => None,
                };
                self.shared.set_last_error(Some((error, cause)));
            }
            let before = self.machine.stats();
            let now = Instant::now().into_std();
            actions = match outcome {
                Outcome::Inputs(inputs) => self.machine.handle_all(now, inputs),
                Outcome::Established(watch) => {
                    let header = watch.header;
                    self.op = Op::Stream(Box::new(Streaming {
                        watch,
                        last_heard: Instant::now(),
                        asked: Asked::Nothing,
                    }));
                    self.shared.set_last_error(None);
                    self.machine.handle(now, Input::WatchStarted(header))
                }
            };
            let after = self.machine.stats();
            if after != before {
                metrics::record_stats(&self.shared.service, &before, &after);
                self.shared.set_stats(after);
            }
        }
        self.stopped = true;
        tracing::debug!("sync loop stopped: the last cache handle was dropped");
    }

    fn act(&mut self, action: Action) {
        let deadline = || Box::pin(sleep(self.config.request_timeout));
        match action {
            Action::Publish(snapshot) => {
                metrics::record_publish(
                    &self.shared.service,
                    snapshot.len(),
                    !snapshot.freshness().is_live(),
                );
                tracing::debug!(
                    revision = snapshot.revision(),
                    instances = snapshot.len(),
                    freshness = ?snapshot.freshness(),
                    "publishing a snapshot"
                );
                self.shared.publish(snapshot);
            }
            Action::List => {
                let backend = self.backend.clone();
                let prefix = self.prefix.clone();
                self.op = Op::List(
                    async move { backend.list(&prefix).await }.boxed(),
                    deadline(),
                );
            }
            Action::Verify {
                revision,
                with_values,
            } => {
                let backend = self.backend.clone();
                let prefix = self.prefix.clone();
                let watch = match std::mem::replace(&mut self.op, Op::Idle) {
                    Op::Stream(streaming) => Some(streaming),
                    _ => None,
                };
                self.op = Op::Verify(
                    async move { backend.keys_at(&prefix, revision, with_values).await }.boxed(),
                    deadline(),
                    watch,
                );
            }
            Action::Watch { from_revision } => {
                let backend = self.backend.clone();
                let prefix = self.prefix.clone();
                self.op = Op::Connect(
                    async move { backend.watch(&prefix, from_revision).await }.boxed(),
                    deadline(),
                );
            }
            Action::Sleep(delay) => self.op = Op::Sleep(Box::pin(sleep(delay))),
        }
    }
}

/// Waits for the current operation to produce something for the machine.
async fn wait(
    op: &mut Op,
    config: &DriverConfig,
    error: &mut Option<String>,
    probe: Probe<'_>,
) -> Outcome {
    match op {
        Op::Idle => std::future::pending().await,
        Op::Sleep(sleep) => {
            sleep.await;
            *op = Op::Idle;
            Outcome::Inputs(vec![Input::TimerFired])
        }
        Op::List(list, deadline) => {
            let outcome = tokio::select! {
                result = list => match result {
                    Ok(response) => Outcome::Inputs(vec![Input::Listed(response)]),
                    Err(e) => failed(e, error),
                },
                _ = deadline => timed_out("list", error),
            };
            *op = Op::Idle;
            outcome
        }
        Op::Verify(keys, deadline, watch) => {
            let outcome = tokio::select! {
                result = keys => match result {
                    Ok(keys) => {
                        // The watch goes on if the machine trusts it; if not, its next action
                        // (a list) replaces it.
                        if let Some(mut streaming) = watch.take() {
                            streaming.last_heard = Instant::now();
                            *op = Op::Stream(streaming);
                        }
                        return Outcome::Inputs(vec![Input::Verified(keys)]);
                    }
                    Err(e) if e.kind == BackendErrorKind::Compacted => {
                        Outcome::Inputs(vec![Input::Compacted { compact_revision: 0 }])
                    }
                    Err(e) if e.kind == BackendErrorKind::FutureRevision => {
                        Outcome::Inputs(vec![Input::HistoryShorter])
                    }
                    Err(e) => failed(e, error),
                },
                _ = deadline => timed_out("history check", error),
            };
            *op = Op::Idle;
            outcome
        }
        Op::Connect(connect, deadline) => {
            let outcome = tokio::select! {
                result = connect => match result {
                    Ok(watch) => Outcome::Established(watch),
                    Err(e) => failed(e, error),
                },
                _ = deadline => timed_out("watch", error),
            };
            *op = Op::Idle;
            outcome
        }
        Op::Stream(streaming) => {
            let outcome = follow(streaming, config, error, probe).await;
            if let Outcome::Inputs(inputs) = &outcome {
                if matches!(
                    inputs.last(),
                    Some(Input::Failed(_) | Input::Compacted { .. })
                ) {
                    *op = Op::Idle;
                }
            }
            outcome
        }
    }
}

/// How a stalled-looking watch is told from an etcd that simply does not answer progress
/// requests: a unary probe through the same connection.
struct Probe<'a> {
    backend: &'a Arc<dyn Backend>,
    prefix: &'a [u8],
    support: &'a mut ProgressSupport,
}

/// Reads the next messages of a watch, and checks an idle one is alive.
///
/// Idle for half the stall bound, it asks etcd for a progress notification. Still silent at
/// three quarters of the bound, it sends a cheap unary probe, bounded by what is left and raced
/// against the stream: an answer from the watch's own member proves etcd alive (behind a gRPC
/// proxy, or on an old release, progress requests are never answered), and from then on idle
/// watches are checked with the probe alone, until a progress answer shows up again. No answer
/// by the bound, or one from another member only, is a stall. A hung etcd is therefore reported
/// within the bound either way, and a healthy one that cannot answer progress requests never is.
async fn follow(
    streaming: &mut Streaming,
    config: &DriverConfig,
    error: &mut Option<String>,
    probe: Probe<'_>,
) -> Outcome {
    let half = config.stall_timeout / 2;
    let three_quarters = config.stall_timeout * 3 / 4;
    loop {
        let deadline = streaming.last_heard
            + match streaming.asked {
                Asked::Nothing => half,
                Asked::Progress => three_quarters,
            };
        tokio::select! {
            message = streaming.watch.stream.next() => {
                return read(streaming, message, error, probe.support);
            }
            _ = sleep_until(deadline) => {}
        }
        let bound = streaming.last_heard + config.stall_timeout;
        let left = bound.saturating_duration_since(Instant::now());
        let ask_progress =
            streaming.asked == Asked::Nothing && *probe.support == ProgressSupport::Answered;
        if ask_progress {
            streaming.asked = Asked::Progress;
            let request = streaming.watch.progress.request_progress();
            // A hung server may not even take the request: bound it by the stall bound.
            match timeout(left, request).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "progress request failed");
                    *error = Some(format!("progress request: {e}"));
                    return Outcome::Inputs(vec![Input::Failed(e.kind.into())]);
                }
                Err(_) => {
                    *error = Some("watch stalled: progress request not taken".to_owned());
                    return Outcome::Inputs(vec![Input::Failed(FreezeCause::Stalled)]);
                }
            }
        }
        // Silent after a progress request, or a server known not to answer them: does the
        // watch's member answer at all? Whatever the watch says meanwhile counts first.
        let watch_member = streaming.watch.member_id;
        let answer = tokio::select! {
            message = streaming.watch.stream.next() => {
                return read(streaming, message, error, probe.support);
            }
            answer = timeout(left, probe.backend.probe(probe.prefix)) => answer,
        };
        match answer {
            Ok(Ok(member)) if member == watch_member || member == 0 || watch_member == 0 => {
                if *probe.support == ProgressSupport::Answered {
                    tracing::info!(
                        "etcd answers requests but not progress requests (a gRPC proxy, or an \
                         old release): idle watches are checked with a probe from now on"
                    );
                    *probe.support = ProgressSupport::Unanswered;
                }
                streaming.last_heard = Instant::now();
                streaming.asked = Asked::Nothing;
            }
            Ok(Ok(member)) => {
                tracing::warn!(
                    watch_member,
                    member,
                    "watch silent, and only another member answers: its member is stalled"
                );
                *error = Some(format!(
                    "watch stalled: member {watch_member:x} silent, member {member:x} answers"
                ));
                return Outcome::Inputs(vec![Input::Failed(FreezeCause::Stalled)]);
            }
            Ok(Err(e)) => {
                tracing::info!(error = %e, "liveness probe failed");
                *error = Some(format!("liveness probe: {e}"));
                return Outcome::Inputs(vec![Input::Failed(e.kind.into())]);
            }
            Err(_) => {
                tracing::warn!(
                    bound = ?config.stall_timeout,
                    "watch silent past the stall bound, and etcd does not answer"
                );
                *error = Some(format!(
                    "watch stalled: no answer within {:?}",
                    config.stall_timeout
                ));
                return Outcome::Inputs(vec![Input::Failed(FreezeCause::Stalled)]);
            }
        }
    }
}

/// Turns `first` and whatever else the watch already has into inputs: the watch was heard from.
fn read(
    streaming: &mut Streaming,
    first: Option<Result<WatchMessage, BackendError>>,
    error: &mut Option<String>,
    support: &mut ProgressSupport,
) -> Outcome {
    streaming.last_heard = Instant::now();
    streaming.asked = Asked::Nothing;
    let mut inputs = Vec::new();
    let mut next = first;
    loop {
        match next {
            Some(Ok(message)) => {
                if matches!(message, WatchMessage::Progress { .. }) {
                    // Progress requests are answered after all (a proxy replaced by etcd).
                    *support = ProgressSupport::Answered;
                }
                inputs.push(Input::from(message));
            }
            Some(Err(e)) => {
                tracing::info!(error = %e, "watch failed");
                inputs.push(Input::Failed(e.kind.into()));
                *error = Some(format!("watch: {e}"));
                break;
            }
            None => {
                tracing::info!("watch stream ended");
                inputs.push(Input::Failed(FreezeCause::Unavailable));
                *error = Some("watch stream ended".to_owned());
                break;
            }
        }
        if inputs.len() >= MAX_BATCH {
            break;
        }
        // Take whatever else is already there, so a burst becomes one publish.
        match streaming.watch.stream.next().now_or_never() {
            Some(more) => next = more,
            None => break,
        }
    }
    Outcome::Inputs(inputs)
}

fn failed(e: BackendError, error: &mut Option<String>) -> Outcome {
    tracing::info!(error = %e, "request failed");
    let cause = e.kind.into();
    *error = Some(e.to_string());
    Outcome::Inputs(vec![Input::Failed(cause)])
}

fn timed_out(what: &str, error: &mut Option<String>) -> Outcome {
    tracing::info!("{what} timed out");
    *error = Some(format!("{what} timed out"));
    Outcome::Inputs(vec![Input::Failed(FreezeCause::Timeout)])
}
