//! `protoc`, which etcd-client's build script runs (through prost-build) to compile etcd's
//! protobufs, and which needs protobuf's well-known types (`google/protobuf/*.proto`) next to it.
//!
//! Where it comes from, in order:
//! 1. `PROTOC` (and `PROTOC_INCLUDE`), when the user set them: used as given, or an error.
//! 2. The `protoc-bin-vendored` crate: Google's release binary with its include files, pinned by
//!    `Cargo.lock`. This is the usual case. It makes the build independent of how a system
//!    packages protobuf (Debian's `protobuf-compiler` lacks the include files without
//!    `libprotobuf-dev`), needs neither root nor apt, and works on macOS and Windows too.
//! 3. A `protoc` on `PATH`, on a platform the vendored crate has no binary for. On Debian/Ubuntu
//!    `protobuf-compiler` and `libprotobuf-dev` provide one that works.
//!
//! Whichever it is, it must compile a file that imports `google/protobuf/descriptor.proto`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Check, Fix, Scratch, output_of};
use crate::util::{Result, say, tool_from_env, which};

/// A protoc that compiled a file importing protobuf's well-known types.
pub struct Protoc {
    pub bin: PathBuf,
    /// The directory holding `google/protobuf/*.proto`, when it is not protoc's own default.
    pub include: Option<PathBuf>,
    /// e.g. `libprotoc 31.1`.
    pub version: String,
    /// Where it came from, in words.
    pub origin: &'static str,
}

const PACKAGES: &[&str] = &["protobuf-compiler", "libprotobuf-dev"];
const ELSEWHERE: &str = "install protoc 3.15 or newer with its include files (macOS: `brew install protobuf`), \
     or set PROTOC=/path/to/protoc and PROTOC_INCLUDE=/path/to/include";

pub fn find() -> Result<Check<Protoc>> {
    if let Some(bin) = tool_from_env("PROTOC")? {
        let include = std::env::var_os("PROTOC_INCLUDE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        return match exercise(&bin, include.as_deref()) {
            Ok(version) => Ok(Ok(Protoc {
                bin,
                include,
                version,
                origin: "from PROTOC",
            })),
            Err(why) => Err(format!(
                "PROTOC is set to `{}`, which cannot build etcd's protobufs: {why}\n\
                 Point PROTOC at a protoc with its include files (and PROTOC_INCLUDE at them if \
                 they are not next to it), or unset it to use the vendored protoc.",
                bin.display()
            )),
        };
    }
    match vendored() {
        Ok(protoc) => return Ok(Ok(protoc)),
        Err(why) => say!("ensure_tools: the vendored protoc cannot be used here: {why}"),
    }
    let Some(bin) = which("protoc") else {
        return Ok(Err(fix("not found on PATH".to_string())));
    };
    Ok(match exercise(&bin, None) {
        Ok(version) => Ok(Protoc {
            bin,
            include: None,
            version,
            origin: "from PATH",
        }),
        Err(why) => Err(fix(format!("{} does not work: {why}", bin.display()))),
    })
}

fn fix(problem: String) -> Fix {
    Fix {
        tool: "protoc",
        problem,
        packages: PACKAGES,
        elsewhere: ELSEWHERE,
    }
}

fn vendored() -> std::result::Result<Protoc, String> {
    let bin = protoc_bin_vendored::protoc_bin_path().map_err(|e| e.to_string())?;
    let include = protoc_bin_vendored::include_path().map_err(|e| e.to_string())?;
    let version = exercise(&bin, Some(&include))?;
    Ok(Protoc {
        bin,
        include: Some(include),
        version,
        origin: "vendored by the protoc-bin-vendored crate",
    })
}

/// Compiles a file that imports `google/protobuf/descriptor.proto`, as etcd's protobufs do
/// (through gogoproto). Returns protoc's version line.
fn exercise(bin: &Path, include: Option<&Path>) -> std::result::Result<String, String> {
    let version = output_of(Command::new(bin).arg("--version"))?;
    let version = version.trim().to_string();
    if !version.starts_with("libprotoc ") {
        return Err(format!(
            "`--version` printed `{}`, not `libprotoc <version>`",
            version.lines().next().unwrap_or_default()
        ));
    }
    let scratch = Scratch::new("protoc").map_err(|e| e.to_string())?;
    let proto = scratch.0.join("check.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\n\
         package xtask.check;\n\
         import \"google/protobuf/descriptor.proto\";\n\
         message Check { google.protobuf.FileDescriptorProto file = 1; }\n",
    )
    .map_err(|e| format!("cannot write {}: {e}", proto.display()))?;
    let out = scratch.0.join("check.pb");
    let mut cmd = Command::new(bin);
    cmd.arg("-I").arg(&scratch.0);
    if let Some(include) = include {
        cmd.arg("-I").arg(include);
    }
    cmd.arg(format!("--descriptor_set_out={}", out.display()))
        .arg(&proto);
    output_of(&mut cmd).map_err(|e| {
        format!("cannot compile a file importing google/protobuf/descriptor.proto: {e}")
    })?;
    match std::fs::metadata(&out) {
        Ok(m) if m.len() > 0 => Ok(version),
        _ => Err(format!(
            "it exited 0 but wrote no descriptor set to {}",
            out.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_protoc_compiles_well_known_imports() {
        let protoc = vendored().expect("the vendored protoc works on this platform");
        assert!(
            protoc.version.starts_with("libprotoc "),
            "{}",
            protoc.version
        );
    }

    /// Debian's `protobuf-compiler` without `libprotobuf-dev` is this case: protoc runs, but
    /// finds no `google/protobuf/*.proto`.
    #[test]
    fn a_protoc_without_its_include_files_is_refused() {
        let bin = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
        let lonely = Scratch::new("protoc-test").expect("scratch dir");
        let copy = lonely.0.join("protoc");
        std::fs::copy(&bin, &copy).expect("copy protoc");
        let why = exercise(&copy, None).expect_err("no include files next to it");
        assert!(why.contains("descriptor.proto"), "{why}");
    }

    #[test]
    fn a_program_that_is_not_protoc_is_refused() {
        let why = exercise(Path::new("true"), None).expect_err("`true` is no protoc");
        assert!(why.contains("libprotoc"), "{why}");
    }
}
