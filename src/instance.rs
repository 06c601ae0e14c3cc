//! The unit of discovery: one running instance of a service.
//!
//! An [`Instance`] is validated when it is built, so every instance the library hands out (whether
//! built by a provider or decoded from etcd) satisfies the same limits: non-empty names, a
//! `host:port` address, a weight of at least 1, and bounded sizes for every field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Serialize};

/// Longest service name, instance id, address, tag, metadata key or metadata value, in bytes.
pub const MAX_FIELD_LEN: usize = 512;
/// Most tags one instance may carry.
pub const MAX_TAGS: usize = 64;
/// Most metadata entries one instance may carry.
pub const MAX_META: usize = 64;
/// Largest weight an instance may have.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Whether an instance takes new work.
///
/// Callers never pick a [`Draining`](State::Draining) instance; it stays listed so that tools can
/// see it while it finishes the requests it already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Serving: eligible for new requests.
    #[default]
    Up,
    /// Finishing in-flight work; never picked for new requests.
    Draining,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Up => "up",
            State::Draining => "draining",
        })
    }
}

/// Why an instance could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InstanceError {
    /// A required field was empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The field's name.
        field: &'static str,
    },
    /// A field was longer than its limit.
    #[error("{field} is {len} bytes long; the limit is {max}")]
    TooLong {
        /// The field's name.
        field: &'static str,
        /// The field's length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// More tags or metadata entries than allowed.
    #[error("{field} has {count} entries; the limit is {max}")]
    TooMany {
        /// The field's name.
        field: &'static str,
        /// How many entries were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A name contained a character that cannot appear in an etcd key segment.
    #[error("{field} {value:?} contains {bad:?}, which cannot appear in a key segment")]
    BadChar {
        /// The field's name.
        field: &'static str,
        /// The offending value.
        value: String,
        /// The offending character.
        bad: char,
    },
    /// The address was not `host:port`.
    #[error("address {addr:?} is not host:port ({reason})")]
    BadAddr {
        /// The address given.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The weight was 0 or above [`MAX_WEIGHT`].
    #[error("weight {weight} is outside 1..={MAX_WEIGHT}")]
    BadWeight {
        /// The weight given.
        weight: u32,
    },
}

/// One instance of a service: where to reach it and how to treat it.
///
/// Strings are reference-counted, so cloning an instance or sharing it between snapshots is cheap.
/// On a per-request path prefer the [`Picked`](crate::Picked) guard or an `Arc<Instance>`:
/// cloning an `Instance` writes the reference count of each of its strings, and some of those
/// (the service name, empty tags and metadata) are shared by every instance of a cache.
/// Build one with [`Instance::builder`]; every instance is valid by construction.
///
/// ```
/// use etcd_registry::{Instance, State};
///
/// let instance = Instance::builder("user", "10.0.0.7:8080")
///     .id("user-7")
///     .tag("v2")
///     .meta("zone", "eu-1")
///     .weight(3)
///     .build()?;
/// assert_eq!(instance.addr(), "10.0.0.7:8080");
/// assert_eq!(instance.meta("zone"), Some("eu-1"));
/// assert_eq!(instance.state(), State::Up);
/// # Ok::<(), etcd_registry::InstanceError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Instance {
    service: Arc<str>,
    id: Arc<str>,
    addr: Arc<str>,
    tags: Arc<[Arc<str>]>,
    meta: Arc<BTreeMap<Arc<str>, Arc<str>>>,
    weight: u32,
    state: State,
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("service", &&*self.service)
            .field("id", &&*self.id)
            .field("addr", &&*self.addr)
            .field("tags", &self.tags)
            .field("meta", &self.meta)
            .field("weight", &self.weight)
            .field("state", &self.state)
            .finish()
    }
}

impl Instance {
    /// Starts building an instance of `service` reachable at `addr` (`host:port`).
    ///
    /// The id defaults to the address; set a stable one with [`InstanceBuilder::id`].
    pub fn builder(service: impl Into<String>, addr: impl Into<String>) -> InstanceBuilder {
        InstanceBuilder {
            service: service.into(),
            addr: addr.into(),
            id: None,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight: 1,
            state: State::Up,
        }
    }

