//! The documents of the application server's XML control API
//! (`dtd/control-api.dtd`, `docs/control-api.md`): what an admin tool
//! sends (send requests, group definitions, tags) and what the server
//! answers (jobs, components, groups). The server and `rsctl` both use
//! these, so the two cannot drift apart.

use super::control::{control_body, read_node, write_node};
use super::header::token;
use super::xml::{Tag, XmlIn, XmlOut};
use super::{Limits, XmlError};
use crate::control::{ControlAction, StatusNode};
use crate::ids::{ComponentKind, CustomerId, RsId};
use crate::time::Timestamp;

/// A request to send one control action: to components and to groups
/// (expanded when the request arrives), how long it may wait to be
/// delivered, and where to push the job's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    pub to: Vec<RsId>,
    pub groups: Vec<String>,
    pub action: ControlAction,
    pub ttl_secs: Option<u64>,
    /// An `http://` URL the server POSTs the job document to whenever a
    /// destination's state changes.
    pub notify: Option<String>,
}

pub fn encode_send_request(r: &SendRequest) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    let mut x = XmlOut::document(&mut buf);
    x.open("send")
        .attr_num_opt("ttl-secs", r.ttl_secs)
        .attr_opt("notify", r.notify.as_deref())
        .gt()
        .newline();
    write_to(&mut x, &r.to, &r.groups);
    let control = super::encode_control(&r.action);
    let body = control.strip_prefix(super::xml::DECL).unwrap_or(&control);
    x.buf.extend_from_slice(body);
    x.close("send").newline();
    buf
}

/// Decodes `<send>`: at least one `<to id>` or `<to group>`, then one
/// `<control>`.
pub fn decode_send_request(bytes: &[u8], limits: &Limits) -> Result<SendRequest, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("send")?;
    let ttl_secs = root.opt_u64("ttl-secs")?;
    let notify = root.opt_with("notify", notify_url)?;
    let (mut to, mut groups) = (Vec::new(), Vec::new());
    let mut action = None;
    while let Some(tag) = x.child(&root)? {
        match tag.name {
            "to" if action.is_none() => read_to(&mut x, &tag, &mut to, &mut groups)?,
            "control" if action.is_none() => action = Some(control_body(&mut x, &tag)?),
            _ => return Err(root.unexpected_child(&tag)),
        }
    }
    x.finish()?;
    if to.is_empty() && groups.is_empty() {
        return Err(XmlError::MissingElement {
            element: "send".into(),
            child: "to",
        });
    }
    Ok(SendRequest {
        to,
        groups,
        action: action.ok_or(XmlError::MissingElement {
            element: "send".into(),
            child: "control",
        })?,
        ttl_secs,
        notify,
    })
}

/// A request to offer a published file to components and groups: they
/// fetch it (through the MLM nearest them) and process it by its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferRequest {
    pub to: Vec<RsId>,
    pub groups: Vec<String>,
    /// The published file (`PUT /files/{name}` answered its SHA-256).
    pub sha256: [u8; 32],
    /// What it is: `software`/`package` is installed, `configuration`/...
    /// is applied as a configuration change; anything else is kept.
    pub class: String,
    pub sub: String,
    pub ttl_secs: Option<u64>,
    pub notify: Option<String>,
}

pub fn encode_offer_request(r: &OfferRequest) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    let mut x = XmlOut::document(&mut buf);
    x.open("offer")
        .attr("file", &super::sha256_hex(&r.sha256))
        .attr("class", &r.class)
        .attr("sub", &r.sub)
        .attr_num_opt("ttl-secs", r.ttl_secs)
        .attr_opt("notify", r.notify.as_deref())
        .gt()
        .newline();
    write_to(&mut x, &r.to, &r.groups);
    x.close("offer").newline();
    buf
}

/// Decodes `<offer>`: at least one `<to id>` or `<to group>`.
pub fn decode_offer_request(bytes: &[u8], limits: &Limits) -> Result<OfferRequest, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("offer")?;
    let sha256 = root.req_with("file", super::parse_sha256)?;
    let class = root.req_with("class", token)?;
    let sub = root.req_with("sub", token)?;
    let ttl_secs = root.opt_u64("ttl-secs")?;
    let notify = root.opt_with("notify", notify_url)?;
    let (mut to, mut groups) = (Vec::new(), Vec::new());
    while let Some(tag) = x.child(&root)? {
        match tag.name {
            "to" => read_to(&mut x, &tag, &mut to, &mut groups)?,
            _ => return Err(root.unexpected_child(&tag)),
        }
    }
    x.finish()?;
    if to.is_empty() && groups.is_empty() {
        return Err(XmlError::MissingElement {
            element: "offer".into(),
            child: "to",
        });
    }
    Ok(OfferRequest {
        to,
        groups,
        sha256,
        class,
        sub,
        ttl_secs,
        notify,
    })
}

/// A published file (the answer to `PUT /files/{name}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedFile {
    pub name: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

pub fn encode_file(f: &PublishedFile) -> Vec<u8> {
    let mut buf = Vec::with_capacity(128);
    let mut x = XmlOut::document(&mut buf);
    x.open("file")
        .attr("name", &f.name)
        .attr_num("size", f.size)
        .attr("sha256", &super::sha256_hex(&f.sha256))
        .empty()
        .newline();
    buf
}

