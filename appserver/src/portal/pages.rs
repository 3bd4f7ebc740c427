//! The portal's pages: each gathers what the control API's own functions
//! give the viewer's grants (control.rs: `visible_components`, `scope`,
//! `job_page`, `visible_job`, `visible_groups`, `start_job`) into a view,
//! and renders it with its template (appserver/templates/portal/).

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use rs_net::server::{Peer, Refusal};
use rs_protocol::codec::api::{Component, Job};
use rs_protocol::control::{ActionKind, ControlAction, StatusNode, queue_health};
use rs_protocol::model::{Content, ContentKind, Severity};
use rs_protocol::{RsId, Timestamp};

use super::{Viewer, html, see_other};
use crate::AppServer;
use crate::security::Grants;

/// What the layout shows on every page.
pub(crate) struct Nav {
    pub admin: String,
    /// The customers granted, as people read them.
    pub scope: String,
    pub csrf: String,
    pub title: String,
    /// Seconds between reloads of a page that shows something live (0:
    /// none).
    pub refresh: u32,
    /// An admin of every customer (the provider-wide pages are linked).
    pub provider: bool,
}

impl Nav {
    fn new(v: &Viewer, title: impl Into<String>, refresh: u32) -> Nav {
        Nav {
            admin: v.admin.name.clone(),
            scope: match &v.admin.grants {
                Grants::All => "every customer".into(),
                Grants::Some(list) => list.join(", "),
            },
            csrf: v.csrf.clone(),
            title: title.into(),
            refresh,
            provider: v.admin.grants.is_all(),
        }
    }
}

/// A page's failure, as the API would have answered it.
struct Failure(http::StatusCode, String);

impl From<warp::Rejection> for Failure {
    fn from(r: warp::Rejection) -> Failure {
        match r.find::<Refusal>() {
            Some(f) => Failure(f.status, f.text.clone()),
            None => Failure(http::StatusCode::NOT_FOUND, "no such page".into()),
        }
    }
}