    /// The service this instance belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The instance's id, unique within its service.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The address callers connect to, as `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The same instance with `service` shared from the caller's allocation, when it names the
    /// same service: a cache decodes thousands of instances of one service, and this keeps one
    /// copy of its name instead of one per instance.
    pub(crate) fn share_service(mut self, service: &Arc<str>) -> Self {
        if *self.service == **service {
            self.service = service.clone();
        }
        self
    }

    /// The instance's URI, for HTTP and gRPC clients: `scheme://addr`, with the scheme from
    /// the metadata entry `scheme` (`grpc` is read as `http` and `grpcs` as `https`, as
    /// registries written by Go frameworks use them), `http` by default. An address that
    /// carries its own scheme (`https://10.0.0.7:443`) is taken as it is.
    ///
    /// ```
    /// use etcd_registry::Instance;
    ///
    /// let plain = Instance::builder("user", "10.0.0.7:8080").build()?;
    /// assert_eq!(plain.uri()?, "http://10.0.0.7:8080/");
    /// let tls = Instance::builder("user", "10.0.0.7:8443").meta("scheme", "grpcs").build()?;
    /// assert_eq!(tls.uri()?, "https://10.0.0.7:8443/");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// When the address and scheme do not make a valid URI.
    #[cfg(feature = "tower")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
    pub fn uri(&self) -> Result<http::Uri, http::uri::InvalidUri> {
        self.uri_with_default_scheme("http")
    }

    /// [`uri`](Self::uri) with `default` as the scheme of an instance whose metadata names
    /// none: `"https"` for a fleet that serves TLS and does not say so in its registrations
    /// (go-zero's layout carries no metadata at all).
    ///
    /// ```
    /// use etcd_registry::Instance;
    ///
    /// let instance = Instance::builder("user", "10.0.0.7:8443").build()?;
    /// assert_eq!(instance.uri_with_default_scheme("https")?, "https://10.0.0.7:8443/");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// When the address and scheme do not make a valid URI.
    #[cfg(feature = "tower")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
    pub fn uri_with_default_scheme(
        &self,
        default: &str,
    ) -> Result<http::Uri, http::uri::InvalidUri> {
        if self.addr.contains("://") {
            return self.addr.parse();
        }
        let scheme = match self.meta("scheme") {
            None => default,
            Some(s) if s.eq_ignore_ascii_case("grpc") => "http",
            Some(s) if s.eq_ignore_ascii_case("grpcs") => "https",
            Some(other) => other,
        };
        format!("{scheme}://{}", self.addr).parse()
    }

    /// The instance's tags, in the order they were given.
    pub fn tags(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.tags.iter().map(|t| &**t)
    }

    /// Whether the instance carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| &**t == tag)
    }

    /// The metadata value under `key`.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(|v| &**v)
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.meta.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The relative weight used by weighted balancing (at least 1).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Whether the instance takes new work.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the instance may be picked for new work.
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// A builder that starts from this instance, to change some fields.
    ///
    /// ```
    /// use etcd_registry::{Instance, State};
    /// let up = Instance::builder("user", "10.0.0.7:8080").build()?;
    /// let draining = up.to_builder().state(State::Draining).build()?;
    /// assert_eq!(draining.id(), up.id());
    /// # Ok::<(), etcd_registry::InstanceError>(())
    /// ```
    pub fn to_builder(&self) -> InstanceBuilder {
        InstanceBuilder {
            service: self.service.to_string(),
            addr: self.addr.to_string(),
            id: Some(self.id.to_string()),
            tags: self.tags.iter().map(|t| t.to_string()).collect(),
            meta: self
                .meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            weight: self.weight,
            state: self.state,
        }
    }
}

/// Builds a validated [`Instance`]; see [`Instance::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .build() is called"]
pub struct InstanceBuilder {
    service: String,
    addr: String,
    id: Option<String>,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    weight: u32,
    state: State,
}

