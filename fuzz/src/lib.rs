//! Shared code of the fuzz targets: the checks each target makes, and the input formats.
//!
//! The targets themselves (`fuzz_targets/*.rs`) are one line each, so a crashing input can be
//! replayed through these functions from anywhere, and the input formats are written down once.

pub mod decode;
pub mod machine;
