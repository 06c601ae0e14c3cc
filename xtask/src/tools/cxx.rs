//! The C++ compiler `libfuzzer-sys` builds libFuzzer with (through the `cc` crate: `$CXX`, else
//! `c++`). Debian's `gcc` alone is not enough: `g++` brings the compiler and libstdc++'s headers.

use std::path::PathBuf;
use std::process::Command;

use super::{Check, Fix, Scratch, output_of};
use crate::util::{Result, tool_from_env, which};

const PACKAGES: &[&str] = &["g++"];
const ELSEWHERE: &str = "install a C++ compiler with its standard library (macOS: `xcode-select --install`), or set CXX";

pub fn find() -> Result<Check<PathBuf>> {
    let compiler = match tool_from_env("CXX")? {
        Some(c) => c,
        None => match which("c++") {
            Some(c) => c,
            None => {
                return Ok(Err(
                    fix("no `c++` on PATH (and CXX is not set)".to_string()),
                ));
            }
        },
    };
    Ok(match exercise(&compiler) {
        Ok(()) => Ok(compiler),
        Err(why) => Err(fix(format!(
            "{} cannot build C++: {why}",
            compiler.display()
        ))),
    })
}

fn fix(problem: String) -> Fix {
    Fix {
        tool: "C++ compiler",
        problem,
        packages: PACKAGES,
        elsewhere: ELSEWHERE,
    }
}

/// Compiles, links and runs a program that uses the C++ standard library.
fn exercise(compiler: &std::path::Path) -> std::result::Result<(), String> {
    let scratch = Scratch::new("cxx").map_err(|e| e.to_string())?;
    let source = scratch.0.join("check.cc");
    let program = scratch.0.join("check");
    std::fs::write(
        &source,
        "#include <string>\n#include <vector>\n\
         int main() { std::vector<std::string> v{\"ok\"}; return v.size() == 1 ? 0 : 1; }\n",
    )
    .map_err(|e| format!("cannot write {}: {e}", source.display()))?;
    output_of(Command::new(compiler).arg(&source).arg("-o").arg(&program))?;
    output_of(&mut Command::new(&program))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compiler_that_builds_nothing_is_refused() {
        assert!(exercise(std::path::Path::new("false")).is_err());
    }

    /// `cargo xtask ci` installs g++ before the tests run, so this holds wherever ci passed.
    #[test]
    fn the_systems_cxx_builds_and_runs_a_program() {
        let Some(cxx) = which("c++") else {
            panic!("no c++ on PATH: run `cargo xtask ci`, which installs g++");
        };
        exercise(&cxx).expect("c++ builds and runs a program");
    }
}
