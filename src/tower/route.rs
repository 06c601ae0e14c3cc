//! [`Route`]: which picker a [`Balanced`](super::Balanced) service uses for each request.

use std::sync::Arc;

use http::HeaderName;

/// How a [`Balanced`](super::Balanced) service picks the instance for a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Route {
    /// Power of two choices on load ([`ServiceCache::pick_p2c`](crate::ServiceCache::pick_p2c)):
    /// the default for request/response traffic.
    #[default]
    P2c,
    /// Round-robin ([`ServiceCache::pick`](crate::ServiceCache::pick)).
    RoundRobin,
    /// Smooth weighted round-robin
    /// ([`ServiceCache::pick_weighted`](crate::ServiceCache::pick_weighted)).
    Weighted,
    /// Consistent hashing ([`ServiceCache::pick_by`](crate::ServiceCache::pick_by)) of the
    /// request's [`RoutingKey`] extension, or else of the value of `header` if given; a request
    /// with neither goes by p2c.
    Hash {
        /// The header whose value is the key when the request has no [`RoutingKey`].
        header: Option<HeaderName>,
    },
}

impl Route {
    /// The consistent-hash key of `request`, if this route hashes and the request has one.
    pub(crate) fn key<B>(&self, request: &http::Request<B>) -> Option<Arc<[u8]>> {
        let Route::Hash { header } = self else {
            return None;
        };
        if let Some(key) = request.extensions().get::<RoutingKey>() {
            return Some(Arc::clone(&key.0));
        }
        let value = request.headers().get(header.as_ref()?)?;
        Some(Arc::from(value.as_bytes()))
    }
}

/// The consistent-hash key of a request, as a request extension, for [`Route::Hash`]: requests
/// with the same key go to the same instance while it is up.
///
/// ```
/// use etcd_registry::tower::RoutingKey;
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(RoutingKey::new("user-42"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKey(Arc<[u8]>);

impl RoutingKey {
    /// A routing key of `key`'s bytes.
    pub fn new(key: impl AsRef<[u8]>) -> Self {
        Self(Arc::from(key.as_ref()))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}
