//! Throttle control (seed 004, the throttle paragraph; Figs. 14-16, 22-23):
//! every tier decides from static rules and dynamic usage whether a
//! message may go (a sender), or may come in (a forwarder or the
//! application server), now.
//!
//! A rule matches messages by customer, component, class and type, keeps
//! a separate allowance per customer, per component, per class or one for
//! all, and limits them by any of:
//! - a time-of-day window in a time zone (`window = "22:00-06:00"`,
//!   `time_zone = "Europe/Berlin"`; across midnight and DST changes);
//! - a rate in messages/s and bytes/s (GCRA, by `governor`, with a burst of
//!   `burst_secs` worth);
//! - a quota of bytes per hour or per day (local to the rule's zone),
//!   counted durably, so a restart does not reset it;
//! - exemptions: alarms at least as severe as `exempt_severity`, or
//!   messages of at least `exempt_precedence`, always pass.
//!
//! A message that a rule holds back gets how long to wait and why: a
//! sender keeps it in its spool and tries again then (it never rejects
//! it); a forwarder answers `retry` with code `throttled` and that
//! `retry-after`, so the sender keeps custody.
//!
//! Time comes from the daemon's [`Clock`], so tests run a day in a
//! millisecond.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rs_protocol::ids::RsId;
use rs_protocol::model::{ContentKind, Severity};
use rs_protocol::time::Clock;
use rs_protocol::time::Timestamp;
use rs_store::params;
use rs_store::sql::{Conn, Engine, Location, Migration};

pub use rs_protocol::throttle::{
    Per, Period, Rule, ThrottleConfig, decode_throttle, encode_throttle,
};

/// What the throttle needs to know of a message.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub component: &'a RsId,
    pub class: &'a str,
    pub kind: ContentKind,
    /// Bytes it puts on the wire (header and content parts).
    pub bytes: u64,
    pub precedence: u8,
    /// For alarms, when an exemption by severity needs it.
    pub severity: Option<Severity>,
}

/// The verdict on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admit,
    /// Not now: try again after this long.
    Wait {
        after: Duration,
        why: String,
    },
}

/// Durable usage counters: `(rule, key, period start ms) -> (bytes,
/// messages)`, in the daemon's `throttle.db` or, for a farm, in its
/// PostgreSQL database ([`SqlUsage`]), where the members' counts add up so
/// a farm holds its quotas as a whole.
pub trait UsageStore: Send + Sync + std::fmt::Debug {
    /// Counters for periods starting at or after `since` (ms).
    fn load(&self, since: i64) -> Result<Vec<UsageRow>, String>;
    /// Adds these increments.
    fn add(&self, rows: &[UsageRow]) -> Result<(), String>;
    /// Whether other processes add to the same counters (a farm's): then
    /// every flush reads the totals back.
    fn shared(&self) -> bool {
        false
    }
}

/// One counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub rule: String,
    pub key: String,
    pub period_start: i64,
    pub bytes: u64,
    pub messages: u64,
}

/// A usage counter's key, borrowed: (rule, key, period start).
#[derive(Hash)]
struct CountRef<'a>(&'a str, &'a str, i64);

impl CountRef<'_> {
    fn owned(&self) -> (String, String, i64) {
        (self.0.to_owned(), self.1.to_owned(), self.2)
    }
}

/// Hashes as the owned key does (a tuple's and a tuple struct's fields
/// hash in order, `&str` as `String`).
impl hashbrown::Equivalent<(String, String, i64)> for CountRef<'_> {
    fn equivalent(&self, k: &(String, String, i64)) -> bool {
        self.0 == k.0 && self.1 == k.1 && self.2 == k.2
    }
}

