//! [`InSpan`]: a background task run inside a tracing span, without the span on its drop.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Runs `future` inside `span`: the span is entered around each poll, like tracing's
/// `Instrumented`, but not around the drop. `Instrumented` enters its span while dropping the
/// future, which calls the application's subscriber (user code, which may panic, or find its
/// thread's state gone when a runtime is dropped with its thread's locals) before the future's
/// own destructors run. Our tasks' destructors are what tell a cache or a registration that
/// the task ended, so the span must not come before them.
pub(crate) struct InSpan<F> {
    // Dropped before the span: fields drop in declaration order.
    future: Pin<Box<F>>,
    span: tracing::Span,
}

impl<F: Future> InSpan<F> {
    pub(crate) fn new(future: F, span: tracing::Span) -> Self {
        Self {
            future: Box::pin(future),
            span,
        }
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // `InSpan` is `Unpin` (a boxed future and a span), so this is a plain borrow.
        let this = &mut *self;
        let _entered = this.span.enter();
        this.future.as_mut().poll(cx)
    }
}
