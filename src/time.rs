//! Parsers for the number and date forms used by the API's headers.
//! Hand-written because each is small, allocation-free and total: any input
//! gives a value or `None`, never a panic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A non-negative decimal `digits[.digits]` with optional surrounding spaces:
/// the whole part and the fraction in billionths (digits past nine are dropped).
pub(crate) fn parse_decimal(bytes: &[u8]) -> Option<(u64, u32)> {
    let text = bytes.trim_ascii();
    let (whole, fraction) = match text.iter().position(|&c| c == b'.') {
        Some(dot) => (&text[..dot], Some(&text[dot + 1..])),
        None => (text, None),
    };
    let whole = parse_digits(whole)?;
    let nanos = match fraction {
        None => 0,
        Some(digits) => {
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let mut nanos = 0u32;
            for position in 0..9 {
                let digit = digits.get(position).map_or(0, |d| u32::from(d - b'0'));
                nanos = nanos * 10 + digit;
            }
            nanos
        }
    };
    Some((whole, nanos))
}

/// One or more ASCII digits as a `u64`; `None` on anything else or overflow.
fn parse_digits(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Exactly `N` ASCII digits.
fn fixed_digits<const N: usize>(bytes: &[u8]) -> Option<u32> {
    if bytes.len() != N {
        return None;
    }
    bytes.iter().try_fold(0u32, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
    })
}

/// A calendar date and time of day in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl Civil {
    /// Seconds since the Unix epoch, if every field is in range.
    fn to_unix(self) -> Option<i64> {
        let Civil {
            year,
            month,
            day,
            hour,
            minute,
            second,
        } = self;
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        // A leap second (60) is accepted and read as the next second.
        if hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        let days = days_from_civil(year, month, day);
        Some(days * 86_400 + i64::from(hour * 3600 + minute * 60 + second))
    }
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the era-based
/// algorithm: 400-year eras of 146 097 days, with March as the first month).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = i64::from((month + 9) % 12);
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn unix_to_system_time(secs: i64, nanos: u32) -> Option<SystemTime> {
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(Duration::from_nanos(u64::from(nanos)))
    }
}

fn month_from_name(name: &[u8]) -> Option<u32> {
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    MONTHS
        .iter()
        .position(|m| m.as_slice() == name)
        .map(|i| i as u32 + 1)
}

