//! Wire timestamps: UTC, millisecond precision, one fixed RFC 3339 profile.
//!
//! Written by hand rather than with a date crate because the protocol admits
//! exactly one form (`YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, years 0000-9999) and a
//! general RFC 3339 parser would accept offsets and forms that other
//! implementations need not handle; it is also on the decode hot path.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(i64);

/// Largest representable instant: 9999-12-31T23:59:59.999Z.
const MAX_MS: i64 = 253_402_300_799_999;
/// Smallest: 0000-01-01T00:00:00.000Z.
const MIN_MS: i64 = -62_167_219_200_000;

/// Why a string is not a wire timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a UTC timestamp of the form YYYY-MM-DDTHH:MM:SS[.fff]Z")]
pub struct TimestampError;

impl Timestamp {
    /// The timestamp `ms` milliseconds after the epoch, if within years 0-9999.
    pub fn from_millis(ms: i64) -> Option<Self> {
        (MIN_MS..=MAX_MS).contains(&ms).then_some(Timestamp(ms))
    }

    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// Now, from the system clock.
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Self {
        let ms = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(MAX_MS),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(-MIN_MS),
        };
        Timestamp(ms.clamp(MIN_MS, MAX_MS))
    }

    /// `self + d`, saturating at the representable range.
    pub fn saturating_add(self, d: Duration) -> Self {
        let add = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(add).min(MAX_MS))
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0 - earlier.0).unwrap_or(0))
    }

    /// Parses the wire form.
    pub fn parse(s: &str) -> Result<Self, TimestampError> {
        Self::parse_bytes(s.as_bytes())
    }

    /// Parses the wire form from bytes (anything but ASCII is refused).
    pub(crate) fn parse_bytes(b: &[u8]) -> Result<Self, TimestampError> {
        // The form every tier writes (three fractional digits) is read by
        // word arithmetic: headers carry several timestamps and are read at
        // every tier.
        if let Ok(w) = <&[u8; 24]>::try_from(b) {
            let [y, mo, d, h, mi, sec, ms] = written_fields(w).ok_or(TimestampError)?;
            return Self::from_fields(y, mo, d, h, mi, sec, ms);
        }
        if b.len() < 20 || b[b.len() - 1] != b'Z' {
            return Err(TimestampError);
        }
        // At most nine digits: fits a u32.
        let num = |r: std::ops::Range<usize>| -> Result<u32, TimestampError> {
            let mut v = 0u32;
            for &c in &b[r] {
                if !c.is_ascii_digit() {
                    return Err(TimestampError);
                }
                v = v * 10 + u32::from(c - b'0');
            }
            Ok(v)
        };
        let sep = |i: usize, c: u8| {
            if b[i] == c {
                Ok(())
            } else {
                Err(TimestampError)
            }
        };
        sep(4, b'-')?;
        sep(7, b'-')?;
        sep(10, b'T')?;
        sep(13, b':')?;
        sep(16, b':')?;
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let ms = match b.len() {
            20 => 0,
            n if (22..=29).contains(&n) && b[19] == b'.' => {
                let frac = &b[20..n - 1];
                let mut ms = num(20..n - 1)?;
                for _ in frac.len()..3 {
                    ms *= 10;
                }
                for _ in 3..frac.len() {
                    ms /= 10;
                }
                ms
            }
            _ => return Err(TimestampError),
        };
        Self::from_fields(year, month, day, hour, min, sec, ms)
    }

    /// The instant of a parsed date and time (a four-digit year, so 0 to
    /// 9999), if each field is in range. Unsigned arithmetic: every tier
    /// reads several timestamps per message.
    fn from_fields(
        year: u32,
        month: u32,
        day: u32,
        hour: u32,
        min: u32,
        sec: u32,
        ms: u32,
    ) -> Result<Self, TimestampError> {
        if !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || min > 59
            || sec > 59
        {
            return Err(TimestampError);
        }
        let days = days_from_civil(year, month, day);
        let in_day = ((hour * 60 + min) * 60 + sec) * 1000 + ms;
        Ok(Timestamp(days * 86_400_000 + i64::from(in_day)))
    }

    /// Appends the wire form (always with three fractional digits).
    pub fn write_to(self, out: &mut Vec<u8>) {
        let days = self.0.div_euclid(86_400_000);
        let rem = self.0.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        let (h, mi, s, ms) = (
            rem / 3_600_000,
            rem / 60_000 % 60,
            rem / 1000 % 60,
            rem % 1000,
        );
        let mut buf = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: i64| {
            for i in (0..width).rev() {
                buf[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, y);
        put(5, 2, m);
        put(8, 2, d);
        put(11, 2, h);
        put(14, 2, mi);
        put(17, 2, s);
        put(20, 3, ms);
        out.extend_from_slice(&buf);
    }
}

/// The fields of `YYYY-MM-DDTHH:MM:SS.mmmZ` (year, month, day, hour,
/// minute, second, millisecond), if every digit is a digit and every
/// separator is in place; ranges are the caller's to check.
///
/// Three 8-byte words at a time, written out by hand because no crate
/// reads this one fixed form: each word is XORed with the form's template,
/// which leaves separators 0 and digits 0 to 9 when the input matches.
fn written_fields(b: &[u8; 24]) -> Option<[u32; 7]> {
    const TEMPLATE: &[u8; 24] = b"0000-00-00T00:00:00.000Z";
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const SIX: u64 = 0x0606_0606_0606_0606;
    let word = |a: &[u8; 24], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&a[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    // 0xFF at the digits of each word.
    const fn digit_mask(i: usize) -> u64 {
        let mut m = 0u64;
        let mut k = 0;
        while k < 8 {
            if TEMPLATE[i * 8 + k] == b'0' {
                m |= 0xFF << (8 * k);
            }
            k += 1;
        }
        m
    }
    const MASKS: [u64; 3] = [digit_mask(0), digit_mask(1), digit_mask(2)];
    let mut x = [0u64; 3];
    let mut bad = 0u64;
    for i in 0..3 {
        let v = word(b, i) ^ word(TEMPLATE, i);
        let d = v & MASKS[i];
        // A separator must match exactly; a digit byte must be 0x00-0x09:
        // no high nibble, and a low nibble that 6 does not carry past 15
        // (no carry crosses bytes once the high nibbles are clear, and a
        // wrap only happens when one is not).
        bad |= (v & !MASKS[i]) | (d & HIGH) | (d.wrapping_add(SIX) & HIGH & MASKS[i]);
        x[i] = d;
    }
    if bad != 0 {
        return None;
    }
    let digit = |at: usize| ((x[at / 8] >> (8 * (at % 8))) & 0xFF) as u32;
    let two = |at: usize| digit(at) * 10 + digit(at + 1);
    Some([
        two(0) * 100 + two(2),
        two(5),
        two(8),
        two(11),
        two(14),
        two(17),
        two(20) * 10 + digit(22),
    ])
}

fn is_leap(y: u32) -> bool {
    y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400))
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days (public domain).
// Here for years 0 to 9999, counted from 400 years earlier so that the
// year before March of year 0 is not negative, then shifted back by one
// era (146,097 days).
fn days_from_civil(y: u32, m: u32, d: u32) -> i64 {
    let y = y + 400 - u32::from(m <= 2);
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    i64::from(era * 146_097 + doe) - 719_468 - 146_097
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut v = Vec::with_capacity(24);
        self.write_to(&mut v);
        f.write_str(std::str::from_utf8(&v).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A source of the current time; tests substitute their own.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples() {
        let t = Timestamp::parse("2026-11-24T22:56:37.123Z").unwrap();
        assert_eq!(t.as_millis(), 1_795_560_997_123);
        assert_eq!(t.to_string(), "2026-11-24T22:56:37.123Z");
        assert_eq!(
            Timestamp::parse("1970-01-01T00:00:00Z")
                .unwrap()
                .as_millis(),
            0
        );
        assert_eq!(
            Timestamp::parse("1969-12-31T23:59:59.9999Z")
                .unwrap()
                .as_millis(),
            -1
        );
        assert_eq!(
            Timestamp::parse("2024-02-29T00:00:00.5Z")
                .unwrap()
                .to_string(),
            "2024-02-29T00:00:00.500Z"
        );
        for bad in [
            "2023-02-29T00:00:00Z",
            "2026-11-24 22:56:37Z",
            "2026-11-24T22:56:37+01:00",
            "2026-11-24T24:00:00Z",
            "2026-11-24T22:56:37.Z",
            "2026-11-24T22:56:37.1234567890Z",
            "+026-11-24T22:56:37Z",
            // The three-digit form has its own reading; it refuses the same.
            "2023-02-29T00:00:00.000Z",
            "2026-13-24T22:56:37.123Z",
            "2026-11-31T22:56:37.123Z",
            "2026-11-24T22:60:37.123Z",
            "2026-11-24T22:56:3a.123Z",
            "2026-11-24T22:56:37.12+Z",
            "2026-11-24T22:56:37,123Z",
            "-026-11-24T22:56:37.123Z",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            Timestamp::from_millis(MIN_MS).unwrap().to_string(),
            "0000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_millis(MAX_MS).unwrap().to_string(),
            "9999-12-31T23:59:59.999Z"
        );
    }

    /// The three-digit form reads as the general reading does: the same
    /// instant written with two and with four fractional digits.
    #[test]
    fn three_digit_form_agrees_with_the_general_reading() {
        let mut ms = MIN_MS;
        while ms < MAX_MS {
            let wire = Timestamp(ms).to_string();
            let (head, frac) = wire.split_at(20);
            let four = format!("{head}{}0Z", &frac[..3]);
            assert_eq!(Timestamp::parse(&wire), Timestamp::parse(&four), "{wire}");
            if ms % 10 == 0 {
                let two = format!("{head}{}Z", &frac[..2]);
                assert_eq!(Timestamp::parse(&wire), Timestamp::parse(&two), "{wire}");
            }
            ms += 7_654_321_097;
        }
    }

    /// The word-at-a-time reading of the three-digit form takes exactly
    /// what the general reading takes: every byte of a written timestamp
    /// replaced by every other byte reads as the same text with a fourth
    /// fractional digit does (or, for the final `Z`, only a `Z` reads).
    #[test]
    fn three_digit_form_refuses_every_stray_byte() {
        for wire in [
            "2026-11-24T22:56:37.123Z",
            "2024-02-29T09:09:09.999Z",
            "0000-01-01T00:00:00.000Z",
        ] {
            for at in 0..24 {
                for c in 0..=255u8 {
                    let mut b = wire.as_bytes().to_vec();
                    b[at] = c;
                    let got = Timestamp::parse_bytes(&b);
                    if at == 23 {
                        assert_eq!(got.is_ok(), c == b'Z', "{wire} with {c:#x} at {at}");
                        continue;
                    }
                    let mut four = b[..23].to_vec();
                    four.extend_from_slice(b"0Z");
                    assert_eq!(
                        got,
                        Timestamp::parse_bytes(&four),
                        "{wire} with {c:#x} at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn round_trip_many() {
        let mut ms = MIN_MS;
        while ms < MAX_MS {
            let t = Timestamp(ms);
            assert_eq!(Timestamp::parse(&t.to_string()).unwrap(), t);
            ms += 9_876_543_211;
        }
    }
}
