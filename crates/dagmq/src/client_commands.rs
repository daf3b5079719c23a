//! The client commands: each one HTTP call (or a few) to the scheduler's API, printed as a
//! table for people or as JSON for scripts.

use std::time::Duration;

use dagmq_core::params::value_from_text;
use dagmq_core::{ParamType, Params};
use serde_json::Value;

use crate::cli::{ClientArgs, DagsCommand, LogsArgs, RunsCommand, TriggerArgs};
use crate::client::HttpClient;
use crate::{CliError, CliResult, out};

/// The API address used when neither a flag, the environment nor a config file names one.
pub(crate) const DEFAULT_API: &str = "http://127.0.0.1:9191";

/// Longest a call to the API may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Talks to one scheduler.
pub(crate) struct Api {
    /// Where.
    http: HttpClient,
    /// Bearer token from `DAGMQ_API_TOKEN`.
    token: Option<String>,
    /// Print JSON.
    pub json: bool,
}

impl Api {
    /// From the client flags, falling back to the config file's `api`.
    pub(crate) fn new(args: &ClientArgs, file_api: Option<&str>) -> CliResult<Api> {
        let address = args.api.as_deref().or(file_api).unwrap_or(DEFAULT_API);
        // TLS flags say the caller means to talk TLS: a plain http:// API would send the token
        // in cleartext.
        if let Some(flag) = args.tls.first_given()
            && address.split_once("://").is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("http"))
        {
            return Err(CliError::usage(format!(
                "{flag} is set but the API {} is a plain http:// one, which would send the token in \
                 cleartext: use https:// (or leave out the TLS flags)",
                dagmq_core::redact::mask_url(address)
            )));
        }
        let tls = args.tls.load().map_err(CliError::usage)?;
        let http =
            HttpClient::new(address, &tls, REQUEST_TIMEOUT).map_err(|e| CliError::usage(format!("--api: {e}")))?;
        let token = crate::secrets::env_secret("DAGMQ_API_TOKEN").map_err(CliError::usage)?;
        Ok(Api { http, token, json: args.json })
    }

    /// One call; a 4xx answer is bad input (exit 2), anything else that fails is exit 1.
    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>) -> CliResult<Value> {
        let body = body.map(|b| serde_json::to_vec(&b).unwrap_or_default());
        let not_dagmq = |what: String| {
            CliError::runtime(format!(
                "{what}: {} does not answer like a dagmq scheduler's API (set --api or DAGMQ_API to it)",
                self.http.shown()
            ))
        };
        let response = self.http.request(method, path, body.as_deref(), self.token.as_deref()).await.map_err(|e| {
            // Refused connections and timeouts say so already; anything else (a peer that
            // closed the connection or spoke something other than HTTP) is likely not dagmq.
            if e.starts_with("cannot connect") || e.contains("no answer within") {
                CliError::runtime(e)
            } else {
                not_dagmq(e)
            }
        })?;
        // Every answer of the API, errors included, is JSON and carries the API's header.
        let Ok(value) = serde_json::from_slice::<Value>(&response.body) else {
            return Err(not_dagmq(format!("{method} {path} answered HTTP {} without JSON", response.status)));
        };
        if response.api_version.is_none() {
            let said = dagmq_core::store::cut_marked(value.to_string(), 200, "...");
            return Err(not_dagmq(format!(
                "{method} {path} answered HTTP {} ({said}) without the {} header",
                response.status,
                dagmq_scheduler::api::API_HEADER
            )));
        }
        match response.status {
            200..=299 => Ok(value),
            status => {
                let message = value.get("error").and_then(Value::as_str).unwrap_or("no error message").to_string();
                if (400..500).contains(&status) {
                    Err(CliError::input(format!("{message} (HTTP {status})")))
                } else {
                    Err(CliError::runtime(format!("{message} (HTTP {status})")))
                }
            }
        }
    }

    /// Prints a value as pretty JSON.
    fn print_json(&self, value: &Value) -> CliResult<()> {
        out!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        Ok(())
    }
}

