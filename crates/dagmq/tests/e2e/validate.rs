//! `dagmq validate`: good directories pass, bad files are named with line and reason.

use crate::support::{dagmq, examples, text};

#[test]
fn examples_validate() {
    let output = dagmq().args(["validate", "--dags"]).arg(examples()).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "5 dags ok\n");
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
