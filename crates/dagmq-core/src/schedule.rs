//! When a DAG runs: a cron expression in a timezone, a fixed interval, or only when triggered.
//!
//! Schedule points are instants. A DAG with start `S` has a run due for every schedule point `t`
//! with `S <= t <= now` (both ends inclusive): `@every 5m` started exactly one hour ago has 13 due
//! points, `S`, `S+5m`, ..., `S+60m`. With catch-up every due point becomes a run, oldest first;
//! without it only the newest due point does.
//!
//! Cron is evaluated on wall-clock time in the DAG's timezone. Across daylight-saving changes:
//! a wall-clock time that does not exist (spring forward) fires at the first instant after the gap,
//! so no day loses its run; a wall-clock time that happens twice (fall back) fires once, at its
//! first occurrence, so no day doubles its run.

use std::time::Duration;

use chrono::{DateTime, Duration as ChronoDuration, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::cron::CronExpr;
use crate::duration::{format_duration, parse_duration};

/// How a DAG's runs are scheduled.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Runs only when triggered.
    Manual,
    /// A six-field cron expression on wall-clock time in `timezone`.
    Cron {
        /// The expression as written, for display.
        text: String,
        /// The parsed expression.
        expr: CronExpr,
        /// The timezone the expression's wall-clock fields are read in.
        timezone: Tz,
    },
    /// Every `interval` from the DAG's start.
    Every(Duration),
}

impl Schedule {
    /// Parses `@every 30s`, `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly` or a six-field cron.
    pub fn parse(text: &str, timezone: Tz) -> Result<Schedule, String> {
        let text = text.trim();
        if let Some(every) = text.strip_prefix("@every") {
            let interval = parse_duration(every).map_err(|e| format!("bad schedule {text:?}: {e}"))?;
            if interval < Duration::from_secs(1) {
                return Err(format!("bad schedule {text:?}: the interval must be at least 1s"));
            }
            return Ok(Schedule::Every(interval));
        }
        let expanded = match text {
            "@hourly" => "0 0 * * * *",
            "@daily" | "@midnight" => "0 0 0 * * *",
            "@weekly" => "0 0 0 * * SUN",
            "@monthly" => "0 0 0 1 * *",
            "@yearly" | "@annually" => "0 0 0 1 1 *",
            other if other.starts_with('@') => {
                return Err(format!(
                    "bad schedule {text:?}: unknown shorthand (use @every DURATION, @hourly, @daily, @weekly, @monthly, @yearly)"
                ));
            }
            other => other,
        };
        let expr = CronExpr::parse(expanded)?;
        Ok(Schedule::Cron { text: text.to_string(), expr, timezone })
    }

    /// The schedule as written in a DAG file; `None` for manual-only.
    pub fn describe(&self) -> Option<String> {
        match self {
            Schedule::Manual => None,
            Schedule::Cron { text, .. } => Some(text.clone()),
            Schedule::Every(interval) => Some(format!("@every {}", format_duration(*interval))),
        }
    }

