//! Helpers shared by the integration tests.

pub mod api_calls;
pub mod cluster;
pub mod git;
pub mod openapi;
pub mod partition;
pub mod serve;

use std::path::PathBuf;

/// `tests/fixtures/<rel>`: the real forge payloads this project is tested against.
pub fn fixture(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {}: {e} (the real forge payloads, copied from the shared corpus into tests/fixtures)",
            path.display()
        )
    })
}
