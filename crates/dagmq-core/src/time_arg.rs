//! A time a person types (a backfill's `--from` and `--to`): an instant with its offset, or a
//! date or a wall-clock time that the DAG's timezone makes an instant.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A time as given: an instant (RFC 3339, with `Z` or an offset), or a time without an offset
/// (`2026-11-01` is midnight; `2026-11-01T06:00` or `2026-11-01 06:00:30`), read in a timezone
/// later ([`TimeArg::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeArg {
    /// An instant.
    Instant(DateTime<Utc>),
    /// A wall-clock time without an offset.
    Local(NaiveDateTime),
}

/// What [`TimeArg::parse`] accepts, for error messages.
pub const TIME_ARG_FORMATS: &str = "an RFC 3339 time (2026-11-01T06:00:00Z or with an offset, +01:00), a date \
                                    (2026-11-01: midnight in the DAG's timezone) or a time without an offset \
                                    (2026-11-01T06:00: in the DAG's timezone)";

impl From<DateTime<Utc>> for TimeArg {
    fn from(instant: DateTime<Utc>) -> TimeArg {
        TimeArg::Instant(instant)
    }
}

impl TimeArg {
    /// Parses `text`; the error says what was expected.
    pub fn parse(text: &str) -> Result<TimeArg, String> {
        let text = text.trim();
        if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
            return Ok(TimeArg::Instant(instant.with_timezone(&Utc)));
        }
        if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
            return Ok(TimeArg::Local(date.and_time(NaiveTime::MIN)));
        }
        for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
            if let Ok(local) = NaiveDateTime::parse_from_str(text, format) {
                return Ok(TimeArg::Local(local));
            }
        }
        Err(format!("{text:?} is not a time: expected {TIME_ARG_FORMATS}"))
    }

    /// The instant, a wall-clock time read in `timezone`. A time that a daylight-saving change
    /// makes occur twice is its first occurrence; one that it skips is an error.
    pub fn resolve(self, timezone: Tz) -> Result<DateTime<Utc>, String> {
        match self {
            TimeArg::Instant(instant) => Ok(instant),
            TimeArg::Local(local) => match timezone.from_local_datetime(&local) {
                chrono::LocalResult::Single(time) => Ok(time.with_timezone(&Utc)),
                chrono::LocalResult::Ambiguous(first, _) => Ok(first.with_timezone(&Utc)),
                chrono::LocalResult::None => Err(format!(
                    "{local} does not exist in {timezone} (the clocks skip it); give a time with an offset"
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn instants_dates_and_local_times() {
        let warsaw: Tz = "Europe/Warsaw".parse().unwrap();
        let at = |text: &str| TimeArg::parse(text).unwrap().resolve(warsaw).unwrap();
        assert_eq!(at("2026-11-01T06:00:00Z"), utc("2026-11-01T06:00:00Z"));
        assert_eq!(at("2026-11-01T06:00:00+05:00"), utc("2026-11-01T01:00:00Z"));
        assert_eq!(at("2026-11-01"), utc("2026-10-31T23:00:00Z"), "midnight in Warsaw (CET, +01:00)");
        assert_eq!(at("2026-07-01"), utc("2026-06-30T22:00:00Z"), "midnight in Warsaw (CEST, +02:00)");
        assert_eq!(at("2026-11-01T06:00"), utc("2026-11-01T05:00:00Z"));
        assert_eq!(at("2026-11-01 06:00:30"), utc("2026-11-01T05:00:30Z"));
        assert_eq!(TimeArg::parse("2026-11-01").unwrap().resolve(Tz::UTC).unwrap(), utc("2026-11-01T00:00:00Z"));
    }

    #[test]
    fn daylight_saving_changes() {
        let warsaw: Tz = "Europe/Warsaw".parse().unwrap();
        // 2026-10-25 02:30 happens twice in Warsaw: the first is still summer time.
        let twice = TimeArg::parse("2026-10-25T02:30").unwrap().resolve(warsaw).unwrap();
        assert_eq!(twice, utc("2026-10-25T00:30:00Z"));
        // 2026-03-29 02:30 never happens in Warsaw.
        let err = TimeArg::parse("2026-03-29T02:30").unwrap().resolve(warsaw).unwrap_err();
        assert_eq!(
            err,
            "2026-03-29 02:30:00 does not exist in Europe/Warsaw (the clocks skip it); give a time with an offset"
        );
    }

    #[test]
    fn anything_else_says_what_is_expected() {
        for text in ["", "yesterday", "2026-13-01", "2026-11-01T25:00", "1700000000"] {
            let err = TimeArg::parse(text).unwrap_err();
            assert!(err.starts_with(&format!("{:?} is not a time: expected an RFC 3339 time", text.trim())), "{err}");
            assert!(err.contains("midnight in the DAG's timezone"), "{err}");
        }
    }
}
