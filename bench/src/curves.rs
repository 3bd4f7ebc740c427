//! Curves, drawn as SVG into `docs/plots/` (with their points as JSON
//! beside them), where a curve says more than a number:
//!
//! - throughput of the durable forward path against the proxy's envelope
//!   batch size (`upstream.max_messages`);
//! - back-channel latency (API -> proxy applied, p50 and p99) against the
//!   number of proxies long-polling behind the MLM;
//! - throughput of the forward path and of the mosquitto bridge (driven
//!   alike, as the `forward` group drives it) against the number of
//!   integrator clients (publishers), and against the message size;
//! - drain time against the backlog, ours and the bridge's, from 10,000
//!   messages to `--backlog`.
//!
//! The SVG is written by hand: a line chart is a few dozen lines, and no
//! plotting crate is worth its build time here.

use std::fmt::Write as _;

use crate::forward::{Settings, median};
use crate::{percentile, root};

/// One line of a chart: a name and its (x, y) points.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
}

/// A line chart; `log_x`: the x axis in log scale.
pub(crate) fn svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 160.0, 40.0, 50.0);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    let tx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let (x0, x1) = (
        xs.iter().copied().map(tx).fold(f64::INFINITY, f64::min),
        xs.iter().copied().map(tx).fold(f64::NEG_INFINITY, f64::max),
    );
    // Five ticks of a round step (1, 2 or 5 times a power of ten).
    let raw = (ys.iter().copied().fold(0.0, f64::max) * 1.05 / 5.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let y1 = step * 5.0;
    let (pw, ph) = (w - left - right, h - top - bottom);
    let px = |x: f64| {
        left + if x1 > x0 {
            (tx(x) - x0) / (x1 - x0) * pw
        } else {
            pw / 2.0
        }
    };
    let py = |y: f64| top + ph - if y1 > 0.0 { y / y1 * ph } else { 0.0 };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"#,
        w / 2.0,
        esc(title),
        top + ph,
        left + pw,
        top + ph,
        top + ph,
        left + pw / 2.0,
        h - 10.0,
        esc(x_label),
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    // Y ticks: five steps.
    for i in 0..=5 {
        let y = y1 * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{4}</text>"##,
            py(y),
            left + pw,
            left - 6.0,
            py(y) + 4.0,
            tick(y)
        );
    }
    // X ticks: at the points measured.
    let mut xt = xs.clone();
    xt.sort_by(f64::total_cmp);
    xt.dedup();
    for x in xt {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            top + ph + 18.0,
            tick(x)
        );
    }
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    for (i, ser) in series.iter().enumerate() {
        let c = colours[i % colours.len()];
        let path: Vec<String> = ser
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for &(x, y) in &ser.points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"><title>{}: {}</title></circle>"#,
                px(x),
                py(y),
                tick(x),
                tick(y)
            );
        }
        let ly = top + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{2}" y="{3}">{4}</text>"#,
            left + pw + 12.0,
            left + pw + 32.0,
            left + pw + 38.0,
            ly + 4.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn tick(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn write(name: &str, svg_text: &str, series: &[Series], about: &str) -> anyhow::Result<()> {
    let dir = root().join("docs/plots");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.svg")), svg_text)?;
    let points: Vec<serde_json::Value> = series
        .iter()
        .map(|s| serde_json::json!({"series": s.name, "points": s.points}))
        .collect();
    let doc = serde_json::json!({"about": about, "measured_at": crate::now(), "machine": crate::machine(), "series": points});
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    eprintln!("rs-bench curves: wrote docs/plots/{name}.svg");
    Ok(())
}

/// Ours against the bridge at each of `points`, each run with the settings
/// `at` gives for the point: (ours, bridge) medians of `pick`.
fn against_bridge(
    rt: &tokio::runtime::Runtime,
    exe: &std::path::Path,
    tmp: &std::path::Path,
    runs: usize,
    points: &[u64],
    drain: bool,
    at: impl Fn(u64) -> Settings,
) -> anyhow::Result<[Series; 2]> {
    let (mut ours, mut bridge) = (Vec::new(), Vec::new());
    for &x in points {
        let st = at(x);
        let (mut o, mut p) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            crate::forward::quiet_disk(tmp);
            let r = rt.block_on(crate::forward::ours(
                exe,
                &st,
                &tmp.join("ours"),
                false,
                drain,
            ))?;
            crate::forward::quiet_disk(tmp);
            let b = crate::forward::peer(rt, &st, &tmp.join("peer"), drain)?;
            if drain {
                o.push(st.backlog as f64 / r.drain);
                p.push(st.backlog as f64 / b.drain);
            } else {
                o.push(r.rate);
                p.push(b.rate);
            }
        }
        let (o, p) = (median(&mut o), median(&mut p));
        eprintln!("rs-bench curves: {x}: ours {o:.1}, mosquitto bridge {p:.1}");
        ours.push((x as f64, o));
        bridge.push((x as f64, p));
    }
    Ok([
        Series {
            name: "ours".into(),
            points: ours,
        },
        Series {
            name: "mosquitto bridge".into(),
            points: bridge,
        },
    ])
}

