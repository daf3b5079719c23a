//! `dagmq validate`: good directories pass, bad files are named with line and reason.

use crate::support::{dagmq, examples, text};

#[test]
fn examples_validate() {
    let output = dagmq().args(["validate", "--dags"]).arg(examples()).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "8 dags ok\n");
}

#[test]
fn single_files_validate_as_a_directorys_do() {
    let good = examples().join("hello.toml");
    let output = dagmq().arg("validate").arg(&good).arg(examples().join("params.toml")).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "2 dags ok\n");
    let dir = std::env::temp_dir().join(format!("dagmq-validate-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "id = \"bad\"\n[[task]]\nid = \"x\"\ncommand = [\"true\"]\nafter = [\"nope\"]\n").unwrap();
    let output = dagmq().arg("validate").arg(&good).arg(&bad).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&format!("{}:", bad.display())) && stderr.contains("nope"), "{stderr}");
    assert!(stderr.trim_end().ends_with("error: 1 of the dag files are invalid"), "{stderr}");
    // --dags names a directory; a file there says how to check it.
    let output = dagmq().args(["validate", "--dags"]).arg(&good).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        text(&output.stderr).trim(),
        format!(
            "error: --dags {0} is a file: give a directory, or the file itself (dagmq validate {0})",
            good.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_files_exit_2_with_file_line_and_reason() {
    let dir = std::env::temp_dir().join(format!("dagmq-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a_cycle.toml"), "id = \"c\"\n[[task]]\nid = \"x\"\ncommand = [\"true\"]\nafter = [\"y\"]\n[[task]]\nid = \"y\"\ncommand = [\"true\"]\nafter = [\"x\"]\n").unwrap();
    std::fs::write(
        dir.join("b_cron.toml"),
        "id = \"b\"\nschedule = \"0 61 * * * *\"\n[[task]]\nid = \"x\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("c_good.toml"), "id = \"good\"\n[[task]]\nid = \"x\"\ncommand = [\"true\"]\n").unwrap();
    std::fs::write(dir.join("d_toml.toml"), "id = \"d\"\n[[task]\n").unwrap();
    let output = dagmq().args(["validate", "--dags"]).arg(&dir).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    let d = dir.display();
    assert!(stderr.contains(&format!("{d}/a_cycle.toml:3: dag \"c\": cycle x -> y -> x")), "{stderr}");
    assert!(
        stderr.contains(&format!("{d}/b_cron.toml:2: dag \"b\": bad cron \"0 61 * * * *\": minute field")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{d}/d_toml.toml:2: unclosed array table")), "{stderr}");
    assert!(stderr.contains("error: 3 of the dag files are invalid"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_directory_and_bad_usage_exit_2() {
    let output = dagmq().args(["validate", "--dags", "/nonexistent/dagmq"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("cannot read the dags directory /nonexistent/dagmq"));
    let output = dagmq().args(["runs", "frobnicate"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn config_file_is_below_flags_and_environment() {
    let standalone = crate::support::Standalone::start(&examples(), &[]);
    let dir = std::env::temp_dir().join(format!("dagmq-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, format!("api = \"{}\"\n", standalone.api)).unwrap();
    let from_file = dagmq().args(["dags", "list", "--json", "--config"]).arg(&good).output().unwrap();
    assert!(from_file.status.success(), "{}", text(&from_file.stderr));

    let wrong = dir.join("wrong.toml");
    let closed = crate::support::free_port();
    std::fs::write(&wrong, format!("api = \"http://127.0.0.1:{closed}\"\n")).unwrap();
    let flag_wins = dagmq().args(["dags", "list", "--api", &standalone.api, "--config"]).arg(&wrong).output().unwrap();
    assert!(flag_wins.status.success(), "{}", text(&flag_wins.stderr));
    let env_wins =
        dagmq().args(["dags", "list", "--config"]).arg(&wrong).env("DAGMQ_API", &standalone.api).output().unwrap();
    assert!(env_wins.status.success(), "{}", text(&env_wins.stderr));
    let file_only = dagmq().args(["dags", "list", "--config"]).arg(&wrong).output().unwrap();
    assert_eq!(file_only.status.code(), Some(1));
    assert!(text(&file_only.stderr).contains(&format!("cannot connect to http://127.0.0.1:{closed}")));

    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "# the team's settings\n\napii = \"x\"\n").unwrap();
    let bad = dagmq().args(["dags", "list", "--config"]).arg(&typo).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let said = text(&bad.stderr);
    assert!(said.contains(&format!("{}:3: unknown field `apii`", typo.display())), "the file and line: {said}");
    // A process role names the line too.
    let scheduler = dagmq().args(["scheduler", "--config"]).arg(&typo).output().unwrap();
    assert_eq!(scheduler.status.code(), Some(2));
    assert!(text(&scheduler.stderr).contains(&format!("{}:3: unknown field `apii`", typo.display())), "{scheduler:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_a_public_address_without_a_token() {
    let output = dagmq()
        .args(["standalone", "--dags"])
        .arg(examples())
        .args(["--bind", "0.0.0.0", "--port", "1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        text(&output.stderr),
        "error: refusing to listen on 0.0.0.0 without DAGMQ_API_TOKEN; set a token or pass --insecure\n"
    );
}

#[test]
fn a_directory_without_dag_files_is_an_error_and_a_scheduler_says_every_file_was_refused() {
    let dir = std::env::temp_dir().join(format!("dagmq-validate-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a DAG file").unwrap();
    let output = dagmq().args(["validate", "--dags"]).arg(&dir).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(text(&output.stderr).trim(), format!("error: no DAG files (*.toml) in {}", dir.display()));

    std::fs::write(dir.join("bad.toml"), "id = \"bad\"\n[[task]\n").unwrap();
    let log = dir.join("standalone.log");
    let standalone = crate::support::Standalone::start_logged(&dir, &log);
    let expected = format!("every DAG file in {} was refused (1 refused; the reasons are above)", dir.display());
    standalone.wait_until(std::time::Duration::from_secs(30), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains(&expected)
    });
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("pass --dags DIR"), "{logged}");
    drop(standalone);
    std::fs::remove_dir_all(&dir).unwrap();
}
