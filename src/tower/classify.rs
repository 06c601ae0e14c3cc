//! [`Classifier`]: which responses count as failures of the instance that sent them.

use http::HeaderMap;

/// What a request said about the instance that served it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The instance served it.
    Success,
    /// The instance failed it: counts towards outlier ejection.
    Failure,
}

/// When an outcome is known, from the response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// From the head alone.
    Now(Outcome),
    /// A gRPC response whose status comes in the trailers, at the end of the body.
    AtTrailers,
}

/// Which responses count as failures (the default follows gRPC's and Envoy's notion of an
/// instance-level failure):
///
/// - a transport error (the inner service returned `Err`) always does;
/// - a gRPC status (`grpc-status`, in the headers of a trailers-only response or in the
///   trailers) does if it is one of the failure codes: by default `UNKNOWN` (2),
///   `DEADLINE_EXCEEDED` (4), `RESOURCE_EXHAUSTED` (8), `INTERNAL` (13) and `UNAVAILABLE`
///   (14), the codes gRPC's retry policy and Envoy's `retry_on` name as signs of a server in
///   trouble. A gRPC response that ends without a status is a failure;
/// - an HTTP status 5xx does (Envoy's `consecutive_5xx`), unless turned off with
///   [`http_server_errors`](Self::http_server_errors).
///
/// ```
/// use etcd_registry::tower::Classifier;
///
/// // NOT_FOUND (5) from this service means the instance lost its data: count it too.
/// let classifier = Classifier::default().grpc_failure(5, true);
/// assert!(classifier.is_grpc_failure(5));
/// assert!(classifier.is_grpc_failure(14));
/// assert!(!classifier.is_grpc_failure(0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classifier {
    /// Bit `n` set: gRPC code `n` is a failure (codes are 0 to 16).
    grpc_failures: u32,
    http_server_errors: bool,
}

/// UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE.
const DEFAULT_GRPC_FAILURES: u32 = (1 << 2) | (1 << 4) | (1 << 8) | (1 << 13) | (1 << 14);

impl Default for Classifier {
    fn default() -> Self {
        Self {
            grpc_failures: DEFAULT_GRPC_FAILURES,
            http_server_errors: true,
        }
    }
}

impl Classifier {
    /// Counts gRPC status `code` (0 to 16; others are ignored) as a failure or not.
    pub fn grpc_failure(mut self, code: i32, failure: bool) -> Self {
        if let Some(bit) = u32::try_from(code).ok().filter(|c| *c <= 16) {
            if failure {
                self.grpc_failures |= 1 << bit;
            } else {
                self.grpc_failures &= !(1 << bit);
            }
        }
        self
    }

    /// Counts HTTP 5xx responses as failures (the default) or not.
    pub fn http_server_errors(mut self, failure: bool) -> Self {
        self.http_server_errors = failure;
        self
    }

    /// Whether gRPC status `code` counts as a failure.
    pub fn is_grpc_failure(&self, code: i32) -> bool {
        u32::try_from(code)
            .ok()
            .filter(|c| *c <= 16)
            .is_some_and(|bit| self.grpc_failures & (1 << bit) != 0)
    }

    /// The outcome of a gRPC status in `headers` (trailers, or a trailers-only response's
    /// headers); `None` when there is no readable status.
    pub(crate) fn grpc_status(&self, headers: &HeaderMap) -> Option<Outcome> {
        let code: i32 = headers
            .get("grpc-status")?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(if self.is_grpc_failure(code) {
            Outcome::Failure
        } else {
            Outcome::Success
        })
    }

    /// The verdict on a response head.
    pub(crate) fn head<B>(&self, response: &http::Response<B>) -> Verdict {
        if self.http_server_errors && response.status().is_server_error() {
            return Verdict::Now(Outcome::Failure);
        }
        if !is_grpc(response.headers()) {
            return Verdict::Now(Outcome::Success);
        }
        match self.grpc_status(response.headers()) {
            Some(outcome) => Verdict::Now(outcome),
            None => Verdict::AtTrailers,
        }
    }
}

/// Whether the response is gRPC with HTTP/2 trailers (`application/grpc`,
/// `application/grpc+proto`…). gRPC-Web (`application/grpc-web…`) carries its status in the
/// body, not in trailers: it is classified as plain HTTP.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.strip_prefix("application/grpc").is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc(status: Option<&str>) -> http::Response<()> {
        let mut response = http::Response::builder().header("content-type", "application/grpc");
        if let Some(status) = status {
            response = response.header("grpc-status", status);
        }
        response.body(()).expect("valid response")
    }

    #[test]
    fn the_default_failure_codes_are_the_server_trouble_ones() {
        let c = Classifier::default();
        let failures: Vec<i32> = (0..=16).filter(|&n| c.is_grpc_failure(n)).collect();
        assert_eq!(failures, [2, 4, 8, 13, 14]);
        assert!(!c.is_grpc_failure(-1) && !c.is_grpc_failure(17));
        let c = c
            .grpc_failure(5, true)
            .grpc_failure(2, false)
            .grpc_failure(99, true);
        let failures: Vec<i32> = (0..=16).filter(|&n| c.is_grpc_failure(n)).collect();
        assert_eq!(failures, [4, 5, 8, 13, 14]);
    }

    #[test]
    fn heads_are_classified_now_or_at_the_trailers() {
        let c = Classifier::default();
        assert_eq!(c.head(&grpc(Some("14"))), Verdict::Now(Outcome::Failure));
        assert_eq!(c.head(&grpc(Some("0"))), Verdict::Now(Outcome::Success));
        assert_eq!(c.head(&grpc(Some("5"))), Verdict::Now(Outcome::Success));
        assert_eq!(c.head(&grpc(None)), Verdict::AtTrailers);
        // A status that does not parse: wait for the trailers.
        assert_eq!(c.head(&grpc(Some("x"))), Verdict::AtTrailers);
        let typed = |content_type: &str| {
            http::Response::builder()
                .header("content-type", content_type)
                .body(())
                .expect("valid response")
        };
        assert_eq!(
            c.head(&typed("application/grpc+proto")),
            Verdict::AtTrailers
        );
        assert_eq!(
            c.head(&typed("application/grpc;charset=utf-8")),
            Verdict::AtTrailers
        );
        // gRPC-Web has no trailers: judged by its head like plain HTTP.
        assert_eq!(
            c.head(&typed("application/grpc-web")),
            Verdict::Now(Outcome::Success)
        );
        let plain = |status: u16| {
            http::Response::builder()
                .status(status)
                .body(())
                .expect("valid response")
        };
        assert_eq!(c.head(&plain(200)), Verdict::Now(Outcome::Success));
        assert_eq!(c.head(&plain(404)), Verdict::Now(Outcome::Success));
        assert_eq!(c.head(&plain(503)), Verdict::Now(Outcome::Failure));
        let lenient = c.http_server_errors(false);
        assert_eq!(lenient.head(&plain(503)), Verdict::Now(Outcome::Success));
    }
}
