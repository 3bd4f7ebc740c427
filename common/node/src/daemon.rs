//! The skeleton the three daemons share: logging, binding, signals, and how
//! a run ends. Each daemon's `main` is its flags, its configuration type and
//! its `run`; everything around them is here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Logs to standard output, filtered by `RUST_LOG` (default `info`):
/// coloured text on a terminal, plain text elsewhere (a journal, a file),
/// or with `RS_LOG_FORMAT=json` one JSON object per line (`timestamp`,
/// `level`, `target`, `fields.message` and the event's other fields) for
/// a log shipper.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("RS_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().with_ansi(false).init();
    } else {
        logs.with_ansi(std::io::stdout().is_terminal()).init();
    }
}

/// Binds `listen` for `what` (`main`, `metrics`, `api`: the name keeps two
/// listeners apart when both are configured on port 0), or takes the
/// listener the previous image of this process kept open for it across a
/// start in place ([`crate::inherit`]); with `addr_file`, writes the bound
/// address there (for scripts and tests that start a daemon on port 0).
pub async fn bind(
    what: &str,
    listen: SocketAddr,
    addr_file: Option<&Path>,
) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    use std::os::fd::AsFd as _;
    let key = format!("tcp {what} {listen}");
    let listener = match crate::inherit::take(&key) {
        Some(fd) => {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)?
        }
        None => {
            crate::inherit::release_port(listen.port());
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?
        }
    };
    let bound = format!("tcp {what} {}", listener.local_addr()?);
    crate::inherit::keep(&key, &bound, listener.as_fd())?;
    if let Some(f) = addr_file {
        // Whole or not at all, so a script polling for it never reads half.
        rs_store::files::write_atomically(f, listener.local_addr()?.to_string().as_bytes())
            .with_context(|| format!("cannot write {}", f.display()))?;
    }
    Ok(listener)
}

/// Binds the Unix-domain socket `path` (replacing a stale file), or takes
/// the one the previous image kept open, as [`bind`].
pub fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context as _;
    use std::os::fd::AsFd as _;
    let key = format!("unix {}", path.display());
    let listener = match crate::inherit::take(&key).filter(|_| path.exists()) {
        Some(fd) => {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)?
        }
        None => {
            let _ = std::fs::remove_file(path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?
        }
    };
    crate::inherit::keep(&key, &key, listener.as_fd())?;
    Ok(listener)
}

/// `shutdown_grace_secs` when a configuration leaves it out.
pub fn default_grace_secs() -> u64 {
    10
}

/// Set once a good configuration has been read on SIGHUP: the run ends
/// (draining as on SIGTERM) and [`finish`] starts the program over with it.
static RELOADING: AtomicBool = AtomicBool::new(false);

/// Whether the run is ending to start again in place (a reload), so what
/// it would remove on a stop for good (the proxy's socket file) stays.
pub fn reloading() -> bool {
    RELOADING.load(Ordering::Relaxed)
}

/// A token cancelled on SIGTERM or SIGINT, or on SIGHUP when the
/// configuration file at `config` passes `check` ([`lifecycle`]).
pub fn signals<T: 'static>(
    config: Option<PathBuf>,
    check: fn(&str) -> Result<T, String>,
) -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(lifecycle(token.clone(), config, check));
    token
}

/// What `main` returns once `run` has ended: nothing after a stop; after a
/// reload or a `configChange`, the program started over in place (same
/// PID, so a service manager sees no exit; the listeners kept open), which
/// returns only on failure.
pub fn finish(exit: Exit) -> anyhow::Result<()> {
    match exit {
        Exit::Stopped if !reloading() => Ok(()),
        Exit::Stopped | Exit::Restart => Err(anyhow::anyhow!(
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

/// The service manager's side of a daemon's life, by signal:
///
/// - SIGTERM, SIGINT: `STOPPING=1` to the service manager, then `token` is
///   cancelled and the run drains (within its `shutdown_grace_secs`);
/// - SIGHUP: the configuration file is read and checked by the same code
///   as at start (`check`, the daemon's `Config::parse`). A bad one is
///   refused with its file, line and key, in the log and in the service's
///   status line (`systemctl status`), and the daemon goes on with the
///   configuration in force. A good one: `RELOADING=1`, the run drains as
///   on a stop and [`finish`] starts the program over with it, its
///   listeners kept open; the new image says `READY=1` when it serves
///   ([`ready`]).
///
/// Without a service manager (no `NOTIFY_SOCKET`) the notifications are
/// skipped.
pub async fn lifecycle<T>(
    token: CancellationToken,
    config: Option<PathBuf>,
    check: fn(&str) -> Result<T, String>,
) {
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
                if token.is_cancelled() {
                    tracing::info!("SIGHUP: already reloading");
                    continue;
                }
                let Some(path) = &config else {
                    tracing::warn!("SIGHUP: no configuration file to read again; going on");
                    continue;
                };
                match check_file(path, check) {
                    Err(why) => {
                        let why = why.replace('\n', "; ");
                        tracing::error!(
                            "SIGHUP: the configuration is refused, going on with the one in \
                             force: {why}"
                        );
                        notify(&[sd_notify::NotifyState::Status(&format!(
                            "serving; reload refused: {why}"
                        ))]);
                        continue;
                    }
                    Ok(()) => {
                        tracing::info!(
                            "SIGHUP: {} is good; draining, then starting again with it \
                             (listeners kept open)",
                            path.display()
                        );
                        RELOADING.store(true, Ordering::Relaxed);
                        let mut states = vec![
                            sd_notify::NotifyState::Reloading,
                            sd_notify::NotifyState::Status("reloading"),
                        ];
                        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                            states.push(now);
                        }
                        notify(&states);
                        token.cancel();
                        // Still listening: a SIGTERM during the drain makes
                        // it a stop for good.
                        continue;
                    }
                }
            }
        }
        break;
    }
    RELOADING.store(false, Ordering::Relaxed);
    crate::inherit::forget_kept();
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: draining"),
    ]);
    token.cancel();
}

