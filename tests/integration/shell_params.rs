//! Parameter values never become shell syntax: in the script of `sh -c` a substituted value is
//! one shell word; as any other argument it is passed as is; `DAGMQ_PARAM_*` carries it too.
//! Each value below would run `touch PWNED` if it were pasted into the script.

use std::time::Duration;

use dagmq_core::{Dag, DagRegistry, RunState, TaskSpec};

use crate::support::Harness;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_parameter_values_stay_data() {
    let dir = std::env::temp_dir().join(format!("dagmq-shell-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = |n: u32| dir.join(format!("out{n}")).display().to_string();
    let pwned = dir.join("PWNED");
    let mut registry = DagRegistry::new();
    registry
        .add(
            Dag::builder("shell")
                .task(TaskSpec::command(
                    "template",
                    ["sh", "-c", &format!("printf '%s' {{{{ params.v }}}} > {}", out(1))],
                ))
                .task(TaskSpec::command("env", ["sh", "-c", &format!("printf '%s' \"$DAGMQ_PARAM_V\" > {}", out(2))]))
                .task(TaskSpec::command(
                    "positional",
                    ["sh", "-c", &format!("printf '%s' \"$1\" > {}", out(3)), "sh", "{{ params.v }}"],
                ))
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
