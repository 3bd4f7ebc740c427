//! Prometheus metrics: one registry per daemon, read by `/metrics` and by
//! the status tree alike.
//!
//! A counter is declared once, where it is counted: a field of a stats
//! struct made by [`counters!`] (or by hand with [`counter`]), holding its
//! name and help. The daemon registers the struct in its [`Registry`];
//! `/metrics` gathers the registry and the status tree reads the same
//! field with `get()`, so the two never disagree.
//!
//! The `prometheus` crate (not `prometheus-client`) because it writes the
//! classic text format (0.0.4), which every Prometheus server and Debian's
//! `promtool check metrics` read, and because its metrics can be read back
//! (the status tree does).

pub use prometheus::core::{Collector, Desc};
pub use prometheus::proto::MetricFamily;
pub use prometheus::{GaugeVec, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

/// Every metric's name starts with this and `_`.
pub const PREFIX: &str = "rs";

/// A daemon's metrics.
#[derive(Clone)]
pub struct Registry(prometheus::Registry);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Registry(
            prometheus::Registry::new_custom(Some(PREFIX.into()), None)
                .expect("a fixed, valid prefix"),
        )
    }

    /// Registers `c` (a clone: metrics share their values with the
    /// original). A name registered twice with the same labels is a
    /// mistake in the code; it is logged, and the first one is kept.
    pub fn add<C: Collector + Clone + 'static>(&self, c: &C) {
        if let Err(e) = self.0.register(Box::new(c.clone())) {
            tracing::error!("metrics: {e}");
        }
    }

    /// The registry in the text exposition format (0.0.4).
    pub fn text(&self) -> String {
        use prometheus::Encoder as _;
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into memory fails only on a metric without a value,
        // which the constructors here never make.
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.0.gather(), &mut out) {
            tracing::error!("metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The content type of [`Registry::text`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn opts(name: &str, help: &str, labels: &[(&str, &str)]) -> prometheus::Opts {
    let mut o = prometheus::Opts::new(name, help);
    for (k, v) in labels {
        o = o.const_label(*k, *v);
    }
    o
}

/// A counter `name` (ending in `_total`) with fixed `labels`: counters of
/// one name that differ in a label's value (`reason="expired"`,
/// `reason="rejected"`) come out as one family.
///
/// # Panics
/// On a name or label that is not a valid metric name: a mistake in the
/// code, found by the first test that builds the struct.
pub fn counter(name: &str, help: &str, labels: &[(&str, &str)]) -> IntCounter {
    IntCounter::with_opts(opts(name, help, labels)).expect("a valid counter name")
}

/// A gauge with fixed `labels`.
///
/// # Panics
/// As [`counter`].
pub fn gauge(name: &str, help: &str, labels: &[(&str, &str)]) -> IntGauge {
    IntGauge::with_opts(opts(name, help, labels)).expect("a valid gauge name")
}

/// Sets `g` to a count (saturating: a gauge holds an `i64`).
pub fn set(g: &IntGauge, n: u64) {
    g.set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// A gauge read from `f` at each scrape (for a value kept elsewhere: a
/// flag, a length).
///
/// # Panics
/// As [`counter`].
pub fn pulling(
    name: &str,
    help: &str,
    f: impl Fn() -> f64 + Send + Sync + 'static,
) -> prometheus::PullingGauge {
    prometheus::PullingGauge::new(name, help, Box::new(f)).expect("a valid gauge name")
}

/// A gauge with one value per value of `label`, set at each scrape and
/// [`IntGaugeVec::reset`] before (so a value that went away, a
/// precedence no longer spooled, goes away too).
///
/// # Panics
/// As [`counter`].
pub fn gauge_by(name: &str, help: &str, label: &str) -> IntGaugeVec {
    IntGaugeVec::new(prometheus::Opts::new(name, help), &[label]).expect("a valid gauge name")
}

/// A gauge that is there only while it has a value ([`Maybe::set`]):
/// "time until full" means nothing for a spool that is not filling, and
/// the text format has no way to say "none" but leaving it out.
#[derive(Clone)]
pub struct Maybe(IntGaugeVec);

impl std::fmt::Debug for Maybe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Maybe").field(&self.get()).finish()
    }
}

impl Maybe {
    /// # Panics
    /// As [`counter`].
    pub fn new(name: &str, help: &str) -> Self {
        Maybe(IntGaugeVec::new(prometheus::Opts::new(name, help), &[]).expect("a valid gauge name"))
    }