impl InstanceBuilder {
    /// Sets the instance id (default: the address). It must be stable across restarts of the
    /// same instance, and must not contain `/`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds several tags.
    pub fn tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Sets one metadata entry (a later value for the same key wins).
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Sets the weight (default 1; must be in `1..=`[`MAX_WEIGHT`]).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the state (default [`State::Up`]).
    pub fn state(mut self, state: State) -> Self {
        self.state = state;
        self
    }

    /// Validates the fields and builds the instance.
    ///
    /// # Errors
    /// An [`InstanceError`] naming the first field that is empty, too long, badly formed, or out
    /// of range.
    pub fn build(self) -> Result<Instance, InstanceError> {
        check_segment("service", &self.service)?;
        check_addr(&self.addr)?;
        let id = match self.id {
            Some(id) => id,
            None => self.addr.clone(),
        };
        check_segment("id", &id)?;
        if self.tags.len() > MAX_TAGS {
            return Err(InstanceError::TooMany {
                field: "tags",
                count: self.tags.len(),
                max: MAX_TAGS,
            });
        }
        for tag in &self.tags {
            check_len("tag", tag)?;
        }
        if self.meta.len() > MAX_META {
            return Err(InstanceError::TooMany {
                field: "meta",
                count: self.meta.len(),
                max: MAX_META,
            });
        }
        for (k, v) in &self.meta {
            check_len("meta key", k)?;
            if k.is_empty() {
                return Err(InstanceError::Empty { field: "meta key" });
            }
            check_len("meta value", v)?;
        }
        if self.weight == 0 || self.weight > MAX_WEIGHT {
            return Err(InstanceError::BadWeight {
                weight: self.weight,
            });
        }
        Ok(Instance {
            service: self.service.into(),
            id: id.into(),
            addr: self.addr.into(),
            tags: if self.tags.is_empty() {
                NO_TAGS.clone()
            } else {
                self.tags.into_iter().map(Arc::from).collect()
            },
            meta: if self.meta.is_empty() {
                NO_META.clone()
            } else {
                Arc::new(
                    self.meta
                        .into_iter()
                        .map(|(k, v)| (Arc::from(k), Arc::from(v)))
                        .collect(),
                )
            },
            weight: self.weight,
            state: self.state,
        })
    }
}

// Most instances carry no tags or metadata, and an empty `Arc` still costs an allocation (its
// counts) per instance; these are shared instead. They are cloned when an instance is built,
// decoded or cloned, never by `load()` or a pick.
static NO_TAGS: LazyLock<Arc<[Arc<str>]>> = LazyLock::new(|| Arc::from(Vec::new()));
static NO_META: LazyLock<Arc<BTreeMap<Arc<str>, Arc<str>>>> = LazyLock::new(Arc::default);

fn check_len(field: &'static str, value: &str) -> Result<(), InstanceError> {
    if value.len() > MAX_FIELD_LEN {
        return Err(InstanceError::TooLong {
            field,
            len: value.len(),
            max: MAX_FIELD_LEN,
        });
    }
    Ok(())
}

/// A service name or id: non-empty, bounded, and free of `/` and control characters (it becomes
/// one segment of an etcd key; a service name may contain `.` as in go-zero's `user.rpc`).
pub(crate) fn check_segment(field: &'static str, value: &str) -> Result<(), InstanceError> {
    if value.is_empty() {
        return Err(InstanceError::Empty { field });
    }
    check_len(field, value)?;
    if let Some(bad) = value.chars().find(|c| *c == '/' || c.is_control()) {
        return Err(InstanceError::BadChar {
            field,
            value: value.to_owned(),
            bad,
        });
    }
    Ok(())
}

