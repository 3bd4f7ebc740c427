//! The skeleton the three daemons share: logging, binding, signals, and how
//! a run ends. Each daemon's `main` is its flags, its configuration type and
//! its `run`; everything around them is here.

use std::net::SocketAddr;
use std::path::Path;

use tokio_util::sync::CancellationToken;

/// How a daemon's `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped for good (a signal or the `shutdown` action).
    Stopped,
    /// Stopped to start again with the configuration file as it is now
    /// (`configChange`).
    Restart,
}

/// Logs to standard output, filtered by `RUST_LOG` (default `info`),
/// coloured only on a terminal (a journal or a log file gets plain text).
pub fn init_logging() {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

/// Binds `listen`; with `addr_file`, writes the bound address there (for
/// scripts and tests that start a daemon on port 0).
pub async fn bind(
    listen: SocketAddr,
    addr_file: Option<&Path>,
) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    if let Some(f) = addr_file {
        // Whole or not at all, so a script polling for it never reads half.
        rs_store::files::write_atomically(f, listener.local_addr()?.to_string().as_bytes())
            .with_context(|| format!("cannot write {}", f.display()))?;
    }
    Ok(listener)
}

/// A token cancelled on SIGTERM or SIGINT ([`shutdown_on_signal`]).
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(token.clone()));
    token
}

/// What `main` returns once `run` has ended: nothing after a stop; after a
/// `configChange`, the program started over in place (same PID, so a
/// service manager sees no exit), which returns only on failure.
pub fn finish(exit: Exit) -> anyhow::Result<()> {
    match exit {
        Exit::Stopped => Ok(()),
        Exit::Restart => Err(anyhow::anyhow!(
            "cannot start again: {}",
            crate::config_file::start_again()
        )),
    }
}

/// Fault injection for the test suite: with `RS_CRASH_AT=<point>` in its
/// environment a daemon aborts when it reaches that point, as a SIGKILL at
/// that instant would stop it (nothing flushed, nothing cleaned up), so a
/// test can place a crash exactly between two steps that must not be
/// separated by one. Written here rather than with the `fail` crate, whose
/// actions cannot end the process (a panic inside a tokio task is caught).
/// Without the variable this is one load of a cached `Option`.
pub fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("RS_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        tracing::error!("RS_CRASH_AT={name}: aborting here");
        std::process::abort();
    }
}

/// Cancels `token` on SIGTERM or SIGINT (Ctrl-C). SIGHUP, which would
/// otherwise kill the daemon without a shutdown (and which service
/// managers send as "reload"), is caught and logged: the daemon goes on
/// with the configuration it started with.
pub async fn shutdown_on_signal(token: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = hup.recv() => {
                tracing::warn!(
                    "SIGHUP: reloading is not supported; going on with the configuration \
                     in force (restart the service to apply a changed file)"
                );
                continue;
            }
        }
        break;
    }
    token.cancel();
}
