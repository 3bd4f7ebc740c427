//! Shared helpers for the Remote Services test suite: proptest strategies
//! and paths into the repository.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The tests open the daemons' databases read-only to check what they hold.
#![allow(clippy::disallowed_methods)]

pub mod arb;
pub mod deploy;
pub mod postgres;
pub mod relay;

use std::path::PathBuf;

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The name of the user the tests run as.
pub fn whoami() -> String {
    std::process::Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "root".into())
}

/// Waits for a child process to end, killing it after `limit` (so a
/// command that never ends fails its test instead of holding the suite);
/// its exit code, -1 if it had to be killed or died of a signal.
pub fn wait_or_kill(child: &mut std::process::Child, limit: std::time::Duration) -> i32 {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("waiting for a child") {
            return st.code().unwrap_or(-1);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return -1;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
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

/// A bulk request for an upload of `size` bytes with SHA-256 `sha`, from
/// component `from` (class diagnostics/core): what a client sends to be
/// granted an upload URL.
pub fn upload_request(
    from: &rs_protocol::RsId,
    size: u64,
    sha: [u8; 32],
) -> rs_protocol::model::Message {
    use rs_protocol::model::*;
    Message {
        header: Header {
            id: rs_protocol::MessageId::generate(),
            created: rs_protocol::Timestamp::now(),
            class: Classification::new("diagnostics", "core"),
            route: Route::Source(Source {
                component: from.clone(),
                version: "1".into(),
                qos: Qos {
                    expiry: None,
                    precedence: 3,
                    persistent: true,
                },
            }),
            routing: Default::default(),
        },
        content: Content::BulkRequest(BulkRequest {
            direction: Direction::Upload,
            name: "core.1".into(),
            size,
            sha256: sha,
            class: Classification::new("diagnostics", "core"),
            url: None,
            expires: None,
        }),
    }
}
