//! The example integrator behind `rs-hostwatch`. It turns what it sees on this host
//! into alarms, events and data through a proxy's local API:
//!
//! - file-system usage (`df -P -k`): a `major` alarm per mount over the
//!   threshold (`critical` over 98%), `cleared` when it drops back;
//! - load average (`/proc/loadavg`): a `warning` event when over the limit;
//! - a log file, tailed: an event per new line matching a pattern;
//! - performance data every cycle and an OS inventory now and then.
//!
//! It is a separate process, as every integrator is: if the proxy is down
//! or restarting it logs the failure and tries again next cycle.
//! See docs/integrators.md.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use crate::api::SendRequest;
use crate::client::Client;
use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    version,
    about = "Example integrator: disk, load, log lines and inventory of this host"
)]
pub struct Args {
    /// The proxy's integrator socket.
    #[arg(
        long,
        env = "RS_PROXY_SOCKET",
        default_value = "/run/rs-proxy/rs-proxy.sock"
    )]
    pub socket: PathBuf,
    /// Integrator name (its ID is allocated by the proxy).
    #[arg(long, default_value = "hostwatch")]
    pub name: String,
    /// This host's systems-management ID (default: the host name).
    #[arg(long)]
    pub instance: Option<String>,
    /// Seconds between cycles.
    #[arg(long, default_value_t = 30.0)]
    pub interval: f64,
    /// Raise a disk alarm at or above this percentage used.
    #[arg(long, default_value_t = 90)]
    pub disk_threshold: u32,
    /// Send an event when the 1-minute load average exceeds this.
    #[arg(long)]
    pub load_threshold: Option<f64>,
    /// A log file to tail.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Lines of the log containing any of these (case-insensitive) become
    /// events; comma-separated.
    #[arg(long, default_value = "error,fail,critical")]
    pub log_patterns: String,
    /// Send the OS inventory every this many cycles.
    #[arg(long, default_value_t = 20)]
    pub inventory_every: u64,
    /// Stop after this many cycles (default: run until killed).
    #[arg(long)]
    pub cycles: Option<u64>,
}

struct Watch {
    args: Args,
    client: Client,
    instance: String,
    raised: HashSet<String>,
    log_offset: u64,
    patterns: Vec<String>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// (mount point, percent used) of each real file system.
fn disk_usage() -> Vec<(String, u32)> {
    let Ok(out) = std::process::Command::new("df").args(["-P", "-k"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let pct = f.get(4)?.trim_end_matches('%').parse().ok()?;
            let mount = f.get(5)?.to_string();
            let size: u64 = f.get(1)?.parse().ok()?;
            (size > 0 && !mount.starts_with("/proc") && !mount.starts_with("/sys"))
                .then_some((mount, pct))
        })
        .collect()
}

impl Watch {
    fn base(&self) -> SendRequest {
        SendRequest {
            integrator: self.args.name.clone(),
            instance: Some(self.instance.clone()),
            ..SendRequest::default()
        }
    }

    async fn send(&self, what: &str, req: SendRequest) {
        match self.client.send(what, &req).await {
            Ok(id) => tracing::debug!("{what} spooled as {id}"),
            Err(e) => tracing::warn!("{what} not sent: {e}"),
        }
    }

    async fn disks(&mut self) {
        for (mount, pct) in disk_usage() {
            let key = format!("disk:{mount}");
            let over = pct >= self.args.disk_threshold;
            let was = self.raised.contains(&key);
            if over == was {
                continue;
            }
            let severity = if pct >= 98 { "critical" } else { "major" };
            let mut details = BTreeMap::new();
            details.insert("mount".to_owned(), mount.clone());
            details.insert("used.pct".to_owned(), pct.to_string());
            details.insert(
                "threshold.pct".to_owned(),
                self.args.disk_threshold.to_string(),
            );
            let text = if over {
                format!(
                    "file system {mount} is {pct}% full (threshold {}%)",
                    self.args.disk_threshold
                )
            } else {
                format!("file system {mount} is back to {pct}% used")
            };
            self.send(
                "alarm",
                SendRequest {
                    severity: Some(severity.into()),
                    state: Some(if over { "raised" } else { "cleared" }.into()),
                    key: Some(key.clone()),
                    text: Some(text),
                    details,
                    subclass: Some("disk".into()),
                    ..self.base()
                },
            )
            .await;
            if over {
                self.raised.insert(key);
            } else {
                self.raised.remove(&key);
            }
        }
    }

