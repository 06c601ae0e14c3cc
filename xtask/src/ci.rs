//! `cargo xtask ci` and `cargo xtask fuzz`.

use std::env;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::tools::{Need, Tools, ensure_tools};
use crate::util::{Result, cargo, run, say};

/// Per-target fuzzing budget in `ci`, unless `FUZZ_SECONDS` says otherwise.
const CI_FUZZ_SECONDS: u64 = 20;

/// Wall time of each step, printed as a table at the end (also on failure,
/// so a slow or failing step is visible at a glance).
#[derive(Default)]
struct Timings {
    steps: Vec<(String, Duration, bool)>,
    start: Option<Instant>,
}

impl Timings {
    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.start.get_or_insert_with(Instant::now);
        say!("\n==> {name}");
        let began = Instant::now();
        let result = f();
        self.steps
            .push((name.to_string(), began.elapsed(), result.is_ok()));
        result.map_err(|e| format!("step `{name}` failed: {e}"))
    }

    fn print(&self) {
        let width = self.steps.iter().map(|(n, ..)| n.len()).max().unwrap_or(0);
        let width = width.max("total".len());
        say!("\n==> timings");
        for (name, took, ok) in &self.steps {
            let mark = if *ok { "ok" } else { "FAILED" };
            say!("    {name:<width$}  {:>8.1}s  {mark}", took.as_secs_f64());
        }
        let total = self.start.map(|s| s.elapsed()).unwrap_or_default();
        say!("    {:<width$}  {:>8.1}s", "total", total.as_secs_f64());
    }
}

/// Runs every check in order, stopping at the first failure.
pub fn ci() -> Result<()> {
    let mut timings = Timings::default();
    let result = ci_steps(&mut timings);
    timings.print();
    match &result {
        Ok(()) => say!("\nci: all steps passed"),
        Err(_) => say!("\nci: FAILED"),
    }
    result
}

fn ci_steps(t: &mut Timings) -> Result<()> {
    let tools = t.step("ensure_tools", || ensure_tools(Need::Ci))?;

    t.step("fmt", || run(&mut cargo(["fmt", "--all", "--", "--check"])))?;
    t.step("clippy", || {
        let args = [
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--locked",
            "--",
            "-D",
            "warnings",
        ];
        run(&mut tools.apply(cargo(args)))
    })?;
    t.step("doc", || {
        // Broken or private intra-doc links are errors: the docs are part of the API.
        let mut cmd = tools.apply(cargo(["doc", "--no-deps", "--all-features", "--locked"]));
        cmd.env("RUSTDOCFLAGS", "-D warnings");
        run(&mut cmd)
    })?;
    // The same for the crate's private items: the docs of its internals are how a reader
    // finds the way around, and their links rot unseen otherwise.
    t.step("doc_private", || {
        let mut cmd = tools.apply(cargo([
            "doc",
            "--no-deps",
            "--all-features",
            "--locked",
            "-p",
            "etcd-registry",
        ]));
        cmd.env("RUSTDOCFLAGS", "-D warnings --document-private-items");
        run(&mut cmd)
    })?;
    // The core builds without any feature (no etcd-client, tower or tonic).
    t.step("check_no_default_features", || {
        let args = [
            "check",
            "-p",
            "etcd-registry",
            "--no-default-features",
            "--locked",
        ];
        run(&mut tools.apply(cargo(args)))
    })?;
    t.step("test", || {
        let args = ["test", "--workspace", "--all-features", "--locked"];
        run(&mut tools.apply(cargo(args)))
    })?;

    let benches = bench_names()?;
    if benches.is_empty() {
        say!("\nbench: no benches/*.rs, skipped");
    }
    for bench in &benches {
        t.step(&format!("bench {bench}"), || {
            let args = [
                "bench",
                "--locked",
                "--all-features",
                "--bench",
                bench,
                "--",
                "--test",
            ];
            run(&mut tools.apply(cargo(args)))
        })?;
    }

    let Some(targets) = fuzz_targets()? else {
        say!("\nfuzz: no fuzz/ directory, skipped");
        return Ok(());
    };
    let seconds = fuzz_seconds_from_env()?;
    fuzz_all(t, &tools, &targets, seconds)
}

/// `cargo xtask fuzz [SECONDS]`: every fuzz target for SECONDS each.
pub fn fuzz(seconds: u64) -> Result<()> {
    let Some(targets) = fuzz_targets()? else {
        return Err("no fuzz/ directory with a Cargo.toml; nothing to fuzz".to_string());
    };
    let mut timings = Timings::default();
    let result = timings
        .step("ensure_tools", || ensure_tools(Need::Fuzz))
        .and_then(|tools| fuzz_all(&mut timings, &tools, &targets, seconds));
    timings.print();
    result
}

