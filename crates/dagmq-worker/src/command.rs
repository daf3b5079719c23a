//! Runs a command task: a process whose stdout and stderr lines are its log, in its own process
//! group so that a timeout or a cancel stops everything it started.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use dagmq_core::params::param_env_name;
use dagmq_core::store::{LINE_CUT_MARKER, MAX_LOG_LINE_BYTES};
use dagmq_core::task::param_text;
use dagmq_core::template;
use dagmq_core::{ParamsSchema, TaskContext, TaskError, TaskOutcome};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

/// How long a process gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The output file of one try, in a directory of its own (mode 0700, so no other user can
/// plant or read it); both are removed when dropped.
struct OutputFile(std::path::PathBuf);

impl OutputFile {
    fn new() -> std::io::Result<OutputFile> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dagmq-output-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut builder = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir)?;
        Ok(OutputFile(dir.join("output.json")))
    }

    /// Another file in the try's directory.
    fn sibling(&self, name: &str) -> std::path::PathBuf {
        self.0.with_file_name(name)
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A command task as its DAG version declares it.
pub(crate) struct CommandSpec {
    /// The argv; its templates name only dagmq's own values and params of a safe type (the
    /// DAG's load made sure).
    pub(crate) argv: Vec<String>,
    /// Environment variables of the try, each a template of any value.
    pub(crate) env: BTreeMap<String, String>,
    /// The DAG's params, whose types say which values may reach the argv.
    pub(crate) params: Arc<ParamsSchema>,
}

/// Runs a command for the try in `ctx` until it exits or the try is cancelled.
pub(crate) async fn run_command(
    spec: &CommandSpec,
    ctx: TaskContext,
    logical_date: &str,
) -> Result<TaskOutcome, TaskError> {
    let argv = &spec.argv;
    let command_vars = command_vars(spec, &ctx, logical_date)?;
    let mut vars = template_vars(&ctx, logical_date);
    // Outputs this try reads: its direct upstreams' (DAGMQ_INPUTS) and any its `env` names.
    let mut wanted: Vec<String> = ctx.upstream().to_vec();
    for id in spec.env.values().flat_map(|text| template::output_references(text)) {
        if !wanted.contains(&id) {
            wanted.push(id);
        }
    }
    let outputs = ctx.outputs_of(&wanted).await?;
    for (id, output) in &outputs {
        template::output_vars(id, output.as_ref(), &mut vars);
    }
    let rendered = template::render_command(argv, &command_vars)
        .map_err(|e| TaskError::fatal(format!("command template: {e}")))?;
    let mut env = Vec::with_capacity(spec.env.len());
    for (name, text) in &spec.env {
        let value = template::render(text, &vars).map_err(|e| TaskError::fatal(format!("env {name}: {e}")))?;
        env.push((name, value));
    }
    let (program, args) = rendered.split_first().ok_or_else(|| TaskError::fatal("empty command"))?;
    let output = OutputFile::new().map_err(|e| TaskError::new(format!("cannot make the output file: {e}")))?;
    let inputs: serde_json::Map<String, serde_json::Value> = ctx
        .upstream()
        .iter()
        .map(|id| (id.clone(), outputs.get(id).cloned().flatten().unwrap_or(serde_json::Value::Null)))
        .collect();
    let inputs_path = output.sibling("inputs.json");
    std::fs::write(&inputs_path, serde_json::Value::Object(inputs).to_string())
        .map_err(|e| TaskError::new(format!("cannot write the inputs file: {e}")))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env("DAGMQ_RUN_ID", &ctx.run_id)
        .env("DAGMQ_DAG_ID", &ctx.dag_id)
        .env("DAGMQ_TASK_ID", &ctx.task_id)
        .env("DAGMQ_TRY", ctx.try_number.to_string())
        .env("DAGMQ_LOGICAL_DATE", logical_date)
        .env("DAGMQ_OUTPUT", &output.0)
        .env("DAGMQ_INPUTS", &inputs_path);
    // dagmq's own secrets (API token, service URLs, webhook) stay with dagmq: a task that prints
    // its environment would put them in a log any API reader can read.
    for name in dagmq_core::redact::SECRET_ENV_VARS {
        command.env_remove(name);
    }
    for (key, value) in &ctx.params {
        command.env(param_env_name(key), param_text(value));
    }
    command.envs(env);
    crate::guard::guard(&mut command).map_err(|e| TaskError::fatal(format!("cannot start {program:?}: {e}")))?;
    let mut child = command.spawn().map_err(|e| TaskError::fatal(format!("cannot start {program:?}: {e}")))?;
    let pid = child.id();
    // Whatever way the try ends (done, stopped, or dropped mid-way), nothing of it stays behind.
    let _leftovers = pid.map(KillGroupOnDrop);
    let readers = [
        child.stdout.take().map(|out| tokio::spawn(forward_lines(out, ctx.clone()))),
        child.stderr.take().map(|err| tokio::spawn(forward_lines(err, ctx.clone()))),
    ];
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| TaskError::new(format!("waiting for {program:?}: {e}")))?,
        _ = ctx.cancel_signal().cancelled() => {
            stop_group(pid, &mut child).await;
            return Err(TaskError::fatal("stopped: the try was cancelled or timed out"));
        }
    };
    for reader in readers.into_iter().flatten() {
        let _ = reader.await;
    }
    if status.success() {
        // Read only after exit 0: a failed try hands nothing on.
        let output = dagmq_core::task::read_output_file(&output.0).map_err(TaskError::new)?;
        Ok(TaskOutcome { follow_ups: Vec::new(), output })
    } else {
        match status.code() {
            Some(code) => Err(TaskError::new(format!("command exited with status {code}"))),
            None => Err(TaskError::new(format!("command was killed ({status})"))),
        }
    }
}