    fn loadavg() -> Option<(f64, f64, f64)> {
        let s = std::fs::read_to_string("/proc/loadavg").ok()?;
        let mut f = s.split_whitespace().map(|x| x.parse::<f64>().ok());
        Some((f.next()??, f.next()??, f.next()??))
    }

    async fn load_and_perf(&self) {
        let Some((l1, l5, l15)) = Self::loadavg() else {
            return;
        };
        let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| {
            mem.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("0")
                .to_owned()
        };
        let perf = format!(
            "{{\"load1\":{l1},\"load5\":{l5},\"load15\":{l15},\"mem_total_kb\":{},\"mem_available_kb\":{}}}",
            field("MemTotal:"),
            field("MemAvailable:")
        );
        self.send(
            "data",
            SendRequest {
                class: Some("performance".into()),
                subclass: Some("host".into()),
                mime: Some("application/json".into()),
                data: Some(perf),
                ttl_secs: Some(3600),
                persistent: Some(false),
                ..self.base()
            },
        )
        .await;
        let limit = self.args.load_threshold.unwrap_or_else(|| {
            2.0 * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
        });
        if l1 > limit {
            let mut details = BTreeMap::new();
            details.insert("load1".to_owned(), l1.to_string());
            details.insert("limit".to_owned(), limit.to_string());
            self.send(
                "event",
                SendRequest {
                    severity: Some("warning".into()),
                    kind: Some("load.high".into()),
                    text: Some(format!("1-minute load average {l1} is above {limit}")),
                    details,
                    subclass: Some("load".into()),
                    ..self.base()
                },
            )
            .await;
        }
    }

    async fn log_lines(&mut self) {
        let Some(path) = self.args.log.clone() else {
            return;
        };
        let Ok(mut f) = std::fs::File::open(&path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.log_offset {
            self.log_offset = 0; // rotated or truncated
        }
        if f.seek(SeekFrom::Start(self.log_offset)).is_err() {
            return;
        }
        let mut buf = String::new();
        // Bound what one cycle reads.
        if f.take(1 << 20).read_to_string(&mut buf).is_err() {
            return;
        }
        let complete = buf.rfind('\n').map_or(0, |i| i + 1);
        self.log_offset += complete as u64;
        for line in buf[..complete].lines() {
            let lower = line.to_lowercase();
            let Some(p) = self.patterns.iter().find(|p| lower.contains(p.as_str())) else {
                continue;
            };
            let severity = if lower.contains("critical") {
                "major"
            } else {
                "minor"
            };
            let mut details = BTreeMap::new();
            details.insert("file".to_owned(), path.display().to_string());
            details.insert("pattern".to_owned(), p.clone());
            self.send(
                "event",
                SendRequest {
                    severity: Some(severity.into()),
                    kind: Some("log.match".into()),
                    text: Some(line.chars().take(2000).collect()),
                    details,
                    subclass: Some("log".into()),
                    ..self.base()
                },
            )
            .await;
        }
    }

    async fn inventory(&self) {
        let uname = std::process::Command::new("uname")
            .arg("-a")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        self.send(
            "data",
            SendRequest {
                class: Some("inventory".into()),
                subclass: Some("os".into()),
                mime: Some("text/plain".into()),
                data: Some(format!("{uname}\n{os}")),
                ..self.base()
            },
        )
        .await;
    }
}

/// Runs the integrator until its cycle count is reached (or forever).
pub async fn run(args: Args) {
    let client = Client::new(&args.socket);
    let instance = args.instance.clone().unwrap_or_else(hostname);
    let patterns = args
        .log_patterns
        .split(',')
        .map(|p| p.trim().to_lowercase())
        .filter(|p| !p.is_empty())
        .collect();
    let log_offset = args
        .log
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let mut w = Watch {
        client,
        instance,
        raised: HashSet::new(),
        log_offset,
        patterns,
        args,
    };
    // Keep trying to register: the proxy may start after us.
    loop {
        match w
            .client
            .register_integrator(
                &w.args.name,
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
            )
            .await
        {
            Ok(id) => {
                tracing::info!("registered as {id}");
                break;
            }
            Err(e) => {
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let interval = Duration::from_secs_f64(w.args.interval.max(0.05));
    let mut cycle = 0u64;
    loop {
        if cycle.is_multiple_of(w.args.inventory_every.max(1)) {
            w.inventory().await;
        }
        w.disks().await;
        w.load_and_perf().await;
        w.log_lines().await;
        cycle += 1;
        if w.args.cycles.is_some_and(|c| cycle >= c) {
            break;
        }
        tokio::time::sleep(interval).await;
    }
}