impl From<askama::Error> for Failure {
    fn from(e: askama::Error) -> Failure {
        tracing::error!("portal: a page failed to render: {e}");
        Failure(http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

fn unavailable(e: impl std::fmt::Display) -> Failure {
    Failure(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

#[derive(Template)]
#[template(path = "portal/error.html")]
struct ErrorPage {
    nav: Nav,
    status: u16,
    text: String,
}

fn failed(v: &Viewer, f: Failure) -> warp::reply::Response {
    let page = ErrorPage {
        nav: Nav::new(v, f.0.canonical_reason().unwrap_or("error"), 0),
        status: f.0.as_u16(),
        text: f.1,
    };
    match page.render() {
        Ok(body) => html(f.0, body),
        Err(e) => Refusal::new(http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).response(),
    }
}

pub(super) async fn get(
    app: &Arc<AppServer>,
    v: &Viewer,
    page: &str,
    q: &HashMap<String, String>,
) -> warp::reply::Response {
    let r = match page {
        "" => fleet(app, v).await,
        "topology" => topology(app, v).await,
        "component" => component(app, v, q).await,
        "alarms" => alarms(app, v, q).await,
        "jobs" => jobs(app, v, q).await,
        "job" => job(app, v, q).await,
        "send" => send_form(app, v, q.get("to"), None).await,
        "groups" => groups(app, v, None).await,
        "throttle" => throttle(app, v),
        "subscriptions" => subscriptions(app, v).await,
        "files" => files(app, v, None).await,
        "rollouts" => rollouts(app, v).await,
        "rollout" => rollout(app, v, q).await,
        "audit" => audit(app, v, q).await,
        _ => Err(Failure(http::StatusCode::NOT_FOUND, "no such page".into())),
    };
    match r {
        Ok(body) => html(http::StatusCode::OK, body),
        Err(f) => failed(v, f),
    }
}

pub(super) async fn post(
    app: &Arc<AppServer>,
    v: &Viewer,
    page: &str,
    form: &HashMap<String, String>,
) -> warp::reply::Response {
    match page {
        "send" => match send(app, v, form).await {
            Ok(job) => see_other(&format!("{}job?id={job}", super::ROOT)),
            // The form again, with what was wrong.
            Err(Failure(status, text)) => {
                match send_form(app, v, form.get("target"), Some(text)).await {
                    Ok(body) => html(status, body),
                    Err(f) => failed(v, f),
                }
            }
        },
        "groups" | "groups/delete" => match change_group(app, v, page, form).await {
            Ok(()) => see_other(&format!("{}groups", super::ROOT)),
            Err(Failure(status, text)) => match groups(app, v, Some(text)).await {
                Ok(body) => html(status, body),
                Err(f) => failed(v, f),
            },
        },
        "files/offer" => match offer(app, v, form).await {
            Ok(job) => see_other(&format!("{}job?id={job}", super::ROOT)),
            Err(Failure(status, text)) => match files(app, v, Some(text)).await {
                Ok(body) => html(status, body),
                Err(f) => failed(v, f),
            },
        },
        "rollout/step" => {
            let id = form.get("id").cloned().unwrap_or_default();
            let op = form.get("op").cloned().unwrap_or_default();
            match crate::rollouts::act(app, &v.admin, &id, &op).await {
                Ok(_) => see_other(&format!("{}rollout?id={}", super::ROOT, enc(&id))),
                Err(r) => failed(v, r.into()),
            }
        }
        "subscriptions/replay" => match replay(app, v, form).await {
            Ok(()) => see_other(&format!("{}subscriptions", super::ROOT)),
            Err(f) => failed(v, f),
        },
        _ => failed(
            v,
            Failure(http::StatusCode::NOT_FOUND, "no such action".into()),
        ),
    }
}

/// What only an admin of every customer may see or do.
fn provider_only(v: &Viewer) -> Result<(), Failure> {
    if v.admin.grants.is_all() {
        Ok(())
    } else {
        Err(Failure(
            http::StatusCode::FORBIDDEN,
            "this needs an admin of every customer".into(),
        ))
    }
}

// ---- login ----

#[derive(Template)]
#[template(path = "portal/login.html")]
struct Login {
    /// The admin a "use my certificate" button logs in as, if any.
    certificate: Option<String>,
    error: Option<String>,
}

pub(super) fn login(
    _app: &AppServer,
    peer: &Peer,
    error: Option<&str>,
    status: http::StatusCode,
) -> warp::reply::Response {
    let certificate = match peer {
        Peer::Tls(_, Some(id)) if id.role == rs_net::pki::Role::Admin => Some(id.name.clone()),
        Peer::Tcp(_) | Peer::Local => Some("local".into()),
        Peer::Tls(..) => None,
    };
    let page = Login {
        certificate,
        error: error.map(str::to_owned),
    };
    match page.render() {
        Ok(body) => html(status, body),
        Err(e) => Refusal::new(http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).response(),
    }
}

// ---- helpers ----

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now)
}

/// "12 s", "3 min", "2 h", "4 d".
fn age(now: Timestamp, then: Timestamp) -> String {
    let s = now.since(then).as_secs();
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// The CSS class of a state: `ok`, `warn` or `bad`.
fn class_of(state: &str) -> &'static str {
    match state {
        "ok" | "succeeded" | "delivered" | "info" | "recovered" => "ok",
        "late" | "degraded" | "pending" | "warning" | "minor" | "unknown" | "disabled" => "warn",
        _ => "bad",
    }
}

fn metric(s: Option<&StatusNode>, name: &str) -> Option<String> {
    s?.metrics
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.value.clone())
}

// ---- fleet ----

pub(crate) struct SiteRow {
    pub id: String,
    pub kind: String,
    pub state: String,
    pub class: &'static str,
    pub last_seen: String,
    pub age: String,
    pub version: String,
    pub via: String,
    pub spool: String,
    pub oldest: String,
    pub at_risk: String,
}

pub(crate) struct CustomerBlock {
    pub name: String,
    pub ok: usize,
    pub late: usize,
    pub failed: usize,
    pub rows: Vec<SiteRow>,
}

#[derive(Template)]
#[template(path = "portal/fleet.html")]
struct Fleet {
    nav: Nav,
    customers: Vec<CustomerBlock>,
    total: usize,
    charts: Vec<super::charts::LineChart>,
}

fn site_row(c: &Component, now: Timestamp) -> SiteRow {
    // Integrators and support instances send no heartbeats of their own:
    // no state, and not counted.
    let state = c.state.clone().unwrap_or_else(|| "–".into());
    let st = c.status.as_ref();
    SiteRow {
        id: c.id.as_str().to_owned(),
        kind: c.id.kind().as_str().to_owned(),
        class: if c.state.is_some() {
            class_of(&state)
        } else {
            "none"
        },
        state,
        last_seen: c.last_seen.to_string(),
        age: age(now, c.last_seen),
        version: c.version.clone().unwrap_or_default(),
        via: c
            .via
            .iter()
            .map(RsId::as_str)
            .collect::<Vec<_>>()
            .join(" → "),
        spool: metric(st, "spool.messages").unwrap_or_default(),
        oldest: metric(st, queue_health::OLDEST_AGE_SECS)
            .map(|s| format!("{s} s"))
            .unwrap_or_default(),
        at_risk: c.at_risk.clone().unwrap_or_default(),
    }
}

async fn fleet(app: &AppServer, v: &Viewer) -> Result<String, Failure> {
    let list = crate::control::visible_components(app, &v.admin.grants).await?;
    let now = app.clock.now();
    let mut by: std::collections::BTreeMap<String, CustomerBlock> = Default::default();
    for c in &list {
        let customer = c.id.customer().as_str().to_owned();
        let b = by.entry(customer.clone()).or_insert_with(|| CustomerBlock {
            name: customer,
            ok: 0,
            late: 0,
            failed: 0,
            rows: Vec::new(),
        });
        let row = site_row(c, now);
        match row.class {
            "ok" => b.ok += 1,
            "warn" => b.late += 1,
            "bad" => b.failed += 1,
            _ => {}
        }
        b.rows.push(row);
    }
    Ok(Fleet {
        nav: Nav::new(v, "Fleet", 10),
        charts: super::charts::fleet(app, &v.admin.grants),
        total: list.len(),
        customers: by.into_values().collect(),
    }
    .render()?)
}

// ---- topology ----

pub(crate) struct Node {
    pub id: String,
    pub class: &'static str,
    pub x: u32,
    pub y: u32,
    /// Where its label starts.
    pub lx: u32,
    pub ly: u32,
}

pub(crate) struct Link {
    pub x1: u32,
    pub y1: u32,
    pub x2: u32,
    pub y2: u32,
}

#[derive(Template)]
#[template(path = "portal/topology.html")]
struct Topology {
    nav: Nav,
    width: u32,
    height: u32,
    nodes: Vec<Node>,
    links: Vec<Link>,
}

/// The tiers as a picture: this server on the left, each component one
/// column further right per tier between it and the server, a line to
/// the tier it is reached through.
async fn topology(app: &AppServer, v: &Viewer) -> Result<String, Failure> {
    let list = crate::control::visible_components(app, &v.admin.grants).await?;
    const COL: u32 = 230;
    const ROW: u32 = 34;
    let mut columns: Vec<Vec<&Component>> = Vec::new();
    // An integrator or support instance hangs off the proxy it came
    // through, one column further.
    let reached_through = |c: &Component| {
        let tier = c.id.tier();
        (tier != c.id).then_some(tier)
    };
    for c in &list {
        let depth = c.via.len() + 1 + usize::from(reached_through(c).is_some());
        if columns.len() <= depth {
            columns.resize(depth + 1, Vec::new());
        }
        columns[depth].push(c);
    }
    let tallest = columns.iter().map(Vec::len).max().unwrap_or(1).max(1) as u32;
    let height = tallest * ROW + 40;
    let mut at: HashMap<String, (u32, u32)> = HashMap::new();
    let mut nodes = Vec::new();
    let server = (40, height / 2);
    nodes.push(Node {
        id: app.id.as_str().to_owned(),
        class: "ok",
        x: server.0,
        y: server.1,
        lx: server.0 - 30,
        ly: server.1 + 24,
    });
    for (depth, col) in columns.iter().enumerate().skip(1) {
        let x = 40 + depth as u32 * COL;
        let top = (height - col.len() as u32 * ROW) / 2 + ROW / 2;
        for (i, c) in col.iter().enumerate() {
            let y = top + i as u32 * ROW;
            at.insert(c.id.as_str().to_owned(), (x, y));
            nodes.push(Node {
                id: c.id.as_str().to_owned(),
                class: c.state.as_deref().map_or("none", class_of),
                x,
                y,
                lx: x + 12,
                ly: y + 4,
            });
        }
    }
    let links = list
        .iter()
        .filter_map(|c| {
            let &(x2, y2) = at.get(c.id.as_str())?;
            // The tier it is reached through is the nearest in `via`
            // (farthest from the server first), or the server itself.
            let (x1, y1) = match (reached_through(c), c.via.first()) {
                (Some(tier), _) => *at.get(tier.as_str())?,
                (None, Some(hop)) => *at.get(hop.as_str())?,
                (None, None) => server,
            };
            Some(Link { x1, y1, x2, y2 })
        })
        .collect();
    Ok(Topology {
        nav: Nav::new(v, "Topology", 30),
        width: 40 + columns.len().max(2) as u32 * COL,
        height,
        nodes,
        links,
    }
    .render()?)
}

// ---- a component ----

pub(crate) struct TreeRow {
    /// 0 for the component itself.
    pub depth: usize,
    pub kind: String,
    pub name: String,
    pub state: &'static str,
    pub class: &'static str,
    pub metrics: String,
}

pub(crate) struct MsgRow {
    pub seq: i64,
    pub time: String,
    pub component: String,
    pub kind: String,
    pub severity: String,
    pub class: &'static str,
    pub what: String,
    pub text: String,
}

#[derive(Template)]
#[template(path = "portal/component.html")]
struct ComponentPage {
    nav: Nav,
    site: SiteRow,
    first_seen: String,
    tags: String,
    tree: Vec<TreeRow>,
    recent: Vec<MsgRow>,
    /// This server's quota usage counted for it (or its customer).
    usage: Vec<UsageLine>,
}

fn flatten(n: &StatusNode, depth: usize, out: &mut Vec<TreeRow>) {
    out.push(TreeRow {
        depth: depth.min(6),
        kind: n.kind.clone(),
        name: n
            .name
            .clone()
            .or_else(|| n.id.as_ref().map(|i| i.as_str().to_owned()))
            .unwrap_or_default(),
        state: n.state.as_str(),
        class: class_of(n.state.as_str()),
        metrics: n
            .metrics
            .iter()
            .map(|d| format!("{}={}", d.name, d.value))
            .collect::<Vec<_>>()
            .join("  "),
    });
    for c in &n.children {
        flatten(c, depth + 1, out);
    }
}

fn msg_row(r: &crate::store::Row) -> MsgRow {
    let limits = rs_protocol::codec::Limits::default();
    let text = ContentKind::parse(&r.kind)
        .filter(|k| matches!(k, ContentKind::Alarm | ContentKind::Event))
        .and_then(|k| rs_protocol::codec::decode_content_part(k, &r.content, &limits).ok())
        .map(|c| match c {
            Content::Alarm(a) => format!("{} ({})", a.text, a.state.as_str()),
            Content::Event(e) => e.text,
            _ => String::new(),
        })
        .unwrap_or_default();
    let severity = r.severity.map(Severity::as_str).unwrap_or("");
    MsgRow {
        seq: r.seq,
        time: ts(r.created).to_string(),
        component: r.component.clone(),
        kind: r.kind.clone(),
        severity: severity.to_owned(),
        class: if severity.is_empty() {
            "ok"
        } else {
            class_of(severity)
        },
        what: format!("{}/{}", r.class, r.subclass),
        text,
    }
}

async fn component(
    app: &AppServer,
    v: &Viewer,
    q: &HashMap<String, String>,
) -> Result<String, Failure> {
    let id = q.get("id").map(String::as_str).unwrap_or("");
    let list = crate::control::visible_components(app, &v.admin.grants).await?;
    // Another customer's component is one that does not exist.
    let Some(c) = list.iter().find(|c| c.id.as_str() == id) else {
        return Err(Failure(
            http::StatusCode::NOT_FOUND,
            "no such component".into(),
        ));
    };
    let mut tree = Vec::new();
    if let Some(s) = &c.status {
        flatten(s, 0, &mut tree);
    }
    let recent = app
        .store
        .query(crate::store::Query {
            within: Some(c.id.as_str().to_owned()),
            before: Some(i64::MAX),
            limit: 20,
            ..Default::default()
        })
        .await
        .map_err(unavailable)?
        .iter()
        .filter(|r| r.kind == "alarm" || r.kind == "event")
        .map(msg_row)
        .collect();
    let usage = throttle_usage(app, v)
        .into_iter()
        .filter(|u| u.key == c.id.as_str() || u.key == c.id.customer().as_str())
        .collect();
    Ok(ComponentPage {
        usage,
        nav: Nav::new(v, c.id.as_str(), 10),
        site: site_row(c, app.clock.now()),
        first_seen: c.first_seen.to_string(),
        tags: c.tags.join(" "),
        tree,
        recent,
    }
    .render()?)
}

// ---- alarms and events ----

#[derive(Template)]
#[template(path = "portal/alarms.html")]
struct Alarms {
    nav: Nav,
    rows: Vec<MsgRow>,
    kind: String,
    severity: String,
    customer: String,
    /// The customers this admin may choose among (empty: every one).
    customers: Vec<String>,
    /// The next page's cursor, if there may be one.
    next: Option<i64>,
    /// The query string of this page's filters, for the next page's link.
    filters: String,
    /// Alarms of the last day by severity.
    bars: Vec<super::charts::Bar>,
}

const PAGE: usize = 50;

async fn alarms(
    app: &AppServer,
    v: &Viewer,
    q: &HashMap<String, String>,
) -> Result<String, Failure> {
    let bad = |t: String| Failure(http::StatusCode::BAD_REQUEST, t);
    let kind = q.get("type").cloned().unwrap_or_else(|| "alarm".into());
    let severity = q.get("severity").cloned().unwrap_or_default();
    let mut customer = q.get("customer").cloned().unwrap_or_default();
    let customers = match &v.admin.grants {
        Grants::All => Vec::new(),
        Grants::Some(list) => list.clone(),
    };
    // An admin of several customers looks at one at a time.
    if customer.is_empty() && customers.len() > 1 {
        customer = customers[0].clone();
    }
    let before = match q.get("before") {
        Some(b) => b
            .parse::<i64>()
            .map_err(|_| bad(format!("before {b:?}: a cursor")))?,
        None => i64::MAX,
    };
    let mut query = crate::store::Query {
        kind: match kind.as_str() {
            "" | "any" => None,
            k => Some(
                ContentKind::parse(k)
                    .filter(|k| matches!(k, ContentKind::Alarm | ContentKind::Event))
                    .ok_or_else(|| bad(format!("type {k:?}: alarm, event or any")))?,
            ),
        },
        severity: match severity.as_str() {
            "" => None,
            s => Some(Severity::parse(s).ok_or_else(|| bad(format!("severity {s:?}")))?),
        },
        customer: (!customer.is_empty()).then(|| customer.clone()),
        before: Some(before),
        limit: PAGE,
        ..Default::default()
    };
    crate::control::scope(&mut query, &v.admin.grants)?;
    let mut rows: Vec<MsgRow> = app
        .store
        .query(query)
        .await
        .map_err(unavailable)?
        .iter()
        .map(msg_row)
        .collect();
    if kind == "any" {
        rows.retain(|r| r.kind == "alarm" || r.kind == "event");
    }
    let next = (rows.len() == PAGE)
        .then(|| rows.last().map(|r| r.seq))
        .flatten();
    let filters = format!(
        "type={}&severity={}&customer={}",
        enc(&kind),
        enc(&severity),
        enc(&customer)
    );
    let bars = super::charts::alarms(app, &v.admin.grants)
        .await
        .map_err(unavailable)?;
    Ok(Alarms {
        bars,
        // The first page follows what arrives; older pages stay still.
        nav: Nav::new(
            v,
            "Alarms and events",
            if before == i64::MAX { 5 } else { 0 },
        ),
        rows,
        kind,
        severity,
        customer,
        customers,
        next,
        filters,
    }
    .render()?)
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

// ---- jobs ----

pub(crate) struct JobRow {
    pub id: String,
    pub action: String,
    pub created: String,
    pub total: usize,
    pub pending: usize,
    pub delivered: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub expired: usize,
    pub done: bool,
    /// Percent of destinations in a final state.
    pub progress: usize,
}

fn job_row(j: &Job) -> JobRow {
    let total = j.targets.len();
    let finished = j.targets.iter().filter(|t| t.is_final()).count();
    JobRow {
        id: j.id.clone(),
        action: j.action.clone(),
        created: j.created.to_string(),
        total,
        pending: j.count("pending"),
        delivered: j.count("delivered"),
        succeeded: j.count("succeeded"),
        failed: j.count("failed"),
        expired: j.count("expired"),
        done: j.is_done(),
        progress: (finished * 100).checked_div(total).unwrap_or(100),
    }
}

#[derive(Template)]
#[template(path = "portal/jobs.html")]
struct Jobs {
    nav: Nav,
    rows: Vec<JobRow>,
    next: Option<String>,
}

async fn jobs(app: &AppServer, v: &Viewer, q: &HashMap<String, String>) -> Result<String, Failure> {
    let before = q.get("before").cloned();
    let first = before.is_none();
    let page = crate::control::job_page(app, &v.admin.grants, None, before, 25).await?;
    let rows: Vec<JobRow> = page.iter().map(job_row).collect();
    let next = (rows.len() == 25)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    Ok(Jobs {
        nav: Nav::new(v, "Jobs", if first { 5 } else { 0 }),
        rows,
        next,
    }
    .render()?)
}

pub(crate) struct TargetRow {
    pub id: String,
    pub state: String,
    pub class: &'static str,
    pub updated: String,
    pub result: String,
}

#[derive(Template)]
#[template(path = "portal/job.html")]
struct JobPage {
    nav: Nav,
    job: JobRow,
    expiry: String,
    targets: Vec<TargetRow>,
}

async fn job(app: &AppServer, v: &Viewer, q: &HashMap<String, String>) -> Result<String, Failure> {
    let id = q.get("id").map(String::as_str).unwrap_or("");
    let j = crate::control::visible_job(app, id, &v.admin.grants).await?;
    let targets = j
        .targets
        .iter()
        .map(|t| TargetRow {
            id: t.id.as_str().to_owned(),
            class: class_of(&t.state),
            state: t.state.clone(),
            updated: t.updated.to_string(),
            result: [t.code.as_deref(), t.text.as_deref(), t.result.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" · "),
        })
        .collect();
    let row = job_row(&j);
    Ok(JobPage {
        // Live while any destination has not finished.
        nav: Nav::new(v, format!("Job {}", j.id), if row.done { 0 } else { 2 }),
        job: row,
        expiry: j.expiry.map(|e| e.to_string()).unwrap_or_default(),
        targets,
    }
    .render()?)
}

// ---- send ----

/// The actions the form offers: those without arguments, and a
/// configuration change (its TOML typed in).
fn form_actions() -> Vec<&'static str> {
    ActionKind::ALL
        .iter()
        .filter(|k| {
            matches!(
                k,
                ActionKind::GetStatus
                    | ActionKind::Ping
                    | ActionKind::GetConfig
                    | ActionKind::ConfigChange
                    | ActionKind::EnableForwarding
                    | ActionKind::DisableForwarding
                    | ActionKind::ReplayDeadLetters
                    | ActionKind::DiscardDeadLetters
            )
        })
        .map(|k| k.name())
        .collect()
}

#[derive(Template)]
#[template(path = "portal/send.html")]
struct SendPage {
    nav: Nav,
    actions: Vec<&'static str>,
    groups: Vec<String>,
    components: Vec<String>,
    target: String,
    error: Option<String>,
}

/// What a form may send to: the viewer's groups with members
/// (`group:NAME`) and components (of `kind`, if given).
async fn destinations(
    app: &AppServer,
    v: &Viewer,
    kind: Option<rs_protocol::ComponentKind>,
) -> Result<(Vec<String>, Vec<String>), Failure> {
    let groups = crate::control::visible_groups(app, None, &v.admin.grants)
        .await?
        .into_iter()
        .filter(|(_, members)| !members.is_empty())
        .map(|(g, _)| format!("group:{}", g.name))
        .collect();
    let components = crate::control::visible_components(app, &v.admin.grants)
        .await?
        .into_iter()
        .filter(|c| kind.is_none_or(|k| c.id.kind() == k))
        .map(|c| c.id.as_str().to_owned())
        .collect();
    Ok((groups, components))
}

/// A form's `target`: `group:NAME`, or a component's ID; as the API's
/// `to` and `groups`.
fn target_of(target: &str) -> Result<(Vec<RsId>, Vec<String>), Failure> {
    Ok(match target.strip_prefix("group:") {
        Some(g) if !g.is_empty() => (Vec::new(), vec![g.to_owned()]),
        _ => (
            vec![RsId::new(target).map_err(|e| {
                Failure(
                    http::StatusCode::BAD_REQUEST,
                    format!("destination {target:?}: {e}"),
                )
            })?],
            Vec::new(),
        ),
    })
}

async fn send_form(
    app: &AppServer,
    v: &Viewer,
    target: Option<&String>,
    error: Option<String>,
) -> Result<String, Failure> {
    let (groups, components) = destinations(app, v, None).await?;
    Ok(SendPage {
        nav: Nav::new(v, "Send a control action", 0),
        actions: form_actions(),
        groups,
        components,
        target: target.cloned().unwrap_or_default(),
        error,
    }
    .render()?)
}

/// Starts the job the form asks for; its ID.
async fn send(
    app: &AppServer,
    v: &Viewer,
    form: &HashMap<String, String>,
) -> Result<String, Failure> {
    let bad = |t: String| Failure(http::StatusCode::BAD_REQUEST, t);
    let target = form.get("target").map(|t| t.trim()).unwrap_or("");
    let (to, groups) = target_of(target)?;
    let name = form.get("action").map(String::as_str).unwrap_or("");
    let kind = ActionKind::parse(name)
        .filter(|k| form_actions().contains(&k.name()))
        .ok_or_else(|| {
            bad(format!(
                "action {name:?}: one of {}",
                form_actions().join(", ")
            ))
        })?;
    let action = match kind {
        ActionKind::GetStatus => ControlAction::GetStatus,
        ActionKind::Ping => ControlAction::Ping,
        ActionKind::GetConfig => ControlAction::GetConfig,
        ActionKind::EnableForwarding => ControlAction::EnableForwarding,
        ActionKind::DisableForwarding => ControlAction::DisableForwarding,
        ActionKind::ReplayDeadLetters => ControlAction::ReplayDeadLetters(None),
        ActionKind::DiscardDeadLetters => ControlAction::DiscardDeadLetters(None),
        ActionKind::ConfigChange => {
            let config = form
                .get("config")
                .map(|c| c.replace("\r\n", "\n"))
                .unwrap_or_default();
            if config.trim().is_empty() {
                return Err(bad(
                    "configChange needs the settings to change (TOML)".into()
                ));
            }
            ControlAction::ConfigChange { config }
        }
        _ => return Err(bad(format!("{name} is not offered here"))),
    };
    let job = crate::control::start_job(
        app,
        &v.admin.grants,
        &to,
        &groups,
        None,
        None,
        action.name(),
        None,
        |id, dests, expiry, now| {
            rs_protocol::control_messages::control_message(id, dests, Some(expiry), &action, now)
        },
        None,
    )
    .await?;
    tracing::info!(
        "portal: {} sent {} to {target} (job {})",
        v.admin.name,
        action.name(),
        job.id
    );
    Ok(job.id)
}

// ---- groups ----

pub(crate) struct GroupRow {
    pub name: String,
    pub selector: String,
    pub members: Vec<String>,
}

#[derive(Template)]
#[template(path = "portal/groups.html")]
struct Groups {
    nav: Nav,
    rows: Vec<GroupRow>,
    /// Whether the viewer may change groups (an admin of every customer).
    provider: bool,
    kinds: Vec<&'static str>,
    error: Option<String>,
}

/// `POST groups` (create or replace, from the form) and `groups/delete`.
async fn change_group(
    app: &AppServer,
    v: &Viewer,
    page: &str,
    form: &HashMap<String, String>,
) -> Result<(), Failure> {
    provider_only(v)?;
    let bad = |t: String| Failure(http::StatusCode::BAD_REQUEST, t);
    let field = |k: &str| {
        form.get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let name = field("name").ok_or_else(|| bad("a group needs a name".into()))?;
    if page == "groups/delete" {
        crate::control::remove_group(app, name.clone()).await?;
        tracing::info!("portal: {} deleted group {name}", v.admin.name);
        return Ok(());
    }
    let g = rs_protocol::codec::api::GroupDef {
        customer: field("customer")
            .map(|c| {
                rs_protocol::CustomerId::new(&c).map_err(|e| bad(format!("customer {c:?}: {e}")))
            })
            .transpose()?,
        kind: field("kind")
            .map(|k| {
                rs_protocol::ComponentKind::parse(&k).ok_or_else(|| bad(format!("kind {k:?}")))
            })
            .transpose()?,
        tag: field("tag"),
        members: field("members")
            .unwrap_or_default()
            .split_whitespace()
            .map(|m| RsId::new(m).map_err(|e| bad(format!("member {m:?}: {e}"))))
            .collect::<Result<_, _>>()?,
        name,
    };
    // The same checks as the API's document (names are tokens).
    let doc = rs_protocol::codec::api::encode_group(&g);
    let g = rs_protocol::codec::api::decode_group(&doc, &rs_protocol::codec::Limits::default())
        .map_err(|e| bad(format!("group: {e}")))?;
    let name = g.name.clone();
    crate::control::save_group(app, g).await?;
    tracing::info!("portal: {} saved group {name}", v.admin.name);
    Ok(())
}

async fn groups(app: &AppServer, v: &Viewer, error: Option<String>) -> Result<String, Failure> {
    let rows = crate::control::visible_groups(app, None, &v.admin.grants)
        .await?
        .into_iter()
        .map(|(g, members)| {
            let mut sel = Vec::new();
            if let Some(c) = &g.customer {
                sel.push(format!("customer={}", c.as_str()));
            }
            if let Some(k) = g.kind {
                sel.push(format!("kind={}", k.as_str()));
            }
            if let Some(t) = &g.tag {
                sel.push(format!("tag={t}"));
            }
            if !g.members.is_empty() {
                sel.push(format!("{} listed", g.members.len()));
            }
            GroupRow {
                name: g.name,
                selector: sel.join(", "),
                members: members.iter().map(|m| m.as_str().to_owned()).collect(),
            }
        })
        .collect();
    Ok(Groups {
        nav: Nav::new(v, "Groups", 0),
        rows,
        provider: v.admin.grants.is_all(),
        kinds: [
            rs_protocol::ComponentKind::Proxy,
            rs_protocol::ComponentKind::Mlm,
            rs_protocol::ComponentKind::Integrator,
            rs_protocol::ComponentKind::SupportInstance,
        ]
        .iter()
        .map(|k| k.as_str())
        .collect(),
        error,
    }
    .render()?)
}

// ---- audit ----

pub(crate) struct AuditLine {
    pub seq: i64,
    pub at: String,
    pub admin: String,
    pub peer: String,
    pub method: String,
    pub path: String,
    pub status: i64,
    pub class: &'static str,
}

#[derive(Template)]
#[template(path = "portal/audit.html")]
struct Audit {
    nav: Nav,
    rows: Vec<AuditLine>,
    next: Option<i64>,
}

async fn audit(
    app: &AppServer,
    v: &Viewer,
    q: &HashMap<String, String>,
) -> Result<String, Failure> {
    // As the API: an admin of some customers sees its own lines only.
    let who = (!v.admin.grants.is_all()).then(|| v.admin.name.clone());
    let before = q.get("before").and_then(|b| b.parse().ok());
    let rows: Vec<AuditLine> = app
        .audit(who, before, 100)
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|r| AuditLine {
            seq: r.seq,
            at: ts(r.at).to_string(),
            class: if r.status < 400 { "ok" } else { "bad" },
            admin: r.admin,
            peer: r.peer,
            method: r.method,
            path: r.path,
            status: r.status,
        })
        .collect();
    let next = (rows.len() == 100)
        .then(|| rows.last().map(|r| r.seq))
        .flatten();
    Ok(Audit {
        nav: Nav::new(v, "Audit log", 0),
        rows,
        next,
    }
    .render()?)
}

// ---- throttle ----

pub(crate) struct RuleRow {
    pub name: String,
    /// The rule as its TOML (what it matches and what it allows).
    pub toml: String,
    pub held: u64,
}

pub(crate) struct UsageLine {
    pub rule: String,
    pub key: String,
    pub since: String,
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Template)]
#[template(path = "portal/throttle.html")]
struct Throttle {
    nav: Nav,
    rules: Vec<RuleRow>,
    usage: Vec<UsageLine>,
    min_free_disk_mb: String,
}

/// The rules the viewer may see (as the API shows them), messages each
/// held back since this server started, and the current quota periods'
/// usage of the viewer's customers and components.
/// The current quota periods' usage the viewer may see: of the rules it
/// sees, for its customers and their components.
fn throttle_usage(app: &AppServer, v: &Viewer) -> Vec<UsageLine> {
    let cfg = crate::control::visible_throttle(app, &v.admin.grants);
    let (_, usage) = app.current_throttle().report();
    let visible = |rule: &str| cfg.rule.iter().any(|r| r.name == rule);
    let granted_key = |key: &str| {
        key.is_empty() && v.admin.grants.is_all()
            || v.admin.grants.customer(key)
            || RsId::new(key).is_ok_and(|id| v.admin.grants.component(&id))
    };
    usage
        .into_iter()
        .filter(|u| visible(&u.rule) && granted_key(&u.key))
        .map(|u| UsageLine {
            since: ts(u.period_start).to_string(),
            rule: u.rule,
            key: u.key,
            messages: u.messages,
            bytes: u.bytes,
        })
        .collect()
}

fn throttle(app: &AppServer, v: &Viewer) -> Result<String, Failure> {
    let cfg = crate::control::visible_throttle(app, &v.admin.grants);
    let (held, _) = app.current_throttle().report();
    let rules = cfg
        .rule
        .iter()
        .map(|r| RuleRow {
            name: r.name.clone(),
            toml: toml::to_string(r)
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.starts_with("name ="))
                .collect::<Vec<_>>()
                .join(", "),
            held: held
                .iter()
                .find(|(n, _)| *n == r.name)
                .map_or(0, |(_, h)| *h),
        })
        .collect();
    let usage = throttle_usage(app, v);
    Ok(Throttle {
        nav: Nav::new(v, "Throttle", 10),
        rules,
        usage,
        min_free_disk_mb: cfg
            .min_free_disk_mb
            .map(|m| format!("{m} MB"))
            .unwrap_or_else(|| "none".into()),
    }
    .render()?)
}

