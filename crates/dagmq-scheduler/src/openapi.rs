//! The OpenAPI 3 description of the HTTP API, served at `/api/v1/openapi.json`.

use serde_json::{Value, json};

fn error_responses(codes: &[&str]) -> Value {
    let mut responses = serde_json::Map::new();
    for code in codes {
        let description = match *code {
            "400" => "bad input",
            "401" => "missing or wrong bearer token",
            "404" => "unknown id",
            "409" => "conflicts with the current state",
            "413" => "body over 1 MiB",
            _ => "queue or store unavailable",
        };
        responses.insert(
            (*code).to_string(),
            json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    Value::Object(responses)
}

fn operation(summary: &str, ok: (&str, &str), errors: &[&str], parameters: Value, body: Option<Value>) -> Value {
    let mut responses = error_responses(errors);
    responses[ok.0] = json!({"description": ok.1, "content": {"application/json": {}}});
    let mut op = json!({"summary": summary, "parameters": parameters, "responses": responses});
    if let Some(body) = body {
        op["requestBody"] = body;
    }
    op
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

fn query_param(name: &str, kind: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": {"type": kind}, "description": description})
}

/// The document.
pub fn document() -> Value {
    let auth = ["401"];
    let dag = path_param("dag_id");
    let run = path_param("run_id");
    let std_errors = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut all = vec!["401", "503"];
        all.extend_from_slice(extra);
        all
    };
    let _ = auth;
    json!({
        "openapi": "3.0.3",
        "info": {"title": "dagmq", "version": env!("CARGO_PKG_VERSION"),
                 "description": "DAG scheduler API. With DAGMQ_API_TOKEN set, every /api call needs `Authorization: Bearer TOKEN`."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}
        },
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": {"summary": "the web UI", "security": [], "responses": {"200": {"description": "HTML page"}}}},
            "/healthz": {"get": {"summary": "200 when the scheduler reaches its queue and store", "security": [],
                                  "responses": {"200": {"description": "healthy"}, "503": {"description": "a backend is unreachable"}}}},
            "/ui/app.js": {"get": {"summary": "the web UI's script", "security": [], "responses": {"200": {"description": "JavaScript"}}}},
            "/metrics": {"get": {"summary": "Prometheus text format; needs the metrics token, or the API token when no metrics token is set",
                                 "responses": {"200": {"description": "metrics"}, "401": {"description": "missing or wrong token"}}}},
            "/api/v1/openapi.json": {"get": operation("this document", ("200", "the document"), &std_errors(&[]), json!([]), None)},
            "/api/v1/dags": {"get": operation("DAGs with schedule, paused flag, next run and last run", ("200", "DAGs"), &std_errors(&[]), json!([]), None)},
            "/api/v1/dags/{dag_id}/grid": {"get": operation("the DAG's runs as a grid, newest first: run_id, state, kind, logical_date, started_at, ended_at and each task's state (no params, no task details); offset/limit page through older runs; more says whether older runs follow; its ETag is worked out from the runs' records and the unfinished runs' task states, so an If-None-Match that still holds is answered 304 without the grid being built", ("200", "{runs, offset, more}"), &std_errors(&["400", "404"]), json!([dag, query_param("limit", "integer", "1 to 100, default 25"), query_param("offset", "integer", "skip this many newest runs")]), None)},
            "/api/v1/dags/{dag_id}": {"get": operation("one DAG as the list shows it, with its params (type, default, allowed values, required) and params_declared", ("200", "the DAG"), &std_errors(&["404"]), json!([dag]), None)},
            "/api/v1/dags/{dag_id}/pause": {"post": operation("stop scheduled runs", ("200", "paused"), &std_errors(&["404"]), json!([dag]), None)},
            "/api/v1/dags/{dag_id}/unpause": {"post": operation("resume scheduled runs", ("200", "unpaused"), &std_errors(&["404"]), json!([dag]), None)},
            "/api/v1/dags/{dag_id}/runs": {"post": operation(
                "trigger a run; 201 for a new run, 200 with the existing run for a repeated key; 400 when the params do not fit the DAG's params (type, required, unknown to a DAG that declares params) or are over 64 KiB of JSON",
                ("201", "created: {\"run_id\", \"created\"}"),
                &std_errors(&["400", "404", "413"]),
                json!([dag]),
                Some(json!({"required": false, "content": {"application/json": {"schema": {
                    "type": "object",
                    "properties": {"params": {"type": "object"}, "key": {"type": "string", "maxLength": 200}}
                }}}}))
            )},
            "/api/v1/dags/{dag_id}/backfill": {"post": operation(
                "a run (kind backfill) for every schedule point t with from <= t <= to, oldest first, never a second run for a point; max_active_runs holds; 400 for a manual-only DAG, a reversed range or more than 10,000 points",
                ("201", "{\"runs\": [run ids], \"created\": N, \"existing\": M}"),
                &std_errors(&["400", "404", "413"]),
                json!([dag]),
                Some(json!({"required": true, "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["from", "to"],
                    "properties": {"from": {"type": "string", "description": "RFC 3339 (2026-11-01T06:00:00Z), a date (2026-11-01: midnight in the DAG's timezone) or a time without an offset (2026-11-01T06:00, in the DAG's timezone)"}, "to": {"type": "string", "description": "as from; included"}, "params": {"type": "object"}}
                }}}}))
            )},
            "/api/v1/runs": {"get": operation("latest runs, newest first, with task counts by state; without their params (the run has them)", ("200", "runs"), &std_errors(&["400"]), json!([
                query_param("dag_id", "string", "only this DAG"),
                query_param("status", "string", "queued, running, suspended, success, failed or cancelled"),
                query_param("limit", "integer", "1 to 500, default 50"),
                query_param("offset", "integer", "skip this many first (the next page: offset plus limit)")
            ]), None)},
            "/api/v1/runs/{run_id}": {"get": operation("a run with every task: state, try, times, worker, error; `timezone` is its DAG's", ("200", "the run"), &std_errors(&["404"]), json!([run]), None)},
            "/api/v1/runs/{run_id}/restart": {"post": operation("re-run failed and not-run tasks of a finished run", ("200", "restarted"), &std_errors(&["404", "409"]), json!([run]), None)},
            "/api/v1/runs/{run_id}/cancel": {"post": operation("cancel a run (also a suspended one); running tasks are told to stop", ("200", "cancelled"), &std_errors(&["404", "409"]), json!([run]), None)},
            "/api/v1/runs/{run_id}/clear": {"post": operation(
                "run tasks again with a fresh retry budget, even if they succeeded; with downstream, every task after them too (tasks after them that never ran are decided again in any case); the run is running again; 409 when one of them is queued or running",
                ("200", "{\"run_id\", \"cleared\": [task ids]}"),
                &std_errors(&["400", "404", "409"]),
                json!([run]),
                Some(json!({"required": true, "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["tasks"],
                    "properties": {"tasks": {"type": "array", "items": {"type": "string"}}, "downstream": {"type": "boolean"}}
                }}}}))
            )},
            "/api/v1/runs/{run_id}/suspend": {"post": operation("suspend a running run: nothing new is queued; queued and running tries stop and their tasks become suspended without using up a retry", ("200", "suspended"), &std_errors(&["404", "409"]), json!([run]), None)},
            "/api/v1/runs/{run_id}/resume": {"post": operation("resume a suspended run: suspended tasks get new tries", ("200", "resumed"), &std_errors(&["404", "409"]), json!([run]), None)},
            "/api/v1/runs/{run_id}/tasks/{task_id}/logs": {"get": operation("a try's log lines", ("200", "lines and the next offset"), &std_errors(&["404"]), json!([
                run, path_param("task_id"),
                query_param("try", "integer", "the try (default: the latest)"),
                query_param("from", "integer", "first line, for tailing")
            ]), None)},
            "/api/v1/workers": {"get": operation("live workers: name, host, queues, concurrency, running tries, last heartbeat", ("200", "workers"), &std_errors(&[]), json!([]), None)},
            "/api/v1/stats": {"get": operation("runs and tasks by state, queue depths, workers", ("200", "counts"), &std_errors(&[]), json!([]), None)},
            "/api/v1/capacity": {"get": operation("concurrency in use: each pool's used, free and waiting slots; each DAG with unfinished runs: active runs against max_active_runs, queued runs, active tasks against max_active_tasks; each live worker's used and free slots; queued runs held back, with why (max_active_runs 3/3)", ("200", "capacity"), &std_errors(&[]), json!([]), None)}
        }
    })
}
