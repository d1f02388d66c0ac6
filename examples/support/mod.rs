//! Shared by the benchmark examples: a real git repository driven through the `git` CLI.
//! (A directory without `main.rs`, so Cargo does not take it for an example of its own.)

use std::path::Path;
use std::process::Command;

/// Runs `git -C dir args...` with a fixed identity and returns its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.com",
            "-c",
            "commit.gpgsign=false",
            "-C",
        ])
        .arg(dir)
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