    /// The first schedule point strictly after `now`, for a DAG that starts at `start`.
    pub fn next_after(&self, start: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Manual => None,
            Schedule::Every(interval) => {
                if now < start {
                    return Some(start);
                }
                let step = ChronoDuration::from_std(*interval).ok()?;
                let step_ms = step.num_milliseconds().max(1);
                let elapsed_ms = (now - start).num_milliseconds();
                let steps = elapsed_ms / step_ms + 1;
                Some(start + ChronoDuration::milliseconds(steps * step_ms))
            }
            Schedule::Cron { expr, timezone, .. } => {
                let from = if now < start { start - ChronoDuration::seconds(1) } else { now };
                cron_next_after(expr, *timezone, from)
            }
        }
    }

    /// Schedule points `t` with `after < t <= now` and `t >= start`, oldest first, at most `limit`
    /// of them; with `catch_up` false only the newest such point. `after` is the last point that
    /// already has a run.
    pub fn due_points(
        &self,
        start: DateTime<Utc>,
        after: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        catch_up: bool,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut points = Vec::new();
        if matches!(self, Schedule::Manual) || now < start {
            return points;
        }
        let mut cursor = match after {
            Some(last) if last >= start => last,
            _ => start - ChronoDuration::milliseconds(1),
        };
        if !catch_up {
            // The newest due point: walk back from now by finding the point before next_after(now).
            let Some(latest) = self.latest_at_or_before(start, now) else { return points };
            if after.is_none_or(|last| latest > last) {
                points.push(latest);
            }
            return points;
        }
        while points.len() < limit {
            match self.next_after(start, cursor) {
                Some(point) if point <= now => {
                    points.push(point);
                    cursor = point;
                }
                _ => break,
            }
        }
        points
    }

    /// Every schedule point `t` with `from <= t <= to`, oldest first, for a DAG anchored at
    /// `anchor` (its start: `@every` points are counted from it, also backwards, while cron
    /// points do not depend on it). At most `limit` points are computed; more are cut off, so a
    /// caller that wants to refuse a range above `limit` asks for `limit + 1`.
    pub fn points_between(
        &self,
        anchor: DateTime<Utc>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        if from > to {
            return Vec::new();
        }
        let start = match self {
            Schedule::Manual => return Vec::new(),
            Schedule::Every(interval) => {
                let step_ms = ChronoDuration::from_std(*interval).map_or(1, |d| d.num_milliseconds().max(1));
                let behind_ms = (anchor - from).num_milliseconds().max(0);
                // Whole intervals back from the anchor to at or before `from`.
                let steps = (behind_ms + step_ms - 1) / step_ms;
                anchor - ChronoDuration::milliseconds(steps * step_ms)
            }
            Schedule::Cron { .. } => from,
        };
        self.due_points(start, Some(from - ChronoDuration::milliseconds(1)), to, true, limit)
    }

    /// The newest schedule point at or before `now` (and not before `start`).
    fn latest_at_or_before(&self, start: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Manual => None,
            Schedule::Every(interval) => {
                let step_ms = ChronoDuration::from_std(*interval).ok()?.num_milliseconds().max(1);
                let steps = (now - start).num_milliseconds() / step_ms;
                Some(start + ChronoDuration::milliseconds(steps * step_ms))
            }
            Schedule::Cron { .. } => {
                // Search backwards in widening windows; cron points are at most a few years apart.
                let mut window = ChronoDuration::hours(1);
                loop {
                    let from = (now - window).max(start - ChronoDuration::milliseconds(1));
                    let mut last = None;
                    let mut cursor = from;
                    while let Some(point) = self.next_after(start, cursor) {
                        if point > now {
                            break;
                        }
                        last = Some(point);
                        cursor = point;
                    }
                    if last.is_some() || from < start {
                        return last;
                    }
                    if window > ChronoDuration::days(366 * 8) {
                        return None;
                    }
                    window = window * 8;
                }
            }
        }
    }
}

/// The first instant strictly after `now` at which the cron expression fires in `timezone`.
fn cron_next_after(expr: &CronExpr, timezone: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut local = now.with_timezone(&timezone).naive_local();
    loop {
        let candidate = expr.next_local_after(local)?;
        let instant = resolve_local(timezone, candidate)?;
        if instant > now {
            return Some(instant);
        }
        // The candidate mapped to an instant not after now: the second pass through a repeated
        // wall-clock hour. Keep searching in wall-clock time.
        local = candidate;
    }
}

