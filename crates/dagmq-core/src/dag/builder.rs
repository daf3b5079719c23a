//! [`DagBuilder`]: a DAG's settings and tasks, and the checks a DAG passes before it exists
//! (graph order, ids, templates, output references, pools).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::{Dag, DagError, TaskKind, TaskSpec};
use crate::params::{ParamSpec, ParamsSchema};
use crate::schedule::Schedule;

/// Collects a DAG's settings and tasks; [`DagBuilder::build`] validates them.
pub struct DagBuilder {
    /// The DAG under construction (tasks in insertion order until built).
    dag: Dag,
    /// Schedule text, parsed at build time once the timezone is known.
    schedule: Option<String>,
    /// Timezone name, parsed at build time.
    timezone: String,
}

impl DagBuilder {
    /// A manual-only DAG in UTC, catching up, at most 16 active runs.
    pub fn new(id: impl Into<String>) -> DagBuilder {
        DagBuilder {
            dag: Dag {
                id: id.into(),
                description: String::new(),
                schedule: Schedule::Manual,
                timezone: Tz::UTC,
                start: None,
                catch_up: true,
                max_active_runs: 16,
                max_active_tasks: None,
                paused: false,
                tags: Vec::new(),
                run_timeout: None,
                source: "rust".to_string(),
                version: "rust".to_string(),
                params: Arc::new(ParamsSchema::new()),
                tasks: Vec::new(),
                index: HashMap::new(),
                downstream: Vec::new(),
            },
            schedule: None,
            timezone: "UTC".to_string(),
        }
    }

    /// Free text for people.
    pub fn description(mut self, text: impl Into<String>) -> DagBuilder {
        self.dag.description = text.into();
        self
    }

    /// A six-field cron, `@every DURATION` or a shorthand such as `@daily`.
    pub fn schedule(mut self, text: impl Into<String>) -> DagBuilder {
        self.schedule = Some(text.into());
        self
    }

    /// IANA timezone name for the cron schedule.
    pub fn timezone(mut self, name: impl Into<String>) -> DagBuilder {
        self.timezone = name.into();
        self
    }

    /// No schedule point before this is due.
    pub fn start(mut self, start: DateTime<Utc>) -> DagBuilder {
        self.dag.start = Some(start);
        self
    }

    /// Whether missed schedule points each get a run.
    pub fn catch_up(mut self, catch_up: bool) -> DagBuilder {
        self.dag.catch_up = catch_up;
        self
    }

    /// How many runs may be `running` at once.
    pub fn max_active_runs(mut self, max: u32) -> DagBuilder {
        self.dag.max_active_runs = max;
        self
    }

    /// At most `max` of the DAG's tasks queued or running at once, across its runs.
    pub fn max_active_tasks(mut self, max: u32) -> DagBuilder {
        self.dag.max_active_tasks = Some(max);
        self
    }