/// The names a command's argv may use in `{{ ... }}`: dagmq's own values and the params whose
/// declared type makes their text a plain word, each checked again against its type (a value
/// that does not fit, however it got into the store, fails the try instead of reaching the
/// command line).
fn command_vars(
    spec: &CommandSpec,
    ctx: &TaskContext,
    logical_date: &str,
) -> Result<BTreeMap<String, String>, TaskError> {
    let mut vars = dagmq_vars(ctx, logical_date);
    for (key, value) in &ctx.params {
        if spec.params.get(key).is_some_and(dagmq_core::ParamSpec::safe_in_command) {
            let value =
                spec.params.check(key, value.clone()).map_err(|e| TaskError::fatal(format!("run params: {e}")))?;
            vars.insert(format!("params.{key}"), param_text(&value));
        }
    }
    Ok(vars)
}

/// dagmq's own values, by template name.
fn dagmq_vars(ctx: &TaskContext, logical_date: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    vars.insert("run_id".to_string(), ctx.run_id.clone());
    vars.insert("dag_id".to_string(), ctx.dag_id.clone());
    vars.insert("task_id".to_string(), ctx.task_id.clone());
    vars.insert("try".to_string(), ctx.try_number.to_string());
    vars.insert("logical_date".to_string(), logical_date.to_string());
    vars.insert("ds".to_string(), logical_date.get(..10).unwrap_or(logical_date).to_string());
    vars
}

/// The names a task's `env` may use in `{{ ... }}`: dagmq's own values and every param (the
/// upstream outputs are added as they are read).
fn template_vars(ctx: &TaskContext, logical_date: &str) -> BTreeMap<String, String> {
    let mut vars = dagmq_vars(ctx, logical_date);
    for (key, value) in &ctx.params {
        vars.insert(format!("params.{key}"), param_text(value));
    }
    vars
}

/// Sends each line of a pipe to the try's log. A line is held up to [`MAX_LOG_LINE_BYTES`]: a
/// longer one is logged cut, with a marker, and the rest of it is read and dropped, so a task
/// printing 50 MB without a newline costs 64 KiB here. The pipe is read to its end even after
/// the try's log was cut, so the process never blocks on a full pipe.
async fn forward_lines(pipe: impl AsyncRead + Unpin, ctx: TaskContext) {
    let mut reader = BufReader::with_capacity(MAX_LOG_LINE_BYTES, pipe);
    let mut line: Vec<u8> = Vec::new();
    let mut skipping = false;
    let emit = |line: &[u8], cut: bool| {
        let text = String::from_utf8_lossy(line);
        let mut text = text.trim_end_matches(['\n', '\r']).to_string();
        if cut {
            text.push_str(LINE_CUT_MARKER);
        }
        ctx.log(text);
    };
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let newline = chunk.iter().position(|b| *b == b'\n');
        let taken = newline.map_or(chunk.len(), |at| at + 1);
        let body = &chunk[..newline.unwrap_or(chunk.len())];
        if skipping {
            skipping = newline.is_none();
        } else if line.len() + body.len() > MAX_LOG_LINE_BYTES {
            let room = MAX_LOG_LINE_BYTES - line.len();
            line.extend_from_slice(&body[..room]);
            emit(&line, true);
            line.clear();
            skipping = newline.is_none();
        } else {
            line.extend_from_slice(body);
            if newline.is_some() {
                emit(&line, false);
                line.clear();
            }
        }
        reader.consume(taken);
    }
    if !line.is_empty() {
        emit(&line, false);
    }
}

/// Kills a task's process group when dropped.
struct KillGroupOnDrop(u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        crate::guard::kill_group(self.0);
    }
}

/// Stops the process group: SIGTERM, then SIGKILL after [`KILL_GRACE`].
async fn stop_group(pid: Option<u32>, child: &mut tokio::process::Child) {
    let Some(pid) = pid else { return };
    signal_group("TERM", pid).await;
    if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
        crate::guard::kill_group(pid);
        let _ = child.wait().await;
    }
}

/// Signals every process of group `pid` with kill(1), which needs no unsafe code here.
async fn signal_group(signal: &str, pid: u32) {
    let result = Command::new("kill")
        .args([format!("-{signal}"), "--".to_string(), format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(err) = result {
        tracing::warn!(pid, "sending SIG{signal} to the process group: {err}");
    }
}