/// Maps a wall-clock time to an instant: the earlier one when it happens twice, the first
/// instant after the gap when it does not exist.
fn resolve_local(timezone: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    match timezone.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(earlier, _) => Some(earlier.with_timezone(&Utc)),
        LocalResult::None => {
            // Walk forward minute by minute to the end of the gap (gaps are at most a few hours),
            // then keep the same offset into the hour as the requested time.
            for minutes in 1..=24 * 60 {
                let shifted = local + ChronoDuration::minutes(minutes);
                if let LocalResult::Single(t) | LocalResult::Ambiguous(t, _) = timezone.from_local_datetime(&shifted) {
                    return Some(t.with_timezone(&Utc));
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn warsaw() -> Tz {
        "Europe/Warsaw".parse().unwrap()
    }

    fn points(schedule: &Schedule, start: &str, from: &str, to: &str) -> Vec<DateTime<Utc>> {
        schedule.due_points(utc(start), Some(utc(from)), utc(to), true, 10_000)
    }

    #[test]
    fn dst_spring_forward_keeps_one_run() {
        // 2026-03-29: Warsaw clocks jump from 02:00 CET to 03:00 CEST; 02:30 does not exist.
        let daily = Schedule::parse("0 30 2 * * *", warsaw()).unwrap();
        let got = points(&daily, "2026-01-01T00:00:00Z", "2026-03-27T12:00:00Z", "2026-03-31T12:00:00Z");
        assert_eq!(
            got,
            vec![
                utc("2026-03-28T01:30:00Z"), // 02:30 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST, the first instant after the gap
                utc("2026-03-30T00:30:00Z"), // 02:30 CEST
                utc("2026-03-31T00:30:00Z"),
            ]
        );
    }

    #[test]
    fn dst_fall_back_does_not_double() {
        // 2026-10-25: Warsaw clocks go back from 03:00 CEST to 02:00 CET; 02:30 happens twice.
        let daily = Schedule::parse("0 30 2 * * *", warsaw()).unwrap();
        let got = points(&daily, "2026-01-01T00:00:00Z", "2026-10-23T12:00:00Z", "2026-10-27T12:00:00Z");
        assert_eq!(
            got,
            vec![
                utc("2026-10-24T00:30:00Z"), // 02:30 CEST
                utc("2026-10-25T00:30:00Z"), // first 02:30 (CEST); the second (01:30Z) is skipped
                utc("2026-10-26T01:30:00Z"), // 02:30 CET
                utc("2026-10-27T01:30:00Z"),
            ]
        );
        // Asking from inside the repeated hour does not fire the second 02:30.
        assert_eq!(
            daily.next_after(utc("2026-01-01T00:00:00Z"), utc("2026-10-25T01:15:00Z")),
            Some(utc("2026-10-26T01:30:00Z"))
        );
    }

    #[test]
    fn catch_up_counts_with_inclusive_bounds() {
        let every = Schedule::parse("@every 5m", Tz::UTC).unwrap();
        let start = utc("2026-11-23T10:00:00Z");
        let now = utc("2026-11-23T11:00:00Z");
        assert_eq!(every.due_points(start, None, now, true, 1000).len(), 13);
        assert_eq!(every.due_points(start, None, now, false, 1000), vec![now]);
        // One second before the boundary the 60-minute point is not due yet.
        let before = now - ChronoDuration::seconds(1);
        assert_eq!(every.due_points(start, None, before, true, 1000).len(), 12);
        assert_eq!(every.due_points(start, None, before, false, 1000), vec![utc("2026-11-23T10:55:00Z")]);
        // Points that already have runs are not due again.
        assert_eq!(every.due_points(start, Some(utc("2026-11-23T10:50:00Z")), now, true, 1000).len(), 2);
        assert!(every.due_points(start, Some(now), now, false, 1000).is_empty());
        // The limit bounds one call; the caller continues from the last point.
        assert_eq!(every.due_points(start, None, now, true, 5).len(), 5);
    }

    #[test]
    fn cron_catch_up_and_latest() {
        let hourly = Schedule::parse("@hourly", Tz::UTC).unwrap();
        let start = utc("2026-11-23T00:00:00Z");
        let now = utc("2026-11-23T05:30:00Z");
        assert_eq!(hourly.due_points(start, None, now, true, 100).len(), 6);
        assert_eq!(hourly.due_points(start, None, now, false, 100), vec![utc("2026-11-23T05:00:00Z")]);
        let weekly = Schedule::parse("0 0 0 * * MON", Tz::UTC).unwrap();
        let far = utc("2027-06-01T00:00:00Z");
        assert_eq!(weekly.due_points(start, None, far, false, 100), vec![utc("2027-05-31T00:00:00Z")]);
    }

    #[test]
    fn next_after_and_manual() {
        let every = Schedule::parse("@every 30s", Tz::UTC).unwrap();
        let start = utc("2026-11-23T10:00:00Z");
        assert_eq!(every.next_after(start, utc("2026-11-23T09:00:00Z")), Some(start));
        assert_eq!(every.next_after(start, start), Some(utc("2026-11-23T10:00:30Z")));
        assert_eq!(every.describe().as_deref(), Some("@every 30s"));
        assert_eq!(Schedule::Manual.next_after(start, start), None);
        assert!(Schedule::Manual.due_points(start, None, start, true, 10).is_empty());
    }

    #[test]
    fn rejects_bad_schedules() {
        for (text, fragment) in [
            ("@every 0s", "at least 1s"),
            ("@every soon", "bad schedule"),
            ("@fortnightly", "unknown shorthand"),
            ("0 0 2 * *", "expected 6 fields"),
        ] {
            let err = Schedule::parse(text, Tz::UTC).unwrap_err();
            assert!(err.contains(fragment), "{text}: {err}");
        }
    }

    #[test]
    fn points_between_two_instants_for_backfills() {
        let at = |text: &str| DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc);
        let daily = Schedule::parse("0 0 2 * * *", chrono_tz::UTC).unwrap();
        let anchor = at("2026-11-01T00:00:00Z");
        let points = daily.points_between(anchor, at("2026-10-30T02:00:00Z"), at("2026-11-02T01:59:59Z"), 100);
        assert_eq!(points, vec![at("2026-10-30T02:00:00Z"), at("2026-10-31T02:00:00Z"), at("2026-11-01T02:00:00Z")]);
        assert_eq!(daily.points_between(anchor, at("2026-10-01T00:00:00Z"), at("2026-12-31T00:00:00Z"), 5).len(), 5);
        assert!(daily.points_between(anchor, at("2026-11-05T00:00:00Z"), at("2026-11-01T00:00:00Z"), 5).is_empty());
        // `@every` counts from the anchor, backwards too.
        let every = Schedule::parse("@every 10m", chrono_tz::UTC).unwrap();
        let anchor = at("2026-11-01T00:05:00Z");
        let points = every.points_between(anchor, at("2026-10-31T23:50:00Z"), at("2026-11-01T00:15:00Z"), 100);
        assert_eq!(points, vec![at("2026-10-31T23:55:00Z"), at("2026-11-01T00:05:00Z"), at("2026-11-01T00:15:00Z")]);
        assert!(Schedule::Manual.points_between(anchor, anchor, anchor, 5).is_empty());
    }
}
