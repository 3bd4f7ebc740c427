//! Route choice among a tier's upstream URLs (seed 003: link metrics as
//! the basis for automatic route selection, routing by type of service,
//! multiple send).
//!
//! Every route, the one in use too, is probed with an empty envelope
//! whenever it has not been measured for a while; a long poll held to its
//! end measures its route too (what its answer took beyond the hold: the
//! refresh). Those round trips are comparable across routes; a POST of
//! messages is not (it includes the upstream's work on them), so it
//! counts by its failure, by its wait while unanswered, and for large
//! envelopes by its bytes per second. A route's **delay** is the median of its last
//! [`WINDOW`] round trips (none older than [`WINDOW_AGE`]) plus their
//! interquartile spread (the variation of the delay counts against a
//! route), and at least the age of its oldest POST still waiting: a route
//! that has gone silent is slow from the moment a POST stalls on it, not
//! only once the POST times out. A route whose last POST failed is
//! **down** until one succeeds again (the prober's, see
//! [`crate::uplink::Uplink::probe_routes`]).
//!
//! Messages (every envelope) go on the route in use, which moves:
//! - at once, when it is down, to the route with the lowest delay;
//! - when another route's delay is less than half of its own (and
//!   [`MOVE_MARGIN`] less), no sooner than [`RouteChoice::dwell`] after the
//!   last move, unless a POST has waited on it longer than
//!   [`RouteChoice::hedge_after`] (it has gone quiet);
//! - back to a route earlier in the configured order once that route's
//!   delay, over a window of round trips made since it was left (at least
//!   three), is within a quarter of the route in use (the order states
//!   the provider's preference: a private line before the internet).
//!
//! A move is logged and counted; the window and the dwell keep one slow
//! round trip from moving traffic, and the way back needs a window of good
//! ones, so traffic does not flap between two similar routes.
//!
//! Bulk transfers take the first route of `bulk_urls` that is not down
//! (the messages' route when none is named or all are down).
//!
//! Written here rather than taken from a crate: the choice depends on the
//! protocol's own measurements (envelope round trips, empty probe
//! envelopes that also collect a route's back-channel) and on the
//! configured preference, which no load-balancing crate models.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Round trips kept per route.
pub const WINDOW: usize = 8;
/// Round trips older than this no longer count (the newest always does).
pub const WINDOW_AGE: Duration = Duration::from_secs(30);
/// A route must be this much faster (besides twice as fast) to take the
/// messages from the route in use.
pub const MOVE_MARGIN: Duration = Duration::from_millis(20);
/// Round trips a route needs in its window before traffic returns to it.
const TRUSTED_AFTER: usize = 3;
/// A POST waiting less than this is not stalled, whatever it normally
/// takes (seconds).
const STALL_FLOOR: f64 = 0.25;
/// Envelopes at least this large also measure a route's throughput.
const THROUGHPUT_FROM: usize = 64 << 10;

/// What a transfer is, which decides the route it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Envelopes: alarms, events, responses, heartbeats, long polls.
    Messages,
    /// Bulk transfers: uploads and downloads of files.
    Bulk,
}

/// How routes are chosen (`[upstream]`).
#[derive(Debug, Clone)]
pub struct RouteChoice {
    /// How often a route not otherwise used is probed.
    pub probe_every: Duration,
    /// Routes preferred for bulk transfers (indexes into the URLs), in
    /// order.
    pub bulk: Vec<usize>,
    /// The least time between two moves of the messages' route, unless
    /// the route in use is down.
    pub dwell: Duration,
    /// A POST of messages waiting this long (at least; four times its
    /// route's delay when that is longer) is sent again on another route
    /// that is not down, and the first answer taken: the same envelope
    /// twice is stored once (message IDs).
    pub hedge_after: Duration,
}

impl Default for RouteChoice {
    fn default() -> Self {
        RouteChoice {
            probe_every: Duration::from_secs(5),
            bulk: Vec::new(),
            dwell: Duration::from_secs(10),
            hedge_after: Duration::from_millis(500),
        }
    }
}

/// A route's delay as the choice sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Delay {
    /// Its last POST failed.
    Down,
    /// Not measured yet.
    Unknown,
    /// Seconds.
    Known(f64),
}

