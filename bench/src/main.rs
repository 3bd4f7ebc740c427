//! The benchmark report: runs each benchmark, then merges its figures into
//! `docs/benchmarks.json` (one object per figure, replaced by id) and
//! regenerates `docs/benchmarks.md` from it.
//!
//! `cargo run --release -p rs-bench` runs everything; `-- codec` runs one
//! group; `-- --report-only` rewrites the markdown from the JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

mod backchannel;
mod bulk;
mod collector;
mod curves;
mod forward;
mod longpoll;
mod mlmfarm;
mod mlmkill;
mod mlmstorm;
mod relay;
mod routes;
mod storage;
mod throttle;

/// One figure, as `docs/benchmarks.json` holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Figure {
    pub(crate) id: String,
    pub(crate) what: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) runs: u32,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) peer: Option<String>,
    pub(crate) peer_value: Option<f64>,
    pub(crate) ratio: Option<f64>,
    pub(crate) better: String,
    pub(crate) command: String,
    pub(crate) measured_at: String,
    #[serde(default)]
    pub(crate) target: Option<String>,
    #[serde(default)]
    pub(crate) machine: Option<String>,
}

impl Figure {
    /// A figure measured now on this machine, with no peer or target yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn measured(
        id: &str,
        what: String,
        value: f64,
        unit: &str,
        better: &str,
        runs: usize,
        (min, max): (f64, f64),
        command: &str,
    ) -> Figure {
        Figure {
            id: id.into(),
            what,
            value,
            unit: unit.into(),
            runs: u32::try_from(runs).unwrap_or(u32::MAX),
            min,
            max,
            peer: None,
            peer_value: None,
            ratio: None,
            better: better.into(),
            command: command.into(),
            measured_at: now(),
            target: None,
            machine: Some(machine()),
        }
    }
}