/// `value` as one value of a URL's query: every byte but an unreserved character (RFC 3986)
/// percent-encoded, so that a `&` or `#` in it cannot start another parameter.
fn query_value(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `--param KEY=VALUE` flags as params of `dag_id`. Each value becomes the JSON type the DAG
/// declares for its param (read from `GET /api/v1/dags/{dag_id}`): an integer, number or
/// boolean is parsed from the text, anything else stays text. The scheduler checks the rest
/// (allowed values, dates, patterns, required and unknown params, size).
async fn parse_params(api: &Api, dag_id: &str, pairs: &[String]) -> CliResult<Params> {
    let mut split = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CliError::usage(format!("--param {pair:?}: expected KEY=VALUE")));
        };
        split.push((pair, key, value));
    }
    let mut kinds: std::collections::BTreeMap<String, ParamType> = std::collections::BTreeMap::new();
    if !split.is_empty() {
        let dag = api.call("GET", &format!("/api/v1/dags/{dag_id}"), None).await?;
        for param in dag["params"].as_array().into_iter().flatten() {
            if let (Some(name), Ok(kind)) =
                (param["name"].as_str(), serde_json::from_value::<ParamType>(param["type"].clone()))
            {
                kinds.insert(name.to_string(), kind);
            }
        }
    }
    let mut params = Params::new();
    for (pair, key, value) in split {
        let value = value_from_text(kinds.get(key).copied(), value).map_err(|e| {
            let shown = match pair.char_indices().nth(60) {
                Some((at, _)) => format!("{}...", &pair[..at]),
                None => pair.clone(),
            };
            CliError::input(format!("--param {shown}: param {key:?}: {e}"))
        })?;
        params.insert(key.to_string(), value);
    }
    Ok(params)
}

