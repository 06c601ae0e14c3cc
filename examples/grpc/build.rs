//! Compiles `proto/helloworld.proto` with the protoc that the `protoc-bin-vendored` crate ships,
//! so that building this package needs no protoc installed.

fn main() {
    match protoc_bin_vendored::protoc_bin_path() {
        // SAFETY: a build script is one thread here; nothing else reads the environment.
        Ok(protoc) => unsafe { std::env::set_var("PROTOC", protoc) },
        // No vendored binary for this platform: prost-build falls back to `PROTOC`, then to
        // `protoc` on `PATH`, and says so if neither works.
        Err(error) => println!(
            "cargo:warning=no vendored protoc for this platform ({error}); using PROTOC or protoc on PATH"
        ),
    }
    tonic_prost_build::compile_protos("proto/helloworld.proto")
        .expect("compiling proto/helloworld.proto");
}