/// The `p` quantile (0-1) of `v`, nearest rank.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// (min, max) of `v`.
pub(crate) fn spread(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

pub(crate) fn now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Per-iteration times (ns) of one criterion benchmark: median, min, max,
/// and the number of samples.
fn criterion_times(group: &str, bench: &str) -> Result<(f64, f64, f64, u32), String> {
    let dir = root()
        .join("target/criterion")
        .join(group)
        .join(bench)
        .join("new");
    let read = |f: &str| -> Result<serde_json::Value, String> {
        let p = dir.join(f);
        let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_str(&s).map_err(|e| format!("{}: {e}", p.display()))
    };
    let est = read("estimates.json")?;
    let median = est["median"]["point_estimate"]
        .as_f64()
        .ok_or("no median in estimates.json")?;
    let sample = read("sample.json")?;
    let iters = sample["iters"].as_array().ok_or("no iters")?;
    let times = sample["times"].as_array().ok_or("no times")?;
    let per: Vec<f64> = iters
        .iter()
        .zip(times)
        .filter_map(|(i, t)| Some(t.as_f64()? / i.as_f64()?))
        .collect();
    let min = per.iter().copied().fold(f64::INFINITY, f64::min);
    let max = per.iter().copied().fold(0.0, f64::max);
    Ok((median, min, max, per.len() as u32))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

/// Codec: encode, full decode and header-only decode of 100 messages of
/// about 2 KB (common/protocol/benches/codec.rs), and seals
/// (common/net/benches/seal.rs).
fn codec() -> Result<Vec<Figure>, String> {
    run(Command::new("cargo").current_dir(root()).args([
        "bench",
        "-p",
        "rs-protocol",
        "--bench",
        "codec",
        "--",
        "--noplot",
    ]))?;
    let env = rs_protocol::samples::bench_envelope();
    let bytes = rs_protocol::encode_envelope(&env).body.len() as f64;
    let messages = env.messages.len() as f64;
    let command = "cargo run --release -p rs-bench -- codec".to_owned();
    let at = now();
    let machine = machine();
    let mut out = Vec::new();
    let mut rates = BTreeMap::new();
    for (bench, what) in [
        ("encode", "encode"),
        ("decode_full", "full decode"),
        ("decode_headers", "header-only decode"),
    ] {
        let (median, min, max, runs) = criterion_times("codec", bench)?;
        // Per-iteration nanoseconds -> rates; the slowest run gives the min rate.
        let mbps = |ns: f64| bytes / (ns / 1e9) / 1e6;
        let mps = |ns: f64| messages / (ns / 1e9);
        rates.insert(bench, mbps(median));
        for (suffix, unit, f) in [
            ("mb_per_s", "MB/s", &mbps as &dyn Fn(f64) -> f64),
            ("msgs_per_s", "messages/s", &mps),
        ] {
            out.push(Figure {
                id: format!("codec_{bench}_{suffix}"),
                what: format!(
                    "codec {what} of an envelope of 100 messages of about 2 KB, one core"
                ),
                value: f(median),
                unit: unit.into(),
                runs,
                min: f(max),
                max: f(min),
                peer: None,
                peer_value: None,
                ratio: None,
                better: "higher".into(),
                command: command.clone(),
                measured_at: at.clone(),
                target: (bench == "decode_full" && suffix == "mb_per_s")
                    .then(|| ">= 100 MB/s".into()),
                machine: Some(machine.clone()),
            });
        }
    }
    run(Command::new("cargo")
        .current_dir(root())
        .args(["bench", "-p", "rs-net", "--bench", "seal", "--", "--noplot"]))?;
    let parse = criterion_times("seal", "parse_certificate")?.0 / 1e3;
    for (bench, what) in [
        (
            "sign",
            "sealing a 2 KB alarm, signed (PKCS #7, ECDSA P-256)",
        ),
        (
            "sign_encrypt",
            "sealing a 2 KB alarm, signed and encrypted to the server (CMS, ECDH P-256 + AES-256)",
        ),
        (
            "open_signed",
            "opening a signed seal at the server (parse, verify, signer and field checks)",
        ),
        (
            "open_encrypted",
            "opening a signed and encrypted seal at the server (decrypt, then as signed)",
        ),
    ] {
        let (median, min, max, runs) = criterion_times("seal", bench)?;
        let us = |ns: f64| ns / 1e3;
        out.push(Figure {
            id: format!("seal_{bench}_us"),
            what: format!("{what}, one core"),
            value: us(median),
            unit: "µs".into(),
            runs,
            min: us(min),
            max: us(max),
            peer: Some(
                "parsing one X.509 certificate with OpenSSL 3.0 (each seal carries the signer's)"
                    .into(),
            ),
            peer_value: Some(parse),
            ratio: Some(us(median) / parse),
            better: "lower".into(),
            command: command.clone(),
            measured_at: at.clone(),
            target: None,
            machine: Some(machine.clone()),
        });
    }
    if let (Some(&h), Some(&f)) = (rates.get("decode_headers"), rates.get("decode_full"))
        && let Some(fig) = out
            .iter_mut()
            .find(|x| x.id == "codec_decode_headers_mb_per_s")
    {
        fig.peer = Some("full decode of the same envelope".into());
        fig.peer_value = Some(f);
        fig.ratio = Some(h / f);
        fig.target = Some("ratio >= 5".into());
    }
    Ok(out)
}

/// A benchmark group: runs and returns its figures.
type Group = Box<dyn Fn() -> Result<Vec<Figure>, String>>;

/// The value of `--name N` in `args`, or `default`.
fn opt(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load(path: &Path) -> Vec<Figure> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 0.1 || v == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn markdown(figs: &[Figure]) -> String {
    let mut s = String::from(include_str!("intro.md"));
    s.push_str("\n## Figures\n\n| id | what | value | min–max | runs | peer | ratio | target | measured |\n|---|---|---|---|---|---|---|---|---|\n");
    for f in figs {
        s.push_str(&format!(
            "| `{}` | {} | **{} {}** | {}–{} | {} | {} | {} | {} | {} |\n",
            f.id,
            f.what,
            fmt(f.value),
            f.unit,
            fmt(f.min),
            fmt(f.max),
            f.runs,
            match (&f.peer, f.peer_value) {
                (Some(p), Some(v)) => format!("{p}: {} {}", fmt(v), f.unit),
                _ => "–".into(),
            },
            f.ratio.map_or("–".into(), ratio_text),
            f.target.as_deref().unwrap_or("–"),
            f.measured_at,
        ));
    }
    let plots = curves::listed();
    if !plots.is_empty() {
        s.push_str("\n## Plots\n\n");
        for (name, about) in plots {
            s.push_str(&format!(
                "![{name}](plots/{name}.svg)\n\n{about} (points: [`plots/{name}.json`](plots/{name}.json))\n\n"
            ));
        }
    }
    let mut machines: Vec<&str> = figs.iter().filter_map(|f| f.machine.as_deref()).collect();
    machines.sort_unstable();
    machines.dedup();
    s.push_str("\n## Machines and commands\n\n");
    for m in machines {
        s.push_str(&format!("- {m}\n"));
    }
    let mut cmds: Vec<&str> = figs.iter().map(|f| f.command.as_str()).collect();
    cmds.sort_unstable();
    cmds.dedup();
    for c in cmds {
        s.push_str(&format!("- `{c}`\n"));
    }
    s
}

/// The benchmark groups, in the order they run, and what each measures.
const GROUPS: &[(&str, &str)] = &[
    (
        "codec",
        "encode and decode of 2 KB messages, and seals (criterion)",
    ),
    (
        "forward",
        "the durable forward path against a mosquitto bridge, and the drain",
    ),
    ("mtls", "the forward path over mutual TLS"),
    (
        "throttle",
        "the cost of throttle checks, and the forward path with rules",
    ),
    (
        "backchannel",
        "control actions to sites: latency and WAN bytes",
    ),
    (
        "collector",
        "what webhook subscriptions cost the server's ingest",
    ),
    ("bulk", "bulk uploads and downloads against nginx"),
    ("idle", "resident memory of the idle daemons"),
    (
        "storage",
        "ingest on PostgreSQL against SQLite, and a farm of two servers",
    ),
    ("relay", "the MLM relaying small envelopes against nginx"),
    ("curves", "throughput and latency curves (plots)"),
    (
        "mlmfarm",
        "an MLM farm's back-channel: latency of control actions across members",
    ),
    ("mlmkill", "an MLM farm member killed under load"),
    (
        "mlmstorm",
        "10,000 proxies reconnecting to an MLM farm over mutual TLS",
    ),
    (
        "longpoll",
        "an MLM's memory holding many proxies' long polls",
    ),
    (
        "routes",
        "route choice: leaving a degraded route, alarm latency against one route",
    ),
];

/// Options that take a number, with what they set (defaults in brackets).
const OPTIONS: &[(&str, &str)] = &[
    (
        "--messages",
        "messages per forward run [100000]; per curve [20000]",
    ),
    (
        "--backlog",
        "messages of the drain's backlog; the largest of the drain curve [1000000]",
    ),
    ("--clients", "concurrent posters [8]"),
    ("--batch", "messages per POST [20]"),
    (
        "--runs",
        "runs of each benchmark, reported as median and spread [3]",
    ),
    (
        "--actions",
        "control actions in the back-channel runs [300]",
    ),
    (
        "--proxies",
        "simulated proxies of mlmstorm and longpoll [10000]",
    ),
    ("--rate", "alarms a second in mlmkill [5000]"),
];

fn usage() -> String {
    let mut u = String::from(
        "rs-bench [GROUP...] [--OPTION N...] [--report-only]\n\n\
         Runs the named benchmark groups (all of them when none is named), merges\n\
         their figures into docs/benchmarks.json by id and rewrites\n\
         docs/benchmarks.md. --report-only rewrites the report from the JSON.\n\nGroups:\n",
    );
    for (g, what) in GROUPS {
        u.push_str(&format!("  {g:<12} {what}\n"));
    }
    u.push_str("\nOptions:\n");
    for (o, what) in OPTIONS {
        u.push_str(&format!("  {o:<12} N  {what}\n"));
    }
    u.push_str("  --report-only   write the report from docs/benchmarks.json, run nothing\n");
    u.push_str("  -h, --help      this text\n");
    u
}

/// Refuses what is neither a group, an option with its number, nor a flag
/// (a typo would otherwise run every group, for hours).
fn check_args(args: &[String]) -> Result<(), String> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if OPTIONS.iter().any(|(o, _)| *o == a) {
            match args.get(i + 1).map(|v| v.parse::<u64>()) {
                Some(Ok(_)) => i += 2,
                _ => return Err(format!("{a} takes a number")),
            }
        } else if a == "--report-only" || GROUPS.iter().any(|(g, _)| *g == a) {
            i += 1;
        } else {
            return Err(format!("unknown group or option {a:?}"));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", usage());
        return;
    }
    if let Err(e) = check_args(&args) {
        eprintln!("rs-bench: {e}\n\n{}", usage());
        std::process::exit(2);
    }
    let report_only = args.iter().any(|a| a == "--report-only");
    let groups_named: Vec<&String> = args
        .iter()
        .filter(|a| GROUPS.iter().any(|(g, _)| g == a))
        .collect();
    let want = |g: &str| groups_named.is_empty() || groups_named.iter().any(|a| *a == g);
    let settings = forward::Settings {
        messages: opt(&args, "--messages", 100_000),
        backlog: opt(&args, "--backlog", 1_000_000),
        clients: opt(&args, "--clients", 8) as usize,
        batch: opt(&args, "--batch", 20).max(1) as usize,
        runs: opt(&args, "--runs", 3).max(1) as usize,
        payload: None,
    };
    let runs = settings.runs;
    let back = backchannel::Settings {
        actions: opt(&args, "--actions", 300).max(10) as usize,
    };
    let mtls_settings = settings.clone();
    let storage_settings = settings.clone();
    let proxies = opt(&args, "--proxies", 10_000).max(1) as usize;
    let kill_rate = opt(&args, "--rate", 5_000).max(60);
    let curve_messages = opt(&args, "--messages", 20_000);
    let curve_backlog = opt(&args, "--backlog", 1_000_000);
    let json = root().join("docs/benchmarks.json");
    let mut figs = load(&json);
    if !report_only {
        let mut groups: Vec<(&str, Group)> = vec![
            ("codec", Box::new(codec)),
            (
                "forward",
                Box::new(move || forward::run(&settings).map_err(|e| format!("{e:#}"))),
            ),
            (
                "mtls",
                Box::new(move || forward::mtls(&mtls_settings).map_err(|e| format!("{e:#}"))),
            ),
            (
                "throttle",
                Box::new(move || throttle::run().map_err(|e| format!("{e:#}"))),
            ),
            (
                "backchannel",
                Box::new(move || backchannel::run(&back).map_err(|e| format!("{e:#}"))),
            ),
            (
                "collector",
                Box::new(move || collector::run(runs).map_err(|e| format!("{e:#}"))),
            ),
            (
                "bulk",
                Box::new(move || bulk::run(runs).map_err(|e| format!("{e:#}"))),
            ),
            (
                "idle",
                Box::new(move || forward::idle(runs).map_err(|e| format!("{e:#}"))),
            ),
            (
                "storage",
                Box::new(move || storage::run(&storage_settings).map_err(|e| format!("{e:#}"))),
            ),
            (
                "relay",
                Box::new(move || relay::run(runs).map_err(|e| format!("{e:#}"))),
            ),
            (
                "curves",
                Box::new(move || {
                    curves::run(runs, curve_messages, curve_backlog)
                        .map(|()| Vec::new())
                        .map_err(|e| format!("{e:#}"))
                }),
            ),
            (
                "mlmfarm",
                Box::new(move || mlmfarm::run(runs, back.actions).map_err(|e| format!("{e:#}"))),
            ),
            (
                "mlmkill",
                Box::new(move || mlmkill::run(runs, kill_rate).map_err(|e| format!("{e:#}"))),
            ),
            (
                "mlmstorm",
                Box::new(move || mlmstorm::run(runs, proxies).map_err(|e| format!("{e:#}"))),
            ),
            (
                "longpoll",
                Box::new(move || longpoll::run(runs, proxies).map_err(|e| format!("{e:#}"))),
            ),
            (
                "routes",
                Box::new(move || routes::run(runs).map_err(|e| format!("{e:#}"))),
            ),
        ];
        debug_assert!(
            groups
                .iter()
                .map(|(g, _)| *g)
                .eq(GROUPS.iter().map(|(g, _)| *g)),
            "GROUPS lists every group, in order"
        );
        groups.retain(|(g, _)| want(g));
        for (name, f) in groups {
            match f() {
                Ok(new) => {
                    for n in new {
                        figs.retain(|x| x.id != n.id);
                        figs.push(n);
                    }
                }
                Err(e) => {
                    eprintln!("rs-bench: {name}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    figs.sort_by(|a, b| a.id.cmp(&b.id));
    let text = serde_json::to_string_pretty(&figs).unwrap_or_default();
    let md = markdown(&figs);
    if let Err(e) = std::fs::write(&json, text + "\n")
        .and_then(|()| std::fs::write(root().join("docs/benchmarks.md"), md))
    {
        eprintln!("rs-bench: writing the report: {e}");
        std::process::exit(1);
    }
    eprintln!(
        "rs-bench: wrote docs/benchmarks.md and docs/benchmarks.json ({} figures)",
        figs.len()
    );
}

/// A ratio with two decimals, or two significant digits below 0.1 (a
/// target like `< 0.01` needs to see 0.0062, not 0.01).
fn ratio_text(r: f64) -> String {
    if r == 0.0 || !r.is_finite() || r.abs() >= 0.1 {
        return format!("{r:.2}");
    }
    let decimals = (-r.abs().log10()).ceil().clamp(1.0, 12.0) as usize + 1;
    format!("{r:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ratios_keep_two_significant_digits() {
        assert_eq!(ratio_text(0.53), "0.53");
        assert_eq!(ratio_text(1.914), "1.91");
        assert_eq!(ratio_text(0.0062), "0.0062");
        assert_eq!(ratio_text(0.0101), "0.010");
        assert_eq!(ratio_text(0.0454), "0.045");
        assert_eq!(ratio_text(0.0), "0.00");
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn groups_options_and_their_numbers_pass_and_anything_else_is_refused() {
        assert!(check_args(&args(&["mlmstorm", "--runs", "1", "--proxies", "500"])).is_ok());
        assert!(check_args(&args(&["--report-only"])).is_ok());
        assert!(check_args(&args(&[])).is_ok());
        assert!(check_args(&args(&["mlmstrom"])).is_err());
        assert!(check_args(&args(&["--runs"])).is_err());
        assert!(check_args(&args(&["--runs", "three"])).is_err());
        assert!(check_args(&args(&["--duration", "5"])).is_err());
        let u = usage();
        for (g, _) in GROUPS {
            assert!(u.contains(g), "{g}");
        }
        for (o, _) in OPTIONS {
            assert!(u.contains(o), "{o}");
        }
    }
}
