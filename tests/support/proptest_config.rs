//! The proptest settings every property test shares.

use proptest::test_runner::{Config, FileFailurePersistence};

/// `default_cases` cases unless `PROPTEST_CASES` says otherwise, shrinking up to
/// `max_shrink_iters`, and failing cases kept in `proptest-regressions/{regressions}.txt` at the
/// crate root (or not kept, with `None`).
///
/// `Config::default()` reads `PROPTEST_CASES`, but setting `cases` would override it: it is
/// read here first so that the environment wins. The default persistence looks for a `lib.rs`
/// above the test's source and finds none under `tests/`, hence the explicit path.
pub fn config(default_cases: u32, max_shrink_iters: u32, regressions: Option<&str>) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let failure_persistence = regressions.map(|name| {
        let path = format!(
            "{}/proptest-regressions/{name}.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        // Once per test binary: leaking the path is what a `&'static str` here costs.
        Box::new(FileFailurePersistence::Direct(Box::leak(
            path.into_boxed_str(),
        ))) as Box<dyn proptest::test_runner::FailurePersistence>
    });
    Config {
        cases,
        max_shrink_iters,
        failure_persistence,
        ..Config::default()
    }
}