#[derive(Debug, Default)]
struct Health {
    /// (when, seconds) of the last round trips, oldest first.
    samples: VecDeque<(Instant, f64)>,
    /// Consecutive failures (0: up).
    failures: u32,
    last_error: Option<String>,
    /// Timed POSTs under way: (ticket, started, a probe).
    pending: Vec<(u64, Instant, bool)>,
    /// Round trip of POSTs of messages (smoothed), what such a POST
    /// normally waits.
    message_rtt: Option<f64>,
    /// When the last round trip was added to the window.
    measured: Option<Instant>,
    /// Bytes per second of large envelopes (smoothed).
    throughput: Option<f64>,
    posts: u64,
    failed: u64,
}

impl Health {
    /// Seconds the oldest stalled POST under way has waited (0: none):
    /// one that has waited three times what a POST of messages normally
    /// does here, and at least [`STALL_FLOOR`] (a busy upstream or a busy
    /// host is no sign of the route).
    fn stalled(&self, now: Instant) -> f64 {
        let normal = self
            .message_rtt
            .map_or(STALL_FLOOR, |r| (3.0 * r).max(STALL_FLOOR));
        self.pending
            .iter()
            .map(|(_, at, _)| now.saturating_duration_since(*at).as_secs_f64())
            .filter(|waited| *waited > normal)
            .fold(0.0, f64::max)
    }

    fn delay(&self, now: Instant) -> Delay {
        if self.failures > 0 {
            return Delay::Down;
        }
        let stalled = self.stalled(now);
        let mut recent: Vec<f64> = self
            .samples
            .iter()
            .enumerate()
            .filter(|(k, (at, _))| {
                *k + 1 == self.samples.len() || now.saturating_duration_since(*at) <= WINDOW_AGE
            })
            .map(|(_, (_, s))| *s)
            .collect();
        if recent.is_empty() {
            return if stalled > 0.0 {
                Delay::Known(stalled)
            } else {
                Delay::Unknown
            };
        }
        recent.sort_by(f64::total_cmp);
        let q = |p: f64| recent[((recent.len() - 1) as f64 * p).round() as usize];
        let spread = q(0.75) - q(0.25);
        Delay::Known((q(0.5) + spread).max(stalled))
    }

    /// Whether its last [`TRUSTED_AFTER`] round trips (none older than
    /// [`WINDOW_AGE`]) each took at most `limit` seconds, and nothing is
    /// stalled on it.
    fn last_good(&self, now: Instant, limit: f64) -> bool {
        let last: Vec<f64> = self
            .samples
            .iter()
            .rev()
            .take(TRUSTED_AFTER)
            .filter(|(at, _)| now.saturating_duration_since(*at) <= WINDOW_AGE)
            .map(|(_, s)| *s)
            .collect();
        last.len() == TRUSTED_AFTER
            && last.iter().all(|s| *s <= limit)
            && self.stalled(now) <= limit
    }

    fn sample(&mut self, at: Instant, secs: f64) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((at, secs));
        self.measured = Some(at);
    }
}

#[derive(Debug)]
struct Choice {
    /// The route messages go on.
    messages: usize,
    /// When it last moved (`None`: never).
    moved: Option<Instant>,
}

/// A snapshot of one route, for status and metrics.
#[derive(Debug, Clone)]
pub struct RouteStatus {
    pub url: String,
    /// Messages go on this route now.
    pub messages: bool,
    /// Bulk transfers go on this route now.
    pub bulk: bool,
    pub up: bool,
    /// The delay the choice uses, in seconds (`None`: not measured).
    pub delay: Option<f64>,
    pub throughput: Option<f64>,
    pub posts: u64,
    pub failed: u64,
    pub last_error: Option<String>,
}

/// The routes of one upstream, their health and the choice among them.
#[derive(Debug)]
pub struct Routes {
    urls: Vec<String>,
    cfg: RouteChoice,
    health: Vec<Mutex<Health>>,
    choice: Mutex<Choice>,
    tickets: AtomicU64,
    /// Moves of the messages' route.
    pub moves: AtomicU64,
    /// POSTs sent again on a second route (hedged).
    pub hedged: AtomicU64,
    /// Woken at each move of the messages' route.
    moved: tokio::sync::Notify,
}

/// A timed POST under way on a route: dropping it unanswered (the POST
/// was abandoned for a faster route) records how long it had waited, a
/// lower bound of the route's round trip.
#[derive(Debug)]
pub struct Timing<'a> {
    routes: &'a Routes,
    route: usize,
    ticket: u64,
    started: Instant,
    probe: bool,
    done: bool,
}

