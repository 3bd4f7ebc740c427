//! Shared helpers for the Remote Services test suite: proptest strategies
//! and paths into the repository.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod arb;
pub mod deploy;
pub mod relay;

use std::path::PathBuf;

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}
