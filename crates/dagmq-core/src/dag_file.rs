//! DAG files: one TOML file per DAG, tasks that run commands or registered Rust tasks.
//! Parsing is pure: the caller reads the file and passes its name and text.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use toml::Spanned;

use crate::dag::{Dag, DagError, Pools, TaskKind, TaskSpec};
use crate::duration::parse_duration;
use crate::params::{ParamSpec, ParamType};
use crate::task::Params;
use crate::task_registry::TaskRegistry;

/// A DAG file that was refused: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DagFileError {
    /// The file as the caller named it.
    pub file: String,
    /// 1-based line, when the reason has a place.
    pub line: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for DagFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.reason),
            None => write!(f, "{}: {}", self.file, self.reason),
        }
    }
}

impl std::error::Error for DagFileError {}

/// The top level of a DAG file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DagFile {
    id: Spanned<String>,
    #[serde(default)]
    description: String,
    schedule: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    start: Option<Spanned<toml::Value>>,
    catch_up: Option<bool>,
    max_active_runs: Option<Spanned<u32>>,
    max_active_tasks: Option<u32>,
    paused: Option<bool>,
    #[serde(default)]
    tags: Vec<String>,
    run_timeout: Option<Spanned<String>>,
    /// Params: `NAME = value` (a plain default, untyped) or a `[params.NAME]` table (a
    /// declared param with its type).
    #[serde(default)]
    params: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default, rename = "task")]
    tasks: Vec<Spanned<TaskEntry>>,
}

/// One `[[task]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskEntry {
    id: Spanned<String>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    run: Option<Spanned<String>>,
    args: Option<toml::Value>,
    retries: Option<u32>,
    retry_delay: Option<Spanned<String>>,
    retry_backoff: Option<Spanned<f64>>,
    retry_delay_max: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    queue: Option<String>,
    priority: Option<u8>,
    alert_on_failure: Option<bool>,
    alert_on_retry: Option<bool>,
    trigger_rule: Option<Spanned<String>>,
    branch: Option<bool>,
    pool: Option<String>,
    pool_slots: Option<u32>,
    max_active: Option<u32>,
    env: Option<Spanned<BTreeMap<String, String>>>,
}

/// One `[params.NAME]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamEntry {
    #[serde(rename = "type")]
    kind: Option<String>,
    default: Option<toml::Value>,
    values: Option<Vec<String>>,
    pattern: Option<String>,
    max_length: Option<usize>,
    required: Option<bool>,
    description: Option<String>,
}