/// A governor clock over the daemon's [`Clock`] (wall milliseconds), so
/// rates follow the same (possibly simulated) time as everything else.
#[derive(Debug, Clone)]
struct GovClock(Arc<dyn Clock>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct GovInstant(u64);

impl std::ops::Add<governor::nanos::Nanos> for GovInstant {
    type Output = Self;
    fn add(self, d: governor::nanos::Nanos) -> Self {
        GovInstant(self.0.saturating_add(d.as_u64()))
    }
}

impl governor::clock::Reference for GovInstant {
    fn duration_since(&self, earlier: Self) -> governor::nanos::Nanos {
        self.0.saturating_sub(earlier.0).into()
    }
    fn saturating_sub(&self, d: governor::nanos::Nanos) -> Self {
        GovInstant(self.0.saturating_sub(d.as_u64()))
    }
}

thread_local! {
    /// The instant (ms) of the check under way on this thread: a check
    /// reads the clock once, and its rate limiters see that instant too.
    static CHECK_NOW: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Sets [`CHECK_NOW`] for as long as it lives.
struct CheckInstant;

impl CheckInstant {
    fn set(now: Timestamp) -> Self {
        CHECK_NOW.set(Some(u64::try_from(now.as_millis()).unwrap_or(0)));
        CheckInstant
    }
}

impl Drop for CheckInstant {
    fn drop(&mut self) {
        CHECK_NOW.set(None);
    }
}

impl governor::clock::Clock for GovClock {
    type Instant = GovInstant;
    fn now(&self) -> GovInstant {
        let ms = CHECK_NOW
            .get()
            .unwrap_or_else(|| u64::try_from(self.0.now().as_millis()).unwrap_or(0));
        GovInstant(ms * 1_000_000)
    }
}

type Limiter = governor::RateLimiter<
    String,
    governor::state::keyed::HashMapStateStore<String>,
    GovClock,
    governor::middleware::NoOpMiddleware<GovInstant>,
>;

/// A time-of-day window, minutes after local midnight: `[start, end)`,
/// across midnight when `end <= start`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: u16,
    end: u16,
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl Window {
    fn parse(s: &str) -> Result<Window, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("window {s:?}: like 22:00-06:00"))?;
        match (parse_hhmm(a), parse_hhmm(b)) {
            (Some(start), Some(end)) if start != end => Ok(Window { start, end }),
            _ => Err(format!(
                "window {s:?}: two different times of day like 22:00-06:00"
            )),
        }
    }

    fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

#[derive(Debug)]
struct Compiled {
    rule: Rule,
    tz: jiff::tz::TimeZone,
    window: Option<Window>,
    exempt_severity: Option<Severity>,
    /// The rule's `component`, parsed once.
    component: Option<RsId>,
    /// Message and byte rates, each with its burst (in cells).
    messages: Option<(Limiter, u32)>,
    bytes: Option<(Limiter, u32)>,
    /// Time-zone arithmetic is the costly part of a check, and its answers
    /// hold for a while, so they are kept, each in one atomic word that a
    /// check reads without a lock: the UTC minute the window was last seen
    /// open in (zone offsets are whole minutes, windows minute-grained;
    /// `(minute + 1) << 1 | open`, 0: nothing kept), and the current quota
    /// period (see [`pack_period`]).
    window_seen: AtomicU64,
    period: AtomicU64,
}

/// A quota period `[start, end)` in one word: start and length in whole
/// minutes (`start << 32 | length`). `None` for one that is not whole
/// minutes or before 1970 (it is not kept, but worked out each time).
fn pack_period((start, end): (i64, i64)) -> Option<u64> {
    if start % 60_000 != 0 || end % 60_000 != 0 {
        return None;
    }
    let s = u32::try_from(start / 60_000).ok()?;
    let len = u32::try_from((end - start) / 60_000)
        .ok()
        .filter(|&l| l > 0)?;
    Some(u64::from(s) << 32 | u64::from(len))
}

/// [`pack_period`] reversed; `None` for 0 (nothing kept).
fn unpack_period(p: u64) -> Option<(i64, i64)> {
    let start = i64::from(u32::try_from(p >> 32).ok()?) * 60_000;
    let len = i64::from(u32::try_from(p & 0xFFFF_FFFF).ok()?) * 60_000;
    (len > 0).then_some((start, start + len))
}

fn limiter(per_sec: f64, burst_secs: f64, clock: &GovClock) -> Result<(Limiter, u32), String> {
    if !(per_sec.is_finite() && per_sec > 0.0) {
        return Err(format!("a rate must be above 0, not {per_sec}"));
    }
    let period = Duration::from_secs_f64(1.0 / per_sec);
    let burst = (per_sec * burst_secs)
        .round()
        .clamp(1.0, f64::from(u32::MAX)) as u32;
    let quota = governor::Quota::with_period(period)
        .ok_or("the rate is too high")?
        .allow_burst(NonZeroU32::new(burst).ok_or("burst")?);
    Ok((Limiter::hashmap_with_clock(quota, clock.clone()), burst))
}

impl Compiled {
    fn new(rule: Rule, clock: &GovClock) -> Result<Self, String> {
        let name = rule.name.clone();
        let bad = |e: String| format!("throttle rule {name:?}: {e}");
        if name.is_empty() || !rs_protocol::codec::is_token(&name) {
            return Err(format!(
                "throttle rule name {name:?}: a token like night-bulk"
            ));
        }
        let tz = match rule.time_zone.as_deref() {
            None | Some("UTC") => jiff::tz::TimeZone::UTC,
            Some(z) => {
                jiff::tz::TimeZone::get(z).map_err(|e| bad(format!("time zone {z:?}: {e}")))?
            }
        };
        let window = rule
            .window
            .as_deref()
            .map(Window::parse)
            .transpose()
            .map_err(bad)?;
        let exempt_severity = rule
            .exempt_severity
            .as_deref()
            .map(|s| Severity::parse(s).ok_or_else(|| bad(format!("exempt_severity {s:?}"))))
            .transpose()?;
        let component = rule
            .component
            .as_deref()
            .map(|c| RsId::new(c).map_err(|e| bad(format!("component {c:?}: {e}"))))
            .transpose()?;
        if let Some(k) = &rule.kind
            && ContentKind::parse(k).is_none()
        {
            return Err(bad(format!("type {k:?} is not a content type")));
        }
        if rule.quota_period.is_some() && rule.quota_bytes.is_none() {
            return Err(bad("quota_period without quota_bytes".into()));
        }
        let burst = rule.burst_secs.unwrap_or(1.0);
        if !(burst.is_finite() && burst > 0.0) {
            return Err(bad("burst_secs must be above 0".into()));
        }
        let messages = rule
            .messages_per_sec
            .map(|r| limiter(r, burst, clock))
            .transpose()
            .map_err(bad)?;
        let bytes = rule
            .bytes_per_sec
            .map(|r| limiter(r as f64, burst, clock))
            .transpose()
            .map_err(bad)?;
        if messages.is_none() && bytes.is_none() && window.is_none() && rule.quota_bytes.is_none() {
            return Err(bad(
                "limits nothing: give a rate, a quota or a window".into()
            ));
        }
        Ok(Compiled {
            rule,
            tz,
            window,
            exempt_severity,
            component,
            messages,
            bytes,
            window_seen: AtomicU64::new(0),
            period: AtomicU64::new(0),
        })
    }

    fn matches(&self, s: &Subject<'_>) -> bool {
        let r = &self.rule;
        r.customer
            .as_deref()
            .is_none_or(|c| s.component.customer_str() == c)
            && self
                .component
                .as_ref()
                .is_none_or(|c| s.component.is_within(c))
            && r.class.as_deref().is_none_or(|c| s.class == c)
            && r.kind.as_deref().is_none_or(|k| s.kind.as_str() == k)
    }

    fn exempt(&self, s: &Subject<'_>) -> bool {
        self.rule
            .exempt_precedence
            .is_some_and(|p| s.precedence >= p)
            || (s.kind == ContentKind::Alarm
                && matches!((self.exempt_severity, s.severity), (Some(min), Some(sev)) if rank(sev) <= rank(min)))
    }

    /// The allowance a message spends: `s`'s customer, component or class,
    /// or the rule's one.
    fn key<'a>(&self, s: &Subject<'a>) -> &'a str {
        match self.rule.per {
            Per::All => "",
            Per::Customer => s.component.customer_str(),
            Per::Component => s.component.as_str(),
            Per::Class => s.class,
        }
    }

    /// Local wall-clock time in the rule's zone.
    fn local(&self, now: Timestamp) -> jiff::civil::DateTime {
        self.tz.to_datetime(
            jiff::Timestamp::from_millisecond(now.as_millis())
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        )
    }

    /// The instant (ms) of a local time; a time inside a DST gap resolves
    /// to the first valid instant after it, a repeated one to the first.
    fn instant(&self, dt: jiff::civil::DateTime) -> Option<i64> {
        dt.to_zoned_datetime(self.tz.clone())
            .ok()
            .map(|z| z.timestamp().as_millisecond())
    }

    /// Outside the window: how long until it opens.
    fn closed_for(&self, now: Timestamp) -> Option<Duration> {
        let w = self.window?;
        let minute = now.as_millis().div_euclid(60_000);
        let seen = u64::try_from(minute + 1).ok().map(|m| m << 1 | 1);
        if let Some(v) = seen
            && self.window_seen.load(Ordering::Relaxed) == v
        {
            return None;
        }
        let closed = self.closed_for_uncached(w, now);
        if let Some(seen) = seen {
            let open = u64::from(closed.is_none());
            self.window_seen.store(seen & !1 | open, Ordering::Relaxed);
        }
        closed
    }

    fn closed_for_uncached(&self, w: Window, now: Timestamp) -> Option<Duration> {
        let dt = self.local(now);
        let minute =
            u16::try_from(dt.hour()).unwrap_or(0) * 60 + u16::try_from(dt.minute()).unwrap_or(0);
        if w.contains(minute) {
            return None;
        }
        let start = jiff::civil::time(
            i8::try_from(w.start / 60).unwrap_or(0),
            i8::try_from(w.start % 60).unwrap_or(0),
            0,
            0,
        );
        let mut day = dt.date();
        for _ in 0..3 {
            if let Some(mut open) = self.instant(day.to_datetime(start))
                && open > now.as_millis()
            {
                // Inside a DST gap the start time never shows on the wall
                // clock; the window opens when the clock jumps into it, up
                // to two hours earlier: find that minute.
                let open_at = |ms: i64| {
                    let dt = self.tz.to_datetime(
                        jiff::Timestamp::from_millisecond(ms)
                            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
                    );
                    w.contains(
                        u16::try_from(dt.hour()).unwrap_or(0) * 60
                            + u16::try_from(dt.minute()).unwrap_or(0),
                    )
                };
                let mut back = 0;
                while back < 120 && open - 60_000 > now.as_millis() && open_at(open - 60_000) {
                    open -= 60_000;
                    back += 1;
                }
                let ms = open - now.as_millis();
                return Some(Duration::from_millis(u64::try_from(ms).unwrap_or(1).max(1)));
            }
            day = day.tomorrow().unwrap_or(day);
        }
        Some(Duration::from_secs(60))
    }

    /// The quota period containing `now`: (start, end) in ms, local days or
    /// hours of the rule's zone (a DST day is 23 or 25 hours long).
    fn period(&self, now: Timestamp) -> (i64, i64) {
        let t = now.as_millis();
        if let Some((s, e)) = unpack_period(self.period.load(Ordering::Relaxed))
            && (s..e).contains(&t)
        {
            return (s, e);
        }
        let p = self.period_uncached(now);
        if let Some(packed) = pack_period(p) {
            self.period.store(packed, Ordering::Relaxed);
        }
        p
    }

    fn period_uncached(&self, now: Timestamp) -> (i64, i64) {
        let dt = self.local(now);
        let midnight = jiff::civil::time(0, 0, 0, 0);
        let fallback = (now.as_millis(), now.as_millis() + 3_600_000);
        match self.rule.quota_period.unwrap_or_default() {
            Period::Day => {
                let start = self.instant(dt.date().to_datetime(midnight));
                let end = dt
                    .date()
                    .tomorrow()
                    .ok()
                    .and_then(|d| self.instant(d.to_datetime(midnight)));
                match (start, end) {
                    (Some(s), Some(e)) => (s, e),
                    _ => fallback,
                }
            }
            Period::Hour => {
                // Hours are the same everywhere in UTC terms except in
                // zones with sub-hour offsets; count from the local hour.
                let into = i64::from(dt.minute()) * 60_000
                    + i64::from(dt.second()) * 1000
                    + i64::from(dt.subsec_nanosecond()) / 1_000_000;
                let s = now.as_millis() - into;
                (s, s + 3_600_000)
            }
        }
    }
}