/// Every curve; `runs` runs per point (the median is drawn); `max_backlog`:
/// the largest backlog of the drain curve.
pub(crate) fn run(runs: usize, messages: u64, max_backlog: u64) -> anyhow::Result<()> {
    let exe = crate::forward::exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-curves-{}", std::process::id()));
    let s = Settings {
        messages,
        backlog: 0,
        clients: 32,
        batch: 1,
        runs,
        payload: None,
    };
    // Throughput against the batch size.
    let mut thr = Vec::new();
    for batch in [1u64, 5, 20, 100, 500] {
        let mut v = Vec::new();
        for _ in 0..runs {
            let o = rt.block_on(crate::forward::ours_with(
                &exe,
                &s,
                &tmp.join("batch"),
                false,
                false,
                &format!("max_messages = {batch}"),
                false,
            ))?;
            v.push(o.rate);
        }
        let m = median(&mut v);
        eprintln!("rs-bench curves: batch {batch}: {m:.0} messages/s");
        thr.push((batch as f64, m));
    }
    let series = [Series {
        name: "stored/s".into(),
        points: thr,
    }];
    let about = format!(
        "durable forward path integrator -> proxy -> MLM -> appserver stored, 2 KB alarms, {messages} messages, 32 integrator clients, plain HTTP; x: the proxy's upstream.max_messages; median of {runs} run(s) per point. Command: cargo run --release -p rs-bench -- curves --messages {messages} --runs {runs}"
    );
    write(
        "throughput_vs_batch",
        &svg(
            "Forward path: throughput against envelope batch size",
            "messages per envelope (proxy upstream.max_messages, log scale)",
            "messages stored per second",
            &series,
            true,
        ),
        &series,
        &about,
    )?;

    // Throughput against the number of clients, and against the size.
    let command = format!(
        "cargo run --release -p rs-bench -- curves --messages {messages} --backlog {max_backlog} --runs {runs}"
    );
    let like = "the bridge driven as in forward_msgs_per_s: one pipelined QoS 1 publisher per client into broker A, each with as many messages in flight as a batch of ours holds, every message counted at a QoS 1 subscriber on broker B; persistence on both sides (ours fsyncs each tier's group commit before acknowledging, the brokers snapshot every 60 s)";
    let series = against_bridge(&rt, &exe, &tmp, runs, &[1, 2, 4, 8, 16, 32], false, |c| {
        Settings {
            messages,
            backlog: 0,
            clients: c as usize,
            batch: 20,
            runs,
            payload: None,
        }
    })?;
    let about = format!(
        "durable forward path integrator -> proxy -> MLM -> appserver stored against {like}; 2 KB messages, {messages} per run, batches of 20; x: integrator clients (publishers); median of {runs} run(s) per point. Command: {command}"
    );
    write(
        "throughput_vs_clients",
        &svg(
            "Forward path against the mosquitto bridge: throughput by clients",
            "integrator clients / publishers (log scale)",
            "messages per second, end to end",
            &series,
            true,
        ),
        &series,
        &about,
    )?;
    let series = against_bridge(
        &rt,
        &exe,
        &tmp,
        runs,
        &[200, 1024, 2048, 8192, 65_536],
        false,
        |bytes| Settings {
            messages,
            backlog: 0,
            clients: 8,
            batch: 20,
            runs,
            payload: Some(bytes as usize),
        },
    )?;
    let about = format!(
        "the same paths as throughput_vs_clients with 8 clients (publishers), batches of 20, {messages} messages per run; x: payload bytes per message (the alarm's text; the MQTT payload); median of {runs} run(s) per point. Command: {command}"
    );
    write(
        "throughput_vs_size",
        &svg(
            "Forward path against the mosquitto bridge: throughput by message size",
            "payload bytes per message (log scale)",
            "messages per second, end to end",
            &series,
            true,
        ),
        &series,
        &about,
    )?;

    // Drain time against the backlog: 200-byte payloads, so that the
    // largest backlogs fit on the disk here and in mosquitto's memory.
    let mut backlogs = Vec::new();
    let mut b = 10_000u64;
    while b <= max_backlog.max(10_000) {
        backlogs.push(b);
        b *= 10;
    }
    let series = against_bridge(&rt, &exe, &tmp, runs, &backlogs, true, |backlog| Settings {
        messages: 1_000,
        backlog,
        clients: 8,
        batch: 20,
        runs,
        payload: Some(200),
    })?;
    let about = format!(
        "drain of a backlog of 200-byte messages held at the first hop while the next was away (ours at the proxy while the MLM was down, through MLM to the server; the bridge's at broker A while broker B was down, through B to the subscriber), timed from the first message stored or received after the restart to the last; a straight line through the origin is a drain that stays linear; median of {runs} run(s) per point. Command: {command}"
    );
    write(
        "drain_vs_backlog",
        &svg(
            "Drain time against the backlog",
            "messages held while the next hop was away",
            "seconds to drain",
            &series,
            false,
        ),
        &series,
        &about,
    )?;

    // Back-channel latency against the number of proxies.
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for proxies in [1usize, 5, 20, 50] {
        let mut all = Vec::new();
        for _ in 0..runs {
            let (one_way, _) = rt.block_on(crate::backchannel::latency(
                &exe,
                &tmp.join("latency"),
                100,
                proxies,
            ))?;
            all.extend(one_way);
        }
        let (a, b) = (
            percentile(&mut all.clone(), 0.5),
            percentile(&mut all, 0.99),
        );
        eprintln!("rs-bench curves: {proxies} proxies: p50 {a:.0} ms, p99 {b:.0} ms");
        p50.push((proxies as f64, a));
        p99.push((proxies as f64, b));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let series = [
        Series {
            name: "p50".into(),
            points: p50,
        },
        Series {
            name: "p99".into(),
            points: p99,
        },
    ];
    let about = format!(
        "control action from the API call until the proxy applied it (its response's creation time), appserver -> MLM -> proxy with long polls held, 100 actions per run each to a random one of the proxies, a random 20-120 ms apart, plain HTTP; {runs} run(s) per point pooled. Command: cargo run --release -p rs-bench -- curves --messages {messages} --runs {runs}"
    );
    write(
        "latency_vs_proxies",
        &svg(
            "Back-channel latency against the number of proxies",
            "proxies long-polling behind the MLM",
            "API -> proxy applied (ms)",
            &series,
            false,
        ),
        &series,
        &about,
    )?;
    Ok(())
}

/// The plots present, for the report: (name, about).
pub(crate) fn listed() -> Vec<(String, String)> {
    let dir = root().join("docs/plots");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".svg").map(str::to_owned))
        .collect();
    names.sort();
    for n in names {
        let about = std::fs::read_to_string(dir.join(format!("{n}.json")))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["about"].as_str().map(str::to_owned))
            .unwrap_or_default();
        out.push((n, about));
    }
    out
}