pub fn decode_file(bytes: &[u8], limits: &Limits) -> Result<PublishedFile, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("file")?;
    let f = PublishedFile {
        name: root.req("name")?.to_owned(),
        size: root.opt_u64("size")?.unwrap_or(0),
        sha256: root.req_with("sha256", super::parse_sha256)?,
    };
    if let Some(tag) = x.child(&root)? {
        return Err(root.unexpected_child(&tag));
    }
    x.finish()?;
    Ok(f)
}

/// The `<to id>` and `<to group>` elements of `send` and `offer`.
fn write_to(x: &mut XmlOut<'_>, to: &[RsId], groups: &[String]) {
    for t in to {
        x.open("to").attr("id", t.as_str()).empty().newline();
    }
    for g in groups {
        x.open("to").attr("group", g).empty().newline();
    }
}

/// Reads one `<to>`: exactly one of `id` (a component) and `group`.
fn read_to(
    x: &mut XmlIn<'_>,
    tag: &Tag<'_>,
    to: &mut Vec<RsId>,
    groups: &mut Vec<String>,
) -> Result<(), XmlError> {
    match (tag.opt("id"), tag.opt("group")) {
        (Some(_), None) => to.push(tag.req_with("id", |s| RsId::new(s))?),
        (None, Some(_)) => groups.push(tag.req_with("group", token)?),
        _ => return Err(tag.bad("id", "a <to> names either an id or a group")),
    }
    x.end(tag)
}

fn notify_url(s: &str) -> Result<String, &'static str> {
    if (s.starts_with("http://") || s.starts_with("https://")) && s.len() <= 2048 {
        Ok(s.to_owned())
    } else {
        Err("not an http:// or https:// URL")
    }
}

/// A group: a static member list, a selector (every attribute given must
/// match), or both (their union).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupDef {
    pub name: String,
    pub members: Vec<RsId>,
    pub customer: Option<CustomerId>,
    pub kind: Option<ComponentKind>,
    pub tag: Option<String>,
}

impl GroupDef {
    pub fn has_selector(&self) -> bool {
        self.customer.is_some() || self.kind.is_some() || self.tag.is_some()
    }
}

fn write_group(x: &mut XmlOut<'_>, g: &GroupDef, resolved: Option<&[RsId]>) {
    x.open("group")
        .attr("name", &g.name)
        .attr_opt("customer", g.customer.as_ref().map(CustomerId::as_str))
        .attr_opt("kind", g.kind.map(ComponentKind::as_str))
        .attr_opt("tag", g.tag.as_deref());
    let members: &[RsId] = resolved.unwrap_or(&g.members);
    if let Some(r) = resolved {
        x.attr_num("size", r.len() as u64);
    }
    if members.is_empty() {
        x.empty();
        return;
    }
    x.gt().newline();
    for m in members {
        x.open("member").attr("id", m.as_str()).empty().newline();
    }
    x.close("group");
}

/// A group definition, as `PUT /rs/v1/control/groups/{name}` takes it.
pub fn encode_group(g: &GroupDef) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    write_group(&mut x, g, None);
    x.newline();
    buf
}

fn read_group(x: &mut XmlIn<'_>, tag: &Tag<'_>) -> Result<GroupDef, XmlError> {
    let mut g = GroupDef {
        name: tag.req_with("name", token)?,
        members: Vec::new(),
        customer: tag.opt_with("customer", |s| CustomerId::new(s))?,
        kind: tag.opt_with("kind", |s| {
            ComponentKind::parse(s).ok_or("unknown component kind")
        })?,
        tag: tag.opt_with("tag", token)?,
    };
    while let Some(m) = x.child(tag)? {
        if m.name != "member" {
            return Err(tag.unexpected_child(&m));
        }
        g.members.push(m.req_with("id", |s| RsId::new(s))?);
        x.end(&m)?;
    }
    Ok(g)
}

pub fn decode_group(bytes: &[u8], limits: &Limits) -> Result<GroupDef, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("group")?;
    let g = read_group(&mut x, &root)?;
    x.finish()?;
    Ok(g)
}

/// `<groups>`: each group with its members as resolved now.
pub fn encode_groups(groups: &[(GroupDef, Vec<RsId>)]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("groups")
        .attr_num("count", groups.len() as u64)
        .gt()
        .newline();
    for (g, resolved) in groups {
        write_group(&mut x, g, Some(resolved));
        x.newline();
    }
    x.close("groups").newline();
    buf
}

/// Decodes `<groups>`; each group's `members` are the resolved ones.
pub fn decode_groups(bytes: &[u8], limits: &Limits) -> Result<Vec<GroupDef>, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("groups")?;
    let mut out = Vec::new();
    while let Some(tag) = x.child(&root)? {
        if tag.name != "group" {
            return Err(root.unexpected_child(&tag));
        }
        out.push(read_group(&mut x, &tag)?);
    }
    x.finish()?;
    Ok(out)
}

/// `<tags><tag name="…"/>…</tags>`: a component's tags, for selectors.
pub fn encode_tags(tags: &[String]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("tags").gt().newline();
    for t in tags {
        x.open("tag").attr("name", t).empty().newline();
    }
    x.close("tags").newline();
    buf
}

pub fn decode_tags(bytes: &[u8], limits: &Limits) -> Result<Vec<String>, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("tags")?;
    let mut out = Vec::new();
    while let Some(tag) = x.child(&root)? {
        if tag.name != "tag" {
            return Err(root.unexpected_child(&tag));
        }
        out.push(tag.req_with("name", token)?);
        x.end(&tag)?;
    }
    x.finish()?;
    Ok(out)
}

/// One destination of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTarget {
    pub id: RsId,
    /// `pending`, `delivered`, `succeeded`, `failed` or `expired`.
    pub state: String,
    pub updated: Timestamp,
    pub code: Option<String>,
    pub text: Option<String>,
    pub result: Option<String>,
}