fn rank(s: Severity) -> usize {
    Severity::ALL
        .iter()
        .position(|x| *x == s)
        .unwrap_or(usize::MAX)
}

/// Counters of one (rule, key, period).
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    bytes: u64,
    messages: u64,
    /// Not yet written to the store.
    dirty_bytes: u64,
    dirty_messages: u64,
}

/// The throttle of one daemon.
#[derive(Debug)]
pub struct Throttle {
    rules: Vec<Compiled>,
    clock: Arc<dyn Clock>,
    usage: Option<Arc<dyn UsageStore>>,
    /// Usage by (rule, key, period start); looked up with [`CountRef`]
    /// (hashbrown's `Equivalent`: a check allocates no key).
    counts: Mutex<hashbrown::HashMap<(String, String, i64), Count>>,
    /// Messages held back, per rule (since start).
    held: Mutex<HashMap<String, u64>>,
    disk: Option<(std::path::PathBuf, u64)>,
    /// Bulk transfers under way, and the cap.
    bulk: Arc<std::sync::atomic::AtomicU32>,
    max_bulk: Option<u32>,
    /// The members a farm's rates are shared among (1 alone): each
    /// admitted message spends this many cells of its rates, so each
    /// member admits its share and the farm the rate.
    share: std::sync::atomic::AtomicU32,
}

