//! Installing Debian packages, where that is safe: as root on Debian or Ubuntu.

use std::path::Path;
use std::process::Command;

use crate::util::{Result, run, which};

/// True when apt-get can install packages here without asking anyone: Debian or Ubuntu, as root.
pub fn usable() -> bool {
    is_debian() && is_root()
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists() && which("apt-get").is_some()
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `apt-get update`, then `apt-get install` of `packages`, non-interactively.
pub fn install(packages: &[&str]) -> Result<()> {
    let mut update = Command::new("apt-get");
    update
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut install)
}

/// The error for a machine where we may not install: the exact command on Debian/Ubuntu
/// without root, and what to install by hand elsewhere.
pub fn manual_instructions(packages: &[&str], elsewhere: &[&str]) -> String {
    if is_debian() {
        return format!(
            "install the missing tools with:\n    sudo apt-get update && sudo apt-get install -y --no-install-recommends {}",
            packages.join(" ")
        );
    }
    let mut text = String::from("this is not Debian/Ubuntu, so nothing was installed; please:");
    for line in elsewhere {
        text.push_str("\n    - ");
        text.push_str(line);
    }
    text
}