impl Timing<'_> {
    /// The POST was answered (`bytes`: the envelope's size).
    pub fn ok(mut self, bytes: usize) {
        self.done = true;
        self.routes
            .answered(self.route, self.ticket, self.started, bytes, self.probe);
    }

    /// The POST failed: the route is down until one succeeds.
    pub fn failed(mut self, why: &str) {
        self.done = true;
        self.routes.failed(self.route, Some(self.ticket), why);
    }
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        if !self.done {
            let waited = self.started.elapsed().as_secs_f64();
            let mut h = self.routes.lock(self.route);
            h.pending.retain(|(t, _, _)| *t != self.ticket);
            h.sample(Instant::now(), waited);
        }
    }
}

impl Routes {
    pub fn new(urls: Vec<String>, cfg: RouteChoice) -> Self {
        let health = urls.iter().map(|_| Mutex::default()).collect();
        Routes {
            urls,
            cfg,
            health,
            choice: Mutex::new(Choice {
                messages: 0,
                moved: None,
            }),
            tickets: AtomicU64::new(0),
            moves: AtomicU64::new(0),
            hedged: AtomicU64::new(0),
            moved: tokio::sync::Notify::new(),
        }
    }

    /// Returns once the messages' route is no longer `i`.
    pub async fn moved_from(&self, i: usize) {
        loop {
            let moved = self.moved.notified();
            if self.current() != i {
                return;
            }
            moved.await;
        }
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn config(&self) -> &RouteChoice {
        &self.cfg
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Health> {
        self.health[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Route `i`'s delay now.
    pub fn delay(&self, i: usize, now: Instant) -> Delay {
        self.lock(i).delay(now)
    }

    /// A timed POST starts on route `i`: a probe (its answer is a round
    /// trip for the window) or one carrying messages (its answer is not:
    /// it includes the upstream's work on them, which an empty probe on
    /// another route does not, so only probes and refreshes are compared;
    /// its wait while unanswered counts, and its failure).
    pub fn start(&self, i: usize, probe: bool) -> Timing<'_> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut h = self.lock(i);
        h.pending.push((ticket, started, probe));
        h.posts += 1;
        Timing {
            routes: self,
            route: i,
            ticket,
            started,
            probe,
            done: false,
        }
    }

    /// An untimed POST (a long poll) went to route `i`.
    pub fn used(&self, i: usize) {
        self.lock(i).posts += 1;
    }

    /// An untimed POST to route `i` was answered: the route is up.
    pub fn up(&self, i: usize) {
        self.lock(i).failures = 0;
    }

    /// A long poll on route `i` was held to the end and answered empty,
    /// `secs` after its hold: the refresh's round trip, a sample like
    /// any other.
    pub fn refreshed(&self, i: usize, secs: f64) {
        let mut h = self.lock(i);
        h.failures = 0;
        h.sample(Instant::now(), secs);
    }

    fn answered(&self, i: usize, ticket: u64, started: Instant, bytes: usize, probe: bool) {
        let now = Instant::now();
        let secs = now.saturating_duration_since(started).as_secs_f64();
        let mut h = self.lock(i);
        h.pending.retain(|(t, _, _)| *t != ticket);
        if probe {
            h.sample(now, secs);
        } else {
            h.message_rtt = Some(h.message_rtt.map_or(secs, |r| 0.875 * r + 0.125 * secs));
        }
        if h.failures > 0 {
            tracing::info!("upstream route {} answers again", self.urls[i]);
        }
        h.failures = 0;
        if bytes >= THROUGHPUT_FROM && secs > 0.0 {
            let rate = bytes as f64 / secs;
            h.throughput = Some(h.throughput.map_or(rate, |t| 0.75 * t + 0.25 * rate));
        }
    }

    /// A POST to route `i` failed (`ticket`: the timed POST's).
    pub fn failed(&self, i: usize, ticket: Option<u64>, why: &str) {
        let mut h = self.lock(i);
        if let Some(t) = ticket {
            h.pending.retain(|(x, _, _)| *x != t);
        }
        if h.failures == 0 {
            tracing::warn!("upstream route {} is down: {why}", self.urls[i]);
        }
        h.failures += 1;
        h.failed += 1;
        h.last_error = Some(why.to_owned());
    }

    /// The route messages go on now (it may move: see the module).
    pub fn pick(&self, class: Class) -> usize {
        let now = Instant::now();
        match class {
            Class::Messages => self.messages(now),
            Class::Bulk => self
                .cfg
                .bulk
                .iter()
                .copied()
                .find(|&i| self.delay(i, now) != Delay::Down)
                .unwrap_or_else(|| self.messages(now)),
        }
    }

    fn messages(&self, now: Instant) -> usize {
        let n = self.urls.len();
        let mut c = self.choice.lock().unwrap_or_else(|e| e.into_inner());
        if n < 2 {
            return 0;
        }
        let delays: Vec<Delay> = (0..n).map(|i| self.delay(i, now)).collect();
        let cur = c.messages;
        let best_other = |ok: &dyn Fn(usize) -> bool| {
            (0..n)
                .filter(|&i| i != cur && ok(i))
                .filter_map(|i| match delays[i] {
                    Delay::Known(d) => Some((i, d)),
                    _ => None,
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
        };
        let settled = c
            .moved
            .is_none_or(|t| now.duration_since(t) >= self.cfg.dwell);
        // (where to, whether the route in use is left as degraded)
        let to = match delays[cur] {
            // Down: the fastest route that is up, else the first not
            // measured yet, else stay (each POST still tries every route).
            Delay::Down => best_other(&|_| true)
                .map(|(i, _)| i)
                .or_else(|| (0..n).find(|&i| delays[i] == Delay::Unknown))
                .map(|i| (i, true)),
            Delay::Unknown => None,
            Delay::Known(d) => {
                // A POST stalled past the hedging delay moves the messages
                // even within the dwell: the route has gone quiet.
                let quiet = self.lock(cur).stalled(now) >= self.cfg.hedge_after.as_secs_f64();
                let faster = best_other(&|_| true)
                    .filter(|(_, b)| (settled || quiet) && d > 2.0 * b + MOVE_MARGIN.as_secs_f64())
                    .map(|(i, _)| (i, true));
                // Back to a preferred route once its last round trips
                // since it was left are as good.
                let preferred = || {
                    (0..cur)
                        .find(|&i| {
                            settled
                                && delays[i] != Delay::Down
                                && self.lock(i).last_good(now, 1.25 * d + 0.002)
                        })
                        .map(|i| (i, false))
                };
                faster.or_else(preferred)
            }
        };
        if let Some((to, degraded)) = to.filter(|&(to, _)| to != cur) {
            let show = |d: Delay| match d {
                Delay::Known(s) => format!("{:.0} ms", s * 1000.0),
                Delay::Down => "down".into(),
                Delay::Unknown => "not measured".into(),
            };
            tracing::info!(
                "upstream: messages move from {} ({}) to {} ({})",
                self.urls[cur],
                show(delays[cur]),
                self.urls[to],
                show(delays[to])
            );
            if degraded {
                // Its round trips from before say nothing about it now:
                // only what it answers from here on can bring traffic back.
                let mut h = self.lock(cur);
                h.samples.clear();
                if let Delay::Known(d) = delays[cur] {
                    h.sample(now, d);
                }
            } else {
                // Back on the good round trips that brought it back: the
                // slow ones from before it was left would send it away
                // again at the end of the dwell.
                let mut h = self.lock(to);
                while h.samples.len() > TRUSTED_AFTER {
                    h.samples.pop_front();
                }
            }
            c.messages = to;
            c.moved = Some(now);
            self.moves.fetch_add(1, Ordering::Relaxed);
            self.moved.notify_waiters();
        }
        c.messages
    }

    /// Routes to try after `first` when it is unavailable: those not down
    /// by delay, then the down ones, each group in the configured order.
    pub fn fallbacks(&self, first: usize) -> Vec<usize> {
        let now = Instant::now();
        let n = self.urls.len();
        let (mut up, down): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|k| (first + k) % n)
            .skip(1)
            .partition(|&i| self.delay(i, now) != Delay::Down);
        up.extend(down);
        up
    }

    /// When a POST of messages on route `i` should go out again on
    /// another route too, and which: `None` with no other route up.
    pub fn hedge(&self, i: usize, tried: &[bool]) -> Option<(usize, Duration)> {
        let now = Instant::now();
        let other = (0..self.urls.len())
            .filter(|&j| j != i && !tried[j])
            .filter_map(|j| match self.delay(j, now) {
                Delay::Known(d) => Some((j, d)),
                Delay::Unknown => Some((j, f64::MAX / 4.0)),
                Delay::Down => None,
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))?
            .0;
        // Its own measured delay (a stalled POST's wait does not count).
        let measured = !self.lock(i).samples.is_empty();
        let mine = match self.delay(i, now) {
            Delay::Known(d) if measured => Duration::from_secs_f64((4.0 * d).min(60.0)),
            _ => Duration::ZERO,
        };
        Some((other, self.cfg.hedge_after.max(mine)))
    }

    /// Routes with no round trip measured for
    /// [`RouteChoice::probe_every`] (a long poll's refresh counts), the
    /// messages' route among them: every route is compared on the same
    /// empty envelopes.
    pub fn due_for_probe(&self) -> Vec<usize> {
        if self.urls.len() < 2 {
            return Vec::new();
        }
        let now = Instant::now();
        (0..self.urls.len())
            .filter(|&i| {
                self.lock(i)
                    .measured
                    .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.probe_every)
            })
            .collect()
    }

    /// Every route as it stands.
    pub fn status(&self) -> Vec<RouteStatus> {
        let now = Instant::now();
        let messages = self.choice.lock().map(|c| c.messages).unwrap_or(0);
        let bulk = self.pick(Class::Bulk);
        (0..self.urls.len())
            .map(|i| {
                let h = self.lock(i);
                let d = h.delay(now);
                RouteStatus {
                    url: self.urls[i].clone(),
                    messages: i == messages,
                    bulk: i == bulk,
                    up: d != Delay::Down,
                    delay: match d {
                        Delay::Known(s) => Some(s),
                        _ => None,
                    },
                    throughput: h.throughput,
                    posts: h.posts,
                    failed: h.failed,
                    last_error: h.last_error.clone(),
                }
            })
            .collect()
    }

    /// The route messages go on, without moving it.
    pub fn current(&self) -> usize {
        self.choice.lock().map(|c| c.messages).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(n: usize) -> Routes {
        Routes::new(
            (0..n).map(|i| format!("http://r{i}")).collect(),
            RouteChoice {
                dwell: Duration::ZERO,
                ..RouteChoice::default()
            },
        )
    }

    fn feed(r: &Routes, i: usize, secs: f64, n: usize) {
        for _ in 0..n {
            r.lock(i).sample(Instant::now(), secs);
        }
    }

    #[test]
    fn stays_on_the_first_route_until_another_is_clearly_faster() {
        let r = routes(2);
        assert_eq!(r.pick(Class::Messages), 0);
        feed(&r, 0, 0.010, 8);
        feed(&r, 1, 0.006, 8);
        assert_eq!(r.pick(Class::Messages), 0, "not twice as fast: stays");
        feed(&r, 0, 0.300, 8);
        assert_eq!(r.pick(Class::Messages), 1, "degraded: moves");
        assert_eq!(r.moves.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn one_slow_round_trip_moves_nothing_but_a_stalled_post_does() {
        let r = routes(2);
        feed(&r, 0, 0.005, 7);
        feed(&r, 1, 0.005, 8);
        feed(&r, 0, 2.0, 1);
        assert_eq!(r.pick(Class::Messages), 0);
        let t = r.start(0, false);
        r.lock(0).pending[0].1 = Instant::now() - Duration::from_secs(1);
        assert_eq!(r.pick(Class::Messages), 1, "a POST stalled for 1 s");
        drop(t);
        assert!(
            matches!(r.delay(0, Instant::now()), Delay::Known(_)),
            "an abandoned POST is a sample"
        );
    }

    #[test]
    fn a_failure_moves_at_once_and_a_success_brings_the_route_back_up() {
        let r = Routes::new(
            vec!["http://a".into(), "http://b".into()],
            RouteChoice::default(),
        );
        feed(&r, 0, 0.005, 8);
        feed(&r, 1, 0.050, 8);
        r.failed(0, None, "refused");
        assert_eq!(r.pick(Class::Messages), 1, "down: moves despite the dwell");
        r.start(0, false).ok(10);
        assert_eq!(
            r.delay(0, Instant::now()),
            Delay::Unknown,
            "up; a POST of messages is no round trip for the window"
        );
        r.start(0, true).ok(10);
        assert!(matches!(r.delay(0, Instant::now()), Delay::Known(_)));
        assert_eq!(
            r.pick(Class::Messages),
            1,
            "the dwell holds the way back for a while"
        );
    }

    #[test]
    fn returns_to_the_preferred_route_only_after_a_window_of_good_round_trips() {
        let r = routes(2);
        feed(&r, 0, 0.5, 8);
        feed(&r, 1, 0.005, 8);
        assert_eq!(r.pick(Class::Messages), 1);
        feed(&r, 0, 0.005, 2);
        assert_eq!(r.pick(Class::Messages), 1, "two good ones are not enough");
        feed(&r, 0, 0.005, 1);
        assert_eq!(r.pick(Class::Messages), 0, "three are");
        assert_eq!(
            r.delay(0, Instant::now()),
            Delay::Known(0.005),
            "back on the good round trips alone"
        );
        assert_eq!(r.pick(Class::Messages), 0, "and it stays");
        assert_eq!(r.moves.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn round_trips_from_before_a_route_was_left_do_not_bring_traffic_back() {
        let r = routes(2);
        feed(&r, 0, 0.005, 7);
        feed(&r, 1, 0.005, 8);
        let mut t = r.start(0, false);
        t.started -= Duration::from_secs(1);
        r.lock(0).pending[0].1 = t.started;
        assert_eq!(r.pick(Class::Messages), 1);
        drop(t);
        assert_eq!(r.pick(Class::Messages), 1, "its good past is forgotten");
        feed(&r, 0, 0.005, 2);
        assert_eq!(r.pick(Class::Messages), 1, "two good ones are not a window");
        feed(&r, 0, 0.005, 1);
        assert_eq!(r.pick(Class::Messages), 0);
    }

    #[test]
    fn a_route_gone_quiet_is_left_within_the_dwell() {
        let r = Routes::new(
            vec!["http://a".into(), "http://b".into()],
            RouteChoice::default(),
        );
        feed(&r, 0, 0.5, 8);
        feed(&r, 1, 0.005, 8);
        assert_eq!(r.pick(Class::Messages), 1);
        feed(&r, 0, 0.005, 3);
        feed(&r, 1, 0.5, 8);
        // Slower, but the dwell holds: no move yet.
        assert_eq!(r.pick(Class::Messages), 1);
        let _t = r.start(1, false);
        r.lock(1).pending[0].1 = Instant::now() - Duration::from_millis(600);
        assert_eq!(r.pick(Class::Messages), 0, "a POST waited past hedge_after");
    }

    #[test]
    fn a_post_of_messages_taking_its_usual_time_is_not_a_stall() {
        let r = routes(2);
        feed(&r, 0, 0.003, 8);
        feed(&r, 1, 0.003, 8);
        // The upstream takes 130 ms to store an envelope, on either route;
        // empty probes take 3 ms.
        r.lock(0).message_rtt = Some(0.13);
        let _t = r.start(0, false);
        r.lock(0).pending[0].1 = Instant::now() - Duration::from_millis(350);
        assert_eq!(r.pick(Class::Messages), 0, "within three usual round trips");
        r.lock(0).pending[0].1 = Instant::now() - Duration::from_millis(450);
        assert_eq!(r.pick(Class::Messages), 1, "past them: stalled");
    }

    #[test]
    fn bulk_takes_its_named_route_unless_it_is_down() {
        let mut r = routes(2);
        r.cfg.bulk = vec![1];
        assert_eq!(r.pick(Class::Bulk), 1);
        assert_eq!(r.pick(Class::Messages), 0);
        r.failed(1, None, "reset");
        assert_eq!(r.pick(Class::Bulk), 0);
    }

    #[test]
    fn hedges_only_onto_a_route_that_is_up_after_the_floor_or_four_delays() {
        let r = routes(2);
        feed(&r, 0, 0.5, 8);
        assert_eq!(
            r.hedge(0, &[true, false]),
            Some((1, Duration::from_secs(2)))
        );
        assert_eq!(r.hedge(0, &[true, true]), None);
        r.failed(1, None, "refused");
        assert_eq!(r.hedge(0, &[true, false]), None);
        assert_eq!(r.fallbacks(0), vec![1]);
    }
}