impl JobTarget {
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "failed" | "expired")
    }
}

/// A job: one control action sent to one or more destinations. `version`
/// grows with every change of a target's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub message: String,
    pub action: String,
    pub created: Timestamp,
    pub expiry: Option<Timestamp>,
    pub version: u64,
    pub targets: Vec<JobTarget>,
}

impl Job {
    /// Every destination reached a final state.
    pub fn is_done(&self) -> bool {
        self.targets.iter().all(JobTarget::is_final)
    }

    /// How many targets are in `state`.
    pub fn count(&self, state: &str) -> usize {
        self.targets.iter().filter(|t| t.state == state).count()
    }
}

/// A `<job>` start tag with the job's attributes, left open.
fn job_head<'x, 'b>(x: &'x mut XmlOut<'b>, j: &Job) -> &'x mut XmlOut<'b> {
    x.open("job")
        .attr("id", &j.id)
        .attr("message", &j.message)
        .attr("action", &j.action)
        .attr_num("targets", j.targets.len() as u64)
        .attr_ts("created", j.created)
        .attr_ts_opt("expiry", j.expiry)
        .attr_num("version", j.version)
        .attr("state", if j.is_done() { "done" } else { "running" })
}

pub fn encode_job(j: &Job) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256 + j.targets.len() * 128);
    let mut x = XmlOut::document(&mut buf);
    job_head(&mut x, j).gt().newline();
    for t in &j.targets {
        x.open("target")
            .attr("id", t.id.as_str())
            .attr("state", &t.state)
            .attr_ts("updated", t.updated)
            .attr_opt("code", t.code.as_deref());
        if t.text.is_none() && t.result.is_none() {
            x.empty();
        } else {
            x.gt();
            if let Some(text) = &t.text {
                x.text_element("text", text);
            }
            if let Some(result) = &t.result {
                x.text_element("result", result);
            }
            x.close("target");
        }
        x.newline();
    }
    x.close("job").newline();
    buf
}

/// `GET /jobs`: each job's head and how many of its destinations are in
/// each state, without the destinations themselves.
pub fn encode_jobs(list: &[Job]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(128 + list.len() * 256);
    let mut x = XmlOut::document(&mut buf);
    x.open("jobs")
        .attr_num("count", list.len() as u64)
        .gt()
        .newline();
    for j in list {
        job_head(&mut x, j);
        for s in ["pending", "delivered", "succeeded", "failed", "expired"] {
            x.attr_num(s, j.count(s) as u64);
        }
        x.empty().newline();
    }
    x.close("jobs").newline();
    buf
}

pub fn decode_job(bytes: &[u8], limits: &Limits) -> Result<Job, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("job")?;
    let mut j = Job {
        id: root.req_with("id", token)?,
        message: root.req_with("message", token)?,
        action: root.req_with("action", token)?,
        created: root.req_ts("created")?,
        expiry: root.opt_ts("expiry")?,
        version: root.opt_u64("version")?.unwrap_or(0),
        targets: Vec::new(),
    };
    while let Some(tag) = x.child(&root)? {
        if tag.name != "target" {
            return Err(root.unexpected_child(&tag));
        }
        let mut t = JobTarget {
            id: tag.req_with("id", |s| RsId::new(s))?,
            state: tag.req_with("state", token)?,
            updated: tag.req_ts("updated")?,
            code: tag.opt_with("code", token)?,
            text: None,
            result: None,
        };
        while let Some(c) = x.child(&tag)? {
            match c.name {
                "text" if t.text.is_none() && t.result.is_none() => t.text = Some(x.text(&c)?),
                "result" if t.result.is_none() => t.result = Some(x.text(&c)?),
                _ => return Err(tag.unexpected_child(&c)),
            }
        }
        j.targets.push(t);
    }
    x.finish()?;
    Ok(j)
}

/// One step of a message through the tiers, as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    pub at: Timestamp,
    pub component: RsId,
    /// Up: `created` (at its source), `received` and `sent` (by a tier on
    /// the way, from its routing hop), `stored` (here). Down: `queued`
    /// (here, for a next hop), then each destination's job state:
    /// `delivered`, `succeeded`, `failed`, `expired`.
    pub what: String,
    /// Why, for a failed or expired destination (its code and text).
    pub detail: Option<String>,
}

/// Where a message waits now: queued here for a next hop, last offered
/// on a reply at `offered` (never, if absent), not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceWait {
    pub component: RsId,
    pub next_hop: RsId,
    pub since: Timestamp,
    pub offered: Option<Timestamp>,
}

/// `GET /rs/v1/control/messages/{id}/trace`: the hops and times of a
/// message, and where it waits if it is still on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub id: String,
    /// `stored` (it reached this server), `on-its-way` (sent down, some
    /// destination not final), `done` (sent down, every destination
    /// final), `unknown` (not here: still at a site or an MLM, or never
    /// sent).
    pub state: String,
    /// The job that sent it down.
    pub job: Option<String>,
    /// In time order.
    pub events: Vec<TraceEvent>,
    pub waiting: Vec<TraceWait>,
}

