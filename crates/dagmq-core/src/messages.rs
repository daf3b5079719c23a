//! Wire messages: JSON objects with `"v": 1`, the contract with workers and outside producers.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::state::TaskState;
use crate::task::{FollowUp, Params};

/// The schema version this build reads and writes.
pub const VERSION: u32 = 1;

/// Largest message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// "Run this try of this task": scheduler to worker pool, on `dagmq.tasks.<queue>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskToExec {
    /// Schema version.
    pub v: u32,
    /// The run.
    pub run_id: String,
    /// The run's DAG.
    pub dag_id: String,
    /// The task.
    pub task_id: String,
    /// The try this message is for.
    pub try_number: u32,
    /// A failure at this try is final.
    pub max_try: u32,
    /// The run's parameters.
    #[serde(default)]
    pub params: Params,
    /// The run's schedule point or trigger time.
    pub logical_date: DateTime<Utc>,
    /// For a follow-up task: the registered task to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<FollowUp>,
}

/// "This try changed state": worker to scheduler, on `dagmq.status`. The worker has already
/// written the state to the store; the message wakes the scheduler up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusUpdate {
    /// Schema version.
    pub v: u32,
    /// The run.
    pub run_id: String,
    /// The task.
    pub task_id: String,
    /// The try.
    pub try_number: u32,
    /// Its new state: `success`, `failed` or `up_for_retry`.
    pub state: TaskState,
    /// Who ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The downstream tasks the worker claimed as this try succeeded (eager dispatch), so the
    /// scheduler reads them with this one instead of trying to queue them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next: Vec<String>,
}

/// Several status updates in one message, worker to scheduler on `dagmq.status`: a worker
/// sends the outcomes that finished while its previous status message was being confirmed
/// together. Each update is a whole [`StatusUpdate`]; a message with one update is sent as that
/// update alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusBatch {
    /// Schema version.
    pub v: u32,
    /// The updates, oldest first.
    pub updates: Vec<StatusUpdate>,
}

/// Decodes a message of `dagmq.status`, one update or a [`StatusBatch`], with the checks of
/// [`decode`]; an update inside a batch with another `v` is refused as the whole message is.
pub fn decode_status(payload: &[u8]) -> Result<Vec<StatusUpdate>, DecodeError> {
    #[derive(Deserialize)]
    struct Shape {
        updates: Option<serde::de::IgnoredAny>,
    }
    // Most messages are one update: only a payload that names `updates` is looked at twice.
    let named = payload.windows(9).any(|w| w == b"\"updates\"");
    let batch = named && decode::<Shape>(payload)?.updates.is_some();
    if !batch {
        return decode::<StatusUpdate>(payload).map(|update| vec![update]);
    }
    let batch: StatusBatch = serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if let Some(other) = batch.updates.iter().find(|u| u.v != VERSION) {
        return Err(DecodeError::Version(u64::from(other.v)));
    }
    Ok(batch.updates)
}

/// Encodes status updates, each encoded already, as one message: the update alone when there is
/// one, a [`StatusBatch`] otherwise.
pub fn encode_status(encoded: &[Vec<u8>]) -> Vec<u8> {
    if let [one] = encoded {
        return one.clone();
    }
    let mut payload = Vec::with_capacity(encoded.iter().map(|e| e.len() + 1).sum::<usize>() + 24);
    payload.extend_from_slice(format!("{{\"v\":{VERSION},\"updates\":[").as_bytes());
    for (n, update) in encoded.iter().enumerate() {
        if n > 0 {
            payload.push(b',');
        }
        payload.extend_from_slice(update);
    }
    payload.extend_from_slice(b"]}");
    payload
}