/// Why a bulk transfer may not start now, and when to ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub after: Duration,
    pub why: String,
}

/// Held while one bulk transfer runs; dropping it frees its place.
#[derive(Debug)]
pub struct BulkPermit(Arc<std::sync::atomic::AtomicU32>);

impl Drop for BulkPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Throttle {
    /// The accept/refuse decision for a bulk transfer (an upload sent or
    /// relayed, a download to fetch) by `component`, `bytes` still to go:
    /// the rules as for a message of class `bulk` and type `bulk-request`
    /// of that size, then the cap on transfers at once. The permit is held
    /// for the transfer.
    pub fn bulk_permit(
        &self,
        component: &RsId,
        bytes: u64,
        precedence: u8,
    ) -> Result<BulkPermit, Held> {
        use std::sync::atomic::Ordering;
        let held = |d: Decision| match d {
            Decision::Wait { after, why } => Held { after, why },
            Decision::Admit => Held {
                after: Duration::from_secs(1),
                why: String::new(),
            },
        };
        if let Some(max) = self.max_bulk {
            let taken = self
                .bulk
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok();
            if !taken {
                return Err(held(self.hold(
                    "bulk",
                    Duration::from_secs(30),
                    format!("{max} bulk transfers are under way already"),
                )));
            }
        } else {
            self.bulk.fetch_add(1, Ordering::AcqRel);
        }
        let permit = BulkPermit(self.bulk.clone());
        match self.check(&Subject {
            component,
            class: "bulk",
            kind: ContentKind::BulkRequest,
            bytes,
            precedence,
            severity: None,
        }) {
            Decision::Admit => Ok(permit),
            wait => Err(held(wait)),
        }
    }