pub fn encode_trace(t: &Trace) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256 + t.events.len() * 128);
    let mut x = XmlOut::document(&mut buf);
    x.open("trace")
        .attr("id", &t.id)
        .attr("state", &t.state)
        .attr_opt("job", t.job.as_deref())
        .gt()
        .newline();
    for e in &t.events {
        x.open("step")
            .attr_ts("at", e.at)
            .attr("component", e.component.as_str())
            .attr("what", &e.what)
            .attr_opt("detail", e.detail.as_deref())
            .empty()
            .newline();
    }
    for w in &t.waiting {
        x.open("waiting")
            .attr("component", w.component.as_str())
            .attr("next-hop", w.next_hop.as_str())
            .attr_ts("since", w.since)
            .attr_ts_opt("offered", w.offered)
            .empty()
            .newline();
    }
    x.close("trace").newline();
    buf
}

pub fn decode_trace(bytes: &[u8], limits: &Limits) -> Result<Trace, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("trace")?;
    let mut t = Trace {
        id: root.req_with("id", token)?,
        state: root.req_with("state", token)?,
        job: root.opt_with("job", token)?,
        events: Vec::new(),
        waiting: Vec::new(),
    };
    while let Some(tag) = x.child(&root)? {
        match tag.name {
            "step" => t.events.push(TraceEvent {
                at: tag.req_ts("at")?,
                component: tag.req_with("component", |s| RsId::new(s))?,
                what: tag.req_with("what", token)?,
                detail: tag.opt("detail").map(str::to_owned),
            }),
            "waiting" => t.waiting.push(TraceWait {
                component: tag.req_with("component", |s| RsId::new(s))?,
                next_hop: tag.req_with("next-hop", |s| RsId::new(s))?,
                since: tag.req_ts("since")?,
                offered: tag.opt_ts("offered")?,
            }),
            _ => return Err(root.unexpected_child(&tag)),
        }
        x.end(&tag)?;
    }
    x.finish()?;
    Ok(t)
}

/// A component as the application server knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub id: RsId,
    pub version: Option<String>,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    /// The tiers it is reached through, nearest the server last.
    pub via: Vec<RsId>,
    pub state: Option<String>,
    pub tags: Vec<String>,
    /// Why its latest status puts it at risk of losing what it holds
    /// (`control::queue_health::at_risk`), if it does.
    pub at_risk: Option<String>,
    pub status: Option<StatusNode>,
}

pub fn encode_components(list: &[Component]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("components")
        .attr_num("count", list.len() as u64)
        .gt()
        .newline();
    for c in list {
        let via: Vec<&str> = c.via.iter().map(RsId::as_str).collect();
        x.open("component")
            .attr("id", c.id.as_str())
            .attr("kind", c.id.kind().as_str())
            .attr_opt("version", c.version.as_deref())
            .attr_ts("first-seen", c.first_seen)
            .attr_ts("last-seen", c.last_seen)
            .attr("via", &via.join(" "))
            .attr_opt("state", c.state.as_deref())
            .attr("tags", &c.tags.join(" "))
            .attr_opt("at-risk", c.at_risk.as_deref());
        match &c.status {
            Some(s) => {
                x.gt();
                write_node(&mut x, s);
                x.close("component");
            }
            None => {
                x.empty();
            }
        }
        x.newline();
    }
    x.close("components").newline();
    buf
}

pub fn decode_components(bytes: &[u8], limits: &Limits) -> Result<Vec<Component>, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("components")?;
    let mut out = Vec::new();
    while let Some(tag) = x.child(&root)? {
        if tag.name != "component" {
            return Err(root.unexpected_child(&tag));
        }
        let ids = |attr: &'static str| -> Result<Vec<String>, XmlError> {
            Ok(tag
                .opt(attr)
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect())
        };
        let mut via = Vec::new();
        for v in ids("via")? {
            via.push(RsId::new(&v).map_err(|e| tag.bad("via", e.to_string()))?);
        }
        let mut c = Component {
            id: tag.req_with("id", |s| RsId::new(s))?,
            version: tag.opt("version").map(str::to_owned),
            first_seen: tag.req_ts("first-seen")?,
            last_seen: tag.req_ts("last-seen")?,
            via,
            state: tag.opt("state").map(str::to_owned),
            tags: ids("tags")?,
            at_risk: tag.opt("at-risk").map(str::to_owned),
            status: None,
        };
        while let Some(s) = x.child(&tag)? {
            if s.name != "status" || c.status.is_some() {
                return Err(tag.unexpected_child(&s));
            }
            c.status = Some(read_node(&mut x, &s)?);
        }
        out.push(c);
    }
    x.finish()?;
    Ok(out)
}

/// A farm of MLMs (one ID, several members on one database) as its latest
/// status showed it: `GET /rs/v1/control/farms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Farm {
    pub id: RsId,
    /// When the server last heard from any member.
    pub last_seen: Timestamp,
    /// The farm's health at the server (the heartbeat monitor's).
    pub state: Option<String>,
    /// The tiers it is reached through, farthest first.
    pub via: Vec<RsId>,
    pub members: Vec<FarmMember>,
}

/// One member of a [`Farm`], with the load it last recorded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FarmMember {
    pub name: String,
    /// `ok`, or `failed` once silent for the farm's late time.
    pub state: String,
    pub since: Option<Timestamp>,
    /// Its last beat in the farm's database.
    pub seen: Option<Timestamp>,
    /// Envelopes it was handling (held long polls among them).
    pub in_hand: u64,
    /// Envelopes received since it started.
    pub envelopes: u64,
    /// Messages it forwarded upstream since it started.
    pub forwarded: u64,
}

