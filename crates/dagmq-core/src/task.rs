//! The `Task` trait that Rust tasks implement, and what a running task sees: its context, its
//! log, its progress and its cancellation signal.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Parameters of a DAG run, as given by a trigger: string keys, JSON values.
pub type Params = BTreeMap<String, serde_json::Value>;

/// A unit of work written in Rust. The worker calls `run` once per try and polls the returned
/// future in the task that handles the delivery, so `run` must not block the thread: long CPU
/// work or blocking I/O belongs in `tokio::task::spawn_blocking`, or else the try's timeout,
/// cancellation and log flushing wait until it yields.
#[async_trait]
pub trait Task: Send + Sync + 'static {
    /// Runs one try. `Ok` is success (optionally with follow-up tasks); `Err` is a failed try,
    /// retried if the error is retryable and tries are left.
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError>;
}

/// Everything a running try knows about itself and can report.
#[derive(Clone)]
pub struct TaskContext {
    /// The DAG run this try belongs to.
    pub run_id: String,
    /// The DAG the run belongs to.
    pub dag_id: String,
    /// The task being run.
    pub task_id: String,
    /// The try number, starting at 1 and never reused within a run.
    pub try_number: u32,
    /// The run's parameters.
    pub params: Params,
    /// The task's own settings (`args` in a DAG file, or a follow-up's args).
    pub args: serde_json::Value,
    /// Where log lines of this try go.
    log: Arc<dyn LogSink>,
    /// Where progress of this try goes.
    progress: Arc<dyn ProgressSink>,
    /// Fires when the try must stop (run cancelled, timeout, worker shutting down).
    cancel: CancelSignal,
    /// The task's direct upstream tasks, whose outputs are its inputs.
    upstream: Arc<[String]>,
    /// Where other tasks' outputs are read from (the store), when the worker gives one.
    outputs: Option<Arc<dyn OutputSource>>,
}

/// Reads the outputs of a run's tasks, for a try that asks (the worker reads the store).
#[async_trait::async_trait]
pub trait OutputSource: Send + Sync {
    /// The output of each of `task_ids` in run `run_id` (`None` for a task without one).
    async fn outputs(
        &self,
        run_id: &str,
        task_ids: &[String],
    ) -> Result<std::collections::BTreeMap<String, Option<serde_json::Value>>, String>;
}

impl TaskContext {
    /// Assembles a context; the worker does this, and tests of a user's tasks can too.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run_id: String,
        dag_id: String,
        task_id: String,
        try_number: u32,
        params: Params,
        args: serde_json::Value,
        log: Arc<dyn LogSink>,
        progress: Arc<dyn ProgressSink>,
        cancel: CancelSignal,
    ) -> TaskContext {
        TaskContext {
            run_id,
            dag_id,
            task_id,
            try_number,
            params,
            args,
            log,
            progress,
            cancel,
            upstream: Arc::from(Vec::new()),
            outputs: None,
        }
    }

    /// The same context, able to read the outputs of the run's tasks: `upstream` are the
    /// task's direct upstream tasks.
    pub fn with_outputs(mut self, upstream: Arc<[String]>, source: Arc<dyn OutputSource>) -> TaskContext {
        self.upstream = upstream;
        self.outputs = Some(source);
        self
    }

    /// The task's direct upstream tasks.
    pub fn upstream(&self) -> &[String] {
        &self.upstream
    }

    /// The outputs of the direct upstream tasks, `{"ID": output}` (`null` for a task that
    /// handed nothing on). Read when asked, so a try that does not ask costs nothing.
    pub async fn inputs(&self) -> Result<serde_json::Map<String, serde_json::Value>, TaskError> {
        let outputs = self.outputs_of(&self.upstream).await?;
        Ok(outputs.into_iter().map(|(id, output)| (id, output.unwrap_or(serde_json::Value::Null))).collect())
    }

    /// The outputs of these tasks of the run (`None` for a task that handed nothing on).
    pub async fn outputs_of(
        &self,
        task_ids: &[String],
    ) -> Result<std::collections::BTreeMap<String, Option<serde_json::Value>>, TaskError> {
        if task_ids.is_empty() {
            return Ok(Default::default());
        }
        let Some(source) = &self.outputs else {
            return Ok(task_ids.iter().map(|id| (id.clone(), None)).collect());
        };
        source
            .outputs(&self.run_id, task_ids)
            .await
            .map_err(|e| TaskError::new(format!("cannot read the outputs of {}: {e}", task_ids.join(", "))))
    }

    /// Appends one line to this try's log.
    pub fn log(&self, line: impl Into<String>) {
        self.log.line(line.into());
    }

    /// Reports progress between 0.0 and 1.0; values outside are clamped.
    pub fn set_progress(&self, fraction: f64) {
        let fraction = if fraction.is_nan() { 0.0 } else { fraction.clamp(0.0, 1.0) };
        self.progress.set(fraction);
    }

    /// The cancellation signal, to check or await.
    pub fn cancel_signal(&self) -> &CancelSignal {
        &self.cancel
    }

    /// A string parameter, if present (numbers and booleans are rendered as text).
    pub fn param(&self, key: &str) -> Option<String> {
        self.params.get(key).map(param_text)
    }
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("run_id", &self.run_id)
            .field("task_id", &self.task_id)
            .field("try_number", &self.try_number)
            .finish_non_exhaustive()
    }
}

