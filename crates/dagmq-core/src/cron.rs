//! Six-field cron expressions (`sec min hour day-of-month month day-of-week`), evaluated on
//! local wall-clock time.
//!
//! Fields take `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`, and month and
//! weekday names (`JAN`, `MON`). As in Vixie cron, when both day-of-month and day-of-week are
//! restricted, a day matches if either matches. Day-of-week runs 0-7 with 0 and 7 both Sunday.

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike};

/// A parsed cron expression; each field is a bit set of the values it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronExpr {
    /// Allowed seconds, bits 0-59.
    seconds: u64,
    /// Allowed minutes, bits 0-59.
    minutes: u64,
    /// Allowed hours, bits 0-23.
    hours: u32,
    /// Allowed days of month, bits 1-31.
    days_of_month: u32,
    /// Allowed months, bits 1-12.
    months: u16,
    /// Allowed weekdays, bits 0-6 with 0 = Sunday.
    days_of_week: u8,
    /// Whether day-of-month was `*`, which changes how the two day fields combine.
    any_day_of_month: bool,
    /// Whether day-of-week was `*`.
    any_day_of_week: bool,
}

const MONTH_NAMES: [&str; 12] = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl CronExpr {
    /// Parses six whitespace-separated fields.
    pub fn parse(text: &str) -> Result<CronExpr, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 6 {
            return Err(format!(
                "bad cron {text:?}: expected 6 fields (sec min hour day-of-month month day-of-week), found {}",
                fields.len()
            ));
        }
        let field = |index: usize, name: &str, min: u32, max: u32, names: &[&str], names_base: u32| {
            parse_field(fields[index], min, max, names, names_base)
                .map_err(|reason| format!("bad cron {text:?}: {name} field {:?}: {reason}", fields[index]))
        };
        let seconds = field(0, "second", 0, 59, &[], 0)?;
        let minutes = field(1, "minute", 0, 59, &[], 0)?;
        let hours = field(2, "hour", 0, 23, &[], 0)?;
        let days_of_month = field(3, "day-of-month", 1, 31, &[], 0)?;
        let months = field(4, "month", 1, 12, &MONTH_NAMES, 1)?;
        let mut days_of_week = field(5, "day-of-week", 0, 7, &DAY_NAMES, 0)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week |= 1;
        }
        Ok(CronExpr {
            seconds,
            minutes,
            hours: hours as u32,
            days_of_month: days_of_month as u32,
            months: months as u16,
            days_of_week: (days_of_week & 0x7f) as u8,
            any_day_of_month: fields[3] == "*" || fields[3] == "?",
            any_day_of_week: fields[5] == "*" || fields[5] == "?",
        })
    }

    /// Whether the expression allows this calendar day.
    fn day_matches(&self, date: NaiveDate) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let dom = self.days_of_month & (1 << date.day()) != 0;
        let dow = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        match (self.any_day_of_month, self.any_day_of_week) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }

    /// The first wall-clock time strictly after `after` that the expression allows, searching at
    /// most eight years ahead (an expression such as `0 0 0 30 2 *` never matches).
    pub fn next_local_after(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        let start = after + Duration::seconds(1);
        let start = start.with_nanosecond(0)?;
        let mut date = start.date();
        let mut first_day = true;
        let last_date = date + Duration::days(366 * 8);
        while date <= last_date {
            if self.day_matches(date) {
                let from = if first_day { start.time() } else { NaiveTime::MIN };
                if let Some(time) = self.first_time_from(from) {
                    return Some(date.and_time(time));
                }
            }
            first_day = false;
            date = date.succ_opt()?;
        }
        None
    }

    /// The first allowed time of day at or after `from`.
    fn first_time_from(&self, from: NaiveTime) -> Option<NaiveTime> {
        for hour in from.hour()..24 {
            if self.hours & (1 << hour) == 0 {
                continue;
            }
            let min_start = if hour == from.hour() { from.minute() } else { 0 };
            for minute in min_start..60 {
                if self.minutes & (1 << minute) == 0 {
                    continue;
                }
                let sec_start = if hour == from.hour() && minute == from.minute() { from.second() } else { 0 };
                for second in sec_start..60 {
                    if self.seconds & (1 << second) != 0 {
                        return NaiveTime::from_hms_opt(hour, minute, second);
                    }
                }
            }
        }
        None
    }
}