impl FarmMember {
    /// A member from its node in a farm's status tree (`kind="member"`).
    pub fn from_status(n: &StatusNode) -> Option<FarmMember> {
        if n.kind != "member" {
            return None;
        }
        let metric = |k: &str| {
            n.metrics
                .iter()
                .find(|d| d.name == k)
                .map(|d| d.value.as_str())
        };
        let num = |k: &str| metric(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Some(FarmMember {
            name: n.name.clone()?,
            state: n.state.as_str().to_owned(),
            since: n.since,
            seen: metric("seen").and_then(|v| Timestamp::parse(v).ok()),
            in_hand: num("envelopes.in_hand"),
            envelopes: num("envelopes.received"),
            forwarded: num("messages.forwarded"),
        })
    }
}

pub fn encode_farms(list: &[Farm]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("farms")
        .attr_num("count", list.len() as u64)
        .gt()
        .newline();
    for f in list {
        let via: Vec<&str> = f.via.iter().map(RsId::as_str).collect();
        let ok = f.members.iter().filter(|m| m.state == "ok").count();
        x.open("farm")
            .attr("id", f.id.as_str())
            .attr("kind", f.id.kind().as_str())
            .attr_ts("last-seen", f.last_seen)
            .attr("via", &via.join(" "))
            .attr_opt("state", f.state.as_deref())
            .attr_num("members", f.members.len() as u64)
            .attr_num("ok", ok as u64)
            .gt()
            .newline();
        for m in &f.members {
            x.open("farm-member")
                .attr("name", &m.name)
                .attr("state", &m.state)
                .attr_ts_opt("since", m.since)
                .attr_ts_opt("seen", m.seen)
                .attr_num("in-hand", m.in_hand)
                .attr_num("envelopes", m.envelopes)
                .attr_num("forwarded", m.forwarded)
                .empty()
                .newline();
        }
        x.close("farm").newline();
    }
    x.close("farms").newline();
    buf
}

pub fn decode_farms(bytes: &[u8], limits: &Limits) -> Result<Vec<Farm>, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("farms")?;
    let mut out = Vec::new();
    while let Some(tag) = x.child(&root)? {
        if tag.name != "farm" {
            return Err(root.unexpected_child(&tag));
        }
        let mut via = Vec::new();
        for v in tag.opt("via").unwrap_or("").split_whitespace() {
            via.push(RsId::new(v).map_err(|e| tag.bad("via", e.to_string()))?);
        }
        let mut f = Farm {
            id: tag.req_with("id", |s| RsId::new(s))?,
            last_seen: tag.req_ts("last-seen")?,
            state: tag.opt("state").map(str::to_owned),
            via,
            members: Vec::new(),
        };
        while let Some(m) = x.child(&tag)? {
            if m.name != "farm-member" {
                return Err(tag.unexpected_child(&m));
            }
            f.members.push(FarmMember {
                name: m.req("name")?.to_owned(),
                state: m.req("state")?.to_owned(),
                since: m.opt_ts("since")?,
                seen: m.opt_ts("seen")?,
                in_hand: m.opt_u64("in-hand")?.unwrap_or(0),
                envelopes: m.opt_u64("envelopes")?.unwrap_or(0),
                forwarded: m.opt_u64("forwarded")?.unwrap_or(0),
            });
            x.end(&m)?;
        }
        out.push(f);
    }
    x.finish()?;
    Ok(out)
}

/// A subscription, as `POST /rs/v1/control/subscriptions` takes it: which
/// stored messages (every attribute given must match) and how they are
/// delivered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscriptionDef {
    pub name: String,
    pub class: Option<String>,
    pub subclass: Option<String>,
    pub customer: Option<String>,
    pub source: Option<RsId>,
    pub kind: Option<String>,
    pub min_severity: Option<crate::model::Severity>,
    pub delivery: Delivery,
}

/// How a subscription's messages are delivered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Delivery {
    /// POST of each message's XML to this URL, in order, retried.
    Webhook(String),
    /// Pulled by the subscriber (`GET .../feed?after=`); nothing is pushed.
    #[default]
    Feed,
    /// Handed to the built-in service module of this name (configured in
    /// the appserver's TOML), in order, retried.
    Module(String),
}

impl Delivery {
    pub fn as_str(&self) -> &'static str {
        match self {
            Delivery::Webhook(_) => "webhook",
            Delivery::Feed => "feed",
            Delivery::Module(_) => "module",
        }
    }
}

pub fn encode_subscription(s: &SubscriptionDef) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    write_subscription(&mut x, s, None);
    x.newline();
    buf
}

/// Writes one `<subscription>`; with counts (pending, done, failed).
pub fn write_subscription(
    x: &mut XmlOut<'_>,
    s: &SubscriptionDef,
    counts: Option<(u64, u64, u64)>,
) {
    x.open("subscription")
        .attr("name", &s.name)
        .attr_opt("class", s.class.as_deref())
        .attr_opt("sub", s.subclass.as_deref())
        .attr_opt("customer", s.customer.as_deref())
        .attr_opt("source", s.source.as_ref().map(RsId::as_str))
        .attr_opt("type", s.kind.as_deref())
        .attr_opt(
            "min-severity",
            s.min_severity.map(crate::model::Severity::as_str),
        )
        .attr("delivery", s.delivery.as_str());
    match &s.delivery {
        Delivery::Webhook(u) => {
            x.attr("url", u);
        }
        Delivery::Module(m) => {
            x.attr("module", m);
        }
        Delivery::Feed => {}
    }
    if let Some((p, d, f)) = counts {
        x.attr_num("pending", p)
            .attr_num("done", d)
            .attr_num("failed", f);
    }
    x.empty();
}

