//! Queue health in a tier's status tree (and so in every heartbeat): how
//! full its spool is, how old its oldest message, when it will be full at
//! the rate it grows, and what it dropped or dead-lettered since its
//! previous heartbeat. The names, and the rule the centre applies, are
//! `rs_protocol::control::queue_health`.

use std::sync::Mutex;

use rs_protocol::control::queue_health as qh;
use rs_protocol::model::Detail;
use rs_protocol::time::Timestamp;
use rs_store::spool::SpoolStats;

/// What the spool held at the last heartbeat, to tell what changed since.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: tokio::time::Instant,
    bytes: u64,
    dropped: u64,
    dead_letters: u64,
}

/// A tier's queue health: the last heartbeat's sample of its spool.
#[derive(Debug, Default)]
pub struct QueueHealth {
    last_beat: Mutex<Option<Sample>>,
}

fn dropped(s: &SpoolStats) -> u64 {
    s.evicted_total + s.aged_out_total + s.refused_total
}

impl QueueHealth {
    /// Seconds until a spool holding `s` (of at most `max_bytes`) is full
    /// at the rate it grew since the last heartbeat; `None` while it is
    /// not growing (or before the first heartbeat).
    pub fn full_in_secs(&self, s: &SpoolStats, max_bytes: u64) -> Option<i64> {
        let last = self.last_beat.lock().ok().and_then(|l| *l)?;
        let secs = last.at.elapsed().as_secs_f64();
        let rate =
            (s.bytes > last.bytes && secs > 0.0).then(|| (s.bytes - last.bytes) as f64 / secs)?;
        let left = max_bytes.saturating_sub(s.bytes) as f64;
        Some((left / rate) as i64)
    }

    /// The queue-health figures of a spool holding `s` (of at most
    /// `max_bytes`) at `now`, against the last heartbeat's sample. For a
    /// heartbeat (`beat`), `s` becomes the sample the next one is measured
    /// against: exactly what this one reported, so nothing dropped between
    /// two heartbeats goes unreported.
    pub fn details(
        &self,
        s: &SpoolStats,
        max_bytes: u64,
        now: Timestamp,
        beat: bool,
    ) -> Vec<Detail> {
        let mut out = vec![
            Detail::new(qh::MAX_BYTES, max_bytes.to_string()),
            Detail::new(
                qh::FILL_PCT,
                (u128::from(s.bytes) * 100 / u128::from(max_bytes.max(1))).to_string(),
            ),
            Detail::new(
                qh::OLDEST_AGE_SECS,
                s.oldest
                    .map_or(0, |o| (now.as_millis() - o.as_millis()).max(0) / 1000)
                    .to_string(),
            ),
        ];
        let last = match self.last_beat.lock() {
            Ok(mut l) => {
                let last = *l;
                if beat {
                    *l = Some(Sample {
                        at: tokio::time::Instant::now(),
                        bytes: s.bytes,
                        dropped: dropped(s),
                        dead_letters: s.dead_letters,
                    });
                }
                last
            }
            Err(_) => None,
        };
        let (grew, dropped_since, dead_since) = match last {
            Some(l) => {
                let secs = l.at.elapsed().as_secs_f64();
                let grew =
                    (s.bytes > l.bytes && secs > 0.0).then(|| (s.bytes - l.bytes) as f64 / secs);
                (
                    grew,
                    dropped(s).saturating_sub(l.dropped),
                    s.dead_letters.saturating_sub(l.dead_letters),
                )
            }
            None => (None, 0, 0),
        };
        if let Some(rate) = grew {
            let left = max_bytes.saturating_sub(s.bytes) as f64;
            out.push(Detail::new(
                qh::FULL_IN_SECS,
                ((left / rate) as u64).to_string(),
            ));
        }
        out.push(Detail::new(qh::DROPPED, dropped_since.to_string()));
        out.push(Detail::new(qh::DEAD_LETTERED, dead_since.to_string()));
        out
    }
}