// ---- subscriptions and failed tasks ----

pub(crate) struct SubRow {
    pub name: String,
    pub delivery: String,
    pub filters: String,
    pub pending: u64,
    pub done: u64,
    pub failed: u64,
}

pub(crate) struct TaskLine {
    pub id: i64,
    pub subscription: String,
    pub message: String,
    pub attempts: u32,
    pub created: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "portal/subscriptions.html")]
struct Subscriptions {
    nav: Nav,
    subs: Vec<SubRow>,
    failed: Vec<TaskLine>,
}

async fn subscriptions(app: &AppServer, v: &Viewer) -> Result<String, Failure> {
    use rs_protocol::codec::api::Delivery;
    provider_only(v)?;
    let subs = app
        .store
        .subscriptions()
        .await
        .map_err(unavailable)?
        .iter()
        .map(|(s, c)| {
            let d = crate::control::def_of(s);
            let filters = [
                d.class.as_ref().map(|c| format!("class={c}")),
                d.subclass.as_ref().map(|c| format!("sub={c}")),
                d.customer.as_ref().map(|c| format!("customer={c}")),
                d.source.as_ref().map(|c| format!("source={}", c.as_str())),
                d.kind.as_ref().map(|c| format!("type={c}")),
                d.min_severity.map(|c| format!("severity>={}", c.as_str())),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
            SubRow {
                delivery: match &d.delivery {
                    Delivery::Webhook(u) => format!("webhook {u}"),
                    Delivery::Feed => "feed".into(),
                    Delivery::Module(m) => format!("module {m}"),
                },
                name: d.name,
                filters,
                pending: c.pending,
                done: c.done,
                failed: c.failed,
            }
        })
        .collect();
    let failed = app
        .store
        .tasks("failed".into(), 100)
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|t| TaskLine {
            id: t.id,
            subscription: t.sub,
            message: t.message,
            attempts: t.attempts,
            created: ts(t.created).to_string(),
            error: t.last_error.unwrap_or_default(),
        })
        .collect();
    Ok(Subscriptions {
        nav: Nav::new(v, "Subscriptions and failed tasks", 0),
        subs,
        failed,
    }
    .render()?)
}

