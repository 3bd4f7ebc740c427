//! Service modules of the intermediate MLM (seed 004, Figs. 16A/B): each
//! forward message passes the configured modules in order, which may
//! modify it, discard it, or take it into an aggregation group.
//!
//! Modules implement [`ServiceModule`]: `inspect` is the per-message phase
//! (before the throttle and forwarding), `tick` the periodic phase. The
//! built-in modules come from the `[[filter]]`, `[[modify]]`,
//! `[[drop_repeats]]` and `[[aggregate]]` tables of `mlm.toml`, applied in
//! that order.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use rs_protocol::codec::{Limits, RawMessage, is_token};
use rs_protocol::model::{Content, ContentKind, Detail, MAX_PRECEDENCE, Message, Severity};
use rs_protocol::{RsId, Timestamp};

use serde::{Deserialize, Serialize};

/// A forward message as modules see it: the header at once, the content
/// decoded only if a module asks for it.
#[derive(Debug)]
pub struct View {
    pub raw: RawMessage,
    decoded: Option<Option<Message>>,
    content_changed: bool,
}

impl View {
    pub fn new(raw: RawMessage) -> Self {
        View {
            raw,
            decoded: None,
            content_changed: false,
        }
    }

    /// The decoded message (`None` if its content does not decode; the
    /// application server will refuse it).
    pub fn message(&mut self) -> Option<&mut Message> {
        if self.decoded.is_none() {
            self.decoded = Some(self.raw.clone().decode(&Limits::default()).ok());
        }
        self.decoded.as_mut().and_then(Option::as_mut)
    }

    pub fn severity(&mut self) -> Option<Severity> {
        match &self.message()?.content {
            Content::Alarm(a) => Some(a.severity),
            Content::Event(e) => Some(e.severity),
            _ => None,
        }
    }

    /// Marks the decoded content as changed, so it is re-encoded.
    pub fn content_changed(&mut self) {
        self.content_changed = true;
    }

    /// The message to forward: the raw one, or re-encoded if a module
    /// changed its content.
    pub fn into_raw(self) -> RawMessage {
        match (self.content_changed, self.decoded) {
            (true, Some(Some(mut m))) => {
                m.header = self.raw.header;
                m.to_raw()
            }
            _ => self.raw,
        }
    }
}

/// What a module decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// On to the next module, then upstream.
    Pass,
    /// Accepted and dropped here (counted).
    Discard(&'static str),
    /// Accepted into aggregation group `group` of rule `rule`; the alarm's
    /// severity and text, read by the module, go into the summary.
    Aggregate {
        rule: usize,
        group: String,
        severity: Severity,
        text: String,
    },
}

/// A service module of the MLM.
pub trait ServiceModule: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Per-message phase; may change the message.
    fn inspect(&self, m: &mut View, now: Timestamp) -> Verdict;
    /// Periodic phase (housekeeping).
    fn tick(&self, _now: Timestamp) {}
}

// The rules as configured (`[[filter]]`, `[[modify]]`, `[[aggregate]]`,
// `[[drop_repeats]]` in the MLM's TOML).