fn is_day_name(name: &[u8], long: bool) -> bool {
    const SHORT: [&[u8]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
    const LONG: [&[u8]; 7] = [
        b"Monday",
        b"Tuesday",
        b"Wednesday",
        b"Thursday",
        b"Friday",
        b"Saturday",
        b"Sunday",
    ];
    if long {
        LONG.contains(&name)
    } else {
        SHORT.contains(&name)
    }
}

/// `HH:MM:SS`.
fn time_of_day(bytes: &[u8]) -> Option<(u32, u32, u32)> {
    if bytes.len() != 8 || bytes[2] != b':' || bytes[5] != b':' {
        return None;
    }
    Some((
        fixed_digits::<2>(&bytes[0..2])?,
        fixed_digits::<2>(&bytes[3..5])?,
        fixed_digits::<2>(&bytes[6..8])?,
    ))
}

/// An HTTP-date in any of RFC 9110's three forms (IMF-fixdate, RFC 850,
/// asctime). The day name is checked for spelling, not against the date.
pub(crate) fn parse_http_date(bytes: &[u8]) -> Option<SystemTime> {
    let text = bytes.trim_ascii();
    let civil = imf_fixdate(text)
        .or_else(|| rfc850_date(text))
        .or_else(|| asctime_date(text))?;
    unix_to_system_time(civil.to_unix()?, 0)
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`
fn imf_fixdate(text: &[u8]) -> Option<Civil> {
    if text.len() != 29 || &text[3..5] != b", " || &text[25..] != b" GMT" {
        return None;
    }
    if !is_day_name(&text[..3], false) || text[7] != b' ' || text[11] != b' ' || text[16] != b' ' {
        return None;
    }
    let (hour, minute, second) = time_of_day(&text[17..25])?;
    Some(Civil {
        year: i64::from(fixed_digits::<4>(&text[12..16])?),
        month: month_from_name(&text[8..11])?,
        day: fixed_digits::<2>(&text[5..7])?,
        hour,
        minute,
        second,
    })
}

/// `Sunday, 06-Nov-94 08:49:37 GMT`; two-digit years 70-99 are 19xx, 00-69 are 20xx.
fn rfc850_date(text: &[u8]) -> Option<Civil> {
    let comma = text.iter().position(|&c| c == b',')?;
    if !is_day_name(&text[..comma], true) {
        return None;
    }
    let rest = &text[comma + 1..];
    if rest.len() != 23 || rest[0] != b' ' || &rest[19..] != b" GMT" {
        return None;
    }
    if rest[3] != b'-' || rest[7] != b'-' || rest[10] != b' ' {
        return None;
    }
    let short_year = i64::from(fixed_digits::<2>(&rest[8..10])?);
    let (hour, minute, second) = time_of_day(&rest[11..19])?;
    Some(Civil {
        year: if short_year >= 70 {
            1900 + short_year
        } else {
            2000 + short_year
        },
        month: month_from_name(&rest[4..7])?,
        day: fixed_digits::<2>(&rest[1..3])?,
        hour,
        minute,
        second,
    })
}

/// `Sun Nov  6 08:49:37 1994`
fn asctime_date(text: &[u8]) -> Option<Civil> {
    if text.len() != 24 || text[3] != b' ' || text[7] != b' ' || text[10] != b' ' {
        return None;
    }
    if !is_day_name(&text[..3], false) || text[19] != b' ' {
        return None;
    }
    let day = match &text[8..10] {
        [b' ', d] => fixed_digits::<1>(&[*d])?,
        two => fixed_digits::<2>(two)?,
    };
    let (hour, minute, second) = time_of_day(&text[11..19])?;
    Some(Civil {
        year: i64::from(fixed_digits::<4>(&text[20..24])?),
        month: month_from_name(&text[4..7])?,
        day,
        hour,
        minute,
        second,
    })
}

/// An RFC 3339 date-time: `2026-11-23T07:00:00Z`, with optional fraction and
/// a `Z` or `±HH:MM` offset (`t`, `z` and a space separator are accepted).
pub(crate) fn parse_rfc3339(bytes: &[u8]) -> Option<SystemTime> {
    let text = bytes.trim_ascii();
    if text.len() < 20 || text[4] != b'-' || text[7] != b'-' || text[13] != b':' {
        return None;
    }
    if !matches!(text[10], b'T' | b't' | b' ') || text[16] != b':' {
        return None;
    }
    let civil = Civil {
        year: i64::from(fixed_digits::<4>(&text[0..4])?),
        month: fixed_digits::<2>(&text[5..7])?,
        day: fixed_digits::<2>(&text[8..10])?,
        hour: fixed_digits::<2>(&text[11..13])?,
        minute: fixed_digits::<2>(&text[14..16])?,
        second: fixed_digits::<2>(&text[17..19])?,
    };
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let [b'.', tail @ ..] = rest {
        let digits = tail.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for position in 0..9 {
            let digit = tail[..digits]
                .get(position)
                .map_or(0, |d| u32::from(d - b'0'));
            nanos = nanos * 10 + digit;
        }
        rest = &tail[digits..];
    }
    let offset_secs: i64 = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = fixed_digits::<2>(&[*h1, *h2])?;
            let minutes = fixed_digits::<2>(&[*m1, *m2])?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = i64::from(hours * 3600 + minutes * 60);
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return None,
    };
    unix_to_system_time(civil.to_unix()? - offset_secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Option<SystemTime> {
        unix_to_system_time(secs, 0)
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal(b"0"), Some((0, 0)));
        assert_eq!(parse_decimal(b" 42 "), Some((42, 0)));
        assert_eq!(parse_decimal(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some((u64::MAX, 0)));
        for bad in [
            &b"18446744073709551616"[..],
            b"",
            b"1.",
            b".1",
            b"-1",
            b"1e2",
            b"1.2.3",
            b"0x10",
            b"1 2",
        ] {
            assert_eq!(
                parse_decimal(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2026, 11, 23), 20_780);
    }

    #[test]
    fn http_dates_all_forms() {
        let expected = at(784_111_777);
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"), expected);
        assert_eq!(parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), expected);
        assert_eq!(parse_http_date(b"Sun Nov  6 08:49:37 1994"), expected);
        assert_eq!(
            parse_http_date(b"Thu, 29 Feb 2024 00:00:00 GMT"),
            at(1_709_164_800)
        );
        assert!(
            parse_http_date(b"Tue, 06-Nov-29 00:00:00 GMT").is_none(),
            "Tue is short"
        );
        for bad in [
            &b"Fri, 29 Feb 2023 00:00:00 GMT"[..],
            b"Sun, 06 Nov 1994 08:60:37 GMT",
            b"Sun, 06 Foo 1994 08:49:37 GMT",
            b"Xyz, 06 Nov 1994 08:49:37 GMT",
            b"Sun, 6 Nov 1994 08:49:37 GMT",
            b"Sun Nov 6 08:49:37 1994",
            b"",
            b"GMT",
            "Sun, 06 Nov 1994 08:49:37 G\u{e9}".as_bytes(),
        ] {
            assert_eq!(
                parse_http_date(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn rfc3339_forms() {
        assert_eq!(parse_rfc3339(b"1970-01-01T00:00:00Z"), at(0));
        assert_eq!(parse_rfc3339(b"2026-11-23T07:00:00Z"), at(1_795_417_200));
        assert_eq!(
            parse_rfc3339(b"2026-11-23t08:00:00+01:00"),
            at(1_795_417_200)
        );
        assert_eq!(
            parse_rfc3339(b"2026-11-23 06:30:00-00:30"),
            at(1_795_417_200)
        );
        assert_eq!(
            parse_rfc3339(b"1970-01-01T00:00:01.25Z"),
            unix_to_system_time(1, 250_000_000)
        );
        assert_eq!(parse_rfc3339(b"1969-12-31T23:59:59Z"), at(-1));
        for bad in [
            &b"2026-11-23T07:00:00"[..],
            b"2026-11-23T07:00:00.Z",
            b"2026-13-23T07:00:00Z",
            b"2026-11-23T07:00:00+24:00",
            b"2026-11-23X07:00:00Z",
            b"2026-11-23T07:00:00ZZ",
            b"garbage",
        ] {
            assert_eq!(
                parse_rfc3339(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