/// Bench names: the stems of `benches/*.rs`, sorted for a stable order.
fn bench_names() -> Result<Vec<String>> {
    let dir = Path::new("benches");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list benches/: {e}"))?;
    let mut names = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list benches/: {e}"))?
            .path();
        let is_rs = path.is_file() && path.extension().is_some_and(|ext| ext == "rs");
        let stem = path.file_stem().and_then(|s| s.to_str()).filter(|_| is_rs);
        names.extend(stem.map(str::to_string));
    }
    names.sort();
    Ok(names)
}

/// `None` when there is no `fuzz/Cargo.toml`; otherwise its `[[bin]]` names.
fn fuzz_targets() -> Result<Option<Vec<String>>> {
    let manifest = Path::new("fuzz").join("Cargo.toml");
    if !manifest.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(&manifest)
        .map_err(|e| format!("cannot read {}: {e}", manifest.display()))?;
    Ok(Some(bin_names(&text)))
}

/// The `name` of every `[[bin]]` table in a Cargo manifest. A line-based
/// reader is enough for cargo-fuzz's generated layout and keeps xtask free of
/// dependencies.
fn bin_names(manifest: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines() {
        let line = strip_comment(line).trim();
        if line.starts_with('[') {
            in_bin = line.replace(' ', "") == "[[bin]]";
            continue;
        }
        if !in_bin {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() == "name" {
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')));
            if let Some(name) = unquoted.filter(|n| !n.is_empty()) {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// Drops a trailing `# comment` that is not inside a string.
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '#') => return &line[..i],
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            _ => {}
        }
    }
    line
}

fn fuzz_seconds_from_env() -> Result<u64> {
    match env::var("FUZZ_SECONDS") {
        Ok(s) => parse_seconds(&s).map_err(|e| format!("FUZZ_SECONDS: {e}")),
        Err(env::VarError::NotPresent) => Ok(CI_FUZZ_SECONDS),
        Err(env::VarError::NotUnicode(_)) => Err("FUZZ_SECONDS is not valid UTF-8".to_string()),
    }
}

pub fn parse_seconds(s: &str) -> Result<u64> {
    match s.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a positive whole number of seconds")),
    }
}

fn fuzz_all(t: &mut Timings, tools: &Tools, targets: &[String], seconds: u64) -> Result<()> {
    if targets.is_empty() {
        say!("\nfuzz: fuzz/Cargo.toml lists no [[bin]] targets, skipped");
        return Ok(());
    }
    t.step("cargo-fuzz", || ensure_cargo_fuzz(tools))?;
    for target in targets {
        t.step(&format!("fuzz {target} ({seconds}s)"), || {
            // libFuzzer writes the inputs it finds into the first corpus
            // directory. That is a fresh scratch directory, so the committed
            // seeds in fuzz/corpus/<target> are only read, never added to.
            let scratch = scratch_corpus(target)?;
            let seeds = env::current_dir()
                .map_err(|e| format!("cannot read the current directory: {e}"))?
                .join("fuzz")
                .join("corpus")
                .join(target);
            let mut cmd = tools.apply(cargo(["fuzz", "run", target.as_str()]));
            cmd.arg(&scratch);
            if seeds.is_dir() {
                cmd.arg(&seeds);
            }
            cmd.arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-print_final_stats=1")
                // cargo-fuzz passes -Z flags (sanitizers); this lets a stable
                // toolchain accept them, so no nightly install is needed.
                .env("RUSTC_BOOTSTRAP", "1");
            let result = run(&mut cmd);
            let _ = fs::remove_dir_all(&scratch);
            result
        })?;
    }
    Ok(())
}

/// An empty directory for the inputs one fuzz run finds.
fn scratch_corpus(target: &str) -> Result<std::path::PathBuf> {
    let dir = env::temp_dir().join(format!(
        "etcd-registry-fuzz-{}-{target}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn ensure_cargo_fuzz(tools: &Tools) -> Result<()> {
    let installed = cargo(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        say!("cargo-fuzz: already installed");
        return Ok(());
    }
    say!("cargo-fuzz: not installed, installing it with cargo install");
    run(&mut tools.apply(cargo(["install", "cargo-fuzz", "--locked"])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bin_names_from_a_cargo_fuzz_manifest() {
        let manifest = r#"
[package]
name = "etcd-registry-fuzz"   # not a bin

[dependencies]
libfuzzer-sys = "0.4"

[[bin]]
name = "decode_key"
path = "fuzz_targets/decode_key.rs"
test = false

[[ bin ]]
name = 'decode_value' # trailing comment
path = "fuzz_targets/decode_value.rs"

[profile.release]
debug = 1
"#;
        assert_eq!(bin_names(manifest), ["decode_key", "decode_value"]);
    }

    #[test]
    fn comment_marker_inside_a_string_is_kept() {
        assert_eq!(strip_comment(r#"name = "a#b" # c"#), r#"name = "a#b" "#);
    }

    #[test]
    fn seconds_must_be_positive() {
        assert_eq!(parse_seconds(" 5 "), Ok(5));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("abc").is_err());
    }
}
