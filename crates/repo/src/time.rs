//! Instants as seconds since the Unix epoch, shown as RFC 3339 in UTC, and the calendar
//! fields that retention rules group backups by.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// An instant, in whole seconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

/// Now.
pub(crate) fn now() -> Timestamp {
    Timestamp::from_system(SystemTime::now())
}

/// RFC 3339 text (UTC, whole seconds) of `secs` since the epoch.
pub fn rfc3339(secs: i64) -> String {
    Timestamp(secs).to_string()
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Timestamp {
    /// The instant of a system time (before the epoch: the epoch).
    pub fn from_system(t: SystemTime) -> Timestamp {
        Timestamp(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0))
    }

    /// Parses `YYYY-MM-DDTHH:MM:SSZ` (what [`Display`](fmt::Display) writes).
    pub fn parse(s: &str) -> Option<Timestamp> {
        let b = s.as_bytes();
        if b.len() != 20
            || b[4] != b'-'
            || b[7] != b'-'
            || b[10] != b'T'
            || b[13] != b':'
            || b[16] != b':'
            || b[19] != b'Z'
        {
            return None;
        }
        let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
        let (y, mo, d, h, mi, se) =
            (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
            return None;
        }
        let days = days_from_civil(y as i64, mo, d);
        if civil_from_days(days) != (y as i64, mo, d) {
            return None;
        }
        Some(Timestamp(days * 86400 + (h * 3600 + mi * 60 + se) as i64))
    }

    /// Year, month (1-12), day (1-31), hour (0-23), in UTC shifted by `offset` seconds.
    pub(crate) fn civil(self, offset: i64) -> (i64, u32, u32, u32) {
        let t = self.0 + offset;
        let (y, m, d) = civil_from_days(t.div_euclid(86400));
        (y, m, d, (t.rem_euclid(86400) / 3600) as u32)
    }

    /// The ISO 8601 week (year, week number) of the day, in UTC shifted by `offset`.
    pub(crate) fn iso_week(self, offset: i64) -> (i64, u32) {
        let days = (self.0 + offset).div_euclid(86400);
        // 1970-01-01 was a Thursday: weekday 0 = Monday.
        let weekday = (days + 3).rem_euclid(7);
        let thursday = days - weekday + 3;
        let (y, _, _) = civil_from_days(thursday);
        let jan1 = days_from_civil(y, 1, 1);
        (y, ((thursday - jan1) / 7 + 1) as u32)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = civil_from_days(self.0.div_euclid(86400));
        let s = self.0.rem_euclid(86400);
        write!(f, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(Timestamp(1_798_761_599).to_string(), "2026-12-31T23:59:59Z");
        for t in [0, 951_782_400, 1_798_761_599, 4_102_444_800, 1_000_000_007] {
            assert_eq!(Timestamp::parse(&Timestamp(t).to_string()), Some(Timestamp(t)));
        }
        for bad in ["", "2026-02-30T00:00:00Z", "2026-13-01T00:00:00Z", "2026-01-01 00:00:00Z"] {
            assert_eq!(Timestamp::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn iso_weeks() {
        // 2021-01-03 (Sunday) is in week 53 of 2020; 2021-01-04 starts week 1.
        let day = |y, m, d| Timestamp(days_from_civil(y, m, d) * 86400 + 43200);
        assert_eq!(day(2021, 1, 3).iso_week(0), (2020, 53));
        assert_eq!(day(2021, 1, 4).iso_week(0), (2021, 1));
        assert_eq!(day(2026, 12, 31).iso_week(0), (2026, 53));
        assert_eq!(day(2024, 12, 30).iso_week(0), (2025, 1));
    }
}
