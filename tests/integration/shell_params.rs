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
