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

/// Asserts that `doc` is valid against `dtd/control-api.dtd` (xmllint,
/// from libxml2-utils, which scripts/test installs). `scratch` is a file
/// path the document may be written to.
pub fn assert_control_api_valid(doc: &[u8], scratch: &std::path::Path) {
    std::fs::write(scratch, doc).expect("writing the document");
    let out = std::process::Command::new("xmllint")
        .args(["--noout", "--nonet", "--dtdvalid"])
        .arg(repo_root().join("dtd/control-api.dtd"))
        .arg(scratch)
        .output()
        .expect("xmllint (libxml2-utils)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(doc),
        String::from_utf8_lossy(&out.stderr)
    );
}
