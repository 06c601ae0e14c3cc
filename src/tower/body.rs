//! [`Observed`]: a response body that reports the request's outcome when a gRPC status arrives
//! in its trailers.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};

use super::classify::{Classifier, Outcome};
use crate::balance::picked::Call;

/// A call whose outcome is only known at the trailers.
struct Pending {
    call: Call,
    classifier: Classifier,
}

impl Pending {
    fn report(self, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.call.success(),
            Outcome::Failure => self.call.failure(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response body of a [`Balanced`](super::Balanced) service: the inner service's body,
    /// unchanged, which reports the request's outcome when the gRPC status arrives in the
    /// trailers (a status that is a failure, an error, or an end without status: failure).
    /// A body dropped before its end reports nothing (the request counts as dropped).
    ///
    /// Responses whose outcome is known from their head (HTTP, or gRPC trailers-only) were
    /// reported already; their body only passes frames through.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }
}

impl<B> Observed<B> {
    /// A body whose outcome was reported already (or is not tracked).
    pub(crate) fn reported(inner: B) -> Self {
        Self {
            inner,
            pending: None,
        }
    }

    /// A body that reports `call`'s outcome at its trailers.
    pub(crate) fn at_trailers(inner: B, call: Call, classifier: Classifier) -> Self {
        Self {
            inner,
            pending: Some(Pending { call, classifier }),
        }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body> Body for Observed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(pending) = this.pending.take()
                {
                    let outcome = pending
                        .classifier
                        .grpc_status(trailers)
                        .unwrap_or(Outcome::Failure);
                    pending.report(outcome);
                }
            }
            // An error in the body, or the end without trailers: the instance failed it.
            Some(Err(_)) | None => {
                if let Some(pending) = this.pending.take() {
                    pending.report(Outcome::Failure);
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug> fmt::Debug for Observed<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed")
            .field("inner", &self.inner)
            .field("pending", &self.pending.is_some())
            .finish()
    }
}