/// Accepts `ip:port`, `[ipv6]:port` and `hostname:port` with a port in 1..=65535.
pub(crate) fn check_addr(addr: &str) -> Result<(), InstanceError> {
    let bad = |reason| InstanceError::BadAddr {
        addr: addr.to_owned(),
        reason,
    };
    if addr.is_empty() {
        return Err(InstanceError::Empty { field: "addr" });
    }
    check_len("addr", addr)?;
    if let Ok(sock) = addr.parse::<SocketAddr>() {
        return if sock.port() == 0 {
            Err(bad("port 0"))
        } else {
            Ok(())
        };
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("port is not 1..=65535"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| bad("unclosed ["))?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| bad("bad IPv6 address"));
    }
    if host.contains(':') {
        return Err(bad("IPv6 addresses need [brackets]"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.len() > 253 || !host.trim_end_matches('.').split('.').all(label_ok) {
        return Err(bad("bad host name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_with_defaults() {
        let i = Instance::builder("user", "10.0.0.7:8080").build().unwrap();
        assert_eq!(i.id(), "10.0.0.7:8080");
        assert_eq!(i.weight(), 1);
        assert_eq!(i.state(), State::Up);
        assert!(i.is_up());
        assert_eq!(i.tags().len(), 0);
    }

    #[test]
    fn keeps_every_field() {
        let i = Instance::builder("user.rpc", "host-1.example:80")
            .id("u1")
            .tags(["a", "b"])
            .meta("zone", "eu-1")
            .meta("zone", "eu-2")
            .weight(7)
            .state(State::Draining)
            .build()
            .unwrap();
        assert_eq!(i.service(), "user.rpc");
        assert_eq!(i.tags().collect::<Vec<_>>(), ["a", "b"]);
        assert!(i.has_tag("b") && !i.has_tag("c"));
        assert_eq!(i.meta("zone"), Some("eu-2"));
        assert_eq!(i.weight(), 7);
        assert!(!i.is_up());
        assert_eq!(i.to_builder().build().unwrap(), i);
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        let err = |b: InstanceBuilder| b.build().unwrap_err();
        assert_eq!(
            err(Instance::builder("", "a:1")),
            InstanceError::Empty { field: "service" }
        );
        assert_eq!(
            err(Instance::builder("s", "a:1").id("")),
            InstanceError::Empty { field: "id" }
        );
        assert!(matches!(
            err(Instance::builder("s/x", "a:1")),
            InstanceError::BadChar { bad: '/', .. }
        ));
        assert!(matches!(
            err(Instance::builder("s", "a:1").id("x/y")),
            InstanceError::BadChar { field: "id", .. }
        ));
        assert_eq!(
            err(Instance::builder("s", "a:1").weight(0)),
            InstanceError::BadWeight { weight: 0 }
        );
        assert!(matches!(
            err(Instance::builder("s", "a:1").weight(MAX_WEIGHT + 1)),
            InstanceError::BadWeight { .. }
        ));
        assert!(matches!(
            err(Instance::builder("s".repeat(MAX_FIELD_LEN + 1), "a:1")),
            InstanceError::TooLong {
                field: "service",
                ..
            }
        ));
        assert!(matches!(
            err(Instance::builder("s", "a:1").tags((0..=MAX_TAGS).map(|i| i.to_string()))),
            InstanceError::TooMany { field: "tags", .. }
        ));
        assert!(matches!(
            err(Instance::builder("s", "a:1").meta("k", "v".repeat(MAX_FIELD_LEN + 1))),
            InstanceError::TooLong {
                field: "meta value",
                ..
            }
        ));
    }

    #[test]
    fn address_forms() {
        for ok in [
            "10.0.0.7:8080",
            "[::1]:9000",
            "[2001:db8::1]:1",
            "localhost:65535",
            "user-svc.default.svc.cluster.local:50051",
            "host_1:80",
        ] {
            assert_eq!(check_addr(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.7",
            "10.0.0.7:0",
            "10.0.0.7:65536",
            ":80",
            "::1:80",
            "[::1:80",
            "[zz]:80",
            "bad host:80",
            "-a:80",
            "a..b:80",
            "host:http",
        ] {
            assert!(check_addr(bad).is_err(), "{bad} should be rejected");
        }
    }
}
