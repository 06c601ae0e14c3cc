//! A service registry on etcd that keeps serving when etcd falls over.
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod codec;
mod error;
pub mod instance;

pub use backend::{Backend, MemoryBackend};
pub use codec::{Codec, DecodeError, Decoded, KeyLayout};
pub use error::{Error, Result};
pub use instance::{Instance, InstanceBuilder, InstanceError, State};
