//! Values from outside (params, upstream outputs) never reach a command line as text: a DAG file
//! that templates one into `command` is refused at load with `file:line`, the same intent
//! written with the task key `env` runs hostile values inertly, and triggers whose params do
//! not fit the DAG's schema (or are over 64 KiB) are refused by the API (400), the CLI (exit 2)
//! and the trigger queue (dead-lettered with the reason).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Standalone, dagmq, http_get, http_post_json, text};

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dagmq-params-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TOML basic string holding `text` (a JSON string is one).
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// A DAG file whose task `t` runs `argv` (each item a TOML string), with `head` before the task
/// and `extra` after it; the `command` key is on line `head.lines().count() + 4`.
fn dag_file(id: &str, head: &str, argv: &[&str], extra: &str) -> String {
    let argv: Vec<String> = argv.iter().map(|a| toml_string(a)).collect();
    format!("id = \"{id}\"\n{head}[[task]]\nid = \"t\"\ncommand = [{}]\n{extra}", argv.join(", "))
}

/// The params every refused file declares: one of each kind that must not reach a command.
const UNSAFE_PARAMS: &str =
    "[params]\nplain = \"x\"\n[params.a]\ntype = \"string\"\n[params.b]\ntype = \"string\"\nmax_length = 8\n";

#[test]
fn outside_values_templated_into_a_command_are_refused_at_load_with_file_and_line() {
    let dir = scratch("refused");
    let s = "echo {{ params.a }}";
    let shapes: Vec<(&str, Vec<&str>)> = vec![
        ("bash_extglob", vec!["bash", "-O", "extglob", "-c", s]),
        ("bash_rcfile", vec!["bash", "--rcfile", "/dev/null", "-c", s]),
        ("sh_dashdash", vec!["sh", "-c", "--", s]),
        ("env_u", vec!["env", "-u", "HOME", "sh", "-c", s]),
        ("timeout", vec!["timeout", "30", "sh", "-c", s]),
        ("nice", vec!["nice", "sh", "-c", s]),
        ("su", vec!["su", "root", "-c", s]),
        ("ssh", vec!["ssh", "host", s]),
        ("python", vec!["python3", "-c", "print('{{ params.a }}')"]),
        ("git", vec!["git", "ls-remote", "{{ params.a }}"]),
        ("single_quoted", vec!["sh", "-c", "echo '{{ params.a }}'"]),
        ("double_quoted", vec!["sh", "-c", "echo \"{{ params.b }}\""]),
        ("heredoc", vec!["sh", "-c", "cat <<EOF\n{{ params.a }}\nEOF"]),
        ("eval", vec!["sh", "-c", "eval {{ params.a }}"]),
        ("xargs", vec!["sh", "-c", "printf '%s' {{ params.a }} | xargs sh -c"]),
        ("plain_param", vec!["sh", "-c", "echo {{ params.plain }}"]),
        ("undeclared_param", vec!["sh", "-c", "echo {{ params.nowhere }}"]),
    ];
    let head_lines = UNSAFE_PARAMS.lines().count();
    for (name, argv) in &shapes {
        std::fs::write(dir.join(format!("{name}.toml")), dag_file(name, UNSAFE_PARAMS, argv, "")).unwrap();
    }
    // An upstream output, in a shell script and as a plain argument.
    let outputs = "id = \"outputs\"\n[[task]]\nid = \"up\"\ncommand = [\"true\"]\n[[task]]\nid = \"down\"\n\
                   after = [\"up\"]\ncommand = [\"sh\", \"-c\", \"cat {{ tasks.up.output.path }}\"]\n";
    std::fs::write(dir.join("outputs.toml"), outputs).unwrap();
    let output_arg = "id = \"output_arg\"\n[[task]]\nid = \"up\"\ncommand = [\"true\"]\n[[task]]\nid = \"down\"\n\
                      after = [\"up\"]\ncommand = [\"rm\", \"-rf\", \"{{ tasks.up.output }}\"]\n";
    std::fs::write(dir.join("output_arg.toml"), output_arg).unwrap();

    let output = dagmq().args(["validate", "--dags"]).arg(&dir).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    let d = dir.display();
    for (name, argv) in &shapes {
        let line = head_lines + 4;
        let named = argv.iter().find_map(|a| a.split("{{").nth(1)).unwrap().split("}}").next().unwrap().trim();
        let expected = format!("{d}/{name}.toml:{line}: dag \"{name}\", task \"t\": {{{{ {named} }}}} in `command`");
        assert!(stderr.contains(&expected), "{name}: want {expected:?} in\n{stderr}");
    }
    assert!(
        stderr.contains(&format!(
            "{d}/outputs.toml:8: dag \"outputs\", task \"down\": {{{{ tasks.up.output.path }}}} in `command`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{d}/output_arg.toml:8: dag \"output_arg\", task \"down\": {{{{ tasks.up.output }}}} in `command`"
        )),
        "{stderr}"
    );
    // Each error says what to do instead.
    assert!(stderr.contains("env = { A = \"{{ params.a }}\" }"), "{stderr}");
    assert!(stderr.contains("$DAGMQ_PARAM_A"), "{stderr}");
    assert!(stderr.contains(&format!("error: {} of the dag files are invalid", shapes.len() + 2)), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tasks of the `through_env` DAG: each writes the value it got through its environment to
/// `out_NAME` in `dir`, in one of the command shapes the refused files use.
fn through_env_dag(dir: &Path) -> String {
    let out = |name: &str| dir.join(format!("out_{name}")).display().to_string();
    let write = |name: &str| format!("printf '%s' \"$V\" > {}", out(name));
    let python = format!("import os; open({:?}, 'w').write(os.environ['V'])", out("python"));
    let upstream = "import json, os; json.dump({'path': os.environ['V']}, open(os.environ['DAGMQ_OUTPUT'], 'w'))";
    let tasks: Vec<(&str, Vec<String>)> = vec![
        ("bash_extglob", vec!["bash".into(), "-O".into(), "extglob".into(), "-c".into(), write("bash_extglob")]),
        ("bash_rcfile", vec!["bash".into(), "--rcfile".into(), "/dev/null".into(), "-c".into(), write("bash_rcfile")]),
        ("sh_dashdash", vec!["sh".into(), "-c".into(), "--".into(), write("sh_dashdash")]),
        ("env_u", vec!["env".into(), "-u".into(), "HOME".into(), "sh".into(), "-c".into(), write("env_u")]),
        ("timeout", vec!["timeout".into(), "30".into(), "sh".into(), "-c".into(), write("timeout")]),
        ("nice", vec!["nice".into(), "sh".into(), "-c".into(), write("nice")]),
        ("python", vec!["python3".into(), "-c".into(), python]),
        ("heredoc", vec!["sh".into(), "-c".into(), format!("cat > {} <<EOF\n$V\nEOF", out("heredoc"))]),
        ("eval", vec!["sh".into(), "-c".into(), format!("eval 'printf \"%s\" \"$V\"' > {}", out("eval"))]),
        (
            "xargs",
            vec![
                "sh".into(),
                "-c".into(),
                format!("printf '%s' \"$V\" | xargs -0 sh -c 'printf \"%s\" \"$1\" > {}' sh", out("xargs")),
            ],
        ),
    ];
    let mut file = String::from(
        "id = \"through_env\"\n[params.v]\ntype = \"string\"\nrequired = true\n\
         [params.n]\ntype = \"integer\"\ndefault = 7\n",
    );
    for (name, argv) in &tasks {
        let argv: Vec<String> = argv.iter().map(|a| toml_string(a)).collect();
        file.push_str(&format!(
            "[[task]]\nid = \"{name}\"\ncommand = [{}]\nenv = {{ V = \"{{{{ params.v }}}}\" }}\n",
            argv.join(", ")
        ));
    }
    // An upstream output, through `env` too; and a typed param in the command itself.
    file.push_str(&format!(
        "[[task]]\nid = \"up\"\ncommand = [\"python3\", \"-c\", {}]\nenv = {{ V = \"{{{{ params.v }}}}\" }}\n\
         [[task]]\nid = \"down\"\nafter = [\"up\"]\ncommand = [\"sh\", \"-c\", {}]\n\
         env = {{ V = \"{{{{ tasks.up.output.path }}}}\" }}\n\
         [[task]]\nid = \"typed\"\ncommand = [\"sh\", \"-c\", {}]\n",
        toml_string(upstream),
        toml_string(&write("down")),
        toml_string(&format!("printf '%s' {{{{ params.n }}}}-{{{{ ds }}}} > {}", out("typed"))),
    ));
    file
}

#[test]
fn the_same_intent_through_env_runs_hostile_values_inertly() {
    let dir = scratch("env");
    let dags = dir.join("dags");
    std::fs::create_dir_all(&dags).unwrap();
    std::fs::write(dags.join("through_env.toml"), through_env_dag(&dir)).unwrap();
    let standalone = Standalone::start(&dags, &[]);
    let pwned = dir.join("PWNED");
    let touch = format!("touch {}", pwned.display());
    for value in [format!("x; {touch} #"), format!("$({touch})"), format!("`{touch}`\n'\"; {touch}")] {
        let param = format!("v={value}");
        let run = standalone.json(&["trigger", "through_env", "--param", &param, "--wait"]);
        assert_eq!(run["state"], "success", "{value:?}: {run}");
        for name in [
            "bash_extglob",
            "bash_rcfile",
            "sh_dashdash",
            "env_u",
            "timeout",
            "nice",
            "python",
            "eval",
            "xargs",
            "down",
        ] {
            let got = std::fs::read_to_string(dir.join(format!("out_{name}"))).unwrap();
            assert_eq!(got, value, "{name} got another value");
        }
        let heredoc = std::fs::read_to_string(dir.join("out_heredoc")).unwrap();
        assert_eq!(heredoc, format!("{value}\n"), "the heredoc got another value");
        assert!(!pwned.exists(), "{value:?} ran as code");
        let typed = std::fs::read_to_string(dir.join("out_typed")).unwrap();
        assert!(typed.starts_with("7-20"), "the typed param's default and ds reach the command: {typed}");
    }
    drop(standalone);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A DAG with a schema of every type, and one without a schema.
const TYPED: &str = r#"id = "typed"
[params]
who = "world"
[params.n]
type = "integer"
required = true
[params.ratio]
type = "number"
default = 0.5
[params.dry]
type = "boolean"
default = false
[params.day]
type = "date"
default = "2026-01-01"
[params.at]
type = "datetime"
default = "2026-01-01T00:00:00Z"
[params.mode]
type = "enum"
values = ["fast", "slow"]
default = "fast"
[params.name]
type = "string"
pattern = "[a-z]+"
max_length = 8
default = "abc"
[[task]]
id = "t"
command = ["echo", "{{ params.n }} {{ params.mode }} {{ params.day }}"]
env = { NAME = "{{ params.name }}" }
"#;

const UNTYPED: &str = "id = \"untyped\"\n[params]\ndate = \"1970-01-01\"\n[[task]]\nid = \"t\"\ncommand = [\"true\"]\n";

fn typed_standalone(name: &str) -> (Standalone, PathBuf) {
    let dir = scratch(name);
    std::fs::write(dir.join("typed.toml"), TYPED).unwrap();
    std::fs::write(dir.join("untyped.toml"), UNTYPED).unwrap();
    (Standalone::start(&dir, &[]), dir)
}

#[test]
fn the_api_refuses_ill_typed_unknown_missing_and_oversized_params_with_the_reason() {
    let (standalone, dir) = typed_standalone("api");
    let post = |dag: &str, body: String| http_post_json(&standalone.api, &format!("/api/v1/dags/{dag}/runs"), &body);
    let big = "x".repeat(70 * 1024);
    for (dag, params, reason) in [
        ("typed", r#"{"n":"3"}"#.to_string(), r#"param \"n\": expected an integer, got the string \"3\""#),
        ("typed", r#"{"n":3.5}"#.to_string(), r#"param \"n\": expected an integer, got 3.5"#),
        ("typed", r#"{}"#.to_string(), r#"param \"n\" is required"#),
        ("typed", r#"{"n":1,"mode":"turbo"}"#.to_string(), r#"param \"mode\": expected one of fast, slow"#),
        ("typed", r#"{"n":1,"day":"2026-02-30"}"#.to_string(), r#"param \"day\": expected a date"#),
        ("typed", r#"{"n":1,"at":"yesterday"}"#.to_string(), r#"param \"at\": expected a datetime"#),
        ("typed", r#"{"n":1,"dry":"yes"}"#.to_string(), r#"param \"dry\": expected a boolean"#),
        ("typed", r#"{"n":1,"name":"ABC"}"#.to_string(), r#"param \"name\": \"ABC\" does not match the pattern"#),
        ("typed", r#"{"n":1,"name":"abcdefghij"}"#.to_string(), r#"param \"name\": longer than 8 characters"#),
        ("typed", r#"{"n":1,"nope":1}"#.to_string(), r#"unknown param \"nope\""#),
        ("untyped", format!(r#"{{"date":"{big}"}}"#), "at most 65536 bytes (64 KiB)"),
        ("typed", format!(r#"{{"n":1,"who":"{big}"}}"#), "at most 65536 bytes (64 KiB)"),
        ("untyped", r#"{"date":"a\u0000b"}"#.to_string(), r#"param \"date\": holds a NUL byte"#),
        ("untyped", r#"{"a-b":"1","a_b":"2"}"#.to_string(), r#"would both be $DAGMQ_PARAM_A_B"#),
    ] {
        let (status, body) = post(dag, format!(r#"{{"params":{params}}}"#));
        assert_eq!(status, 400, "{dag} {:.60}: {body}", params);
        assert!(body.contains(reason), "{dag} {:.60}: want {reason:?} in {body}", params);
    }
    // A good trigger gets the defaults, normalised values, and keeps the untyped plain default.
    let (status, body) = post("typed", r#"{"params":{"n":3,"at":"2026-01-01T01:00:00+01:00"}}"#.to_string());
    assert_eq!(status, 201, "{body}");
    let run_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["run_id"].as_str().unwrap().to_string();
    let run = standalone.json(&["runs", "show", &run_id]);
    assert_eq!(
        run["params"],
        serde_json::json!({"n": 3, "ratio": 0.5, "dry": false, "day": "2026-01-01", "at": "2026-01-01T01:00:00+01:00",
            "mode": "fast", "name": "abc", "who": "world"})
    );
    // The schema is part of the DAG as the API shows it.
    let dags = standalone.json(&["dags", "list"]);
    let typed = dags.as_array().unwrap().iter().find(|d| d["dag_id"] == "typed").unwrap();
    assert_eq!(typed["params_declared"], true);
    let mode = typed["params"].as_array().unwrap().iter().find(|p| p["name"] == "mode").unwrap();
    assert_eq!(mode["type"], "enum");
    assert_eq!(mode["values"], serde_json::json!(["fast", "slow"]));
    assert_eq!(mode["default"], "fast");
    drop(standalone);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_cli_converts_params_by_the_schema_and_refuses_what_does_not_fit_with_exit_2() {
    let (standalone, dir) = typed_standalone("cli");
    let refused = |args: &[&str], reason: &str| {
        let output = standalone.cli(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", text(&output.stderr));
        assert!(text(&output.stderr).contains(reason), "{args:?}: want {reason:?} in {}", text(&output.stderr));
    };
    refused(&["trigger", "typed", "--param", "n=three"], "--param n=three: param \"n\": expected an integer");
    refused(&["trigger", "typed", "--param", "n=1", "--param", "dry=maybe"], "param \"dry\": expected a boolean");
    refused(
        &["trigger", "typed", "--param", "n=1", "--param", "mode=turbo"],
        "param \"mode\": expected one of fast, slow",
    );
    refused(&["trigger", "typed", "--param", "n=1", "--param", "nope=1"], "unknown param \"nope\"");
    refused(&["trigger", "typed"], "param \"n\" is required");
    let big = format!("date={}", "x".repeat(70 * 1024));
    refused(&["trigger", "untyped", "--param", &big], "at most 65536 bytes (64 KiB)");
    let run = standalone.json(&[
        "trigger",
        "typed",
        "--param",
        "n=3",
        "--param",
        "ratio=2",
        "--param",
        "dry=true",
        "--param",
        "mode=slow",
        "--wait",
    ]);
    assert_eq!(run["state"], "success", "{run}");
    let shown = standalone.json(&["runs", "show", run["run_id"].as_str().unwrap()]);
    assert_eq!((&shown["params"]["n"], &shown["params"]["ratio"]), (&serde_json::json!(3), &serde_json::json!(2)));
    assert_eq!(
        (&shown["params"]["dry"], &shown["params"]["mode"]),
        (&serde_json::json!(true), &serde_json::json!("slow"))
    );
    let log = standalone.cli(&["logs", run["run_id"].as_str().unwrap(), "t"]);
    assert!(text(&log.stdout).contains("3 slow 2026-01-01"), "{}", text(&log.stdout));
    // A DAG without a schema takes its params as strings, as before.
    let untyped =
        standalone.json(&["trigger", "untyped", "--param", "date=2026-11-22", "--param", "other=1", "--wait"]);
    let shown = standalone.json(&["runs", "show", untyped["run_id"].as_str().unwrap()]);
    assert_eq!(shown["params"], serde_json::json!({"date": "2026-11-22", "other": "1"}));
    drop(standalone);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ill_typed_and_oversized_triggers_on_the_queue_are_dead_lettered_with_the_reason() {
    use dagmq_core::{Queue, Topic};
    let Some(mut cluster) = crate::cluster::Cluster::new(&[("typed.toml", TYPED), ("untyped.toml", UNTYPED)]) else {
        return;
    };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let (amqp, namespace) = (cluster.amqp.clone(), cluster.namespace.clone());
    let big = "x".repeat(70 * 1024);
    let dead = cluster.block_on(async move {
        let mut config = dagmq_rabbitmq::RabbitConfig::new(amqp);
        config.namespace = namespace;
        let queue = dagmq_rabbitmq::RabbitQueue::connect(config).await.unwrap();
        for payload in [
            r#"{"v":1,"dag_id":"typed","params":{"n":"3"}}"#.to_string(),
            r#"{"v":1,"dag_id":"typed","params":{"n":1,"nope":true}}"#.to_string(),
            format!(r#"{{"v":1,"dag_id":"untyped","params":{{"date":"{big}"}}}}"#),
            r#"{"v":1,"dag_id":"typed","params":{"n":1},"key":"good"}"#.to_string(),
        ] {
            queue.publish(&Topic::Triggers, payload.into_bytes()).await.unwrap();
        }
        let mut dead = queue.consume(&Topic::Dead, 10).await.unwrap();
        let mut reasons = Vec::new();
        for _ in 0..3 {
            let delivery = tokio::time::timeout(Duration::from_secs(30), dead.next()).await.unwrap().unwrap().unwrap();
            reasons.push(delivery.error.clone().unwrap_or_default());
            delivery.ack().await.unwrap();
        }
        reasons
    });
    assert_eq!(dead[0], r#"trigger: dag "typed": param "n": expected an integer, got the string "3""#);
    assert!(dead[1].starts_with(r#"trigger: dag "typed": unknown param "nope""#), "{}", dead[1]);
    assert!(dead[2].contains("at most 65536 bytes (64 KiB)"), "{}", dead[2]);
    cluster.wait_until(Duration::from_secs(30), || {
        cluster
            .json(&["runs", "list", "--dag", "typed", "--status", "success"])
            .as_array()
            .is_some_and(|r| r.len() == 1)
    });
    assert_eq!(cluster.json(&["runs", "list", "--dag", "untyped"]).as_array().unwrap().len(), 0);
}

/// Numbers at the start of a command argument: the task writes the arguments it got, one a
/// line, to `args` in `dir`.
fn numbers_dag(dir: &Path) -> String {
    let record = format!("printf '%s\\n' \"$@\" > {}", dir.join("args").display());
    format!(
        "id = \"numbers\"\n[params.n]\ntype = \"integer\"\ndefault = 1\n[params.x]\ntype = \"number\"\ndefault = 0.5\n\
         [[task]]\nid = \"t\"\ncommand = [\"sh\", \"-c\", {}, \"sh\", \"{{{{ params.n }}}}\", \"--x={{{{ params.x }}}}\"]\n",
        toml_string(&record)
    )
}

#[test]
fn a_negative_number_at_the_start_of_a_command_argument_is_refused_at_trigger() {
    let dir = scratch("negative");
    let dags = dir.join("dags");
    std::fs::create_dir_all(&dags).unwrap();
    std::fs::write(dags.join("numbers.toml"), numbers_dag(&dir)).unwrap();
    let standalone = Standalone::start(&dags, &[]);
    // `tail {{ params.n }}` with n = -1 would run `tail -1`: the value would be an option.
    let refusal = "param \"n\": -1 starts with '-', and task \"t\" templates {{ params.n }} at the start of a \
                   command argument, where a program would read it as an option";
    let output = standalone.cli(&["trigger", "numbers", "--param", "n=-1"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains(refusal), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("--n={{ params.n }}"), "the fix is named: {}", text(&output.stderr));
    let (status, body) = http_post_json(&standalone.api, "/api/v1/dags/numbers/runs", r#"{"params":{"n":-1e300}}"#);
    assert_eq!(status, 400, "{body}");
    let (status, body) = http_post_json(&standalone.api, "/api/v1/dags/numbers/runs", r#"{"params":{"n":-5}}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("param \\\"n\\\": -5 starts with '-'"), "{body}");
    assert_eq!(standalone.json(&["runs", "list", "--dag", "numbers"]).as_array().unwrap().len(), 0);
    // After an option's `=`, a negative number is that option's value; a positive one anywhere.
    let run = standalone.json(&["trigger", "numbers", "--param", "n=7", "--param", "x=-1e300", "--wait"]);
    assert_eq!(run["state"], "success", "{run}");
    assert_eq!(std::fs::read_to_string(dir.join("args")).unwrap(), "7\n--x=-1e+300\n");
    drop(standalone);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn defaults_of_secret_named_params_are_masked_in_the_dag_views() {
    let dir = scratch("secret-defaults");
    let file = "id = \"secrets\"\n[params]\ndb_password = \"hunter2-plain\"\n[params.api_token]\ntype = \"string\"\n\
                default = \"s3cr3t-typed\"\n[params.day]\ntype = \"date\"\ndefault = \"2026-01-01\"\n[[task]]\nid = \"t\"\n\
                command = [\"true\"]\n";
    std::fs::write(dir.join("secrets.toml"), file).unwrap();
    let standalone = Standalone::start(&dir, &[]);
    let port: u16 = standalone.api.rsplit(':').next().unwrap().parse().unwrap();
    for path in ["/api/v1/dags", "/api/v1/dags/secrets"] {
        let (status, body) = http_get(port, path);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(!body.contains("hunter2") && !body.contains("s3cr3t"), "{path} shows a secret default: {body}");
    }
    let dag: serde_json::Value = serde_json::from_str(&http_get(port, "/api/v1/dags/secrets").1).unwrap();
    let default =
        |name: &str| dag["params"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["default"].clone();
    assert_eq!(default("db_password"), "***");
    assert_eq!(default("api_token"), "***");
    assert_eq!(default("day"), "2026-01-01", "other defaults are shown");
    // The run still gets the real defaults.
    let run = standalone.json(&["trigger", "secrets", "--wait"]);
    assert_eq!(run["state"], "success", "{run}");
    drop(standalone);
    std::fs::remove_dir_all(&dir).unwrap();
}