/// A TOML value as JSON; a TOML date or time becomes its text.
fn toml_to_json(value: toml::Value) -> serde_json::Value {
    match value {
        toml::Value::String(s) => serde_json::Value::String(s),
        toml::Value::Integer(i) => serde_json::Value::from(i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number)
        }
        toml::Value::Boolean(b) => serde_json::Value::Bool(b),
        toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        toml::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => {
            serde_json::Value::Object(table.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

/// A DAG parsed from a file, with the defaults its file declares for run parameters.
pub struct LoadedDag {
    /// The validated DAG.
    pub dag: Dag,
    /// The defaults of the file's params (plain and declared); the schema is `dag.params`.
    pub default_params: Params,
}

/// Parses and validates one DAG file. `run = "NAME"` tasks are built from `registry`.
pub fn parse_dag_file(file: &str, text: &str, registry: &TaskRegistry) -> Result<LoadedDag, DagFileError> {
    parse_dag_file_with_pools(file, text, registry, None)
}

/// Like [`parse_dag_file`], and with `pools` every `pool` a task names must be one of them.
pub fn parse_dag_file_with_pools(
    file: &str,
    text: &str,
    registry: &TaskRegistry,
    pools: Option<&Pools>,
) -> Result<LoadedDag, DagFileError> {
    // Line numbers by binary search in the lines' starts: a file of N tasks asks a few times
    // per task, so a scan from the top each time made loading a large file quadratic.
    let lines = LineIndex::new(text);
    let line_of = |_: &str, offset: usize| lines.line(offset);
    let error = |span: Option<Range<usize>>, reason: String| DagFileError {
        file: file.to_string(),
        line: span.map(|s| line_of(text, s.start)),
        reason,
    };
    let parsed: DagFile = toml::from_str(text).map_err(|e| error(e.span(), e.message().trim().to_string()))?;

    let dag_id = parsed.id.get_ref().clone();
    let mut builder = Dag::builder(dag_id.clone())
        .description(parsed.description)
        .source(file)
        .version(crate::dag::content_version(text));
    if let Some(schedule) = &parsed.schedule {
        builder = builder.schedule(schedule.get_ref());
    }
    if let Some(timezone) = &parsed.timezone {
        if timezone.get_ref().parse::<chrono_tz::Tz>().is_err() {
            return Err(error(Some(timezone.span()), format!("unknown timezone {:?}", timezone.get_ref())));
        }
        builder = builder.timezone(timezone.get_ref());
    }
    if let Some(start) = &parsed.start {
        let text_value = match start.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Datetime(d) => d.to_string(),
            other => {
                return Err(error(
                    Some(start.span()),
                    format!("start must be an RFC 3339 time, not a {}", other.type_str()),
                ));
            }
        };
        let instant = DateTime::parse_from_rfc3339(&text_value).map_err(|e| {
            error(Some(start.span()), format!("bad start {text_value:?}: {e} (use e.g. 2026-01-01T00:00:00Z)"))
        })?;
        builder = builder.start(instant.with_timezone(&Utc));
    }
    if let Some(catch_up) = parsed.catch_up {
        builder = builder.catch_up(catch_up);
    }
    if let Some(max) = &parsed.max_active_runs {
        builder = builder.max_active_runs(*max.get_ref());
    }
    if let Some(max) = parsed.max_active_tasks {
        builder = builder.max_active_tasks(max);
    }
    if let Some(paused) = parsed.paused {
        builder = builder.paused(paused);
    }
    for tag in parsed.tags {
        builder = builder.tag(tag);
    }
    if let Some(timeout) = &parsed.run_timeout {
        let duration =
            parse_duration(timeout.get_ref()).map_err(|e| error(Some(timeout.span()), format!("run_timeout: {e}")))?;
        builder = builder.run_timeout(duration);
    }

    let mut param_lines: HashMap<String, usize> = HashMap::new();
    for (name, value) in parsed.params {
        let line = line_of(text, value.span().start);
        param_lines.insert(name.clone(), line);
        let param_error = |reason: String| DagFileError {
            file: file.to_string(),
            line: Some(line),
            reason: format!("dag {dag_id:?}: param {name:?}: {reason}"),
        };
        let spec = match value.into_inner() {
            toml::Value::Table(table) => {
                let entry: ParamEntry = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
                    param_error(format!(
                        "{} (a table under [params] declares a param; an object default is written `default = {{ ... }}` \
                         in it)",
                        e.message().trim()
                    ))
                })?;
                let kind = entry.kind.as_deref().map(ParamType::parse).transpose().map_err(&param_error)?;
                ParamSpec {
                    kind,
                    default: entry.default.map(toml_to_json),
                    values: entry.values.unwrap_or_default(),
                    pattern: entry.pattern,
                    max_length: entry.max_length,
                    required: entry.required.unwrap_or(false),
                    description: entry.description.unwrap_or_default(),
                    plain: false,
                }
            }
            plain => ParamSpec::plain(toml_to_json(plain)),
        };
        builder = builder.param(name, spec);
    }

    let mut task_lines: HashMap<String, usize> = HashMap::new();
    let mut command_lines: HashMap<String, usize> = HashMap::new();
    let mut env_lines: HashMap<String, usize> = HashMap::new();
    let mut after_spans: HashMap<(String, String), Range<usize>> = HashMap::new();
    for entry in parsed.tasks {
        let entry_span = entry.span();
        let entry = entry.into_inner();
        let task_id = entry.id.get_ref().clone();
        let task_error = |span: Range<usize>, reason: String| error(Some(span), format!("task {task_id:?}: {reason}"));
        task_lines.entry(task_id.clone()).or_insert_with(|| line_of(text, entry.id.span().start));
        if task_lines.get(&task_id) != Some(&line_of(text, entry.id.span().start)) {
            return Err(error(Some(entry.id.span()), format!("dag {dag_id:?}: duplicate task id {task_id:?}")));
        }
        let args = match entry.args {
            Some(value) => {
                serde_json::to_value(value).map_err(|e| task_error(entry_span.clone(), format!("bad args: {e}")))?
            }
            None => serde_json::Value::Null,
        };
        if let Some(command) = &entry.command {
            command_lines.insert(task_id.clone(), line_of(text, command.span().start));
        }
        let kind = match (entry.command, entry.run) {
            (Some(command), None) => TaskKind::Command(command.into_inner()),
            (None, Some(name)) => {
                let task = registry
                    .build(name.get_ref(), &args)
                    .map_err(|reason| task_error(name.span(), format!("run {:?}: {reason}", name.get_ref())))?;
                TaskKind::Rust { name: Some(name.into_inner()), task }
            }
            (Some(command), Some(_)) => {
                return Err(task_error(command.span(), "has both `command` and `run`; give one".to_string()));
            }
            (None, None) => {
                return Err(task_error(entry_span, "needs `command = [...]` or `run = \"NAME\"`".to_string()));
            }
        };
        let mut spec = TaskSpec::new(task_id.clone(), kind).args(args);
        if let Some(env) = entry.env {
            env_lines.insert(task_id.clone(), line_of(text, env.span().start));
            spec.env = env.into_inner();
        }
        for up in &entry.after {
            after_spans.insert((task_id.clone(), up.get_ref().clone()), up.span());
        }
        spec.after = entry.after.into_iter().map(Spanned::into_inner).collect();
        let duration =
            |value: &Option<Spanned<String>>, key: &str| -> Result<Option<std::time::Duration>, DagFileError> {
                match value {
                    Some(v) => {
                        parse_duration(v.get_ref()).map(Some).map_err(|e| task_error(v.span(), format!("{key}: {e}")))
                    }
                    None => Ok(None),
                }
            };
        let config = &mut spec.config;
        if let Some(retries) = entry.retries {
            config.retries = retries;
        }
        if let Some(delay) = duration(&entry.retry_delay, "retry_delay")? {
            config.retry_delay = delay;
        }
        if let Some(max) = duration(&entry.retry_delay_max, "retry_delay_max")? {
            config.retry_delay_max = max;
        }
        if let Some(backoff) = &entry.retry_backoff {
            if !(backoff.get_ref().is_finite() && *backoff.get_ref() >= 1.0) {
                return Err(task_error(backoff.span(), "retry_backoff must be at least 1.0".to_string()));
            }
            config.retry_backoff = *backoff.get_ref();
        }
        config.timeout = duration(&entry.timeout, "timeout")?;
        if let Some(queue) = entry.queue {
            config.queue = queue;
        }
        if let Some(priority) = entry.priority {
            config.priority = priority;
        }
        if let Some(on) = entry.alert_on_failure {
            config.alert_on_failure = on;
        }
        if let Some(on) = entry.alert_on_retry {
            config.alert_on_retry = on;
        }
        if let Some(rule) = &entry.trigger_rule {
            config.trigger_rule = rule.get_ref().parse().map_err(|e| task_error(rule.span(), e))?;
        }
        config.branch = entry.branch.unwrap_or(false);
        config.pool = entry.pool;
        config.pool_slots = entry.pool_slots.unwrap_or(1);
        config.max_active = entry.max_active;
        builder = builder.task(spec);
    }

    let schedule_span = parsed.schedule.as_ref().map(Spanned::span);
    let locate = |err: DagError| {
        let line = match &err {
            DagError::DuplicateTask { task, .. } => task_lines.get(task).copied(),
            DagError::UnknownUpstream { task, upstream, .. } => {
                after_spans.get(&(task.clone(), upstream.clone())).map(|s| line_of(text, s.start))
            }
            DagError::Cycle { path, .. } => path.first().and_then(|t| task_lines.get(t)).copied(),
            DagError::NotAnAncestor { task, .. } => task_lines.get(task).copied(),
            DagError::Param { param, .. } => param_lines.get(param).copied(),
            DagError::CommandTemplate { task, .. } => command_lines.get(task).copied(),
            DagError::Env { task, .. } => env_lines.get(task).or_else(|| task_lines.get(task)).copied(),
            DagError::Invalid { reason, .. } if reason.contains("cron") || reason.contains("schedule") => {
                schedule_span.clone().map(|s| line_of(text, s.start))
            }
            DagError::Invalid { reason, .. } => reason
                .strip_prefix("task \"")
                .and_then(|rest| rest.split('"').next())
                .and_then(|task| task_lines.get(task).copied())
                .or_else(|| Some(line_of(text, parsed.id.span().start))),
        };
        DagFileError { file: file.to_string(), line, reason: err.to_string() }
    };
    let dag = builder.build().map_err(locate)?;
    if let Some(pools) = pools {
        crate::dag::check_pools(&dag, pools).map_err(locate)?;
    }
    let default_params: Params = dag.params.defaults();
    Ok(LoadedDag { dag, default_params })
}

