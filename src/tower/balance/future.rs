//! [`ResponseFuture`]: the future of one request through a [`Balanced`](super::Balanced)
//! service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::super::BoxError;
use super::super::body::Observed;

type Boxed<R> = Pin<Box<dyn Future<Output = Result<http::Response<Observed<R>>, BoxError>> + Send>>;

/// The response of a request sent through a [`Balanced`](super::Balanced) service: the pick,
/// the connection to the instance if it has none yet, the inner service's readiness and call.
pub struct ResponseFuture<R> {
    inner: Boxed<R>,
}

impl<R> ResponseFuture<R> {
    pub(crate) fn new(
        future: impl Future<Output = Result<http::Response<Observed<R>>, BoxError>> + Send + 'static,
    ) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }
}

impl<R> Future for ResponseFuture<R> {
    type Output = Result<http::Response<Observed<R>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<R> fmt::Debug for ResponseFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