/// `dagmq trigger`.
pub(crate) async fn trigger(api: &Api, args: &TriggerArgs) -> CliResult<()> {
    let params = parse_params(api, &args.dag_id, &args.params).await?;
    let mut body = serde_json::json!({ "params": params });
    if let Some(key) = &args.key {
        body["key"] = Value::String(key.clone());
    }
    let answer = api.call("POST", &format!("/api/v1/dags/{}/runs", args.dag_id), Some(body)).await?;
    let run_id = answer["run_id"].as_str().unwrap_or_default().to_string();
    if !args.wait {
        if api.json {
            api.print_json(&answer)?;
        } else if answer["created"].as_bool() == Some(false) {
            out!("{run_id} (existing run for key)");
        } else {
            out!("{run_id}");
        }
        return Ok(());
    }
    let mut last_line = String::new();
    loop {
        let run = api.call("GET", &format!("/api/v1/runs/{run_id}"), None).await?;
        let state = run["state"].as_str().unwrap_or("unknown").to_string();
        let counts = &run["task_counts"];
        let total: u64 = counts.as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        let done: u64 = ["success", "failed", "upstream_failed", "cancelled", "skipped"]
            .iter()
            .filter_map(|s| counts[*s].as_u64())
            .sum();
        let line = format!("{run_id}: {state}, {done}/{total} tasks done{}", waiting_text(&run));
        if line != last_line && !api.json {
            eprintln!("{line}");
            last_line = line;
        }
        if matches!(state.as_str(), "success" | "failed" | "cancelled") {
            if api.json {
                api.print_json(&run)?;
            } else {
                out!("{run_id} {state}");
            }
            return if state == "success" { Ok(()) } else { Err(CliError::runtime(format!("run {run_id} {state}"))) };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What `run` (a run's API answer) waits for, as `; waiting: WHAT`: the run's own reason (held
/// back by its DAG's `max_active_runs`) and its tasks' (`TASK (REASON)`, at most three named);
/// empty when it waits for nothing.
fn waiting_text(run: &Value) -> String {
    let mut reasons: Vec<String> = run["waiting_for"].as_str().map(str::to_string).into_iter().collect();
    let tasks: Vec<String> = run["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| Some(format!("{} ({})", t["task_id"].as_str()?, t["waiting_for"].as_str()?)))
        .collect();
    let more = tasks.len().saturating_sub(3);
    reasons.extend(tasks.into_iter().take(3));
    if more > 0 {
        reasons.push(format!("{more} more tasks"));
    }
    if reasons.is_empty() { String::new() } else { format!("; waiting: {}", reasons.join(", ")) }
}

/// Waits until every run is finished, printing progress to stderr as it changes; prints each
/// run with its state (or, with `--json`, the runs) and fails unless all succeeded.
async fn wait_for_runs(api: &Api, runs: &[String]) -> CliResult<()> {
    let mut states: Vec<String> = vec![String::new(); runs.len()];
    let mut last_line = String::new();
    loop {
        for (run_id, state) in runs.iter().zip(states.iter_mut()) {
            if !matches!(state.as_str(), "success" | "failed" | "cancelled") {
                let run = api.call("GET", &format!("/api/v1/runs/{run_id}"), None).await?;
                *state = run["state"].as_str().unwrap_or("unknown").to_string();
            }
        }
        let count = |wanted: &str| states.iter().filter(|s| *s == wanted).count();
        let finished = count("success") + count("failed") + count("cancelled");
        let line = format!(
            "{finished}/{} runs finished: {} success, {} failed, {} cancelled, {} running, {} queued",
            runs.len(),
            count("success"),
            count("failed"),
            count("cancelled"),
            count("running") + count("suspended"),
            count("queued"),
        );
        if line != last_line && !api.json {
            eprintln!("{line}");
            last_line = line;
        }
        if finished == runs.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if api.json {
        let list: Vec<Value> =
            runs.iter().zip(&states).map(|(run, state)| serde_json::json!({"run_id": run, "state": state})).collect();
        api.print_json(&Value::Array(list))?;
    } else {
        for (run, state) in runs.iter().zip(&states) {
            out!("{run} {state}");
        }
    }
    let bad = states.iter().filter(|s| *s != "success").count();
    if bad > 0 {
        return Err(CliError::runtime(format!("{bad} of {} runs did not succeed", runs.len())));
    }
    Ok(())
}

/// A task's output in a table cell: compact JSON (a string as itself), cut at 60 characters.
fn output_text(output: &Value) -> String {
    if output.is_null() {
        return String::new();
    }
    let full = text(output);
    match full.char_indices().nth(60) {
        Some((cut, _)) => format!("{}...", &full[..cut]),
        None => full,
    }
}

/// `dagmq dags ...`.
pub(crate) async fn dags(api: &Api, command: &DagsCommand) -> CliResult<()> {
    match command {
        DagsCommand::List => {
            let dags = api.call("GET", "/api/v1/dags", None).await?;
            if api.json {
                api.print_json(&dags)?;
                return Ok(());
            }
            let rows = dags
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|d| {
                    vec![
                        text(&d["dag_id"]),
                        match (d["version"].as_str().unwrap_or_default(), d["error"].is_string()) {
                            ("", true) => "refused".to_string(),
                            (version, true) => format!("{version} (refused change)"),
                            (version, false) => version.to_string(),
                        },
                        d["schedule"].as_str().unwrap_or("manual").to_string(),
                        if d["paused"].as_bool() == Some(true) { "yes".into() } else { "no".into() },
                        text(&d["next_run"]),
                        text(&d["last_run"]["state"]),
                        d["tasks"].as_array().map_or(0, Vec::len).to_string(),
                    ]
                })
                .collect();
            print_table(&["DAG", "VERSION", "SCHEDULE", "PAUSED", "NEXT RUN", "LAST RUN", "TASKS"], rows)?;
            for refused in dags.as_array().cloned().unwrap_or_default().iter().filter(|d| d["error"].is_string()) {
                eprintln!("refused: {}", text(&refused["error"]));
            }
        }
        DagsCommand::Backfill { dag_id, from, to, params, wait } => {
            let params = parse_params(api, dag_id, params).await?;
            let body = serde_json::json!({"from": from, "to": to, "params": params});
            let answer = api.call("POST", &format!("/api/v1/dags/{dag_id}/backfill"), Some(body)).await?;
            let runs: Vec<String> = answer["runs"]
                .as_array()
                .map(|runs| runs.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default();
            if !api.json {
                eprintln!("{} runs: {} created, {} existing", runs.len(), answer["created"], answer["existing"]);
            }
            if *wait {
                return wait_for_runs(api, &runs).await;
            }
            if api.json {
                api.print_json(&answer)?;
            } else {
                for run in &runs {
                    out!("{run}");
                }
            }
        }
        DagsCommand::Pause { dag_id } | DagsCommand::Unpause { dag_id } => {
            let verb = if matches!(command, DagsCommand::Pause { .. }) { "pause" } else { "unpause" };
            let answer = api.call("POST", &format!("/api/v1/dags/{dag_id}/{verb}"), None).await?;
            if api.json {
                api.print_json(&answer)?;
            } else {
                out!("{dag_id} {verb}d");
            }
        }
    }
    Ok(())
}

/// `dagmq runs ...`.
pub(crate) async fn runs(api: &Api, command: &RunsCommand) -> CliResult<()> {
    match command {
        RunsCommand::List { dag_id, status, limit, offset } => {
            let mut query = format!("?limit={limit}&offset={offset}");
            if let Some(dag_id) = dag_id {
                query.push_str(&format!("&dag_id={}", query_value(dag_id)));
            }
            if let Some(status) = status {
                query.push_str(&format!("&status={}", query_value(status)));
            }
            let runs = api.call("GET", &format!("/api/v1/runs{query}"), None).await?;
            if api.json {
                api.print_json(&runs)?;
                return Ok(());
            }
            let rows = runs
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    vec![
                        text(&r["run_id"]),
                        text(&r["dag_id"]),
                        text(&r["state"]),
                        text(&r["created_at"]),
                        counts(&r["task_counts"]),
                    ]
                })
                .collect();
            print_table(&["RUN", "DAG", "STATE", "CREATED", "TASKS"], rows)?;
        }
        RunsCommand::Show { run_id } => {
            let run = api.call("GET", &format!("/api/v1/runs/{run_id}"), None).await?;
            if api.json {
                api.print_json(&run)?;
                return Ok(());
            }
            out!(
                "run      {}\ndag      {}\nstate    {}{}\nkind     {}\ncreated  {}\nstarted  {}\nended    {}\nparams   {}",
                text(&run["run_id"]),
                text(&run["dag_id"]),
                text(&run["state"]),
                run["waiting_for"].as_str().map(|why| format!("\nwaiting  {why}")).unwrap_or_default(),
                text(&run["kind"]),
                text(&run["created_at"]),
                text(&run["started_at"]),
                text(&run["ended_at"]),
                run["params"]
            );
            out!("");
            let rows = run["tasks"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    vec![
                        text(&t["task_id"]),
                        text(&t["state"]),
                        text(&t["waiting_for"]),
                        text(&t["try_number"]),
                        text(&t["worker"]),
                        text(&t["started_at"]),
                        text(&t["ended_at"]),
                        output_text(&t["output"]),
                        text(&t["error"]),
                    ]
                })
                .collect();
            print_table(
                &["TASK", "STATE", "WAITING FOR", "TRY", "WORKER", "STARTED", "ENDED", "OUTPUT", "ERROR"],
                rows,
            )?;
        }
        RunsCommand::Clear { run_id, tasks, downstream } => {
            let body = serde_json::json!({"tasks": tasks, "downstream": downstream});
            let answer = api.call("POST", &format!("/api/v1/runs/{run_id}/clear"), Some(body)).await?;
            if api.json {
                api.print_json(&answer)?;
            } else {
                let cleared: Vec<&str> = answer["cleared"]
                    .as_array()
                    .map(|c| c.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                out!("{run_id} cleared: {}", cleared.join(", "));
            }
        }
        RunsCommand::Restart { run_id }
        | RunsCommand::Cancel { run_id }
        | RunsCommand::Suspend { run_id }
        | RunsCommand::Resume { run_id } => {
            let (verb, done) = match command {
                RunsCommand::Restart { .. } => ("restart", "restarted"),
                RunsCommand::Cancel { .. } => ("cancel", "cancelled"),
                RunsCommand::Suspend { .. } => ("suspend", "suspended"),
                _ => ("resume", "resumed"),
            };
            let answer = api.call("POST", &format!("/api/v1/runs/{run_id}/{verb}"), None).await?;
            if api.json {
                api.print_json(&answer)?;
            } else {
                out!("{run_id} {done}");
            }
        }
    }
    Ok(())
}

/// `dagmq logs`.
pub(crate) async fn logs(api: &Api, args: &LogsArgs) -> CliResult<()> {
    let mut from = 0;
    loop {
        let mut path = format!("/api/v1/runs/{}/tasks/{}/logs?from={from}", args.run_id, args.task_id);
        if let Some(try_number) = args.try_number {
            path.push_str(&format!("&try={try_number}"));
        }
        let log = api.call("GET", &path, None).await?;
        if api.json && !args.follow {
            api.print_json(&log)?;
            return Ok(());
        }
        for line in log["lines"].as_array().cloned().unwrap_or_default() {
            match line.as_str() {
                Some(text) => out!("{text}"),
                None => out!("{line}"),
            }
        }
        from = log["next"].as_u64().unwrap_or(0) as usize;
        let state = log["state"].as_str().unwrap_or("");
        let finished = matches!(
            state,
            "success" | "failed" | "upstream_failed" | "cancelled" | "skipped" | "up_for_retry" | "suspended"
        );
        if !args.follow || finished {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `dagmq workers`.
pub(crate) async fn workers(api: &Api) -> CliResult<()> {
    let workers = api.call("GET", "/api/v1/workers", None).await?;
    if api.json {
        api.print_json(&workers)?;
        return Ok(());
    }
    let rows = workers
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|w| {
            vec![
                text(&w["name"]),
                text(&w["host"]),
                w["queues"].as_array().map(|q| q.iter().map(text).collect::<Vec<_>>().join(",")).unwrap_or_default(),
                text(&w["concurrency"]),
                w["running"].as_array().map_or(0, Vec::len).to_string(),
                text(&w["last_heartbeat"]),
            ]
        })
        .collect();
    print_table(&["WORKER", "HOST", "QUEUES", "CONCURRENCY", "RUNNING", "LAST HEARTBEAT"], rows)?;
    Ok(())
}

/// A JSON value as a table cell.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Task counts as `success=3 failed=1`.
fn counts(value: &Value) -> String {
    value
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Prints rows under headers, columns padded to their widest cell.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>) -> CliResult<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> CliResult<()> {
        let padded: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = widths[i])).collect();
        out!("{}", padded.join("  ").trim_end());
        Ok(())
    };
    line(headers.iter().map(|h| h.to_string()).collect())?;
    for row in rows {
        line(row)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_of_a_run_says_what_it_waits_for() {
        let waits = |run: Value| waiting_text(&run);
        assert_eq!(waits(serde_json::json!({"tasks": [{"task_id": "a", "waiting_for": null}]})), "");
        assert_eq!(
            waits(serde_json::json!({"waiting_for": "max_active_runs 1/1", "tasks": []})),
            "; waiting: max_active_runs 1/1"
        );
        let tasks: Vec<Value> = (1..=5)
            .map(|i| serde_json::json!({"task_id": format!("t{i}"), "waiting_for": "no live worker consumes pool gpu"}))
            .collect();
        assert_eq!(
            waits(serde_json::json!({"tasks": tasks})),
            "; waiting: t1 (no live worker consumes pool gpu), t2 (no live worker consumes pool gpu), \
             t3 (no live worker consumes pool gpu), 2 more tasks"
        );
    }
}