    /// Whether the DAG starts paused.
    pub fn paused(mut self, paused: bool) -> DagBuilder {
        self.dag.paused = paused;
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> DagBuilder {
        self.dag.tags.push(tag.into());
        self
    }

    /// Fails a run that is still unfinished this long after it started.
    pub fn run_timeout(mut self, timeout: Duration) -> DagBuilder {
        self.dag.run_timeout = Some(timeout);
        self
    }

    /// Sets the version (what a DAG file's loader derives from its text).
    pub fn version(mut self, version: impl Into<String>) -> DagBuilder {
        self.dag.version = version.into();
        self
    }

    /// Where the DAG came from, for error messages.
    pub fn source(mut self, source: impl Into<String>) -> DagBuilder {
        self.dag.source = source.into();
        self
    }

    /// Declares a param: its type, default and allowed values (see [`ParamSpec`]). A DAG
    /// that declares a param refuses triggers with params it does not declare (plain defaults,
    /// [`ParamSpec::plain`], excepted).
    pub fn param(mut self, name: impl Into<String>, spec: ParamSpec) -> DagBuilder {
        Arc::make_mut(&mut self.dag.params).insert(name, spec);
        self
    }

    /// Adds a task.
    pub fn task(mut self, task: TaskSpec) -> DagBuilder {
        self.dag.tasks.push(task);
        self
    }

    /// Validates and returns the DAG: ids, upstreams, cycles, schedule, timezone, settings.
    pub fn build(self) -> Result<Dag, DagError> {
        let DagBuilder { mut dag, schedule, timezone } = self;
        let invalid = |reason: String| DagError::Invalid { dag: dag.id.clone(), reason };
        check_id(&dag.id).map_err(|reason| invalid(format!("bad dag id: {reason}")))?;
        dag.timezone = timezone.parse::<Tz>().map_err(|_| invalid(format!("unknown timezone {timezone:?}")))?;
        if let Some(text) = schedule {
            dag.schedule = Schedule::parse(&text, dag.timezone).map_err(&invalid)?;
        }
        if dag.max_active_runs == 0 {
            return Err(invalid("max_active_runs must be at least 1".to_string()));
        }
        if dag.max_active_tasks == Some(0) {
            return Err(invalid("max_active_tasks must be at least 1".to_string()));
        }
        if dag.tasks.is_empty() {
            return Err(invalid("a dag needs at least one task".to_string()));
        }
        Arc::make_mut(&mut dag.params).validate().map_err(|e| DagError::Param {
            dag: dag.id.clone(),
            param: e.param,
            reason: e.reason,
        })?;
        if !matches!(dag.schedule, Schedule::Manual)
            && let Some((name, _)) = dag.params.iter().find(|(_, spec)| spec.required)
        {
            return Err(DagError::Param {
                dag: dag.id.clone(),
                param: name.clone(),
                reason: "required without a default, but scheduled runs have only defaults: give it a default"
                    .to_string(),
            });
        }
        for task in &dag.tasks {
            check_id(&task.id).map_err(|reason| invalid(format!("task {:?}: bad id: {reason}", task.id)))?;
            if let TaskKind::Command(argv) = &task.kind
                && argv.is_empty()
            {
                return Err(invalid(format!("task {:?}: empty command", task.id)));
            }
            if task.config.pool_slots == 0 {
                return Err(invalid(format!("task {:?}: pool_slots must be at least 1", task.id)));
            }
            if task.config.max_active == Some(0) {
                return Err(invalid(format!("task {:?}: max_active must be at least 1", task.id)));
            }
            if let Some(pool) = &task.config.pool {
                check_id(pool).map_err(|reason| invalid(format!("task {:?}: bad pool name: {reason}", task.id)))?;
            }
            if task.config.priority > 9 {
                return Err(invalid(format!("task {:?}: priority must be 0-9", task.id)));
            }
            if !(task.config.retry_backoff.is_finite() && task.config.retry_backoff >= 1.0) {
                return Err(invalid(format!("task {:?}: retry_backoff must be at least 1.0", task.id)));
            }
            check_id(&task.config.queue)
                .map_err(|reason| invalid(format!("task {:?}: bad queue name: {reason}", task.id)))?;
            check_templates(&dag.id, &dag.params, task)?;
        }
        let mut word_starts = BTreeMap::new();
        for task in &dag.tasks {
            let TaskKind::Command(argv) = &task.kind else { continue };
            for name in argv.iter().flat_map(|arg| crate::template::word_start_placeholders(arg)) {
                if let Some(param) = name.strip_prefix("params.") {
                    word_starts.entry(param.to_string()).or_insert_with(|| task.id.clone());
                }
            }
        }
        Arc::make_mut(&mut dag.params).set_word_starts(word_starts).map_err(|e| DagError::Param {
            dag: dag.id.clone(),
            param: e.param,
            reason: e.reason,
        })?;
        let order = topological_order(&dag.id, &dag.tasks)?;
        let mut slots: Vec<Option<TaskSpec>> = dag.tasks.drain(..).map(Some).collect();
        dag.tasks = order.into_iter().filter_map(|i| slots[i].take()).collect();
        dag.index = dag.tasks.iter().enumerate().map(|(i, t)| (t.id.clone(), i)).collect();
        dag.downstream = vec![Vec::new(); dag.tasks.len()];
        for (i, task) in dag.tasks.iter().enumerate() {
            for up in task.after.iter() {
                if let Some(&u) = dag.index.get(up) {
                    dag.downstream[u].push(i);
                }
            }
        }
        check_output_references(&dag)?;
        for task in dag.tasks.iter().filter(|t| t.config.branch) {
            if dag.downstream_of(&task.id).is_empty() {
                return Err(invalid(format!(
                    "task {:?}: branch = true, but no task runs after it, so there is nothing to choose",
                    task.id
                )));
            }
        }
        Ok(dag)
    }
}

/// Refuses what a task may not template: in `command`, anything but dagmq's own values and
/// params of a type whose values are plain words (values from outside would be pasted into a
/// command line, where a shell, an interpreter or an option parser may take them for code);
/// in `env`, bad names and unclosed placeholders.
fn check_templates(dag: &str, params: &ParamsSchema, task: &TaskSpec) -> Result<(), DagError> {
    let env_error = |reason: String| DagError::Env { dag: dag.to_string(), task: task.id.clone(), reason };
    let argv = match &task.kind {
        TaskKind::Command(argv) => argv,
        _ if !task.env.is_empty() => {
            return Err(env_error(
                "is for command tasks; a Rust task reads ctx.params and ctx.inputs() itself".to_string(),
            ));
        }
        _ => return Ok(()),
    };
    for (name, template) in &task.env {
        crate::params::check_env_name(name).map_err(&env_error)?;
        let names = crate::template::placeholders(template).map_err(|e| env_error(format!("{name}: {e}")))?;
        for placeholder in &names {
            if let Some(reason) = env_template_refusal(params, placeholder) {
                return Err(env_error(format!("{name}: {{{{ {placeholder} }}}}: {reason}")));
            }
        }
        if let (Some(first), Some(entry)) = (names.first(), crate::params::code_env_name(name)) {
            return Err(env_error(format!(
                "{name} takes a template, but programs other than the task's own read {name} ({entry}) as code, \
                 options or a place to load code from, so a value put there could run as code in any of them; \
                 only a literal value may set it. Pass the value under a name of your own: \
                 env = {{ VALUE = \"{{{{ {first} }}}}\" }} and \"$VALUE\" in the command"
            )));
        }
    }
    for arg in argv {
        let names = crate::template::placeholders(arg).map_err(|reason| DagError::Invalid {
            dag: dag.to_string(),
            reason: format!("task {:?}: command: {reason}", task.id),
        })?;
        for name in names {
            if let Some(reason) = command_template_refusal(params, name) {
                return Err(DagError::CommandTemplate {
                    dag: dag.to_string(),
                    task: task.id.clone(),
                    name: name.to_string(),
                    reason,
                });
            }
        }
    }
    Ok(())
}

/// Why `{{ name }}` names nothing a task's `env` can be given, or `None` when it names
/// dagmq's own value, a param (one the DAG declares, when it declares any) or an upstream
/// output.
fn env_template_refusal(params: &ParamsSchema, name: &str) -> Option<String> {
    if crate::params::DAGMQ_VALUES.contains(&name) {
        return None;
    }
    if let Some(param) = name.strip_prefix("params.") {
        if !params.declared() || params.get(param).is_some() {
            return None;
        }
        let known: Vec<&str> = params.iter().map(|(name, _)| name.as_str()).collect();
        return Some(format!("param {param:?} is not declared (this dag declares: {})", known.join(", ")));
    }
    let output = name
        .strip_prefix("tasks.")
        .and_then(|tail| tail.split_once(".output"))
        .is_some_and(|(id, rest)| !id.is_empty() && (rest.is_empty() || rest.starts_with('.')));
    if output {
        return None;
    }
    Some(format!(
        "unknown template variable (known: {}, params.NAME, tasks.ID.output)",
        crate::params::DAGMQ_VALUES.join(", ")
    ))
}

/// Why `{{ name }}` may not be templated into a command (with what to write instead), or
/// `None` when it may.
fn command_template_refusal(params: &ParamsSchema, name: &str) -> Option<String> {
    const RULE: &str = "only dagmq's own values (run_id, dag_id, task_id, try, logical_date, ds) and params of \
                        type integer, number, boolean, date, datetime or enum may be templated into a command, where \
                        text from outside could become code or options";
    if crate::params::DAGMQ_VALUES.contains(&name) {
        return None;
    }
    if let Some(param) = name.strip_prefix("params.") {
        let what = match params.get(param) {
            Some(spec) if spec.safe_in_command() => return None,
            Some(spec) if spec.kind.is_some() => format!("param {param:?} is a string"),
            Some(_) => format!("param {param:?} has no type"),
            None => format!("param {param:?} is not declared"),
        };
        let var: String = crate::params::param_env_name(param).trim_start_matches("DAGMQ_PARAM_").to_string();
        return Some(format!(
            "{what}; {RULE}. Pass it through the environment: env = {{ {var} = \"{{{{ {name} }}}}\" }} in the task \
             and \"${var}\" in the command (or ${})",
            crate::params::param_env_name(param)
        ));
    }
    if name.starts_with("tasks.") && name.contains(".output") {
        return Some(format!(
            "an upstream output is text from outside; {RULE}. Pass it through the environment: \
             env = {{ VALUE = \"{{{{ {name} }}}}\" }} in the task and \"$VALUE\" in the command (or read \
             $DAGMQ_INPUTS)"
        ));
    }
    Some(format!(
        "unknown template variable (known in a command: {}, and params.NAME of a safe type)",
        crate::params::DAGMQ_VALUES.join(", ")
    ))
}

/// Refuses a task that reads `{{ tasks.ID.output }}` (in its `env`) of a task that is not its
/// ancestor. Only tasks with such references cost a walk up the graph.
fn check_output_references(dag: &Dag) -> Result<(), DagError> {
    for task in &dag.tasks {
        let TaskKind::Command(argv) = &task.kind else { continue };
        let texts = argv.iter().chain(task.env.values());
        for referenced in texts.flat_map(|text| crate::template::output_references(text)) {
            if !is_ancestor(dag, &referenced, task) {
                return Err(DagError::NotAnAncestor { dag: dag.id.clone(), task: task.id.clone(), referenced });
            }
        }
    }
    Ok(())
}

/// Whether `ancestor` is reached by walking up from `task`'s upstreams.
fn is_ancestor(dag: &Dag, ancestor: &str, task: &TaskSpec) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<&str> = task.after.iter().map(String::as_str).collect();
    while let Some(id) = stack.pop() {
        if id == ancestor {
            return true;
        }
        if seen.insert(id)
            && let Some(up) = dag.task(id)
        {
            stack.extend(up.after.iter().map(String::as_str));
        }
    }
    false
}

