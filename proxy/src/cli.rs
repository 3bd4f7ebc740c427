//! The `rs-proxy` command line: runs the proxy daemon (`run`), enrolls a
//! site in one step (`enroll`), checks its configuration and spool, or
//! talks to a running proxy over its socket (`send`, `register`,
//! `status`). In the library so that the test suite's multi-call program
//! runs exactly this.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use crate::api::SendRequest;
use crate::client::Client;
use clap::{Args, Parser, Subcommand, ValueEnum};
use rs_node::daemon;

#[derive(Debug, Parser)]
#[command(version, about = "The Remote Services proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the proxy daemon.
    Run {
        /// Configuration file (TOML); see docs/configuration.md.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Send an alarm, event or data through a running proxy; prints the
    /// message ID once it is durably spooled.
    Send(Box<SendArgs>),
    /// Register an integrator; prints its remote services ID.
    Register {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "1.0")]
        version: String,
    },
    /// Hand a file over for upload through a running proxy; prints the
    /// upload's ID once the request is spooled (with --wait, follows it to
    /// the end).
    Upload(Box<UploadArgs>),
    /// List a running proxy's uploads (JSON).
    Uploads {
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a running proxy's status (JSON).
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Where a message sent through this proxy is: waiting in the spool
    /// (and why: the next hop's state), dead-lettered, dropped, or sent on
    /// (then `rsctl trace ID` at the centre shows its hops).
    Trace {
        /// The message ID `send` printed.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Work on the spool file.
    #[command(subcommand)]
    Spool(SpoolCmd),
    /// Enroll this site in one step: obtain the certificate and the ID with
    /// the token, write the configuration, hand the state to the service's
    /// user and start the service (systemctl enable --now rs-proxy).
    Enroll(Box<EnrollArgs>),
    /// Check the configuration (the same checks as at start) and exit: 0
    /// when it is good, 1 with each problem as FILE:LINE: KEY: problem.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum SpoolCmd {
    /// Check the spool without changing it (the daemon may run): SQLite's
    /// integrity check, then what it holds by state and precedence. Exit
    /// status 0 when intact, 1 when damaged (the daemon moves a damaged
    /// spool aside at its next start and spools again what it can read).
    Verify {
        /// The proxy's configuration: checks `spool.db` in its data_dir.
        #[arg(long, short, required_unless_present = "file")]
        config: Option<PathBuf>,
        /// A spool file to check instead.
        #[arg(long, conflicts_with = "config")]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// The upstream's URL (the provider's MLM or server); repeat it for a
    /// failover list, in order.
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// The one-time enrollment token (from `rsctl enroll`).
    #[arg(long)]
    token: String,
    /// The provider's CA certificate (public; it comes with the token).
    #[arg(long, default_value = "/etc/rs/ca.pem")]
    ca: PathBuf,
    /// The configuration file to write (what is in it already is kept,
    /// with enrollment's settings laid over).
    #[arg(long, short, default_value = "/etc/rs-proxy/proxy.toml")]
    config: PathBuf,
    /// The state directory: spool, registry, certificate and key.
    #[arg(long, default_value = "/var/lib/rs-proxy")]
    data_dir: PathBuf,
    /// The integrator socket.
    #[arg(long, default_value = "/run/rs-proxy/rs-proxy.sock")]
    socket: PathBuf,
    /// The user the service runs as, made the owner of the state, the key
    /// and the configuration ("" leaves ownership as it is).
    #[arg(long, default_value = "rs-proxy")]
    user: String,
    /// Do not start the service (start it later with `systemctl enable
    /// --now rs-proxy`, or `rs-proxy run --config FILE`).
    #[arg(long)]
    no_start: bool,
}

#[derive(Debug, Args)]
struct Conn {
    /// The proxy's integrator socket.
    #[arg(
        long,
        env = "RS_PROXY_SOCKET",
        default_value = "/run/rs-proxy/rs-proxy.sock"
    )]
    socket: PathBuf,
}