/// Renders a parameter value as text: strings without quotes, anything else as JSON.
pub fn param_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// What masked values look like.
pub const MASK: &str = "***";

/// Whether a parameter holds a secret: its name contains `password`, `secret`, `token` or `key`
/// (any case). Secrets are masked in the API, the UI and task logs.
pub fn is_secret_param(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["password", "secret", "token", "key"].iter().any(|word| lower.contains(word))
}

/// The parameters with secret values replaced by [`MASK`].
pub fn mask_params(params: &Params) -> Params {
    params
        .iter()
        .map(|(k, v)| {
            (k.clone(), if is_secret_param(k) { serde_json::Value::String(MASK.to_string()) } else { v.clone() })
        })
        .collect()
}

/// The texts of secret parameter values worth masking in logs (at least 4 characters, so that
/// masking cannot shred ordinary output).
pub fn secret_values(params: &Params) -> Vec<String> {
    let mut values: Vec<String> = params
        .iter()
        .filter(|(k, _)| is_secret_param(k))
        .map(|(_, v)| param_text(v))
        .filter(|v| v.len() >= 4)
        .collect();
    // Longest first, so a secret that contains another is masked whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
}

/// `line` with every secret value replaced by [`MASK`].
pub fn mask_line(line: &str, secrets: &[String]) -> String {
    let mut masked = line.to_string();
    for secret in secrets {
        if masked.contains(secret.as_str()) {
            masked = masked.replace(secret.as_str(), MASK);
        }
    }
    masked
}

/// Receives a try's log lines.
pub trait LogSink: Send + Sync {
    /// Takes one line; must not block.
    fn line(&self, line: String);
}

/// Receives a try's progress.
pub trait ProgressSink: Send + Sync {
    /// Takes the latest fraction done; must not block.
    fn set(&self, fraction: f64);
}

/// A sink that drops everything, for tests and for tasks run outside a worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl LogSink for NullSink {
    fn line(&self, _line: String) {}
}

impl ProgressSink for NullSink {
    fn set(&self, _fraction: f64) {}
}

/// The receiving side of a try's stop signal.
#[derive(Debug, Clone)]
pub struct CancelSignal {
    /// Becomes `true` once when the try must stop.
    receiver: watch::Receiver<bool>,
}

/// The sending side of a try's stop signal.
#[derive(Debug)]
pub struct CancelHandle {
    /// Set to `true` to stop the try.
    sender: watch::Sender<bool>,
}