/// Parses one field into a bit set of allowed values.
fn parse_field(text: &str, min: u32, max: u32, names: &[&str], names_base: u32) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step.parse().map_err(|_| format!("step {step:?} is not a number"))?;
                if step == 0 {
                    return Err("step must be at least 1".to_string());
                }
                (range, step)
            }
            None => (part, 1),
        };
        let (low, high) = if range == "*" || range == "?" {
            (min, max)
        } else if let Some((low, high)) = range.split_once('-') {
            (value(low, names, names_base)?, value(high, names, names_base)?)
        } else {
            let single = value(range, names, names_base)?;
            // `5/15` means "from 5 to the end in steps of 15", as in most cron dialects.
            (single, if part.contains('/') { max } else { single })
        };
        if low < min || high > max || low > high {
            return Err(format!("{range:?} is outside {min}-{max} or reversed"));
        }
        let mut v = low;
        while v <= high {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

/// One value of a field: a number or a name.
fn value(text: &str, names: &[&str], names_base: u32) -> Result<u32, String> {
    if let Ok(number) = text.parse::<u32>() {
        return Ok(number);
    }
    let upper = text.to_ascii_uppercase();
    names
        .iter()
        .position(|name| *name == upper)
        .map(|index| index as u32 + names_base)
        .ok_or_else(|| format!("{text:?} is not a number or name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    fn check(expr: &str, after: &str, expected: &str) {
        let cron = CronExpr::parse(expr).unwrap();
        assert_eq!(cron.next_local_after(at(after)), Some(at(expected)), "{expr} after {after}");
    }

    #[test]
    fn next_times() {
        check("0 0 2 * * *", "2026-01-01 00:00:00", "2026-01-01 02:00:00");
        check("0 0 2 * * *", "2026-01-01 02:00:00", "2026-01-02 02:00:00");
        check("*/15 * * * * *", "2026-01-01 00:00:07", "2026-01-01 00:00:15");
        check("0 */5 * * * *", "2026-01-01 00:59:00", "2026-01-01 01:00:00");
        check("0 30 9 * * MON-FRI", "2026-11-21 10:00:00", "2026-11-23 09:30:00");
        check("0 0 0 1 JAN *", "2026-06-01 00:00:00", "2027-01-01 00:00:00");
        check("0 0 0 29 2 *", "2026-03-01 00:00:00", "2028-02-29 00:00:00");
        check("0 0 12 * * 7", "2026-11-23 00:00:00", "2026-11-29 12:00:00");
        // Both day fields restricted: either one matches (Vixie cron).
        check("0 0 0 1 * MON", "2026-11-23 12:00:00", "2026-11-30 00:00:00");
        check("5/20 0 0 * * *", "2026-01-01 00:00:06", "2026-01-01 00:00:25");
    }

    #[test]
    fn rejects_bad_fields() {
        for (expr, fragment) in [
            ("0 0 2 * *", "expected 6 fields"),
            ("60 0 0 * * *", "second field"),
            ("0 0 24 * * *", "hour field"),
            ("0 0 0 0 * *", "day-of-month field"),
            ("0 0 0 * 13 *", "month field"),
            ("0 0 0 * * FUNDAY", "day-of-week field"),
            ("0 0 0 * * */0", "step must be at least 1"),
            ("0 5-1 0 * * *", "reversed"),
        ] {
            let err = CronExpr::parse(expr).unwrap_err();
            assert!(err.contains(fragment), "{expr}: {err}");
        }
    }

    #[test]
    fn impossible_date_has_no_next() {
        let cron = CronExpr::parse("0 0 0 30 2 *").unwrap();
        assert_eq!(cron.next_local_after(at("2026-01-01 00:00:00")), None);
    }
}