/// The pools a process knows, by name, with their slots.
pub type Pools = BTreeMap<String, u32>;

/// The first task of `dag` that names a pool not in `pools`, as an error that says where pools
/// come from.
pub fn check_pools(dag: &Dag, pools: &Pools) -> Result<(), DagError> {
    for task in &dag.tasks {
        if let Some(pool) = &task.config.pool {
            match pools.get(pool) {
                None => {
                    let known: Vec<&str> = pools.keys().map(String::as_str).collect();
                    let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                    return Err(DagError::Invalid {
                        dag: dag.id.clone(),
                        reason: format!(
                            "task {:?}: unknown pool {pool:?} (pools: {known}; declare it under [pools] in the \
                             config file or with --pool {pool}=SLOTS)",
                            task.id
                        ),
                    });
                }
                Some(&slots) if slots < task.config.pool_slots => {
                    return Err(DagError::Invalid {
                        dag: dag.id.clone(),
                        reason: format!(
                            "task {:?}: pool_slots {} is more than pool {pool:?} has ({slots}), so it could never run",
                            task.id, task.config.pool_slots
                        ),
                    });
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Ids are what URLs, queue names and Redis keys carry: letters, digits, `_`, `-` and `.`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty".to_string());
    }
    if id.len() > 200 {
        return Err(format!("{id:?} is longer than 200 characters"));
    }
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("{id:?} contains {bad:?}; use letters, digits, '_', '-' and '.'"));
    }
    Ok(())
}

/// Indices of `tasks` in an order where every task follows its upstreams; refuses duplicates,
/// unknown upstreams and cycles (naming the tasks of the cycle).
fn topological_order(dag: &str, tasks: &[TaskSpec]) -> Result<Vec<usize>, DagError> {
    let mut index = HashMap::new();
    for (i, task) in tasks.iter().enumerate() {
        if index.insert(task.id.as_str(), i).is_some() {
            return Err(DagError::DuplicateTask { dag: dag.to_string(), task: task.id.clone() });
        }
    }
    let mut upstreams: Vec<Vec<usize>> = Vec::with_capacity(tasks.len());
    for task in tasks {
        let mut ups = Vec::with_capacity(task.after.len());
        for up in task.after.iter() {
            match index.get(up.as_str()) {
                Some(&i) => ups.push(i),
                None => {
                    return Err(DagError::UnknownUpstream {
                        dag: dag.to_string(),
                        task: task.id.clone(),
                        upstream: up.clone(),
                    });
                }
            }
        }
        upstreams.push(ups);
    }
    // Depth-first search with colours; the grey stack names the cycle when one is found.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour = vec![Colour::White; tasks.len()];
    let mut order = Vec::with_capacity(tasks.len());
    for root in 0..tasks.len() {
        if colour[root] != Colour::White {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        colour[root] = Colour::Grey;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&up) = upstreams[node].get(*next) {
                *next += 1;
                match colour[up] {
                    Colour::White => {
                        colour[up] = Colour::Grey;
                        stack.push((up, 0));
                    }
                    Colour::Grey => {
                        let from = stack.iter().position(|&(n, _)| n == up).unwrap_or(0);
                        let mut path: Vec<String> = stack[from..].iter().map(|&(n, _)| tasks[n].id.clone()).collect();
                        path.reverse();
                        path.insert(0, tasks[up].id.clone());
                        return Err(DagError::Cycle { dag: dag.to_string(), path });
                    }
                    Colour::Black => {}
                }
            } else {
                colour[node] = Colour::Black;
                order.push(node);
                stack.pop();
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str) -> TaskSpec {
        TaskSpec::command(id, ["true"])
    }

    fn check(builder: DagBuilder, expected: Result<Vec<&str>, &str>) {
        match (builder.build(), expected) {
            (Ok(dag), Ok(order)) => assert_eq!(dag.tasks().iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), order),
            (Err(err), Err(message)) => assert_eq!(err.to_string(), message),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn builds_in_dependency_order() {
        check(
            Dag::builder("d").task(cmd("c").after(["b"])).task(cmd("b").after(["a"])).task(cmd("a")),
            Ok(vec!["a", "b", "c"]),
        );
        check(
            Dag::builder("diamond")
                .task(cmd("join").after(["l", "r"]))
                .task(cmd("l").after(["root"]))
                .task(cmd("r").after(["root"]))
                .task(cmd("root")),
            Ok(vec!["root", "l", "r", "join"]),
        );
    }

    #[test]
    fn refuses_bad_graphs() {
        check(
            Dag::builder("etl").task(cmd("extract")).task(cmd("load").after(["extrct"])),
            Err(r#"dag "etl", task "load": unknown upstream "extrct""#),
        );
        check(Dag::builder("etl").task(cmd("a")).task(cmd("a")), Err(r#"dag "etl": duplicate task id "a""#));
        check(
            Dag::builder("etl").task(cmd("a").after(["c"])).task(cmd("b").after(["a"])).task(cmd("c").after(["b"])),
            Err(r#"dag "etl": cycle a -> b -> c -> a"#),
        );
        check(Dag::builder("etl").task(cmd("a").after(["a"])), Err(r#"dag "etl": cycle a -> a"#));
        check(Dag::builder("etl"), Err(r#"dag "etl": a dag needs at least one task"#));
    }

    #[test]
    fn refuses_bad_settings() {
        check(
            Dag::builder("etl").schedule("0 0 25 * * *").task(cmd("a")),
            Err(r#"dag "etl": bad cron "0 0 25 * * *": hour field "25": "25" is outside 0-23 or reversed"#),
        );
        check(
            Dag::builder("etl").timezone("Mars/Olympus").task(cmd("a")),
            Err(r#"dag "etl": unknown timezone "Mars/Olympus""#),
        );
        check(
            Dag::builder("e t l").task(cmd("a")),
            Err(r#"dag "e t l": bad dag id: "e t l" contains ' '; use letters, digits, '_', '-' and '.'"#),
        );
        check(
            Dag::builder("etl").max_active_runs(0).task(cmd("a")),
            Err(r#"dag "etl": max_active_runs must be at least 1"#),
        );
        check(
            Dag::builder("etl").task(TaskSpec::command("a", Vec::<String>::new())),
            Err(r#"dag "etl": task "a": empty command"#),
        );
    }

    #[test]
    fn rust_dags_declare_params_and_template_like_files() {
        use crate::params::{ParamSpec, ParamType};
        let dag = Dag::builder("etl")
            .param("day", ParamSpec::typed(ParamType::Date).default_value(serde_json::json!("2026-01-01")))
            .param("who", ParamSpec::typed(ParamType::String).max_length(20))
            .task(TaskSpec::command("a", ["sh", "-c", "echo {{ params.day }} \"$WHO\""]).env("WHO", "{{ params.who }}"))
            .build()
            .unwrap();
        assert!(dag.params.declared());
        assert_eq!(dag.params.defaults(), [("day".to_string(), serde_json::json!("2026-01-01"))].into());
        assert_eq!(dag.task("a").unwrap().env["WHO"], "{{ params.who }}");
        let err = Dag::builder("etl")
            .param("who", ParamSpec::typed(ParamType::String))
            .task(TaskSpec::command("a", ["sh", "-c", "echo {{ params.who }}"]))
            .build()
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "dag \"etl\", task \"a\": {{ params.who }} in `command`: param \"who\" is a string; only dagmq's own"
            ),
            "{err}"
        );
        check(
            Dag::builder("etl")
                .param("n", ParamSpec::typed(ParamType::Integer).default_value(serde_json::json!(1.5)))
                .task(cmd("a")),
            Err(r#"dag "etl": param "n": default: expected an integer, got 1.5"#),
        );
        check(Dag::builder("etl").task(cmd("a").env("", "x")), Err(r#"dag "etl", task "a": env: an empty name"#));
        // A negative number where a word starts would be an option: refused at trigger (and by
        // the worker's check); after an option's `=` it is that option's value.
        let dag = Dag::builder("etl")
            .param("n", ParamSpec::typed(ParamType::Integer))
            .param("x", ParamSpec::typed(ParamType::Number))
            .task(TaskSpec::command("a", ["sh", "-c", "tail {{ params.n }} f --x={{ params.x }}"]))
            .build()
            .unwrap();
        let given = |name: &str, value: serde_json::Value| [(name.to_string(), value)].into();
        let err = dag.params.resolve(given("n", serde_json::json!(-1))).unwrap_err();
        assert!(err.starts_with("param \"n\": -1 starts with '-', and task \"a\" templates"), "{err}");
        assert!(dag.params.check("n", serde_json::json!(-1)).is_err());
        dag.params.resolve(given("n", serde_json::json!(1))).unwrap();
        dag.params.resolve(given("x", serde_json::json!(-1e300))).unwrap();
        // Rust DAGs go through the same env check as files.
        let err = Dag::builder("etl")
            .param("s", ParamSpec::typed(ParamType::String))
            .task(cmd("a").env("BASH_ENV", "{{ params.s }}"))
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("dag \"etl\", task \"a\": env: BASH_ENV takes a template, but "), "{err}");
    }
}