/// Tells the service manager the daemon serves (`READY=1`: start-up, or a
/// reload, is complete), and closes inherited listeners the configuration
/// no longer names. Called by each daemon once its listeners accept.
pub fn ready(what: &str) {
    crate::inherit::close_unclaimed();
    RELOADING.store(false, Ordering::Relaxed);
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(what),
    ]);
}

/// With a watchdog configured (`WatchdogSec=` in the unit), pings it every
/// half period while `alive` answers within that half period (the daemon's
/// storage thread answers a query): a daemon whose storage is wedged stops
/// pinging, and the service manager restarts it. Until `stop`.
pub fn watchdog<F, Fut>(stop: CancellationToken, alive: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = period / 2;
    tracing::info!("watchdog: pinging every {every:?} while storage answers");
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(every, alive()).await {
                Ok(Ok(())) => notify(&[sd_notify::NotifyState::Watchdog]),
                Ok(Err(e)) => tracing::error!("watchdog: not pinging: {e}"),
                Err(_) => {
                    tracing::error!("watchdog: not pinging: storage did not answer in {every:?}")
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// One message to the service manager (nothing without one).
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// `check-config`: reads the configuration file at `path` with `parse` (the
/// daemon's own parsing and checks, the same code as at start) and says
/// whether it would start with it: `FILE: ok`, or each problem as
/// `FILE:LINE: KEY: problem` (the line of the key it names, when it names
/// one that is in the file), one per line. Returns the exit status: 0
/// good, 1 not.
pub fn check_config<T>(path: &std::path::Path, parse: impl Fn(&str) -> Result<T, String>) -> i32 {
    match check_file(path, parse) {
        Ok(()) => {
            println!("{}: ok", path.display());
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// Reads and checks the configuration file at `path` with `parse`: the
/// problem as `FILE:LINE: KEY: problem`, if any.
pub fn check_file<T>(
    path: &std::path::Path,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text)
        .map(|_| ())
        .map_err(|e| locate_problems(path, &text, &e))
}

/// The problems found checking a configuration after it parsed, so that
/// `check-config` and a refused reload name every one, not the first.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Notes `problem`.
    pub fn add(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// Notes the problem `r` carries, if any; its value otherwise.
    pub fn check<T>(&mut self, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    /// `value` when nothing was noted; else every problem, one per line.
    pub fn into_result<T>(self, value: T) -> Result<T, String> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0.join("\n"))
        }
    }
}

/// Configuration problems (one per line, as [`Problems`] gives them) each
/// as `FILE:LINE: KEY: problem`; a TOML error is one problem (parsing
/// stops at it).
fn locate_problems(path: &std::path::Path, text: &str, problems: &str) -> String {
    if problems.starts_with("TOML parse error") {
        return locate_problem(path, text, problems);
    }
    problems
        .lines()
        .map(|p| locate_problem(path, text, p))
        .collect::<Vec<_>>()
        .join("\n")
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

    #[test]
    fn every_problem_is_named_on_its_own_line() {
        let path = std::path::Path::new("/etc/rs/proxy.toml");
        let text = "id = \"acme.x1\"\nheartbeat_secs = 0\n";
        let mut p = Problems::default();
        p.add("id \"acme.x1\" is not a proxy ID");
        assert_eq!(
            p.check::<()>(Err("heartbeat_secs must be at least 1".into())),
            None
        );
        assert_eq!(p.check(Ok::<_, String>(7)), Some(7));
        let all = p.into_result(()).unwrap_err();
        assert_eq!(
            locate_problems(path, text, &all),
            "/etc/rs/proxy.toml:1: id: id \"acme.x1\" is not a proxy ID\n\
             /etc/rs/proxy.toml:2: heartbeat_secs: heartbeat_secs must be at least 1"
        );
        assert!(Problems::default().into_result(()).is_ok());
    }
}