impl CancelSignal {
    /// A new signal and the handle that fires it.
    pub fn new() -> (CancelHandle, CancelSignal) {
        let (sender, receiver) = watch::channel(false);
        (CancelHandle { sender }, CancelSignal { receiver })
    }

    /// Whether the try has been told to stop.
    pub fn is_cancelled(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Completes when the try is told to stop; never completes otherwise.
    pub async fn cancelled(&self) {
        let mut receiver = self.receiver.clone();
        if receiver.wait_for(|stop| *stop).await.is_err() {
            // The handle is gone without firing: nobody can cancel any more.
            std::future::pending::<()>().await;
        }
    }
}

impl CancelHandle {
    /// Tells the try to stop.
    pub fn cancel(&self) {
        self.sender.send_replace(true);
    }
}

/// Largest output a try may hand on, in bytes of compact JSON.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// What a successful try returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskOutcome {
    /// Tasks to add to the run after this one, before its downstream tasks.
    pub follow_ups: Vec<FollowUp>,
    /// What the try hands on to its downstream tasks and to whoever reads the run.
    pub output: Option<serde_json::Value>,
}

impl TaskOutcome {
    /// Success with nothing more to do.
    pub fn done() -> TaskOutcome {
        TaskOutcome::default()
    }

    /// Success that adds follow-up tasks to the run.
    pub fn with_follow_ups(follow_ups: Vec<FollowUp>) -> TaskOutcome {
        TaskOutcome { follow_ups, output: None }
    }

    /// Success that hands on `output`.
    pub fn with_output(output: serde_json::Value) -> TaskOutcome {
        TaskOutcome { follow_ups: Vec::new(), output: Some(output) }
    }
}

/// Checks an output against [`MAX_OUTPUT_BYTES`]; the error says how large it is.
pub fn check_output(output: &serde_json::Value) -> Result<(), String> {
    let size = serde_json::to_vec(output).map_or(usize::MAX, |bytes| bytes.len());
    if size > MAX_OUTPUT_BYTES {
        return Err(format!("the output is {size} bytes of JSON, more than the limit of {MAX_OUTPUT_BYTES}"));
    }
    Ok(())
}

/// Reads a command task's output file: none or empty (blank) is no output; more than
/// [`MAX_OUTPUT_BYTES`] (known from its size, before reading) or text that is not JSON is an
/// error that says so.
pub fn read_output_file(path: &std::path::Path) -> Result<Option<serde_json::Value>, String> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok(None) };
    check_output_file_size(meta.len())?;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the output file (DAGMQ_OUTPUT): {e}"))?;
    parse_output_file(&bytes)
}

/// Parses the bytes of an output file, as [`read_output_file`] does. The worker checks the
/// size of every output it records, so the value is not measured again here.
pub fn parse_output_file(bytes: &[u8]) -> Result<Option<serde_json::Value>, String> {
    check_output_file_size(bytes.len() as u64)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes).map(Some).map_err(|e| format!("the output file (DAGMQ_OUTPUT) is not JSON: {e}"))
}

fn check_output_file_size(len: u64) -> Result<(), String> {
    if len > MAX_OUTPUT_BYTES as u64 {
        return Err(format!(
            "the output file (DAGMQ_OUTPUT) holds {len} bytes, more than the limit of {MAX_OUTPUT_BYTES}"
        ));
    }
    Ok(())
}

/// A task created at run time by another task's success (dynamic tasks). It runs a task that
/// workers know by name (`run = "NAME"`), so a message can never make a worker run anything
/// that is not registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowUp {
    /// Task id within the run; must not clash with existing ones.
    pub id: String,
    /// Name of a registered Rust task.
    pub run: String,
    /// Settings passed to the task as `ctx.args`.
    #[serde(default)]
    pub args: serde_json::Value,
    /// Other follow-ups of the same outcome this one waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Tries after the first; the parent's setting when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

impl FollowUp {
    /// A follow-up running registered task `run` with `args`.
    pub fn new(id: impl Into<String>, run: impl Into<String>, args: serde_json::Value) -> FollowUp {
        FollowUp { id: id.into(), run: run.into(), args, after: Vec::new(), retries: None }
    }
}