/// `POST subscriptions/replay`: one failed task (`id`), or every one.
async fn replay(
    app: &AppServer,
    v: &Viewer,
    form: &HashMap<String, String>,
) -> Result<(), Failure> {
    provider_only(v)?;
    let id = match form.get("id").map(|i| i.trim()).filter(|i| !i.is_empty()) {
        Some(i) => Some(i.parse::<i64>().map_err(|_| {
            Failure(
                http::StatusCode::BAD_REQUEST,
                format!("task {i:?}: a number"),
            )
        })?),
        None => None,
    };
    let n = crate::control::replay_tasks(app, id).await?;
    tracing::info!("portal: {} replayed {n} failed tasks", v.admin.name);
    Ok(())
}

// ---- files ----

pub(crate) struct FileRow {
    pub sha256: String,
    pub name: String,
    pub size: i64,
    pub published: String,
}

#[derive(Template)]
#[template(path = "portal/files.html")]
struct Files {
    nav: Nav,
    files: Vec<FileRow>,
    groups: Vec<String>,
    components: Vec<String>,
    error: Option<String>,
}

/// The published files, and a form to offer one to a group or a
/// component (software is installed, configuration applied; the job's
/// page shows each destination's progress).
async fn files(app: &AppServer, v: &Viewer, error: Option<String>) -> Result<String, Failure> {
    provider_only(v)?;
    let files = app
        .store
        .published_files(200)
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|(sha256, name, size, created)| FileRow {
            sha256,
            name,
            size,
            published: ts(created).to_string(),
        })
        .collect();
    let (groups, components) =
        destinations(app, v, Some(rs_protocol::ComponentKind::Proxy)).await?;
    Ok(Files {
        nav: Nav::new(v, "Files", 0),
        files,
        groups,
        components,
        error,
    }
    .render()?)
}