pub fn decode_subscription(bytes: &[u8], limits: &Limits) -> Result<SubscriptionDef, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("subscription")?;
    let delivery = root.req("delivery")?;
    let url = root.opt_with("url", notify_url)?;
    let module = root.opt_with("module", token)?;
    let delivery = match (delivery, url, module) {
        ("webhook", Some(u), None) => Delivery::Webhook(u),
        ("feed", None, None) => Delivery::Feed,
        ("module", None, Some(m)) => Delivery::Module(m),
        _ => {
            return Err(root.bad(
                "delivery",
                "webhook (with a url), module (with a module name) or feed (with neither)",
            ));
        }
    };
    let s = SubscriptionDef {
        name: root.req_with("name", token)?,
        class: root.opt_with("class", token)?,
        subclass: root.opt_with("sub", token)?,
        customer: root.opt_with("customer", |s| {
            CustomerId::new(s).map(|c| c.as_str().to_owned())
        })?,
        source: root.opt_with("source", |s| RsId::new(s))?,
        kind: root.opt_with("type", |s| {
            crate::model::ContentKind::parse(s)
                .map(|k| k.as_str().to_owned())
                .ok_or("not a content type")
        })?,
        min_severity: root.opt_with("min-severity", |s| {
            crate::model::Severity::parse(s).ok_or("critical, major, minor, warning or info")
        })?,
        delivery,
    };
    x.end(&root)?;
    x.finish()?;
    Ok(s)
}

/// `POST /tokens`: an API token to make, for an admin without a client
/// certificate (a script, or the web portal's login).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Unique among the server's tokens; the audit log names its
    /// requests `token:NAME`.
    pub name: String,
    /// `*` (every customer), or customer IDs separated by commas.
    pub customers: String,
    /// How long it is good for (default 90, at most 366).
    pub days: Option<u64>,
}

/// An API token as the server lists it; `secret` only in the answer that
/// made it (the server keeps its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub customers: String,
    pub created: Timestamp,
    pub created_by: String,
    pub expires: Timestamp,
    pub revoked: Option<Timestamp>,
    pub secret: Option<String>,
}

/// The longest a token may be made good for.
pub const MAX_TOKEN_DAYS: u64 = 366;

/// `customers` of a token: `*`, or customer IDs separated by commas.
fn token_customers(s: &str) -> Result<String, String> {
    if s.trim() == "*" {
        return Ok("*".into());
    }
    let list: Vec<String> = s
        .split(',')
        .map(str::trim)
        .map(|c| {
            CustomerId::new(c)
                .map(|_| c.to_owned())
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err("`*` or customer IDs separated by commas".into());
    }
    Ok(list.join(","))
}

pub fn encode_token_request(r: &TokenRequest) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("token")
        .attr("name", &r.name)
        .attr("customers", &r.customers)
        .attr_num_opt("days", r.days)
        .empty()
        .newline();
    buf
}

pub fn decode_token_request(bytes: &[u8], limits: &Limits) -> Result<TokenRequest, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("token")?;
    let r = TokenRequest {
        name: root.req_with("name", token)?,
        customers: root.req_with("customers", token_customers)?,
        days: root.opt_with("days", |s| {
            super::xml::parse_u64(s)
                .map_err(str::to_owned)
                .and_then(|d| {
                    if (1..=MAX_TOKEN_DAYS).contains(&d) {
                        Ok(d)
                    } else {
                        Err(format!("from 1 to {MAX_TOKEN_DAYS}"))
                    }
                })
        })?,
    };
    if let Some(c) = x.child(&root)? {
        return Err(root.unexpected_child(&c));
    }
    x.finish()?;
    Ok(r)
}

fn write_token(x: &mut XmlOut<'_>, t: &ApiToken) {
    x.open("token")
        .attr("name", &t.name)
        .attr("customers", &t.customers)
        .attr_ts("created", t.created)
        .attr("created-by", &t.created_by)
        .attr_ts("expires", t.expires)
        .attr_ts_opt("revoked", t.revoked)
        .attr_opt("secret", t.secret.as_deref())
        .empty()
        .newline();
}

/// `<tokens>`: the server's API tokens (without secrets), or the one just
/// made (with its secret).
pub fn encode_tokens(list: &[ApiToken]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("tokens")
        .attr_num("count", list.len() as u64)
        .gt()
        .newline();
    for t in list {
        write_token(&mut x, t);
    }
    x.close("tokens").newline();
    buf
}

pub fn decode_tokens(bytes: &[u8], limits: &Limits) -> Result<Vec<ApiToken>, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("tokens")?;
    let mut out = Vec::new();
    while let Some(t) = x.child(&root)? {
        if t.name != "token" {
            return Err(root.unexpected_child(&t));
        }
        let ts = |s: &str| Timestamp::parse(s);
        out.push(ApiToken {
            name: t.req_with("name", token)?,
            customers: t.req_with("customers", token_customers)?,
            created: t.req_with("created", ts)?,
            created_by: t.req_with("created-by", |s| Ok::<_, String>(s.to_owned()))?,
            expires: t.req_with("expires", ts)?,
            revoked: t.opt_with("revoked", ts)?,
            secret: t.opt_with("secret", |s| Ok::<_, String>(s.to_owned()))?,
        });
        x.end(&t)?;
    }
    x.finish()?;
    Ok(out)
}

/// How a rollout's destinations are split into waves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waves {
    /// Waves of these sizes, in order: a count, or a percentage of all the
    /// destinations (each wave takes the next ones, by ID; the last wave
    /// takes the rest).
    Sizes(Vec<WaveSize>),
    /// One wave per customer.
    Customer,
    /// One wave per MLM the destinations are reached through (those
    /// reached directly are one wave of their own).
    Mlm,
}