/// The id in the run of follow-up `id` returned by task `parent`: the parent's id, a dot, its
/// own id (so two parents' follow-ups cannot clash).
pub fn follow_up_task_id(parent: &str, id: &str) -> String {
    format!("{parent}.{id}")
}

/// Why a try failed, and whether it may be tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    /// What went wrong, for the log and the API.
    pub message: String,
    /// Whether a retry can help; a fatal error skips the remaining tries.
    pub retryable: bool,
}

impl TaskError {
    /// A failure that is retried while tries are left.
    pub fn new(message: impl Into<String>) -> TaskError {
        TaskError { message: message.into(), retryable: true }
    }

    /// A failure that no retry can fix: the task fails at once.
    pub fn fatal(message: impl Into<String>) -> TaskError {
        TaskError { message: message.into(), retryable: false }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

impl From<String> for TaskError {
    fn from(message: String) -> TaskError {
        TaskError::new(message)
    }
}

impl From<&str> for TaskError {
    fn from(message: &str) -> TaskError {
        TaskError::new(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_files_parse_or_say_what_is_wrong() {
        assert_eq!(parse_output_file(b""), Ok(None));
        assert_eq!(parse_output_file(b" \n"), Ok(None));
        assert_eq!(parse_output_file(br#"{"rows": 3}"#), Ok(Some(serde_json::json!({"rows": 3}))));
        assert_eq!(parse_output_file(b"\"a string\"\n"), Ok(Some(serde_json::json!("a string"))));
        let err = parse_output_file(b"rows=3").unwrap_err();
        assert!(err.starts_with("the output file (DAGMQ_OUTPUT) is not JSON: "), "{err}");
        let big = format!("\"{}\"", "x".repeat(MAX_OUTPUT_BYTES));
        let err = parse_output_file(big.as_bytes()).unwrap_err();
        assert!(err.contains(&format!("holds {} bytes, more than the limit of 65536", big.len())), "{err}");
        // Exactly at the limit is allowed.
        let fits = format!("\"{}\"", "x".repeat(MAX_OUTPUT_BYTES - 2));
        assert!(parse_output_file(fits.as_bytes()).unwrap().is_some());
        assert!(
            check_output(&serde_json::json!("x".repeat(MAX_OUTPUT_BYTES))).unwrap_err().contains("more than the limit")
        );
    }

    #[tokio::test]
    async fn cancel_signal_fires_once_for_all_clones() {
        let (handle, signal) = CancelSignal::new();
        let clone = signal.clone();
        assert!(!clone.is_cancelled());
        handle.cancel();
        clone.cancelled().await;
        assert!(signal.is_cancelled());
    }

    #[test]
    fn secrets_are_masked() {
        let params: Params = [
            ("db_password", serde_json::json!("hunter22")),
            ("API_TOKEN", serde_json::json!("abcd1234")),
            ("date", serde_json::json!("2026-11-22")),
            ("key", serde_json::json!("k1")),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into();
        let masked = mask_params(&params);
        assert_eq!(masked["db_password"], serde_json::json!(MASK));
        assert_eq!(masked["API_TOKEN"], serde_json::json!(MASK));
        assert_eq!(masked["key"], serde_json::json!(MASK));
        assert_eq!(masked["date"], serde_json::json!("2026-11-22"));
        let secrets = secret_values(&params);
        assert_eq!(secrets, vec!["abcd1234".to_string(), "hunter22".to_string()]);
        assert_eq!(
            mask_line("login with hunter22 and abcd1234 on 2026-11-22 k1", &secrets),
            "login with *** and *** on 2026-11-22 k1"
        );
    }

    #[test]
    fn param_text_renders_values() {
        assert_eq!(param_text(&serde_json::json!("x")), "x");
        assert_eq!(param_text(&serde_json::json!(3)), "3");
        assert_eq!(param_text(&serde_json::json!(true)), "true");
    }
}