/// 1-based line number of a byte offset.
/// Where each line of a text starts, to find the line of a byte offset in O(log lines).
struct LineIndex {
    /// Byte offsets of the starts of the lines after the first.
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        LineIndex { starts: text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i + 1).collect() }
    }

    /// The line (from 1) of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|start| *start <= offset) + 1
    }
}

/// The line (from 1) of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    #[test]
    fn the_line_index_agrees_with_a_scan() {
        let text = "a\n\nbc\nd";
        let index = LineIndex::new(text);
        for offset in 0..=text.len() + 2 {
            assert_eq!(index.line(offset), line_of(text, offset), "offset {offset}");
        }
    }

    use async_trait::async_trait;

    use super::*;
    use crate::task::{Task, TaskContext, TaskError, TaskOutcome};

    struct Noop;

    #[async_trait]
    impl Task for Noop {
        async fn run(&self, _ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
            Ok(TaskOutcome::done())
        }
    }

    fn registry() -> TaskRegistry {
        let mut registry = TaskRegistry::new();
        registry.register("noop", |_| Ok(Arc::new(Noop) as Arc<dyn Task>));
        registry
    }

    fn check(text: &str, expected: &str) {
        match parse_dag_file("etl.toml", text, &registry()) {
            Ok(_) => panic!("expected error {expected}"),
            Err(err) => assert_eq!(err.to_string(), expected),
        }
    }

    const GOOD: &str = r#"
