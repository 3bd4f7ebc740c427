//! The portal's charts, drawn by the server as SVG: messages stored per
//! second and the backlog at each tier (from the last [`KEEP`] samples
//! this server takes every `chart_sample_secs`, two hours at the default
//! 15 s, kept in memory: a restarted member starts a new curve), and
//! alarms by severity over the last day.
//! Every figure is kept per customer, so a chart shows only the customers
//! its viewer is granted.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use rs_protocol::ComponentKind;
use rs_protocol::model::Severity;

use crate::AppServer;
use crate::security::Grants;

/// How many samples are kept (two hours at one every 15 s).
const KEEP: usize = 480;

/// How often the history is sampled (`chart_sample_secs`, at least 1 s).
pub fn every(app: &AppServer) -> Duration {
    Duration::from_secs(app.cfg.chart_sample_secs.max(1))
}

/// One customer's figures at one time.
#[derive(Debug, Clone, Copy, Default)]
struct Point {
    at: i64,
    /// Messages stored per second since the sample before.
    rate: f64,
    /// Messages waiting in its proxies' spools, and in its MLMs', as their
    /// latest status reported them.
    proxies: u64,
    mlms: u64,
}

/// The sampled history, per customer.
#[derive(Debug, Default)]
pub struct History {
    series: Mutex<BTreeMap<String, VecDeque<Point>>>,
    last: Mutex<Option<i64>>,
}

impl History {
    /// Takes one sample (called every [`every`] by the server).
    pub async fn sample(&self, app: &AppServer) {
        let now = app.clock.now().as_millis();
        let from = self
            .last
            .lock()
            .ok()
            .and_then(|l| *l)
            .unwrap_or(now - every(app).as_millis() as i64);
        let stored = match app.store.stored_by_customer(from, now).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("portal history: {e}");
                return;
            }
        };
        let components = match crate::control::visible_components(app, &Grants::All).await {
            Ok(c) => c,
            Err(_) => return,
        };
        let secs = ((now - from).max(1) as f64) / 1000.0;
        let mut points: BTreeMap<String, Point> = BTreeMap::new();
        for (customer, n) in stored {
            points.entry(customer).or_default().rate = n as f64 / secs;
        }
        for c in &components {
            let waiting = c
                .status
                .as_ref()
                .and_then(|s| s.metrics.iter().find(|d| d.name == "spool.messages"))
                .and_then(|d| d.value.parse::<u64>().ok())
                .unwrap_or(0);
            let p = points
                .entry(c.id.customer().as_str().to_owned())
                .or_default();
            match c.id.kind() {
                ComponentKind::Proxy => p.proxies += waiting,
                ComponentKind::Mlm => p.mlms += waiting,
                _ => {}
            }
        }
        if let Ok(mut series) = self.series.lock() {
            for (customer, mut p) in points {
                p.at = now;
                let s = series.entry(customer).or_default();
                s.push_back(p);
                while s.len() > KEEP {
                    s.pop_front();
                }
            }
        }
        if let Ok(mut l) = self.last.lock() {
            *l = Some(now);
        }
    }

    /// The granted customers' figures summed at each sample time.
    fn summed(&self, grants: &Grants) -> Vec<Point> {
        let Ok(series) = self.series.lock() else {
            return Vec::new();
        };
        let mut by_time: BTreeMap<i64, Point> = BTreeMap::new();
        for (customer, s) in series.iter() {
            if !grants.customer(customer) {
                continue;
            }
            for p in s {
                let t = by_time.entry(p.at).or_default();
                t.at = p.at;
                t.rate += p.rate;
                t.proxies += p.proxies;
                t.mlms += p.mlms;
            }
        }
        by_time.into_values().collect()
    }
}

/// One curve of a chart, as SVG polyline points.
pub(crate) struct Curve {
    pub label: &'static str,
    pub class: &'static str,
    pub points: String,
    pub last: String,
}

/// A line chart: its curves, and the labels of its axes.
pub(crate) struct LineChart {
    pub title: &'static str,
    pub curves: Vec<Curve>,
    pub y_max: String,
    pub from: String,
    pub samples: usize,
    /// Seconds between samples.
    pub every: u64,
}

/// The plotting area (the template draws the axes around it).
pub(crate) const WIDTH: f64 = 440.0;
pub(crate) const HEIGHT: f64 = 100.0;

/// A curve to draw: its label, its CSS class, and its figure at a sample.
type CurveOf = (&'static str, &'static str, fn(&Point) -> f64);

fn line_chart(
    title: &'static str,
    points: &[Point],
    curves: &[CurveOf],
    unit: &str,
    every: u64,
) -> LineChart {
    let max = points
        .iter()
        .flat_map(|p| curves.iter().map(move |c| (c.2)(p)))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let (t0, t1) = match (points.first(), points.last()) {
        (Some(a), Some(b)) => (a.at, b.at.max(a.at + 1)),
        _ => (0, 1),
    };
    let x = |at: i64| 40.0 + (at - t0) as f64 / (t1 - t0) as f64 * WIDTH;
    let y = |v: f64| 10.0 + HEIGHT - v / max * HEIGHT;
    LineChart {
        title,
        curves: curves
            .iter()
            .map(|(label, class, f)| Curve {
                label,
                class,
                points: points
                    .iter()
                    .map(|p| format!("{:.1},{:.1}", x(p.at), y(f(p))))
                    .collect::<Vec<_>>()
                    .join(" "),
                last: points
                    .last()
                    .map(|p| format!("{:.1}", f(p)))
                    .unwrap_or_default(),
            })
            .collect(),
        y_max: format!("{max:.1} {unit}"),
        from: points
            .first()
            .and_then(|p| rs_protocol::Timestamp::from_millis(p.at))
            .map(|t| t.to_string())
            .unwrap_or_default(),
        samples: points.len(),
        every,
    }
}

/// The fleet page's charts for `grants`.
pub(crate) fn fleet(app: &AppServer, grants: &Grants) -> Vec<LineChart> {
    let points = app.history.summed(grants);
    let every = every(app).as_secs();
    vec![
        line_chart(
            "Messages stored per second",
            &points,
            &[("stored", "c1", |p| p.rate)],
            "/s",
            every,
        ),
        line_chart(
            "Backlog by tier (messages waiting)",
            &points,
            &[
                ("proxies", "c1", |p| p.proxies as f64),
                ("MLMs", "c2", |p| p.mlms as f64),
            ],
            "",
            every,
        ),
    ]
}

/// One bar of the alarms chart.
pub(crate) struct Bar {
    pub severity: &'static str,
    pub count: i64,
    pub y: u32,
    pub width: u32,
}

/// Alarms stored in the last day by severity, for `grants`.
pub(crate) async fn alarms(app: &AppServer, grants: &Grants) -> Result<Vec<Bar>, String> {
    let since = app.clock.now().as_millis() - 86_400_000;
    let rows = app
        .store
        .alarms_by_severity(since)
        .await
        .map_err(|e| e.to_string())?;
    let mut counts = [0i64; 5];
    for (customer, rank, n) in rows {
        if grants.customer(&customer)
            && let Some(c) = usize::try_from(rank).ok().and_then(|r| counts.get_mut(r))
        {
            *c += n;
        }
    }
    let max = counts.iter().copied().max().unwrap_or(0).max(1);
    Ok(Severity::ALL
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(i, (s, n))| Bar {
            severity: s.as_str(),
            count: n,
            y: 6 + i as u32 * 22,
            width: (n * 400 / max) as u32,
        })
        .collect())
}
