//! The backoff of every retry loop in the product: the sender, enrollment,
//! bulk transfers, downloads, the MLM's cache fetches and the server's
//! collector tasks all wait this long between attempts, each with its own
//! cap.

use std::time::Duration;

/// Exponential backoff from 1 s doubling to `cap`, full jitter.
pub fn backoff(attempts: u32, cap: Duration) -> Duration {
    let exp = Duration::from_secs(1).saturating_mul(1u32 << attempts.min(20));
    let top = exp.min(cap).as_millis() as u64;
    Duration::from_millis(fastrand::u64(top / 2..=top.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_one_second_to_the_cap_with_jitter() {
        for attempts in 0..40 {
            let cap = Duration::from_secs(60);
            let top = Duration::from_secs(1)
                .saturating_mul(1 << attempts.min(20))
                .min(cap);
            let d = backoff(attempts, cap);
            assert!(
                d <= top && d >= top / 2,
                "{attempts}: {d:?} outside {top:?}/2..={top:?}"
            );
        }
    }
}