/// Which messages a rule applies to; every field given must match.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub class: Option<String>,
    pub subclass: Option<String>,
    /// Content type: alarm, event, response, bulk-request, bulk-response, data.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Alarms and events less severe than this match (e.g. "warning"
    /// matches warning and info).
    pub severity_at_most: Option<String>,
    /// Alarms and events at least this severe match.
    pub severity_at_least: Option<String>,
    /// The source component, or a component it was allocated under.
    pub source: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterRule {
    #[serde(flatten)]
    pub when: Match,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModifyRule {
    #[serde(flatten)]
    pub when: Match,
    pub set_precedence: Option<u8>,
    pub set_class: Option<String>,
    pub set_subclass: Option<String>,
    /// Alarms and events: replace the severity.
    pub set_severity: Option<String>,
    /// Add a detail NAME=VALUE to alarms and events.
    pub add_detail: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateRule {
    #[serde(flatten)]
    pub when: Match,
    /// Seconds from the first alarm of a group to its summary.
    pub window_secs: u64,
    /// Alarms with the same value of this are one group: "key" (the
    /// integrator's alarm key), "source", or "class" (class/subclass).
    #[serde(default = "default_group")]
    pub group_by: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepeatRule {
    #[serde(flatten)]
    pub when: Match,
    pub window_secs: u64,
}

fn default_group() -> String {
    "key".into()
}

/// A compiled [`Match`].
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    class: Option<String>,
    subclass: Option<String>,
    kind: Option<ContentKind>,
    at_most: Option<Severity>,
    at_least: Option<Severity>,
    source: Option<RsId>,
}

fn severity(s: &Option<String>, what: &str) -> Result<Option<Severity>, String> {
    s.as_deref()
        .map(|v| {
            Severity::parse(v).ok_or_else(|| {
                format!("{what} {v:?}: one of critical, major, minor, warning, info")
            })
        })
        .transpose()
}

impl Matcher {
    pub fn compile(m: &Match) -> Result<Self, String> {
        Ok(Matcher {
            class: m.class.clone(),
            subclass: m.subclass.clone(),
            kind: m
                .kind
                .as_deref()
                .map(|k| {
                    ContentKind::parse(k).ok_or_else(|| format!("type {k:?} is not a content type"))
                })
                .transpose()?,
            at_most: severity(&m.severity_at_most, "severity_at_most")?,
            at_least: severity(&m.severity_at_least, "severity_at_least")?,
            source: m
                .source
                .as_deref()
                .map(|s| RsId::new(s).map_err(|e| format!("source {s:?}: {e}")))
                .transpose()?,
        })
    }

    pub fn matches(&self, v: &mut View) -> bool {
        let h = &v.raw.header;
        if self.class.as_ref().is_some_and(|c| *c != h.class.class)
            || self
                .subclass
                .as_ref()
                .is_some_and(|c| *c != h.class.subclass)
            || self.kind.is_some_and(|k| k != v.raw.kind)
        {
            return false;
        }
        if let Some(src) = &self.source
            && !h.source().is_some_and(|s| s.component.is_within(src))
        {
            return false;
        }
        if self.at_most.is_some() || self.at_least.is_some() {
            let Some(sev) = v.severity() else {
                return false;
            };
            // Severity orders most severe first.
            if self.at_most.is_some_and(|m| sev < m) || self.at_least.is_some_and(|m| sev > m) {
                return false;
            }
        }
        true
    }
}

/// `[[filter]]`: discard what matches.
#[derive(Debug)]
pub struct Filter(Matcher);

impl ServiceModule for Filter {
    fn name(&self) -> &'static str {
        "filter"
    }
    fn inspect(&self, m: &mut View, _now: Timestamp) -> Verdict {
        if self.0.matches(m) {
            Verdict::Discard("filtered")
        } else {
            Verdict::Pass
        }
    }
}

/// `[[modify]]`: change attributes of what matches.
#[derive(Debug)]
pub struct Modify {
    when: Matcher,
    precedence: Option<u8>,
    class: Option<String>,
    subclass: Option<String>,
    severity: Option<Severity>,
    detail: Option<Detail>,
}

impl ServiceModule for Modify {
    fn name(&self) -> &'static str {
        "modify"
    }
    fn inspect(&self, m: &mut View, _now: Timestamp) -> Verdict {
        if !self.when.matches(m) {
            return Verdict::Pass;
        }
        // Precedence is QoS, outside a seal; class, subclass and content
        // are sealed, so a sealed message keeps them (changing them would
        // make the server refuse the seal).
        let sealed = m.raw.seal().is_some();
        if let Some(p) = self.precedence
            && let rs_protocol::Route::Source(s) = &mut m.raw.header.route
        {
            s.qos.precedence = p;
        }
        if sealed {
            return Verdict::Pass;
        }
        if let Some(c) = &self.class {
            m.raw.header.class.class = c.as_str().into();
        }
        if let Some(c) = &self.subclass {
            m.raw.header.class.subclass = c.as_str().into();
        }
        if self.severity.is_some() || self.detail.is_some() {
            let (sev, det) = (self.severity, self.detail.clone());
            let mut changed = false;
            if let Some(msg) = m.message() {
                match &mut msg.content {
                    Content::Alarm(a) => {
                        if let Some(s) = sev {
                            a.severity = s;
                        }
                        a.details.extend(det);
                        changed = true;
                    }
                    Content::Event(e) => {
                        if let Some(s) = sev {
                            e.severity = s;
                        }
                        e.details.extend(det);
                        changed = true;
                    }
                    _ => {}
                }
            }
            if changed {
                m.content_changed();
            }
        }
        Verdict::Pass
    }
}

/// `[[drop_repeats]]`: discard a message identical to one seen from the
/// same source within the window. Best effort: the memory is bounded and
/// not kept across restarts (a repeat then passes, which is harmless).
#[derive(Debug)]
pub struct DropRepeats {
    when: Matcher,
    window: Duration,
    seen: Mutex<HashMap<u64, Timestamp>>,
}

const MAX_REMEMBERED: usize = 100_000;

fn fingerprint(v: &mut View) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let hd = &v.raw.header;
    hd.source().map(|s| s.component.as_str()).hash(&mut h);
    hd.class.class.hash(&mut h);
    hd.class.subclass.hash(&mut h);
    v.raw.kind.hash(&mut h);
    match v.message().map(|m| &m.content) {
        Some(Content::Alarm(a)) => {
            (a.severity, a.state.as_str(), &a.key, &a.instance, &a.text).hash(&mut h);
        }
        Some(Content::Event(e)) => {
            (e.severity, &e.kind, &e.instance, &e.text).hash(&mut h);
        }
        _ => v.raw.content.hash(&mut h),
    }
    h.finish()
}