/// The size of one wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSize {
    Count(u32),
    Percent(u8),
}

impl WaveSize {
    /// How many of `total` destinations it takes.
    pub fn of(self, total: usize) -> usize {
        match self {
            WaveSize::Count(n) => n as usize,
            WaveSize::Percent(p) => (total * usize::from(p)).div_ceil(100),
        }
    }
}

/// `POST /rollouts`: one control action sent to destinations wave by
/// wave, each wave started only once the one before succeeded well
/// enough; halted by errors and by silence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRequest {
    pub name: String,
    pub to: Vec<RsId>,
    pub groups: Vec<String>,
    pub waves: Waves,
    /// The share of a wave (percent) that must succeed before the next
    /// wave starts (default 100).
    pub success_pct: u8,
    /// The rollout halts when more than this many destinations of a wave
    /// failed, expired or stayed silent (default 0).
    pub max_failed: u32,
    /// A destination of the running wave that has not finished this long
    /// after the wave started counts as failed (default 600).
    pub silence_secs: u64,
    /// Each next wave waits for `POST /rollouts/{id}/approve` (default:
    /// it starts by itself).
    pub approve: bool,
    pub payload: RolloutPayload,
}

/// What a rollout sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutPayload {
    /// A control action (`<control>`).
    Action(ControlAction),
    /// A published file offered for download (`<publish file class
    /// sub>`, as `POST /offer` offers it).
    File {
        sha256: [u8; 32],
        class: String,
        sub: String,
    },
}

impl RolloutPayload {
    /// The name its jobs carry: the action's, or `offer`.
    pub fn name(&self) -> &'static str {
        match self {
            RolloutPayload::Action(a) => a.name(),
            RolloutPayload::File { .. } => "offer",
        }
    }
}

/// A rollout's `waves`: sizes separated by commas, each a count or a
/// percentage (`1,10%,100%`).
pub fn parse_waves(s: &str) -> Result<Vec<WaveSize>, String> {
    let sizes: Vec<WaveSize> = s
        .split(',')
        .map(str::trim)
        .map(|w| match w.strip_suffix('%') {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .map(WaveSize::Percent)
                .ok_or_else(|| format!("{w:?}: a percentage from 1% to 100%")),
            None => w
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .map(WaveSize::Count)
                .ok_or_else(|| format!("{w:?}: a count (1 or more) or a percentage")),
        })
        .collect::<Result<_, _>>()?;
    if sizes.is_empty() || sizes.len() > 100 {
        return Err("1 to 100 wave sizes separated by commas".into());
    }
    Ok(sizes)
}

fn waves_text(w: &[WaveSize]) -> String {
    w.iter()
        .map(|s| match s {
            WaveSize::Count(n) => n.to_string(),
            WaveSize::Percent(p) => format!("{p}%"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn encode_rollout_request(r: &RolloutRequest) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    let mut x = XmlOut::document(&mut buf);
    x.open("rollout").attr("name", &r.name);
    match &r.waves {
        Waves::Sizes(s) => x.attr("waves", &waves_text(s)),
        Waves::Customer => x.attr("by", "customer"),
        Waves::Mlm => x.attr("by", "mlm"),
    };
    x.attr_num("success-pct", u64::from(r.success_pct))
        .attr_num("max-failed", u64::from(r.max_failed))
        .attr_num("silence-secs", r.silence_secs)
        .attr("advance", if r.approve { "approve" } else { "auto" })
        .gt()
        .newline();
    write_to(&mut x, &r.to, &r.groups);
    match &r.payload {
        RolloutPayload::Action(a) => {
            let control = super::encode_control(a);
            let body = control.strip_prefix(super::xml::DECL).unwrap_or(&control);
            x.buf.extend_from_slice(body);
        }
        RolloutPayload::File { sha256, class, sub } => {
            x.open("publish")
                .attr("file", &super::sha256_hex(sha256))
                .attr("class", class)
                .attr("sub", sub)
                .empty()
                .newline();
        }
    }
    x.close("rollout").newline();
    buf
}

/// Decodes `<rollout>`: its name and rules, at least one `<to>`, then one
/// `<control>` or `<publish>`.
pub fn decode_rollout_request(bytes: &[u8], limits: &Limits) -> Result<RolloutRequest, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("rollout")?;
    let name = root.req_with("name", token)?;
    let waves = match (root.opt_with("waves", parse_waves)?, root.opt("by")) {
        (Some(s), None) => Waves::Sizes(s),
        (None, Some("customer")) => Waves::Customer,
        (None, Some("mlm")) => Waves::Mlm,
        (None, None) => Waves::Sizes(vec![WaveSize::Percent(100)]),
        (Some(_), Some(_)) => {
            return Err(root.bad("by", "give waves or by, not both"));
        }
        (None, Some(other)) => {
            return Err(root.bad("by", format!("{other:?}: customer or mlm")));
        }
    };
    let success_pct = root
        .opt_with("success-pct", |s| {
            s.parse::<u8>()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or("a percentage from 1 to 100")
        })?
        .unwrap_or(100);
    let max_failed = root
        .opt_with("max-failed", |s| s.parse::<u32>().map_err(|_| "a count"))?
        .unwrap_or(0);
    let silence_secs = root
        .opt_with("silence-secs", |s| {
            s.parse::<u64>()
                .ok()
                .filter(|t| (1..=30 * 86_400).contains(t))
                .ok_or("seconds from 1 to 2592000 (30 days)")
        })?
        .unwrap_or(600);
    let approve = match root.opt("advance") {
        None | Some("auto") => false,
        Some("approve") => true,
        Some(other) => return Err(root.bad("advance", format!("{other:?}: auto or approve"))),
    };
    let (mut to, mut groups) = (Vec::new(), Vec::new());
    let mut action = None;
    while let Some(tag) = x.child(&root)? {
        match tag.name {
            "to" if action.is_none() => read_to(&mut x, &tag, &mut to, &mut groups)?,
            "control" if action.is_none() => {
                action = Some(RolloutPayload::Action(control_body(&mut x, &tag)?));
            }
            "publish" if action.is_none() => {
                action = Some(RolloutPayload::File {
                    sha256: tag.req_with("file", super::parse_sha256)?,
                    class: tag.req_with("class", token)?,
                    sub: tag.req_with("sub", token)?,
                });
                x.end(&tag)?;
            }
            _ => return Err(root.unexpected_child(&tag)),
        }
    }
    x.finish()?;
    if to.is_empty() && groups.is_empty() {
        return Err(XmlError::MissingElement {
            element: "rollout".into(),
            child: "to",
        });
    }
    Ok(RolloutRequest {
        name,
        to,
        groups,
        waves,
        success_pct,
        max_failed,
        silence_secs,
        approve,
        payload: action.ok_or(XmlError::MissingElement {
            element: "rollout".into(),
            child: "control",
        })?,
    })
}

/// One wave of a rollout as the server shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutWave {
    /// From 1.
    pub n: u32,
    /// `not-sent`, `running`, `succeeded`, `halted` (it stopped the
    /// rollout) or `done`.
    pub state: String,
    pub job: Option<String>,
    pub started: Option<Timestamp>,
    /// Each destination and its state: a job target's (`pending`,
    /// `delivered`, `succeeded`, `failed`, `expired`), or `not-sent`.
    pub members: Vec<(RsId, String)>,
}

/// A rollout as the server shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub id: String,
    pub name: String,
    pub action: String,
    /// `running`, `waiting` (for approval), `paused`, `halted`,
    /// `succeeded`, `completed` (every wave sent, some after a halt was
    /// resumed) or `aborted`.
    pub state: String,
    /// The wave running or last run, from 1.
    pub wave: u32,
    pub reason: Option<String>,
    pub created: Timestamp,
    pub created_by: String,
    pub waves: Vec<RolloutWave>,
}