/// "Start a run of this DAG": anyone to the scheduler, on `dagmq.triggers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Schema version.
    pub v: u32,
    /// The DAG to run.
    pub dag_id: String,
    /// Parameters, merged over the DAG's defaults.
    #[serde(default)]
    pub params: Params,
    /// Idempotency key: a second trigger with the same key creates no second run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Broadcast from the scheduler to every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Stop tries of this run: it was cancelled or suspended.
    CancelRun {
        /// Schema version.
        v: u32,
        /// The run.
        run_id: String,
        /// The tries the scheduler stopped (moved out of `queued` or `running` in the store):
        /// a worker stops exactly these, claimed or not yet, without asking the store, and
        /// leaves alone any other try of the run (a later try of a resumed run). Absent (a
        /// message from an older scheduler, or a list too large for one message): the worker
        /// checks the run's tries with the store instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tries: Option<Vec<StoppedTry>>,
    },
}

/// A try a stop broadcast names: (task, try number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoppedTry {
    /// The task.
    pub task_id: String,
    /// Its try that was stopped.
    pub try_number: u32,
}

impl Control {
    /// The stop broadcast for `run_id` naming `tries`, encoded; without the list when it would
    /// not fit in one message (the workers then check the run's tries with the store).
    pub fn encode_cancel(run_id: &str, tries: Vec<StoppedTry>) -> Vec<u8> {
        let precise = encode(&Control::CancelRun { v: VERSION, run_id: run_id.to_string(), tries: Some(tries) });
        if precise.len() <= MAX_MESSAGE_BYTES {
            return precise;
        }
        encode(&Control::CancelRun { v: VERSION, run_id: run_id.to_string(), tries: None })
    }
}

/// Why a message was refused; the text goes into `x-dagmq-error` when dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("payload of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
    /// Not JSON, or not the expected shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A `v` this build does not read.
    #[error("unsupported message version {0} (this build reads v={VERSION})")]
    Version(u64),
}

impl DecodeError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Version(_) => "version",
        }
    }
}