    /// Bulk transfers under way.
    pub fn bulk_transfers(&self) -> u32 {
        self.bulk.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Compiles `cfg`; `usage` keeps quota counters across restarts;
    /// `data_dir` is where the free-disk floor is measured.
    pub fn new(
        cfg: &ThrottleConfig,
        clock: Arc<dyn Clock>,
        usage: Option<Arc<dyn UsageStore>>,
        data_dir: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let gov = GovClock(clock.clone());
        let mut names = std::collections::HashSet::new();
        let mut rules = Vec::new();
        for r in &cfg.rule {
            if !names.insert(r.name.clone()) {
                return Err(format!("throttle rule {:?} is defined twice", r.name));
            }
            rules.push(Compiled::new(r.clone(), &gov)?);
        }
        let t = Throttle {
            rules,
            clock,
            usage,
            counts: Mutex::new(hashbrown::HashMap::new()),
            held: Mutex::new(HashMap::new()),
            bulk: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            max_bulk: cfg.max_bulk_transfers,
            share: std::sync::atomic::AtomicU32::new(1),
            disk: match (cfg.min_free_disk_mb, data_dir) {
                (Some(mb), Some(d)) => Some((d.to_path_buf(), mb * 1024 * 1024)),
                _ => None,
            },
        };
        t.reload()?;
        Ok(t)
    }

    /// Shares every rule's rates among `members` (a farm's live members,
    /// each holding an equal part; at least 1): a member then admits
    /// `rate / members`, and the farm the rate. Quotas need no share (their
    /// counters are the farm's).
    pub fn set_share(&self, members: u32) {
        self.share
            .store(members.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The members the rates are shared among now.
    pub fn share(&self) -> u32 {
        self.share.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// No rules at all (checks cost nothing).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.disk.is_none()
    }

    /// Reads the current periods' counters from the store.
    fn reload(&self) -> Result<(), String> {
        let Some(u) = &self.usage else { return Ok(()) };
        let since = self.clock.now().as_millis() - 31 * 86_400_000;
        let rows = u.load(since)?;
        let mut c = self.counts.lock().map_err(|_| "poisoned")?;
        for r in rows {
            let e = c.entry((r.rule, r.key, r.period_start)).or_default();
            e.bytes += r.bytes;
            e.messages += r.messages;
        }
        Ok(())
    }

    /// May this message go (or come in) now?
    pub fn check(&self, s: &Subject<'_>) -> Decision {
        if self.is_empty() {
            return Decision::Admit;
        }
        let now = self.clock.now();
        let _instant = CheckInstant::set(now);
        if let Some((dir, floor)) = &self.disk
            && let Some(free) = free_bytes(dir)
            && free < *floor
        {
            return self.hold(
                "disk",
                Duration::from_secs(30),
                format!("less than {} MB free on the data disk", floor / 1024 / 1024),
            );
        }
        // The rules that apply, walked three times rather than collected: a
        // check allocates only the rate limiters' keys.
        let matching = || self.rules.iter().filter(|r| r.matches(s) && !r.exempt(s));
        // Windows and quotas first: they consume nothing, so a refusal
        // there does not spend another rule's rate.
        for r in matching() {
            if let Some(after) = r.closed_for(now) {
                return self.hold(
                    &r.rule.name,
                    after,
                    format!(
                        "outside the window {} ({})",
                        r.rule.window.as_deref().unwrap_or(""),
                        r.rule.time_zone.as_deref().unwrap_or("UTC")
                    ),
                );
            }
            if let Some(q) = r.rule.quota_bytes {
                let (start, end) = r.period(now);
                let used = self
                    .counts
                    .lock()
                    .ok()
                    .and_then(|c| {
                        c.get(&CountRef(&r.rule.name, r.key(s), start))
                            .map(|x| x.bytes)
                    })
                    .unwrap_or(0);
                if used.saturating_add(s.bytes) > q {
                    let after = Duration::from_millis(
                        u64::try_from(end - now.as_millis()).unwrap_or(0).max(1),
                    );
                    return self.hold(
                        &r.rule.name,
                        after,
                        format!(
                            "quota of {q} bytes per {:?} used",
                            r.rule.quota_period.unwrap_or_default()
                        )
                        .to_lowercase(),
                    );
                }
            }
        }
        // In a farm each message spends `share` cells: this member's part
        // of the rate (a cost above the burst takes the whole burst).
        let share = u64::from(self.share());
        let cells = |n: u64, burst: u32| {
            NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX).clamp(1, burst))
                .unwrap_or(NonZeroU32::MIN)
        };
        for r in matching().filter(|r| r.messages.is_some() || r.bytes.is_some()) {
            let key = r.key(s).to_owned();
            if let Some((l, burst)) = &r.messages
                && let Ok(Err(not_until)) = l.check_key_n(&key, cells(share, *burst))
            {
                let after = not_until
                    .wait_time_from(governor::clock::Clock::now(&GovClock(self.clock.clone())));
                return self.hold(
                    &r.rule.name,
                    after.max(Duration::from_millis(1)),
                    "message rate".into(),
                );
            }
            if let Some((l, burst)) = &r.bytes {
                // A message larger than the burst takes the whole burst.
                if let Ok(Err(not_until)) =
                    l.check_key_n(&key, cells(s.bytes.saturating_mul(share), *burst))
                {
                    let after = not_until
                        .wait_time_from(governor::clock::Clock::now(&GovClock(self.clock.clone())));
                    return self.hold(
                        &r.rule.name,
                        after.max(Duration::from_millis(1)),
                        "byte rate".into(),
                    );
                }
            }
        }
        // Admitted: count it for every rule it matched (quotas read these;
        // status shows them for every rule).
        if let Ok(mut c) = self.counts.lock() {
            for r in matching() {
                let (start, _) = r.period(now);
                let key = CountRef(&r.rule.name, r.key(s), start);
                let e = match c.get_mut(&key) {
                    Some(e) => e,
                    None => c.entry(key.owned()).or_default(),
                };
                e.bytes += s.bytes;
                e.messages += 1;
                e.dirty_bytes += s.bytes;
                e.dirty_messages += 1;
            }
        }
        Decision::Admit
    }

    fn hold(&self, rule: &str, after: Duration, why: String) -> Decision {
        if let Ok(mut h) = self.held.lock() {
            *h.entry(rule.to_owned()).or_default() += 1;
        }
        Decision::Wait {
            after,
            why: format!("throttle {rule}: {why}"),
        }
    }

    /// Writes the counters gathered since the last flush to the store
    /// (each daemon calls this every second and when it stops: a crash
    /// forgets at most the last second's usage).
    pub fn flush(&self) -> Result<(), String> {
        let Some(u) = &self.usage else { return Ok(()) };
        let rows: Vec<UsageRow> = {
            let mut c = self.counts.lock().map_err(|_| "poisoned")?;
            let horizon = self.clock.now().as_millis() - 32 * 86_400_000;
            c.retain(|k, _| k.2 >= horizon);
            c.iter_mut()
                .filter(|(_, v)| v.dirty_messages > 0)
                .map(|((rule, key, start), v)| {
                    let row = UsageRow {
                        rule: rule.clone(),
                        key: key.clone(),
                        period_start: *start,
                        bytes: v.dirty_bytes,
                        messages: v.dirty_messages,
                    };
                    v.dirty_bytes = 0;
                    v.dirty_messages = 0;
                    row
                })
                .collect()
        };
        if !rows.is_empty() {
            u.add(&rows)?;
        }
        if u.shared() {
            // The farm's totals: what every member flushed, plus what this
            // one counted since its rows were taken.
            let totals = u.load(self.clock.now().as_millis() - 31 * 86_400_000)?;
            let mut c = self.counts.lock().map_err(|_| "poisoned")?;
            for t in totals {
                let e = c.entry((t.rule, t.key, t.period_start)).or_default();
                e.bytes = t.bytes + e.dirty_bytes;
                e.messages = t.messages + e.dirty_messages;
            }
        }
        Ok(())
    }

    /// For status: per rule, messages held back since start; and the usage
    /// of the current quota periods.
    pub fn report(&self) -> (Vec<(String, u64)>, Vec<UsageRow>) {
        let now = self.clock.now();
        let mut held: Vec<(String, u64)> = self
            .held
            .lock()
            .map(|h| h.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        held.sort();
        let mut usage = Vec::new();
        if let Ok(c) = self.counts.lock() {
            for r in &self.rules {
                let (start, _) = r.period(now);
                for ((rule, key, s), v) in c.iter() {
                    if *rule == r.rule.name && *s == start {
                        usage.push(UsageRow {
                            rule: rule.clone(),
                            key: key.clone(),
                            period_start: start,
                            bytes: v.bytes,
                            messages: v.messages,
                        });
                    }
                }
            }
        }
        usage.sort_by(|a, b| (&a.rule, &a.key).cmp(&(&b.rule, &b.key)));
        (held, usage)
    }

    /// Status metrics: `throttle.RULE.held` (messages held back since
    /// start) and `throttle.RULE[.KEY].bytes` (usage of the current quota
    /// period).
    pub fn metrics(&self) -> Vec<(String, u64)> {
        let (held, usage) = self.report();
        let mut out: Vec<(String, u64)> = held
            .into_iter()
            .map(|(rule, n)| (format!("throttle.{rule}.held"), n))
            .collect();
        for u in usage {
            let key = if u.key.is_empty() {
                String::new()
            } else {
                format!(".{}", u.key)
            };
            out.push((format!("throttle.{}{key}.bytes", u.rule), u.bytes));
        }
        out
    }

    /// The rules, as configured.
    pub fn rules(&self) -> Vec<Rule> {
        self.rules.iter().map(|r| r.rule.clone()).collect()
    }
}

/// Free bytes (for unprivileged users) on the file system holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

impl<'a> Subject<'a> {
    /// The subject of a forward message, or `None` for a back-channel one.
    /// `bytes` counts the content plus 512 for the header part (its real
    /// size varies little; encoding it again just to count would cost
    /// more than the check). The severity is read from an alarm's content
    /// only when `need_severity` (a rule exempts by severity).
    pub fn of(m: &'a rs_protocol::codec::RawMessage, need_severity: bool) -> Option<Self> {
        let src = m.header.source()?;
        let severity = if need_severity && m.kind == ContentKind::Alarm {
            match m.clone().decode(&rs_protocol::codec::Limits::default()) {
                Ok(rs_protocol::model::Message {
                    content: rs_protocol::model::Content::Alarm(a),
                    ..
                }) => Some(a.severity),
                _ => None,
            }
        } else {
            None
        };
        Some(Subject {
            component: &src.component,
            class: &m.header.class.class,
            kind: m.kind,
            bytes: m.content.len() as u64 + 512,
            precedence: src.qos.precedence,
            severity,
        })
    }
}

impl Throttle {
    /// Some rule exempts alarms by severity (so callers decode alarms).
    pub fn needs_severity(&self) -> bool {
        self.rules.iter().any(|r| r.exempt_severity.is_some())
    }

    /// Checks a raw message (back-channel messages always pass).
    pub fn check_raw(&self, m: &rs_protocol::codec::RawMessage) -> Decision {
        if self.is_empty() {
            return Decision::Admit;
        }
        match Subject::of(m, self.needs_severity()) {
            Some(s) => self.check(&s),
            None => Decision::Admit,
        }
    }
}

/// The usage table's schema changes, in order (append only). Version 1
/// adopts the `throttle.db` of releases before versions as it is.
pub const USAGE_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "baseline",
    apply: |c| {
        c.batch(
            "CREATE TABLE IF NOT EXISTS usage (
                rule         TEXT   NOT NULL,
                key          TEXT   NOT NULL,
                period_start BIGINT NOT NULL,
                bytes        BIGINT NOT NULL,
                messages     BIGINT NOT NULL,
                PRIMARY KEY (rule, key, period_start)
            )",
        )
    },
}];