fn write_rollout(x: &mut XmlOut<'_>, r: &Rollout, with_waves: bool) {
    x.open("rollout")
        .attr("id", &r.id)
        .attr("name", &r.name)
        .attr("action", &r.action)
        .attr("state", &r.state)
        .attr_num("wave", u64::from(r.wave))
        .attr_num("waves", r.waves.len() as u64)
        .attr_opt("reason", r.reason.as_deref())
        .attr_ts("created", r.created)
        .attr("created-by", &r.created_by);
    if !with_waves {
        x.empty().newline();
        return;
    }
    x.gt().newline();
    for w in &r.waves {
        x.open("wave")
            .attr_num("n", u64::from(w.n))
            .attr("state", &w.state)
            .attr_opt("job", w.job.as_deref())
            .attr_ts_opt("started", w.started)
            .gt()
            .newline();
        for (id, state) in &w.members {
            x.open("member")
                .attr("id", id.as_str())
                .attr("state", state)
                .empty()
                .newline();
        }
        x.close("wave").newline();
    }
    x.close("rollout").newline();
}

/// `<rollout>` with its waves and each destination's state.
pub fn encode_rollout(r: &Rollout) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    write_rollout(&mut x, r, true);
    buf
}

/// `<rollouts>`: without their waves.
pub fn encode_rollouts(list: &[Rollout]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("rollouts")
        .attr_num("count", list.len() as u64)
        .gt()
        .newline();
    for r in list {
        write_rollout(&mut x, r, false);
    }
    x.close("rollouts").newline();
    buf
}

/// Decodes `<rollout>` as the server answers it.
pub fn decode_rollout(bytes: &[u8], limits: &Limits) -> Result<Rollout, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("rollout")?;
    let ts = |s: &str| Timestamp::parse(s);
    let text = |s: &str| Ok::<_, String>(s.to_owned());
    let mut r = Rollout {
        id: root.req_with("id", text)?,
        name: root.req_with("name", text)?,
        action: root.req_with("action", text)?,
        state: root.req_with("state", text)?,
        wave: root.req_with("wave", |s| s.parse::<u32>().map_err(|_| "a number"))?,
        reason: root.opt_with("reason", text)?,
        created: root.req_with("created", ts)?,
        created_by: root.req_with("created-by", text)?,
        waves: Vec::new(),
    };
    while let Some(w) = x.child(&root)? {
        if w.name != "wave" {
            return Err(root.unexpected_child(&w));
        }
        let mut wave = RolloutWave {
            n: w.req_with("n", |s| s.parse::<u32>().map_err(|_| "a number"))?,
            state: w.req_with("state", text)?,
            job: w.opt_with("job", text)?,
            started: w.opt_with("started", ts)?,
            members: Vec::new(),
        };
        while let Some(m) = x.child(&w)? {
            if m.name != "member" {
                return Err(w.unexpected_child(&m));
            }
            wave.members.push((
                m.req_with("id", |s| RsId::new(s))?,
                m.req_with("state", text)?,
            ));
            x.end(&m)?;
        }
        r.waves.push(wave);
    }
    x.finish()?;
    Ok(r)
}