#[derive(Debug, Args)]
struct UploadArgs {
    #[command(flatten)]
    conn: Conn,
    /// The integrator uploading (registered on first use).
    #[arg(long)]
    integrator: String,
    /// The support instance (systems-management ID) the file is about.
    #[arg(long)]
    instance: Option<String>,
    /// The file; it must stay unchanged until the upload is done.
    file: PathBuf,
    /// Name to announce (default: the file's name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "diagnostics")]
    class: String,
    #[arg(long, default_value = "file")]
    subclass: String,
    /// Wait until the upload is done, refused or failed, printing progress.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum What {
    Alarm,
    Event,
    Data,
}

#[derive(Debug, Args)]
struct SendArgs {
    what: What,
    #[command(flatten)]
    conn: Conn,
    /// The integrator sending (registered on first use).
    #[arg(long, default_value = "cli")]
    integrator: String,
    /// The support instance (its systems-management ID: host name, address).
    #[arg(long)]
    instance: Option<String>,
    /// critical, major, minor, warning or info.
    #[arg(long)]
    severity: Option<String>,
    /// Alarms: raised, updated or cleared.
    #[arg(long)]
    state: Option<String>,
    /// Alarms: key correlating raise, update and clear.
    #[arg(long)]
    key: Option<String>,
    /// Events: what kind of event.
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    text: Option<String>,
    /// Integrator-specific data, NAME=VALUE (repeatable).
    #[arg(long = "detail", value_parser = parse_detail)]
    details: Vec<(String, String)>,
    #[arg(long)]
    class: Option<String>,
    #[arg(long)]
    subclass: Option<String>,
    #[arg(long)]
    precedence: Option<u8>,
    /// Seconds until the message is worthless.
    #[arg(long)]
    ttl: Option<u64>,
    /// Data: MIME type.
    #[arg(long)]
    mime: Option<String>,
    /// Data: read the bytes from this file.
    #[arg(long)]
    file: Option<PathBuf>,
}