/// Usage counters in a table on either engine (rs_store::sql):
/// `throttle.db` in the data directory, or a farm's PostgreSQL schema,
/// where every member adds its counts and reads the farm's totals back.
#[derive(Debug)]
pub struct SqlUsage {
    /// Always `Some` but while dropped.
    conn: Mutex<Option<Conn>>,
    shared: bool,
}

impl SqlUsage {
    pub fn open(at: &Location) -> Result<Self, rs_store::db::DbError> {
        let conn = off_runtime(|| Conn::open(at, USAGE_MIGRATIONS))?;
        Ok(SqlUsage {
            shared: conn.engine() == Engine::Postgres,
            conn: Mutex::new(Some(conn)),
        })
    }

    /// Runs `f` on the connection, off the async workers.
    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, rs_store::db::DbError> + Send,
    ) -> Result<T, String> {
        let mut guard = self.conn.lock().map_err(|_| "poisoned")?;
        let c = guard.as_mut().ok_or("the usage store is closed")?;
        off_runtime(|| f(c)).map_err(|e| e.to_string())
    }
}

/// A replaced throttle (the server's, set at run time) is dropped
/// wherever its last user lets go of it, often on an async worker, where
/// closing a PostgreSQL connection would panic (the blocking client runs
/// a runtime of its own): the connection is closed on a thread of its own.
impl Drop for SqlUsage {
    fn drop(&mut self) {
        if let Some(c) = self.conn.get_mut().ok().and_then(Option::take) {
            let _ = std::thread::Builder::new()
                .name("rs-usage-close".into())
                .spawn(move || drop(c));
        }
    }
}