impl ServiceModule for DropRepeats {
    fn name(&self) -> &'static str {
        "drop_repeats"
    }
    fn inspect(&self, m: &mut View, now: Timestamp) -> Verdict {
        if !self.when.matches(m) {
            return Verdict::Pass;
        }
        let fp = fingerprint(m);
        let Ok(mut seen) = self.seen.lock() else {
            return Verdict::Pass;
        };
        match seen.get(&fp) {
            Some(t) if now.since(*t) < self.window => Verdict::Discard("repeat"),
            _ => {
                if seen.len() < MAX_REMEMBERED {
                    seen.insert(fp, now);
                }
                Verdict::Pass
            }
        }
    }
    fn tick(&self, now: Timestamp) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.retain(|_, t| now.since(*t) < self.window);
        }
    }
}

/// `[[aggregate]]`: alarms that match are accepted into a durable group
/// (see [`crate::aggregate`]) and replaced by one summary per window.
#[derive(Debug)]
pub struct Aggregate {
    pub rule: usize,
    when: Matcher,
    pub window: Duration,
    group_by: String,
}

impl ServiceModule for Aggregate {
    fn name(&self) -> &'static str {
        "aggregate"
    }
    fn inspect(&self, m: &mut View, _now: Timestamp) -> Verdict {
        // A sealed alarm cannot be read here, so it cannot be summarised:
        // it goes on whole (only the application server opens it). An
        // alarm whose content does not decode goes on too; the server
        // answers for it, a forwarder never refuses what it cannot read.
        if m.raw.kind != ContentKind::Alarm || m.raw.seal().is_some() || !self.when.matches(m) {
            return Verdict::Pass;
        }
        let h = &m.raw.header;
        let class = format!("{}/{}", h.class.class, h.class.subclass);
        let source = h.source().map(|s| s.component.to_string());
        let Some(Content::Alarm(a)) = m.message().map(|m| &m.content) else {
            return Verdict::Pass;
        };
        let group = match self.group_by.as_str() {
            "source" => source.unwrap_or_default(),
            "class" => class,
            _ => a.key.clone().unwrap_or(class),
        };
        Verdict::Aggregate {
            rule: self.rule,
            group,
            severity: a.severity,
            text: a.text.clone(),
        }
    }
}

/// The modules these rules configure, in application order.
pub fn build(
    filter: &[FilterRule],
    modify: &[ModifyRule],
    drop_repeats: &[RepeatRule],
    aggregate: &[AggregateRule],
) -> Result<Vec<Box<dyn ServiceModule>>, String> {
    let mut out: Vec<Box<dyn ServiceModule>> = Vec::new();
    for (i, f) in filter.iter().enumerate() {
        out.push(Box::new(Filter(
            Matcher::compile(&f.when).map_err(|e| format!("filter {i}: {e}"))?,
        )));
    }
    for (i, m) in modify.iter().enumerate() {
        let err = |e: String| format!("modify {i}: {e}");
        if m.set_precedence.is_some_and(|p| p > MAX_PRECEDENCE) {
            return Err(err("set_precedence must be 0 to 9".into()));
        }
        for t in [&m.set_class, &m.set_subclass].into_iter().flatten() {
            if !is_token(t) {
                return Err(err(format!("{t:?} is not a token")));
            }
        }
        let detail = match &m.add_detail {
            None => None,
            Some(d) => {
                let (k, v) = d
                    .split_once('=')
                    .ok_or_else(|| err(format!("add_detail {d:?} is not NAME=VALUE")))?;
                if !is_token(k) {
                    return Err(err(format!("detail name {k:?} is not a token")));
                }
                Some(Detail::new(k, v))
            }
        };
        out.push(Box::new(Modify {
            when: Matcher::compile(&m.when).map_err(err)?,
            precedence: m.set_precedence,
            class: m.set_class.clone(),
            subclass: m.set_subclass.clone(),
            severity: severity(&m.set_severity, "set_severity").map_err(err)?,
            detail,
        }));
    }
    for (i, r) in drop_repeats.iter().enumerate() {
        if r.window_secs == 0 {
            return Err(format!("drop_repeats {i}: window_secs must be at least 1"));
        }
        out.push(Box::new(DropRepeats {
            when: Matcher::compile(&r.when).map_err(|e| format!("drop_repeats {i}: {e}"))?,
            window: Duration::from_secs(r.window_secs),
            seen: Mutex::new(HashMap::new()),
        }));
    }
    for (i, a) in aggregate.iter().enumerate() {
        if a.window_secs == 0 {
            return Err(format!("aggregate {i}: window_secs must be at least 1"));
        }
        if !["key", "source", "class"].contains(&a.group_by.as_str()) {
            return Err(format!(
                "aggregate {i}: group_by must be key, source or class"
            ));
        }
        out.push(Box::new(Aggregate {
            rule: i,
            when: Matcher::compile(&a.when).map_err(|e| format!("aggregate {i}: {e}"))?,
            window: Duration::from_secs(a.window_secs),
            group_by: a.group_by.clone(),
        }));
    }
    Ok(out)
}