/// Decodes a message: size, JSON, version, then shape, with the first failing check as the error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    #[derive(Deserialize)]
    struct Version {
        v: Option<serde_json::Value>,
    }
    let version: Version = serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    match version.v {
        None => return Err(DecodeError::Malformed("missing field `v`".to_string())),
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
        Some(serde_json::Value::Number(n)) => return Err(DecodeError::Version(n.as_u64().unwrap_or(0))),
        Some(other) => return Err(DecodeError::Malformed(format!("field `v` must be a number, not {other}"))),
    }
    serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// Encodes a message. Our own types always serialize.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    serde_json::to_vec(message).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(payload: &[u8], expected: Result<Trigger, &str>) {
        let got = decode::<Trigger>(payload);
        match expected {
            Ok(trigger) => assert_eq!(got, Ok(trigger)),
            Err(message) => assert_eq!(got.unwrap_err().to_string(), message),
        }
    }

    #[test]
    fn decodes_triggers_and_refuses_bad_ones() {
        check(
            br#"{"v":1,"dag_id":"etl","params":{"date":"2026-11-22"},"key":"etl-2026-11-22"}"#,
            Ok(Trigger {
                v: 1,
                dag_id: "etl".into(),
                params: [("date".to_string(), serde_json::json!("2026-11-22"))].into(),
                key: Some("etl-2026-11-22".into()),
            }),
        );
        check(
            br#"{"v":1,"dag_id":"etl"}"#,
            Ok(Trigger { v: 1, dag_id: "etl".into(), params: Params::new(), key: None }),
        );
        check(br#"{"v":2,"dag_id":"etl"}"#, Err("unsupported message version 2 (this build reads v=1)"));
        check(br#"{"dag_id":"etl"}"#, Err("malformed message: missing field `v`"));
        check(br#"{"v":1}"#, Err("malformed message: missing field `dag_id` at line 1 column 7"));
        check(b"{not json", Err("malformed message: key must be a string at line 1 column 2"));
        check(&[0xff, 0xfe, 0x00], Err("malformed message: expected value at line 1 column 1"));
        check(br#"{"v":"1","dag_id":"etl"}"#, Err("malformed message: field `v` must be a number, not \"1\""));
        check(
            br#"{"v":1,"dag_id":"etl","extra":1}"#,
            Err(
                "malformed message: unknown field `extra`, expected one of `v`, `dag_id`, `params`, `key` at line 1 column 29",
            ),
        );
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        check(&big, Err("payload of 1048577 bytes exceeds the limit of 1048576 bytes"));
    }

    fn update(task_id: &str) -> StatusUpdate {
        StatusUpdate {
            v: VERSION,
            run_id: "r".into(),
            task_id: task_id.into(),
            try_number: 1,
            state: TaskState::Success,
            worker: Some("w".into()),
            error: None,
            next: Vec::new(),
        }
    }

    #[test]
    fn status_messages_carry_one_update_or_a_batch() {
        let (a, b) = (update("a"), update("b"));
        let one = encode_status(&[encode(&a)]);
        assert_eq!(one, encode(&a), "one update goes alone, as before batches existed");
        assert_eq!(decode_status(&one), Ok(vec![a.clone()]));
        let both = encode_status(&[encode(&a), encode(&b)]);
        assert_eq!(decode_status(&both), Ok(vec![a.clone(), b.clone()]));
        assert_eq!(decode::<StatusBatch>(&both), Ok(StatusBatch { v: VERSION, updates: vec![a, b] }));
        // Bad batches are refused whole, with the first failing check.
        assert_eq!(decode_status(br#"{"v":2,"updates":[]}"#), Err(DecodeError::Version(2)));
        assert_eq!(
            decode_status(
                br#"{"v":1,"updates":[{"v":3,"run_id":"r","task_id":"a","try_number":1,"state":"success"}]}"#
            ),
            Err(DecodeError::Version(3))
        );
        assert!(matches!(
            decode_status(br#"{"v":1,"updates":[{"v":1,"run_id":"r"}]}"#),
            Err(DecodeError::Malformed(m)) if m.contains("missing field `task_id`")
        ));
        assert!(matches!(
            decode_status(br#"{"v":1,"updates":{}}"#),
            Err(DecodeError::Malformed(m)) if m.contains("expected a sequence")
        ));
        assert!(matches!(decode_status(br#"{"v":1,"task_id":"a"}"#), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn round_trips_task_messages() {
        let message = TaskToExec {
            v: VERSION,
            run_id: "r".into(),
            dag_id: "d".into(),
            task_id: "t".into(),
            try_number: 2,
            max_try: 3,
            params: Params::new(),
            logical_date: DateTime::from_timestamp(0, 0).unwrap(),
            follow_up: None,
        };
        assert_eq!(decode::<TaskToExec>(&encode(&message)), Ok(message));
        let control = Control::CancelRun { v: VERSION, run_id: "r".into(), tries: None };
        assert_eq!(String::from_utf8(encode(&control)).unwrap(), r#"{"kind":"cancel_run","v":1,"run_id":"r"}"#);
        assert_eq!(decode::<Control>(br#"{"kind":"cancel_run","v":1,"run_id":"r"}"#), Ok(control));
        let precise = Control::encode_cancel("r", vec![StoppedTry { task_id: "t".into(), try_number: 2 }]);
        assert_eq!(
            String::from_utf8(precise.clone()).unwrap(),
            r#"{"kind":"cancel_run","v":1,"run_id":"r","tries":[{"task_id":"t","try_number":2}]}"#
        );
        let Ok(Control::CancelRun { tries: Some(tries), .. }) = decode::<Control>(&precise) else {
            panic!("the list decodes")
        };
        assert_eq!(tries, vec![StoppedTry { task_id: "t".into(), try_number: 2 }]);
    }

    #[test]
    fn a_stop_broadcast_too_large_for_one_message_goes_without_its_list() {
        let many = (0..40_000).map(|i| StoppedTry { task_id: format!("task-{i:08}"), try_number: 1 }).collect();
        let encoded = Control::encode_cancel("r", many);
        assert_eq!(String::from_utf8(encoded).unwrap(), r#"{"kind":"cancel_run","v":1,"run_id":"r"}"#);
    }
}
