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

/// `check-config`: reads the configuration file at `path` with `parse` (the
/// daemon's own parsing and checks, the same code as at start) and says
/// whether it would start with it: `FILE: ok`, or the problem as
/// `FILE:LINE: KEY: problem` (the line of the key it names, when it names
/// one that is in the file). Returns the exit status: 0 good, 1 not.
pub fn check_config<T>(path: &std::path::Path, parse: impl Fn(&str) -> Result<T, String>) -> i32 {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return 1;
        }
    };
    match parse(&text) {
        Ok(_) => {
            println!("{}: ok", path.display());
            0
        }
        Err(e) => {
            eprintln!("{}", locate_problem(path, &text, &e));
            1
        }
    }
}

/// A configuration problem as `FILE:LINE: KEY: problem`: TOML's own errors
/// carry their line; the checks after parsing name the key first (`id`,
/// `upstream.urls`, `[seal]`), whose line is looked up in the text.
fn locate_problem(path: &std::path::Path, text: &str, problem: &str) -> String {
    let file = path.display();
    let one_line = problem
        .replace('\n', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    // toml: "TOML parse error at line 3, column 1 ..."
    if let Some(rest) = problem.strip_prefix("TOML parse error at line ")
        && let Some(line) = rest.split(',').next()
    {
        let key = problem.lines().last().unwrap_or_default().trim().to_owned();
        return format!("{file}:{line}: {key}");
    }
    let first = problem
        .split(|c: char| c.is_whitespace() || c == ':')
        .next()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']');
    let key = (!first.is_empty()
        && first
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.'))
    .then_some(first);
    match key.and_then(|k| key_line(text, k)) {
        Some(line) => format!("{file}:{line}: {}: {one_line}", key.unwrap_or_default()),
        None => format!("{file}: {one_line}"),
    }
}

/// The line (from 1) where the dotted `key` (`id`, `upstream.urls`, or a
/// table such as `seal`) is set in the TOML `text`, if it is.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let (table, name) = match key.rsplit_once('.') {
        Some((t, n)) => (t, n),
        None => ("", key),
    };
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if let Some(h) = l.strip_prefix('[') {
            current = h.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
            // The key is a table: its header.
            if table.is_empty() && current == name {
                return Some(i + 1);
            }
            continue;
        }
        let Some((k, _)) = l.split_once('=') else {
            continue;
        };
        if current == table && k.trim() == name {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn problems_name_their_file_line_and_key() {
        let path = std::path::Path::new("/etc/rs/proxy.toml");
        let text = "id = \"acme.x1\"\ndata_dir = \"/tmp\"\n[upstream]\nurls = [\"ftp://a\"]\n";
        assert_eq!(
            locate_problem(
                path,
                text,
                "id \"acme.x1\" is not a proxy ID (like acme.p1)"
            ),
            "/etc/rs/proxy.toml:1: id: id \"acme.x1\" is not a proxy ID (like acme.p1)"
        );
        assert_eq!(
            locate_problem(path, text, "upstream.urls: ftp://a is not http(s)"),
            "/etc/rs/proxy.toml:4: upstream.urls: upstream.urls: ftp://a is not http(s)"
        );
        let toml_err = "TOML parse error at line 2, column 1\n  |\n2 | bogus = 1\n  | ^^^^^\nunknown field `bogus`, expected one of `id`, `data_dir`\n";
        assert_eq!(
            locate_problem(path, text, toml_err),
            "/etc/rs/proxy.toml:2: unknown field `bogus`, expected one of `id`, `data_dir`"
        );
        assert_eq!(
            locate_problem(path, text, "something else"),
            "/etc/rs/proxy.toml: something else"
        );
    }
}
