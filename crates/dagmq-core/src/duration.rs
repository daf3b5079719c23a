//! Human durations as DAG files write them: `500ms`, `5s`, `10m`, `1h30m`, `2d`.

use std::time::Duration;

/// Parses a duration such as `5s`, `1h30m` or `250ms`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("bad duration {text:?}: expected a number at {rest:?}"));
        }
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {text:?}: {:?} is not a number", &rest[..digits]))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => return Err(format!("bad duration {text:?}: missing unit (ms, s, m, h, d)")),
            other => return Err(format!("bad duration {text:?}: unknown unit {other:?} (ms, s, m, h, d)")),
        };
        total += Duration::from_secs_f64(number * scale);
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if !millis.is_multiple_of(1000) {
        return format!("{millis}ms");
    }
    let secs = duration.as_secs();
    if secs.is_multiple_of(3600) && secs > 0 {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) && secs > 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<u64, &str>) {
        let got = parse_duration(input).map(|d| d.as_millis() as u64);
        match expected {
            Ok(ms) => assert_eq!(got, Ok(ms), "{input}"),
            Err(fragment) => {
                let err = got.expect_err(input);
                assert!(err.contains(fragment), "{input}: {err}");
            }
        }
    }

    #[test]
    fn parses_units_and_sums() {
        check("500ms", Ok(500));
        check("5s", Ok(5000));
        check("10m", Ok(600_000));
        check("1h30m", Ok(5_400_000));
        check("2d", Ok(172_800_000));
        check("1.5s", Ok(1500));
        check("30", Ok(30_000));
        check("", Err("empty"));
        check("5x", Err("unknown unit"));
        check("s5", Err("expected a number"));
        check("5", Ok(5000));
        check("10 m", Err("unknown unit"));
    }

    #[test]
    fn formats_round_trip() {
        for d in ["500ms", "5s", "10m", "2h", "90s"] {
            let parsed = parse_duration(d).unwrap();
            assert_eq!(parse_duration(&format_duration(parsed)).unwrap(), parsed);
        }
    }
}
