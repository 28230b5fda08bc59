//! Human durations for flags such as `--ttl 24h`: one or more `<number><unit>` groups with units
//! `s`, `m`, `h`, `d` (`90s`, `30m`, `24h`, `7d`, `1h30m`). A bare number is refused rather than
//! guessed at.

use std::time::Duration;

/// Parses a duration such as `24h`, `30m`, `7d` or `1h30m`; used as a clap `value_parser`.
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration; use e.g. 24h, 30m, 7d".into());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: expected a number at {rest:?}"
            ));
        }
        let (number, after) = rest.split_at(digits);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        let mut chars = after.chars();
        let unit_secs = match chars.next() {
            Some('s') => 1,
            Some('m') => 60,
            Some('h') => 3600,
            Some('d') => 86_400,
            Some(c) => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {c:?} (use s, m, h, d)"
                ));
            }
            None => {
                return Err(format!(
                    "invalid duration {s:?}: missing unit after {number} (use s, m, h, d)"
                ));
            }
        };
        total = n
            .checked_mul(unit_secs)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        rest = chars.as_str();
    }
    if total == 0 {
        return Err(format!("invalid duration {s:?}: must be positive"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse(" 2d12h "), Ok(Duration::from_secs(216_000)));
    }

    #[test]
    fn refuses_bad_durations() {
        for bad in [
            "",
            "24",
            "h",
            "24x",
            "-1h",
            "1.5h",
            "0s",
            "99999999999999999999d",
            "1h 30m",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