fn parse_detail(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// Runs the command line `args` (the program's name first); returns the
/// exit status.
pub fn main_with<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rs-proxy: {e}");
            return 1;
        }
    };
    match rt.block_on(real_main(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("rs-proxy: {e:#}");
            1
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run { config } => {
            daemon::init_logging();
            crate::daemon(config).await
        }
        Cmd::Enroll(a) => {
            let a = *a;
            let site = crate::enroll::Site {
                upstreams: a.servers,
                token: a.token,
                ca: a.ca,
                config: a.config.clone(),
                data_dir: a.data_dir,
                socket: a.socket,
                user: (!a.user.is_empty()).then_some(a.user),
            };
            let id = crate::enroll::site(&site).await?;
            println!(
                "enrolled as {id}; configuration written to {}",
                a.config.display()
            );
            if a.no_start {
                println!("start it with: systemctl enable --now rs-proxy");
                return Ok(());
            }
            let status = std::process::Command::new("systemctl")
                .args(["enable", "--now", "rs-proxy.service"])
                .status()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "systemctl: {e}; start it with: rs-proxy run --config {}",
                        a.config.display()
                    )
                })?;
            anyhow::ensure!(
                status.success(),
                "systemctl enable --now rs-proxy: {status}"
            );
            println!("rs-proxy started (systemctl status rs-proxy)");
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            std::process::exit(daemon::check_config(&config, crate::Config::parse));
        }
        Cmd::Spool(SpoolCmd::Verify { config, file }) => {
            let path = match (file, config) {
                (Some(f), _) => f,
                (None, Some(c)) => crate::Config::load(&c)
                    .map_err(anyhow::Error::msg)?
                    .data_dir
                    .join("spool.db"),
                (None, None) => anyhow::bail!("--config or --file"),
            };
            let (ok, text) = crate::verify_spool(&path).map_err(anyhow::Error::msg)?;
            print!("{text}");
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Register {
            conn,
            name,
            version,
        } => {
            let id = Client::new(conn.socket)
                .register_integrator(&name, &version, std::env::consts::OS)
                .await?;
            println!("{id}");
            Ok(())
        }
        Cmd::Upload(a) => {
            let a = *a;
            let client =
                Client::new(&a.conn.socket).with_timeout(std::time::Duration::from_secs(3600));
            client
                .register_integrator(
                    &a.integrator,
                    env!("CARGO_PKG_VERSION"),
                    std::env::consts::OS,
                )
                .await?;
            let path = std::path::absolute(&a.file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
            let u = client
                .upload(&crate::bulk::UploadRequest {
                    integrator: a.integrator,
                    instance: a.instance,
                    path: path.display().to_string(),
                    name: a.name,
                    class: Some(a.class),
                    subclass: Some(a.subclass),
                    precedence: None,
                })
                .await?;
            println!("{}", u.id);
            if a.wait {
                let mut last = (String::new(), u64::MAX);
                loop {
                    let s = client.upload_state(&u.id).await?;
                    if (s.state.clone(), s.sent) != last {
                        eprintln!(
                            "{}: {} of {} bytes{}",
                            s.state,
                            s.sent,
                            s.size,
                            s.reason
                                .as_deref()
                                .map(|r| format!(" ({r})"))
                                .unwrap_or_default()
                        );
                        last = (s.state.clone(), s.sent);
                    }
                    match s.state.as_str() {
                        "done" => break,
                        "refused" | "failed" => {
                            anyhow::bail!("upload {}: {}", s.state, s.reason.unwrap_or_default())
                        }
                        _ => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                    }
                }
            }
            Ok(())
        }
        Cmd::Uploads { conn } => {
            let v = Client::new(conn.socket).uploads().await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Status { conn } => {
            let v = Client::new(conn.socket).status().await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Trace { id, conn } => {
            let v = Client::new(conn.socket).trace(&id).await?;
            print!("{}", trace_text(&v));
            Ok(())
        }
        Cmd::Send(a) => {
            let a = *a;
            let client = Client::new(&a.conn.socket);
            client
                .register_integrator(
                    &a.integrator,
                    env!("CARGO_PKG_VERSION"),
                    std::env::consts::OS,
                )
                .await?;
            let (data, data_base64) = match &a.file {
                Some(f) => {
                    use base64::Engine as _;
                    let bytes =
                        std::fs::read(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                    (
                        None,
                        Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    )
                }
                None if matches!(a.what, What::Data) => (a.text.clone(), None),
                None => (None, None),
            };
            let req = SendRequest {
                integrator: a.integrator,
                instance: a.instance,
                severity: a.severity,
                state: a.state,
                key: a.key,
                kind: a.kind,
                text: if matches!(a.what, What::Data) {
                    None
                } else {
                    a.text
                },
                details: a.details.into_iter().collect(),
                class: a.class,
                subclass: a.subclass,
                precedence: a.precedence,
                ttl_secs: a.ttl,
                persistent: None,
                mime: a.mime,
                data,
                data_base64,
            };
            let what = match a.what {
                What::Alarm => "alarm",
                What::Event => "event",
                What::Data => "data",
            };
            println!("{}", client.send(what, &req).await?);
            Ok(())
        }
    }
}

/// `rs-proxy trace`'s answer for people.
fn trace_text(v: &serde_json::Value) -> String {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
    let id = s("id");
    let up = &v["upstream"];
    let urls: Vec<&str> = up["urls"]
        .as_array()
        .map(|a| a.iter().filter_map(|u| u.as_str()).collect())
        .unwrap_or_default();
    match s("state") {
        "waiting" => {
            let why = if v["forwarding"] == false {
                "forwarding is switched off (enableForwarding turns it on)".to_owned()
            } else if up["connected"] == true {
                "the next hop answers: it goes with the next POST (or waits for its backoff or the throttle)".to_owned()
            } else {
                match up["last_error"].as_str() {
                    Some(e) => format!("the next hop does not answer: {e}"),
                    None => "no POST has reached the next hop yet".to_owned(),
                }
            };
            format!(
                "message {id}: waiting in this proxy's spool for {}\n  {why}\n",
                urls.join(", ")
            )
        }
        "dead-letter" => format!(
            "message {id}: refused for good upstream ({}); replayDeadLetters sends it again\n",
            s("reason")
        ),
        "dropped" => format!("message {id}: dropped here undelivered ({})\n", s("reason")),
        _ => format!(
            "message {id}: not in this proxy's spool: sent on (`rsctl trace {id}` at the centre shows its hops), or never spooled here\n"
        ),
    }
}