/// `POST files/offer`: the job's ID.
async fn offer(
    app: &AppServer,
    v: &Viewer,
    form: &HashMap<String, String>,
) -> Result<String, Failure> {
    provider_only(v)?;
    let bad = |t: String| Failure(http::StatusCode::BAD_REQUEST, t);
    let field = |k: &str| form.get(k).map(|v| v.trim()).unwrap_or("");
    let hex = field("file");
    let sha256: [u8; 32] = (0..32)
        .map(|i| {
            hex.get(i * 2..i * 2 + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .and_then(|v| v.try_into().ok())
        .filter(|_| hex.len() == 64)
        .ok_or_else(|| bad(format!("file {hex:?}: a SHA-256 (64 hex digits)")))?;
    let target = field("target");
    let (to, groups) = target_of(target)?;
    let req = rs_protocol::codec::api::OfferRequest {
        to,
        groups,
        sha256,
        class: field("class").to_owned(),
        sub: field("sub").to_owned(),
        ttl_secs: None,
        notify: None,
    };
    // The same checks as the API's document (class and sub are tokens).
    let doc = rs_protocol::codec::api::encode_offer_request(&req);
    let req =
        rs_protocol::codec::api::decode_offer_request(&doc, &rs_protocol::codec::Limits::default())
            .map_err(|e| bad(format!("offer: {e}")))?;
    let job = crate::publish::start_offer(app, &v.admin.grants, req, None).await?;
    tracing::info!(
        "portal: {} offered {hex} to {target} (job {})",
        v.admin.name,
        job.id
    );
    Ok(job.id)
}

// ---- rollouts ----

pub(crate) struct RolloutLine {
    pub id: String,
    pub name: String,
    pub action: String,
    pub state: String,
    pub class: &'static str,
    pub wave: u32,
    pub waves: usize,
    pub created: String,
    pub reason: String,
}

fn rollout_class(state: &str) -> &'static str {
    match state {
        "succeeded" | "completed" => "ok",
        "running" | "waiting" | "paused" => "warn",
        _ => "bad",
    }
}

fn rollout_line(r: &rs_protocol::codec::api::Rollout) -> RolloutLine {
    RolloutLine {
        id: r.id.clone(),
        name: r.name.clone(),
        action: r.action.clone(),
        class: rollout_class(&r.state),
        state: r.state.clone(),
        wave: r.wave,
        waves: r.waves.len(),
        created: r.created.to_string(),
        reason: r.reason.clone().unwrap_or_default(),
    }
}

#[derive(Template)]
#[template(path = "portal/rollouts.html")]
struct Rollouts {
    nav: Nav,
    rows: Vec<RolloutLine>,
}

/// The rollouts whose every destination the viewer is granted.
async fn rollouts(app: &AppServer, v: &Viewer) -> Result<String, Failure> {
    let mut rows = Vec::new();
    for r in app.store.rollouts(None).await.map_err(unavailable)? {
        if let Ok((row, waves)) = crate::rollouts::visible(app, &r.id, &v.admin.grants).await {
            rows.push(rollout_line(
                &crate::rollouts::view(app, &row, &waves).await?,
            ));
        }
    }
    Ok(Rollouts {
        nav: Nav::new(v, "Rollouts", 5),
        rows,
    }
    .render()?)
}

pub(crate) struct WaveView {
    pub n: u32,
    pub state: String,
    pub class: &'static str,
    pub job: String,
    pub members: Vec<TargetRow>,
}

#[derive(Template)]
#[template(path = "portal/rollout.html")]
struct RolloutPage {
    nav: Nav,
    r: RolloutLine,
    waves: Vec<WaveView>,
    /// The steps its state allows.
    ops: Vec<&'static str>,
}

/// One rollout: its waves and each destination's state, live while it
/// runs, with the steps its state allows.
async fn rollout(
    app: &AppServer,
    v: &Viewer,
    q: &HashMap<String, String>,
) -> Result<String, Failure> {
    let id = q.get("id").map(String::as_str).unwrap_or("");
    let (row, waves) = crate::rollouts::visible(app, id, &v.admin.grants).await?;
    let r = crate::rollouts::view(app, &row, &waves).await?;
    let ops: Vec<&'static str> = match r.state.as_str() {
        "running" => vec!["pause", "abort"],
        "waiting" => vec!["approve", "pause", "abort"],
        "paused" | "halted" => vec!["resume", "abort"],
        _ => Vec::new(),
    };
    let live = matches!(r.state.as_str(), "running" | "waiting");
    let waves = r
        .waves
        .iter()
        .map(|w| WaveView {
            n: w.n,
            class: match w.state.as_str() {
                "succeeded" => "ok",
                "not-sent" => "none",
                "running" => "warn",
                _ => "bad",
            },
            state: w.state.clone(),
            job: w.job.clone().unwrap_or_default(),
            members: w
                .members
                .iter()
                .map(|(id, s)| TargetRow {
                    id: id.as_str().to_owned(),
                    class: if s == "not-sent" { "none" } else { class_of(s) },
                    state: s.clone(),
                    updated: String::new(),
                    result: String::new(),
                })
                .collect(),
        })
        .collect();
    Ok(RolloutPage {
        nav: Nav::new(v, format!("Rollout {}", r.name), if live { 2 } else { 0 }),
        r: rollout_line(&r),
        waves,
        ops,
    }
    .render()?)
}