/// Runs `f` on a thread of its own: PostgreSQL's blocking client may not
/// run on a thread that drives async tasks (a daemon opens its throttle
/// from its async main; flushes run on the blocking pool).
fn off_runtime<T: Send>(
    f: impl FnOnce() -> Result<T, rs_store::db::DbError> + Send,
) -> Result<T, rs_store::db::DbError> {
    std::thread::scope(|s| {
        s.spawn(f).join().unwrap_or_else(|_| {
            Err(rs_store::db::DbError::Sql(
                "the usage store panicked".into(),
            ))
        })
    })
}

impl UsageStore for SqlUsage {
    fn load(&self, since: i64) -> Result<Vec<UsageRow>, String> {
        self.with(|c| {
            c.rows(
                "SELECT rule, key, period_start, bytes, messages FROM usage WHERE period_start >= ?1",
                params![since],
                |r| {
                    Ok(UsageRow {
                        rule: r.get(0)?,
                        key: r.get(1)?,
                        period_start: r.get(2)?,
                        bytes: r.get(3)?,
                        messages: r.get(4)?,
                    })
                },
            )
        })
    }

    fn add(&self, rows: &[UsageRow]) -> Result<(), String> {
        self.with(|c| {
            c.begin()?;
            let r = (|| {
                for r in rows {
                    c.exec(
                        "INSERT INTO usage (rule, key, period_start, bytes, messages)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (rule, key, period_start)
                         DO UPDATE SET bytes = usage.bytes + ?4, messages = usage.messages + ?5",
                        params![r.rule, r.key, r.period_start, r.bytes, r.messages],
                    )?;
                }
                // Older periods are of no use any more.
                c.exec(
                    "DELETE FROM usage
                     WHERE period_start < (SELECT MAX(period_start) FROM usage) - 2764800000",
                    params![],
                )?;
                Ok(())
            })();
            match r {
                Ok(()) => c.commit(),
                Err(e) => {
                    let _ = c.rollback();
                    Err(e)
                }
            }
        })
    }

