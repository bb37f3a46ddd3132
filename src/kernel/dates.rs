//! UTC calendar arithmetic on microseconds since the epoch, for expiry checks, daily
//! reports and readable timestamps, without a date library. Algorithms from Howard
//! Hinnant's `chrono`-compatible civil date functions.

const US_PER_DAY: i64 = 86_400 * 1_000_000;

/// (year, month, day) of a day number (days since 1970-01-01).
pub fn civil_from_days(z: i64) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
}

/// Day number of (year, month, day).
pub fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn ymd(us: i64) -> (i32, u32, u32) {
    civil_from_days(us.div_euclid(US_PER_DAY))
}

/// Start of a UTC day, in microseconds.
pub fn day_start_us(y: i32, m: u32, d: u32) -> i64 {
    days_from_civil(y, m, d) * US_PER_DAY
}

/// Parses `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Option<(i32, u32, u32)> {
    let mut parts = s.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i32, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    // The day must exist: round-tripping through the day number catches 2026-02-30.
    (civil_from_days(days_from_civil(y, m, d)) == (y, m, d)).then_some((y, m, d))
}

/// RFC 3339 with microseconds, UTC.
pub fn rfc3339(us: i64) -> String {
    let (y, mo, d) = ymd(us);
    let secs_of_day = us.rem_euclid(US_PER_DAY) / 1_000_000;
    let micros = us.rem_euclid(1_000_000);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        secs_of_day / 3600,
        (secs_of_day / 60) % 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for days in [-1000, 0, 1, 59, 365, 10_957, 20_000, 20_781, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(day_start_us(2026, 11, 24) + 3_723_000_001), "2026-11-24T01:02:03.000001Z");
        assert_eq!(parse_date("2026-11-24"), Some((2026, 11, 24)));
        assert_eq!(parse_date("2026-02-30"), None);
        assert_eq!(parse_date("2026-1-01"), None);
        assert_eq!(parse_date("20261124"), None);
    }
}
