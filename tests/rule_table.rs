//! The trigger-rule table of DESIGN.md as one DAG file, shared by the in-memory integration tests
//! and the end-to-end tests of both modes (included with `#[path]`).
//!
//! Each row gives two upstream tasks fixed outcomes; six tasks, one per rule, wait for both. A
//! `success` upstream runs the `ok` task, `failed` the `fail` task, `upstream_failed` waits for a
//! failing feeder, and `skipped` is a `one_failed` task whose feeder succeeds.

/// The rules, in the order of the expected columns.
pub const RULES: [&str; 6] = ["all_success", "all_done", "all_failed", "one_success", "one_failed", "none_failed"];

/// Row name, the two upstream outcomes, and what each rule's task ends as.
pub const ROWS: [(&str, [&str; 2], [&str; 6]); 7] = [
    ("ss", ["success", "success"], ["success", "success", "skipped", "success", "skipped", "success"]),
    (
        "ff",
        ["failed", "failed"],
        ["upstream_failed", "success", "success", "upstream_failed", "success", "upstream_failed"],
    ),
    (
        "uf",
        ["upstream_failed", "failed"],
        ["upstream_failed", "success", "success", "upstream_failed", "success", "upstream_failed"],
    ),
    ("sf", ["success", "failed"], ["upstream_failed", "success", "skipped", "success", "success", "upstream_failed"]),
    ("kk", ["skipped", "skipped"], ["skipped", "success", "skipped", "skipped", "skipped", "success"]),
    ("sk", ["success", "skipped"], ["skipped", "success", "skipped", "success", "skipped", "success"]),
    (
        "kf",
        ["skipped", "failed"],
        ["upstream_failed", "success", "skipped", "upstream_failed", "success", "upstream_failed"],
    ),
];

/// The DAG file `rules` and every task's expected final state. `ok` and `fail` are what a task
/// that succeeds or fails runs: `command = ["true"]`, or `run = "NAME"` of a registered task.
pub fn rule_table_dag(ok: &str, fail: &str) -> (String, Vec<(String, String)>) {
    let mut toml = String::from("id = \"rules\"\ndescription = \"the trigger-rule table\"\n");
    let mut expected = Vec::new();
    let mut task = |id: &str, body: &str, after: &[String], rule: Option<&str>, state: &str| {
        toml.push_str(&format!("\n[[task]]\nid = \"{id}\"\n{body}\n"));
        if !after.is_empty() {
            let quoted: Vec<String> = after.iter().map(|a| format!("\"{a}\"")).collect();
            toml.push_str(&format!("after = [{}]\n", quoted.join(", ")));
        }
        if let Some(rule) = rule {
            toml.push_str(&format!("trigger_rule = \"{rule}\"\n"));
        }
        expected.push((id.to_string(), state.to_string()));
    };
    for (row, outcomes, decisions) in ROWS {
        let mut upstream = Vec::new();
        for (k, outcome) in outcomes.iter().enumerate() {
            let id = format!("{row}_up{k}");
            let feed = format!("{id}_feed");
            match *outcome {
                "success" => task(&id, ok, &[], None, "success"),
                "failed" => task(&id, fail, &[], None, "failed"),
                "upstream_failed" => {
                    task(&feed, fail, &[], None, "failed");
                    task(&id, ok, std::slice::from_ref(&feed), None, "upstream_failed");
                }
                _ => {
                    task(&feed, ok, &[], None, "success");
                    task(&id, ok, std::slice::from_ref(&feed), Some("one_failed"), "skipped");
                }
            }
            upstream.push(id);
        }
        for (rule, state) in RULES.iter().zip(decisions) {
            task(&format!("{row}_{rule}"), ok, &upstream, Some(rule), state);
        }
    }
    (toml, expected)
}