    fn shared(&self) -> bool {
        self.shared
    }
}

/// Opens a daemon's throttle: the rules of `cfg`, usage counters in
/// `data_dir/throttle.db`, the free-disk floor measured on `data_dir`.
pub fn open(
    cfg: &ThrottleConfig,
    clock: Arc<dyn Clock>,
    data_dir: &std::path::Path,
) -> Result<Throttle, String> {
    open_at(
        cfg,
        clock,
        data_dir,
        &Location::Sqlite(data_dir.join("throttle.db")),
    )
}

/// [`open`] with the usage counters at `usage` (a farm's database).
pub fn open_at(
    cfg: &ThrottleConfig,
    clock: Arc<dyn Clock>,
    data_dir: &std::path::Path,
    usage: &Location,
) -> Result<Throttle, String> {
    let usage = SqlUsage::open(usage)
        .map_err(|e| format!("throttle usage at {}: {e}", usage.describe()))?;
    Throttle::new(cfg, clock, Some(Arc::new(usage)), Some(data_dir))
}

/// Flushes the usage counters every second until `stop`, and once more
/// after it. `current` gives the throttle in force each time (a daemon
/// whose throttle is replaced at run time passes a lookup).
pub async fn flush_loop<F>(current: F, stop: tokio_util::sync::CancellationToken)
where
    F: Fn() -> Arc<Throttle>,
{
    loop {
        let done = tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let t = current();
        match tokio::task::spawn_blocking(move || t.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("throttle usage: {e}"),
            Err(e) => tracing::error!("throttle usage: {e}"),
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_quota_period_reads_back_as_it_was_and_odd_ones_are_not_kept() {
        let day = (1_795_996_800_000, 1_796_083_200_000);
        let packed = pack_period(day).unwrap();
        assert_eq!(unpack_period(packed), Some(day));
        // A DST day of 23 hours, a half-hour zone's hour.
        for p in [
            (1_774_832_400_000, 1_774_915_200_000),
            (1_800_000_000_000 - 1_800_000, 1_800_001_800_000),
        ] {
            assert_eq!(unpack_period(pack_period(p).unwrap()), Some(p));
        }
        // Not whole minutes, before 1970, or empty: worked out each time.
        assert_eq!(pack_period((1_795_996_800_001, 1_796_083_200_000)), None);
        assert_eq!(pack_period((-3_600_000, 0)), None);
        assert_eq!(pack_period((60_000, 60_000)), None);
        assert_eq!(unpack_period(0), None);
    }
}