id = "etl"
description = "nightly"
schedule = "0 0 2 * * *"
timezone = "Europe/Warsaw"
start = "2026-01-01T00:00:00Z"
catch_up = false
max_active_runs = 2

[params]
who = "today"

[params.date]
type = "date"
default = "2026-01-01"

[[task]]
id = "extract"
command = ["sh", "-c", "echo {{ params.date }} for $WHO"]
env = { WHO = "{{ params.who }}" }
retries = 2
retry_delay = "5s"
timeout = "10m"

[[task]]
id = "load"
after = ["extract"]
run = "noop"
args = { ms = 5 }
queue = "heavy"
trigger_rule = "all_done"

[[task]]
id = "pick"
command = ["echo", "load"]
branch = true

[[task]]
id = "chosen"
after = ["pick"]
run = "noop"
"#;

    #[test]
    fn parses_a_full_file() {
        let loaded = parse_dag_file("etl.toml", GOOD, &registry()).unwrap();
        let dag = loaded.dag;
        assert_eq!(dag.id, "etl");
        assert_eq!(dag.schedule.describe().as_deref(), Some("0 0 2 * * *"));
        assert!(!dag.catch_up);
        assert_eq!(dag.max_active_runs, 2);
        let extract = dag.task("extract").unwrap();
        assert_eq!(extract.config.retries, 2);
        assert_eq!(extract.config.timeout, Some(std::time::Duration::from_secs(600)));
        let load = dag.task("load").unwrap();
        assert_eq!(load.config.queue, "heavy");
        assert_eq!(load.args, serde_json::json!({"ms": 5}));
        assert_eq!(load.config.trigger_rule, crate::TriggerRule::AllDone);
        assert_eq!(extract.config.trigger_rule, crate::TriggerRule::AllSuccess);
        assert!(dag.task("pick").unwrap().config.branch && !load.config.branch);
        assert_eq!(loaded.default_params.get("who"), Some(&serde_json::json!("today")));
        assert_eq!(loaded.default_params.get("date"), Some(&serde_json::json!("2026-01-01")));
        assert_eq!(extract.env.get("WHO").map(String::as_str), Some("{{ params.who }}"));
        assert!(dag.params.declared());
        assert_eq!(dag.params.get("date").unwrap().kind, Some(ParamType::Date));
        assert!(dag.params.get("who").unwrap().plain);
    }

    #[test]
    fn params_schema_in_a_file() {
        let text = r#"
id = "p"
[params]
plain = [1, 2]
when = 2026-01-02
[params.n]
type = "integer"
default = 3
description = "how many"
[params.mode]
type = "enum"
values = ["fast", "slow"]
[params.name]
type = "string"
pattern = "[a-z]+"
max_length = 10
required = true
[params.blob]
default = { k = [1, 2] }
[[task]]
id = "t"
command = ["echo", "{{ params.n }}", "{{ params.mode }}", "{{ ds }}"]
env = { NAME = "{{ params.name }}", BLOB = "{{ params.blob }}", PLAIN = "{{ params.plain }}" }
"#;
        let loaded = parse_dag_file("p.toml", text, &registry()).unwrap();
        let params = &loaded.dag.params;
        assert_eq!(params.get("n").unwrap().description, "how many");
        assert_eq!(params.get("mode").unwrap().values, ["fast", "slow"]);
        assert!(params.get("name").unwrap().required);
        assert_eq!(params.get("blob").unwrap().kind, None);
        assert!(!params.get("blob").unwrap().plain, "a table without type is declared, untyped");
        assert_eq!(
            loaded.default_params,
            serde_json::from_value::<Params>(serde_json::json!({
                "plain": [1, 2], "when": "2026-01-02", "n": 3, "blob": {"k": [1, 2]}
            }))
            .unwrap()
        );
    }

    #[test]
    fn bad_params_schemas_are_refused_at_their_line() {
        check(
            "id = \"p\"\n[params.n]\ntype = \"int\"\n[[task]]\nid = \"t\"\ncommand = [\"true\"]\n",
            "etl.toml:2: dag \"p\": param \"n\": unknown type \"int\" (one of string, integer, number, boolean, date, \
             datetime, enum)",
        );
        check(
            "id = \"p\"\n[params]\nx = 1\n\n[params.n]\ntype = \"integer\"\ndefault = \"ten\"\n[[task]]\nid = \"t\"\n\
             command = [\"true\"]\n",
            "etl.toml:5: dag \"p\": param \"n\": default: expected an integer, got the string \"ten\"",
        );
        check(
            "id = \"p\"\n[params.m]\ntype = \"enum\"\nvalues = [\"ok\", \"a b\"]\n[[task]]\nid = \"t\"\ncommand = [\"true\"]\n",
            "etl.toml:2: dag \"p\": param \"m\": enum value \"a b\": not a plain word: it contains ' ' (use letters, \
             digits, '_', '-' and '.')",
        );
        check(
            "id = \"p\"\n[params.s]\ntype = \"string\"\npattern = \"[a-\"\n[[task]]\nid = \"t\"\ncommand = [\"true\"]\n",
            "etl.toml:2: dag \"p\": param \"s\": bad pattern \"[a-\": unclosed character class",
        );
        check(
            "id = \"p\"\n[params.s]\ntpye = \"string\"\n[[task]]\nid = \"t\"\ncommand = [\"true\"]\n",
            "etl.toml:2: dag \"p\": param \"s\": unknown field `tpye`, expected one of `type`, `default`, `values`, \
             `pattern`, `max_length`, `required`, `description` (a table under [params] declares a param; an object \
             default is written `default = { ... }` in it)",
        );
        check(
            "id = \"p\"\n[params.a-b]\ntype = \"integer\"\n[params.a_b]\ntype = \"integer\"\n[[task]]\nid = \"t\"\n\
             command = [\"true\"]\n",
            "etl.toml:4: dag \"p\": param \"a_b\": would be $DAGMQ_PARAM_A_B, as param \"a-b\" is; give one another name",
        );
        check(
            "id = \"p\"\n[params.n]\ntype = \"integer\"\ndefault = -1\n[[task]]\nid = \"t\"\n\
             command = [\"tail\", \"{{ params.n }}\", \"f\"]\n",
            "etl.toml:2: dag \"p\": param \"n\": default: -1 starts with '-', and task \"t\" templates {{ params.n }} at \
             the start of a command argument, where a program would read it as an option; write it after the option it \
             belongs to (`--n={{ params.n }}`), put `--` before it, or pass it through `env`",
        );
        check(
            "id = \"p\"\nschedule = \"@daily\"\n[params.s]\ntype = \"string\"\nrequired = true\n[[task]]\nid = \"t\"\n\
             command = [\"true\"]\n",
            "etl.toml:3: dag \"p\": param \"s\": required without a default, but scheduled runs have only defaults: \
             give it a default",
        );
    }

    #[test]
    fn commands_template_only_plain_word_values_and_env_is_checked() {
        let head = "id = \"p\"\n[params]\nplain = \"x\"\n[params.s]\ntype = \"string\"\n[params.n]\ntype = \"integer\"\n\
                    [[task]]\nid = \"up\"\ncommand = [\"true\"]\n[[task]]\nid = \"t\"\nafter = [\"up\"]\n";
        let refused = |tail: &str| match parse_dag_file("p.toml", &format!("{head}{tail}"), &registry()) {
            Ok(_) => panic!("{tail} loaded"),
            Err(err) => err.to_string(),
        };
        let hint = |name: &str, var: &str, env: &str| {
            format!(
                "only dagmq's own values (run_id, dag_id, task_id, try, logical_date, ds) and params of type integer, \
                 number, boolean, date, datetime or enum may be templated into a command, where text from outside \
                 could become code or options. Pass it through the environment: env = {{ {var} = \"{{{{ {name} }}}}\" \
                 }} in the task and \"${var}\" in the command (or {env})"
            )
        };
        assert_eq!(
            refused("command = [\"sh\", \"-c\", \"echo {{ params.s }}\"]\n"),
            format!(
                "p.toml:14: dag \"p\", task \"t\": {{{{ params.s }}}} in `command`: param \"s\" is a string; {}",
                hint("params.s", "S", "$DAGMQ_PARAM_S")
            )
        );
        assert!(refused("command = [\"echo\", \"{{ params.plain }}\"]\n").contains("param \"plain\" has no type; "));
        assert!(refused("command = [\"echo\", \"{{params.zz}}\"]\n").contains("param \"zz\" is not declared; "));
        assert!(refused("command = [\"echo\", \"{{ tasks.up.output }}\"]\n").starts_with(
            "p.toml:14: dag \"p\", task \"t\": {{ tasks.up.output }} in `command`: an upstream output is text from \
                 outside;"
        ));
        assert_eq!(
            refused("command = [\"echo\", \"{{ nope }}\"]\n"),
            "p.toml:14: dag \"p\", task \"t\": {{ nope }} in `command`: unknown template variable (known in a command: \
             run_id, dag_id, task_id, try, logical_date, ds, and params.NAME of a safe type)"
        );
        assert_eq!(
            refused("command = [\"true\"]\nenv = { \"A=B\" = \"x\" }\n"),
            "p.toml:15: dag \"p\", task \"t\": env: name \"A=B\" contains '='; use letters, digits and '_'"
        );
        assert_eq!(
            refused("command = [\"true\"]\nenv = { DAGMQ_RUN_ID = \"x\" }\n"),
            "p.toml:15: dag \"p\", task \"t\": env: name \"DAGMQ_RUN_ID\": names starting with DAGMQ_ are dagmq's own"
        );
        assert_eq!(
            refused("command = [\"true\"]\nenv = { A = \"{{ open\" }\n"),
            "p.toml:15: dag \"p\", task \"t\": env: A: unclosed '{{' in \"{{ open\""
        );
        assert_eq!(
            refused("command = [\"true\"]\nenv = { A = \"{{ tasks.t.output }}\" }\n"),
            "p.toml:12: dag \"p\", task \"t\": {{ tasks.t.output }} names a task that is not upstream of it (directly \
             or through others), so its output may not exist yet"
        );
        assert_eq!(
            refused("run = \"noop\"\nenv = { A = \"x\" }\n"),
            "p.toml:15: dag \"p\", task \"t\": env: is for command tasks; a Rust task reads ctx.params and ctx.inputs() \
             itself"
        );
        // Names other programs read as code or a search path take no template (whatever the
        // value), at the env's line; a literal value stays the author's.
        for name in ["BASH_ENV", "PS4", "LD_PRELOAD", "PATH", "IFS", "PYTHONSTARTUP", "PERL5OPT", "NODE_OPTIONS"]
            .into_iter()
            .chain(["GIT_SSH_COMMAND", "HOME"])
        {
            let err = refused(&format!("command = [\"true\"]\nenv = {{ {name} = \"x{{{{ params.n }}}}\" }}\n"));
            assert!(
                err.starts_with(&format!("p.toml:15: dag \"p\", task \"t\": env: {name} takes a template, but ")),
                "{name}: {err}"
            );
            assert!(err.contains("env = { VALUE = "), "{err}");
        }
        parse_dag_file(
            "p.toml",
            &format!("{head}command = [\"true\"]\nenv = {{ PATH = \"/opt/x/bin:/usr/bin\" }}\n"),
            &registry(),
        )
        .unwrap();
        // In a DAG that declares params, env names only declared ones (and known values).
        assert_eq!(
            refused("command = [\"true\"]\nenv = { A = \"x {{ params.nope }}\" }\n"),
            "p.toml:15: dag \"p\", task \"t\": env: A: {{ params.nope }}: param \"nope\" is not declared (this dag \
             declares: n, plain, s)"
        );
        assert_eq!(
            refused("command = [\"true\"]\nenv = { A = \"{{ nope }}\" }\n"),
            "p.toml:15: dag \"p\", task \"t\": env: A: {{ nope }}: unknown template variable (known: run_id, dag_id, \
             task_id, try, logical_date, ds, params.NAME, tasks.ID.output)"
        );
        // What may be templated loads.
        let good = format!(
            "{head}command = [\"sh\", \"-c\", \"echo {{{{ params.n }}}} {{{{ ds }}}} {{{{run_id}}}} $S\"]\n\
             env = {{ S = \"{{{{ params.s }}}} {{{{ params.plain }}}} {{{{ tasks.up.output.x }}}}\" }}\n"
        );
        parse_dag_file("p.toml", &good, &registry()).unwrap();
    }

    #[test]
    fn a_dag_without_a_schema_may_name_any_param_in_env() {
        let text = "id = \"p\"\n[params]\nday = \"x\"\n[[task]]\nid = \"t\"\ncommand = [\"true\"]\n\
                    env = { A = \"{{ params.other }}\" }\n";
        parse_dag_file("p.toml", text, &registry()).unwrap();
    }

    #[test]
    fn reports_file_line_and_reason() {
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\nafter = [\"b\"]\n",
            "etl.toml:5: dag \"etl\", task \"a\": unknown upstream \"b\"",
        );
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\nafter = [\"b\"]\n[[task]]\nid = \"b\"\ncommand = [\"true\"]\nafter = [\"a\"]\n",
            "etl.toml:3: dag \"etl\": cycle a -> b -> a",
        );
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\n",
            "etl.toml:6: dag \"etl\": duplicate task id \"a\"",
        );
        check(
            "id = \"etl\"\nschedule = \"0 0 2 * *\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\n",
            "etl.toml:2: dag \"etl\": bad cron \"0 0 2 * *\": expected 6 fields (sec min hour day-of-month month day-of-week), found 5",
        );
        check("id = \"etl\"\ntimezone = \"Europe/Warsawa\"\n", "etl.toml:2: unknown timezone \"Europe/Warsawa\"");
        check(
            "id = \"etl\"\nscheduel = \"@daily\"\n",
            "etl.toml:2: unknown field `scheduel`, expected one of `id`, `description`, `schedule`, `timezone`, `start`, `catch_up`, `max_active_runs`, `max_active_tasks`, `paused`, `tags`, `run_timeout`, `params`, `task`",
        );
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\n",
            "etl.toml:2: task \"a\": needs `command = [...]` or `run = \"NAME\"`",
        );
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\nrun = \"nope\"\n",
            "etl.toml:4: task \"a\": run \"nope\": unknown task \"nope\" (registered: noop)",
        );
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\ntimeout = \"10 minutes\"\n",
            "etl.toml:5: task \"a\": timeout: bad duration \"10 minutes\": unknown unit \" minutes\" (ms, s, m, h, d)",
        );
        check("id = \"etl\"\n[[task]\n", "etl.toml:2: unclosed array table, expected `]`");
        let pools: Pools = [("db".to_string(), 2)].into();
        let err = parse_dag_file_with_pools(
            "etl.toml",
            "id = \"etl\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\n[[task]]\nid = \"b\"\ncommand = [\"true\"]\npool = \"dbx\"\n",
            &registry(),
            Some(&pools),
        )
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "etl.toml:6: dag \"etl\": task \"b\": unknown pool \"dbx\" (pools: db; declare it under [pools] in the \
             config file or with --pool dbx=SLOTS)"
        );
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\ntrigger_rule = \"any\"\n",
            "etl.toml:5: task \"a\": unknown trigger_rule \"any\" (one of all_success, all_done, all_failed, \
             one_success, one_failed, none_failed)",
        );
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\n[[task]]\nid = \"pick\"\nbranch = true\n\
             command = [\"true\"]\nafter = [\"a\"]\n",
            "etl.toml:6: dag \"etl\": task \"pick\": branch = true, but no task runs after it, so there is nothing to \
             choose",
        );
        check("id = \"etl\"\n", "etl.toml:1: dag \"etl\": a dag needs at least one task");
        // Reading the output of a task that is not upstream (here a sibling).
        check(
            "id = \"etl\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\n[[task]]\nid = \"b\"\ncommand = [\"true\"]\n\
             [[task]]\nid = \"c\"\nafter = [\"a\"]\ncommand = [\"true\"]\n\
             env = { A = \"{{ tasks.a.output }} {{ tasks.b.output.rows }}\" }\n",
            "etl.toml:9: dag \"etl\", task \"c\": {{ tasks.b.output }} names a task that is not upstream of it \
             (directly or through others), so its output may not exist yet",
        );
    }
}
