//! Run ids: readable, sortable by time, and safe in URLs, queue names and Redis keys.

use chrono::{DateTime, Utc};

/// The id of the scheduled run of `dag_id` for schedule point `point`: the same point always
/// gives the same id, so a point can never get two runs.
pub fn scheduled_run_id(dag_id: &str, point: DateTime<Utc>) -> String {
    format!("{dag_id}--scheduled--{}", point.format("%Y%m%dT%H%M%S%.3fZ"))
}

/// The id of a manual run of `dag_id` (the API, the CLI) triggered at `at`; unique thanks to a
/// random suffix.
pub fn manual_run_id(dag_id: &str, at: DateTime<Utc>) -> String {
    triggered_run_id(dag_id, "manual", at)
}

/// The id of a run of `dag_id` that a trigger message asked for at `at`, as [`manual_run_id`]
/// with `message` for `manual`, so that the id says how the run came.
pub fn message_run_id(dag_id: &str, at: DateTime<Utc>) -> String {
    triggered_run_id(dag_id, "message", at)
}

fn triggered_run_id(dag_id: &str, how: &str, at: DateTime<Utc>) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{dag_id}--{how}--{}-{}", at.format("%Y%m%dT%H%M%S%.3fZ"), &suffix[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_url_safe() {
        let at = DateTime::parse_from_rfc3339("2026-11-23T00:52:24.5Z").unwrap().with_timezone(&Utc);
        assert_eq!(scheduled_run_id("etl", at), "etl--scheduled--20261123T005224.500Z");
        let manual = manual_run_id("etl", at);
        assert!(manual.starts_with("etl--manual--20261123T005224.500Z-"));
        assert_ne!(manual, manual_run_id("etl", at));
        assert!(dagmq_core::dag::check_id(&manual).is_ok());
        let message = message_run_id("etl", at);
        assert!(message.starts_with("etl--message--20261123T005224.500Z-"), "{message}");
        assert!(dagmq_core::dag::check_id(&message).is_ok());
    }
}
