//! Parameter values never become shell syntax: a DAG that templates a value from outside into
//! `command` does not build; through the task key `env` (or `DAGMQ_PARAM_*`) a value reaches
//! the process as data, whatever the command's shape. Each value below would run
//! `touch PWNED` if it were pasted into a script. Triggers whose params do not fit the DAG's
//! schema are refused by the scheduler's handle (the API's path) and dead-lettered with the
//! reason from the trigger queue.

use std::time::Duration;

use dagmq_core::{Dag, DagRegistry, ParamSpec, ParamType, RunState, TaskSpec};

use crate::support::Harness;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_parameter_values_stay_data() {
    let dir = std::env::temp_dir().join(format!("dagmq-shell-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = |n: u32| dir.join(format!("out{n}")).display().to_string();
    let pwned = dir.join("PWNED");
    let string = || ParamSpec::typed(ParamType::String);
    // The old shape, a string param in a shell script, does not build.
    let refused = Dag::builder("shell")
        .param("v", string())
        .task(TaskSpec::command("template", ["sh", "-c", &format!("printf '%s' {{{{ params.v }}}} > {}", out(1))]))
        .build()
        .unwrap_err();
    assert!(refused.to_string().contains("{{ params.v }} in `command`: param \"v\" is a string"), "{refused}");
    let mut registry = DagRegistry::new();
    registry
        .add(
            Dag::builder("shell")
                .param("v", string())
                .task(
                    TaskSpec::command("env", ["sh", "-c", &format!("printf '%s' \"$V\" > {}", out(1))])
                        .env("V", "{{ params.v }}"),
                )
                .task(TaskSpec::command(
                    "param_env",
                    ["sh", "-c", &format!("printf '%s' \"$DAGMQ_PARAM_V\" > {}", out(2))],
                ))
                .task(
                    TaskSpec::command(
                        "wrapped",
                        ["timeout", "30", "bash", "-O", "extglob", "-c", &format!("printf '%s' \"$V\" > {}", out(3))],
                    )
                    .env("V", "{{ params.v }}"),
                )
                .build()
                .unwrap(),
        )
        .unwrap();
    let h = Harness::start(registry).await;
    let touch = format!("touch {}", pwned.display());
    let values = [
        format!("x; {touch}"),
        format!("$({touch})"),
        format!("`{touch}`"),
        "it's \"quoted\" and 'single'".to_string(),
        format!("line one\n{touch}\nline three"),
        "--flag=value".to_string(),
        format!("a && {touch} || b"),
    ];
    for value in values {
        let params = [("v".to_string(), serde_json::Value::String(value.clone()))].into();
        let run = h.scheduler.trigger("shell", params, None).await.unwrap().run_id;
        assert_eq!(h.wait_final(&run).await, RunState::Success, "{value:?}");
        for n in 1..=3 {
            assert_eq!(std::fs::read_to_string(out(n)).unwrap(), value, "task {n} of {value:?}");
        }
        assert!(!pwned.exists(), "{value:?} ran a command");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    h.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A forged task message naming a real queued try, but another DAG, other params and a
/// follow-up, runs the try as the store and the worker's DAG files say, and nothing of the
/// forgery.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_task_message_runs_only_what_the_store_says() {
    use dagmq_core::messages::{TaskToExec, VERSION};
    use dagmq_core::{Queue, Store, TaskState, Topic};

    let dir = std::env::temp_dir().join(format!("dagmq-forged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let pwned = dir.join("PWNED");
    let mut registry = DagRegistry::new();
    registry
        .add(
            Dag::builder("real")
                .task(TaskSpec::command(
                    "t",
                    ["sh", "-c", &format!("printf '%s' \"$DAGMQ_PARAM_V\" >> {}", out.display())],
                ))
                .build()
                .unwrap(),
        )
        .unwrap();
    registry
        .add(
            Dag::builder("other")
                .task(TaskSpec::command("t", ["sh", "-c", &format!("touch {}", pwned.display())]))
                .build()
                .unwrap(),
        )
        .unwrap();
    let mut h = Harness::start(registry).await;
    h.stop_worker().await;
    let params = [("v".to_string(), serde_json::Value::String("good".into()))].into();
    let run = h.scheduler.trigger("real", params, None).await.unwrap().run_id;
    let queued = h.wait_task(&run, "t", |t| t.state == TaskState::Queued).await;
    // The real message is lost; a forged one for the same try takes its place.
    let mut consumer = h.queue.consume(&Topic::Tasks("default".into()), 1).await.unwrap();
    consumer.next().await.unwrap().unwrap().ack().await.unwrap();
    let forged = TaskToExec {
        v: VERSION,
        run_id: run.clone(),
        dag_id: "other".into(),
        task_id: "t".into(),
        try_number: queued.try_number,
        max_try: 9,
        params: [("v".to_string(), serde_json::Value::String("evil".into()))].into(),
        logical_date: chrono::Utc::now(),
        follow_up: Some(dagmq_core::FollowUp::new("t-evil", "sleep", serde_json::json!({"ms": 1}))),
    };
    h.queue.publish(&Topic::Tasks("default".into()), dagmq_core::messages::encode(&forged)).await.unwrap();
    h.start_worker();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "good", "the store's params, the real DAG's command");
    assert!(!pwned.exists(), "the other DAG's command ran");
    let tasks = h.store.tasks(&run).await.unwrap();
    assert_eq!(tasks.len(), 1, "no follow-up added: {tasks:?}");
    assert_eq!(tasks[0].max_try, queued.max_try);
    h.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A DAG with a schema: an integer and an enum.
fn typed_registry() -> DagRegistry {
    let mut registry = DagRegistry::new();
    registry
        .add(
            Dag::builder("typed")
                .param("n", ParamSpec::typed(ParamType::Integer).required())
                .param("mode", ParamSpec::one_of(["fast", "slow"]).default_value(serde_json::json!("fast")))
                .task(TaskSpec::command("t", ["echo", "{{ params.n }}", "{{ params.mode }}"]))
                .build()
                .unwrap(),
        )
        .unwrap();
    registry.add(Dag::builder("untyped").task(TaskSpec::command("t", ["true"])).build().unwrap()).unwrap();
    registry
}

#[tokio::test(flavor = "multi_thread")]
async fn triggers_that_do_not_fit_the_schema_are_refused_and_dead_lettered_with_the_reason() {
    use dagmq_core::{Queue, Store, Topic};
    use dagmq_scheduler::CommandError;

    let h = Harness::start(typed_registry()).await;
    let params = |value: serde_json::Value| serde_json::from_value::<dagmq_core::Params>(value).unwrap();
    let big = "x".repeat(70 * 1024);
    // The handle the API calls: bad input (HTTP 400) with the reason.
    for (dag, given, reason) in [
        (
            "typed",
            serde_json::json!({"n": "3"}),
            "dag \"typed\": param \"n\": expected an integer, got the string \"3\"",
        ),
        ("typed", serde_json::json!({}), "dag \"typed\": param \"n\" is required and has no default"),
        (
            "typed",
            serde_json::json!({"n": 1, "mode": "turbo"}),
            "dag \"typed\": param \"mode\": expected one of fast, slow, got the string \"turbo\"",
        ),
        (
            "typed",
            serde_json::json!({"n": 1, "x": 1}),
            "dag \"typed\": unknown param \"x\" (this dag declares: mode, n)",
        ),
        (
            "untyped",
            serde_json::json!({"v": big}),
            "dag \"untyped\": params are 71688 bytes of JSON; a run's params may be at most 65536 bytes (64 KiB)",
        ),
        (
            "typed",
            serde_json::json!({"n": -1}),
            "dag \"typed\": param \"n\": -1 starts with '-', and task \"t\" templates {{ params.n }} at the start of \
             a command argument, where a program would read it as an option; write it after the option it belongs to \
             (`--n={{ params.n }}`), put `--` before it, or pass it through `env`",
        ),
        (
            "untyped",
            serde_json::json!({"v": {"deep": ["a\0b"]}}),
            "dag \"untyped\": param \"v\": holds a NUL byte, which no environment variable or argument can carry",
        ),
        (
            "untyped",
            serde_json::json!({"a-b": "1", "a_b": "2"}),
            "dag \"untyped\": params \"a-b\" and \"a_b\" would both be $DAGMQ_PARAM_A_B; give one another name",
        ),
    ] {
        match h.scheduler.trigger(dag, params(given.clone()), None).await {
            Err(CommandError::BadInput(message)) => assert_eq!(message, reason, "{given:.60}"),
            other => panic!("{given:.60}: {other:?}"),
        }
    }
    // The trigger queue: dead-lettered with the same reason; the good trigger runs.
    for payload in [
        r#"{"v":1,"dag_id":"typed","params":{"n":"3"}}"#.to_string(),
        format!(r#"{{"v":1,"dag_id":"untyped","params":{{"v":"{big}"}}}}"#),
        r#"{"v":1,"dag_id":"untyped","params":{"v":"a\u0000b"}}"#.to_string(),
        r#"{"v":1,"dag_id":"typed","params":{"n":-2}}"#.to_string(),
        r#"{"v":1,"dag_id":"typed","params":{"n":2,"mode":"slow"},"key":"good"}"#.to_string(),
    ] {
        h.queue.publish(&Topic::Triggers, payload.into_bytes()).await.unwrap();
    }
    let mut dead = h.queue.consume(&Topic::Dead, 10).await.unwrap();
    let mut reasons = Vec::new();
    for _ in 0..4 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), dead.next()).await.unwrap().unwrap().unwrap();
        reasons.push(delivery.error.clone().unwrap());
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        reasons,
        [
            "trigger: dag \"typed\": param \"n\": expected an integer, got the string \"3\"",
            "trigger: dag \"untyped\": params are 71688 bytes of JSON; a run's params may be at most 65536 bytes (64 KiB)",
            "trigger: dag \"untyped\": param \"v\": holds a NUL byte, which no environment variable or argument can \
             carry",
            "trigger: dag \"typed\": param \"n\": -2 starts with '-', and task \"t\" templates {{ params.n }} at the \
             start of a command argument, where a program would read it as an option; write it after the option it \
             belongs to (`--n={{ params.n }}`), put `--` before it, or pass it through `env`",
        ]
    );
    // The good trigger, published last, may still be on its way when the fourth refusal is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let runs = loop {
        let runs = h.store.list_runs(&dagmq_core::store::RunFilter { limit: 10, ..Default::default() }).await.unwrap();
        if !runs.is_empty() || tokio::time::Instant::now() > deadline {
            break runs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].params, params(serde_json::json!({"n": 2, "mode": "slow"})));
    assert_eq!(h.wait_final(&runs[0].run_id).await, RunState::Success);
    h.stop().await;
}

/// Scheduled runs and backfills get the schema's defaults; a backfill's params are checked like
/// a trigger's.
#[tokio::test(start_paused = true)]
async fn scheduled_runs_and_backfills_get_the_defaults_and_backfills_are_checked() {
    use dagmq_core::Store;
    use dagmq_scheduler::CommandError;

    let mut registry = DagRegistry::new();
    registry
        .add(
            Dag::builder("sched")
                .schedule("@every 5m")
                .start(crate::support::origin() - chrono::Duration::minutes(10))
                .catch_up(false)
                .param("n", ParamSpec::typed(ParamType::Integer).default_value(serde_json::json!(5)))
                .param("day", ParamSpec::typed(ParamType::Date))
                .task(TaskSpec::rust("t", dagmq_worker::Noop))
                .build()
                .unwrap(),
        )
        .unwrap();
    let h = Harness::start(registry).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let scheduled = loop {
        let runs = h.store.list_runs(&dagmq_core::store::RunFilter { limit: 10, ..Default::default() }).await.unwrap();
        if let Some(run) = runs.into_iter().next() {
            break run;
        }
        assert!(tokio::time::Instant::now() < deadline, "no scheduled run");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(scheduled.params, [("n".to_string(), serde_json::json!(5))].into());
    let from = crate::support::origin() - chrono::Duration::hours(1);
    let to = crate::support::origin() - chrono::Duration::minutes(50);
    let bad = [("day".to_string(), serde_json::json!("tomorrow"))].into();
    match h.scheduler.backfill("sched", from, to, bad).await {
        Err(CommandError::BadInput(reason)) => assert_eq!(
            reason,
            "dag \"sched\": param \"day\": expected a date (YYYY-MM-DD), got the string \"tomorrow\""
        ),
        other => panic!("{other:?}"),
    }
    let good = [("day".to_string(), serde_json::json!("2026-11-22"))].into();
    let outcome = h.scheduler.backfill("sched", from, to, good).await.unwrap();
    assert_eq!(outcome.created, 3);
    for run_id in &outcome.runs {
        let run = h.store.run(run_id).await.unwrap().unwrap();
        assert_eq!(
            run.params,
            [("day".to_string(), serde_json::json!("2026-11-22")), ("n".to_string(), serde_json::json!(5))].into()
        );
    }
    h.stop().await;
}