    pub fn set(&self, v: Option<i64>) {
        match v {
            Some(v) => self.0.with_label_values::<&str>(&[]).set(v),
            None => self.0.reset(),
        }
    }

    pub fn get(&self) -> Option<i64> {
        let families = self.0.collect();
        let m = families.first()?.get_metric().first()?;
        Some(m.get_gauge().get_value() as i64)
    }
}

impl Collector for Maybe {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

/// Buckets of latencies in seconds: 1 ms to about 65 s, doubling.
pub fn latency_buckets() -> Vec<f64> {
    (0..17).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

/// A histogram of latencies in seconds ([`latency_buckets`]).
///
/// # Panics
/// As [`counter`].
pub fn latency(name: &str, help: &str, labels: &[(&str, &str)]) -> Histogram {
    let mut o = prometheus::HistogramOpts::new(name, help).buckets(latency_buckets());
    for (k, v) in labels {
        o = o.const_label(*k, *v);
    }
    Histogram::with_opts(o).expect("a valid histogram name")
}

/// A struct of counters, each declared once with its metric name, fixed
/// labels and help; `register` adds them all to a [`Registry`].
///
/// ```ignore
/// rs_net::counters! {
///     /// Live counters.
///     pub struct Stats {
///         /// Envelopes received.
///         envelopes: "envelopes_received_total", "Envelopes received.";
///         expired: "messages_refused_total" {reason = "expired"}, "Messages refused, by reason.";
///     }
/// }
/// ```
#[macro_export]
macro_rules! counters {
    (
        $(#[$m:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fm:meta])*
                $field:ident: $metric:literal $({ $($lk:ident = $lv:literal),* })?, $help:literal;
            )*
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone)]
        $vis struct $name {
            $( $(#[$fm])* $vis $field: $crate::metrics::IntCounter, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    $(
                        $field: $crate::metrics::counter(
                            $metric,
                            $help,
                            &[$($((stringify!($lk), $lv)),*)?],
                        ),
                    )*
                }
            }
        }

        impl $name {
            /// Adds every counter to `registry`.
            $vis fn register(&self, registry: &$crate::metrics::Registry) {
                $( registry.add(&self.$field); )*
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::counters! {
        struct Two {
            a: "things_total", "Things.";
            b: "refused_total" {reason = "expired"}, "Refused, by reason.";
            c: "refused_total" {reason = "rejected"}, "Refused, by reason.";
        }
    }

    #[test]
    fn counters_of_one_name_come_out_as_one_family_and_read_back() {
        let r = Registry::new();
        let t = Two::default();
        t.register(&r);
        t.a.inc();
        t.c.inc_by(3);
        let text = r.text();
        assert!(
            text.contains("# TYPE rs_things_total counter\nrs_things_total 1\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE rs_refused_total counter").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("rs_refused_total{reason=\"expired\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("rs_refused_total{reason=\"rejected\"} 3\n"),
            "{text}"
        );
        assert_eq!(t.c.get(), 3);
    }

    #[test]
    fn a_gauge_by_label_forgets_what_a_reset_clears() {
        let r = Registry::new();
        let g = gauge_by("spool_messages", "Waiting.", "precedence");
        r.add(&g);
        g.with_label_values(&["3"]).set(5);
        assert!(r.text().contains("rs_spool_messages{precedence=\"3\"} 5"));
        g.reset();
        g.with_label_values(&["1"]).set(2);
        let text = r.text();
        assert!(!text.contains("precedence=\"3\""), "{text}");
        assert!(
            text.contains("rs_spool_messages{precedence=\"1\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn a_maybe_gauge_is_there_only_with_a_value() {
        let r = Registry::new();
        let g = Maybe::new("full_in_seconds", "Until full.");
        r.add(&g);
        assert!(!r.text().contains("rs_full_in_seconds"), "{}", r.text());
        g.set(Some(42));
        assert!(r.text().contains("rs_full_in_seconds 42\n"), "{}", r.text());
        assert_eq!(g.get(), Some(42));
        g.set(None);
        assert_eq!(g.get(), None);
        assert!(!r.text().contains("rs_full_in_seconds"), "{}", r.text());
    }

    #[test]
    fn a_name_registered_twice_keeps_the_first() {
        let r = Registry::new();
        let a = counter("x_total", "X.", &[]);
        let b = counter("x_total", "X.", &[]);
        r.add(&a);
        r.add(&b);
        a.inc();
        b.inc_by(7);
        assert!(r.text().contains("rs_x_total 1\n"));
    }
}
