//! The HTTP API over a real listener: every route, its answers and its errors.

use std::sync::Arc;
use std::time::Duration;

use dagmq_core::{CancelSignal, Dag, DagRegistry, TaskSpec};
use dagmq_scheduler::api::{ApiConfig, serve};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Harness, Journal, Probe};

/// A harness with its API served on a free port.
struct Served {
    harness: Harness,
    port: u16,
    _stop: dagmq_core::task::CancelHandle,
}

async fn serve_api(token: Option<&str>) -> Served {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(crate::support::origin()));
    let slow = Probe { work: Duration::from_secs(3), ..Probe::new(&journal, &clock) };
    let mut dags = DagRegistry::new();
    dags.add(Dag::builder("etl").task(TaskSpec::rust("extract", Probe::new(&journal, &clock))).build().unwrap())
        .unwrap();
    dags.add(Dag::builder("slow").task(TaskSpec::rust("wait", slow)).build().unwrap()).unwrap();
    let harness = Harness::start(dags).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, signal) = CancelSignal::new();
    let config = ApiConfig {
        token: token.map(str::to_string),
        allowed_hosts: Some(vec!["dagmq.internal".to_string()]),
        allowed_origins: vec!["https://ops.example.com".to_string()],
        ..ApiConfig::default()
    };
    tokio::spawn(serve(listener, harness.scheduler.clone(), config, signal));
    Served { harness, port, _stop: stop }
}

/// One request: status and body (JSON when it parses, else a string).
async fn call(port: u16, method: &str, path: &str, body: Option<&[u8]>, token: Option<&str>) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // A refused oversize body may close the connection before all of it is written.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let value = serde_json::from_str(payload).unwrap_or(Value::String(payload.to_string()));
    (status, value)
}

async fn get(port: u16, path: &str) -> (u16, Value) {
    call(port, "GET", path, None, None).await
}

async fn post(port: u16, path: &str, body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
    call(port, "POST", path, bytes.as_deref(), None).await
}

#[tokio::test]
async fn every_route_answers_and_refuses_bad_input() {
    let served = serve_api(None).await;
    let port = served.port;

    assert_eq!(get(port, "/healthz").await, (200, json!({"status": "ok"})));
    let (status, page) = get(port, "/").await;
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("<title>dagmq</title>"));
    let (status, doc) = get(port, "/api/v1/openapi.json").await;
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.0.3")));

    // Every documented operation is served (not the 404 of an unknown route, not 405).
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            let concrete = path.replace("{dag_id}", "etl").replace("{run_id}", "nope").replace("{task_id}", "t");
            let (status, body) = call(port, &method.to_uppercase(), &concrete, None, None).await;
            assert_ne!(status, 405, "{method} {path}");
            assert!(!body["error"].as_str().unwrap_or("").starts_with("no route"), "{method} {path}: {body}");
        }
    }
    assert_eq!(get(port, "/api/v1/nowhere").await, (404, json!({"error": "no route GET /api/v1/nowhere"})));

    // DAGs, pause and unpause.
    let (status, dags) = get(port, "/api/v1/dags").await;
    assert_eq!(status, 200);
    assert_eq!(
        dags.as_array().unwrap().iter().map(|d| d["dag_id"].clone()).collect::<Vec<_>>(),
        vec![json!("etl"), json!("slow")]
    );
    assert_eq!(post(port, "/api/v1/dags/etl/pause", None).await, (200, json!({"dag_id": "etl", "paused": true})));
    assert_eq!(get(port, "/api/v1/dags").await.1[0]["paused"], true);
    assert_eq!(post(port, "/api/v1/dags/etl/unpause", None).await, (200, json!({"dag_id": "etl", "paused": false})));
    assert_eq!(post(port, "/api/v1/dags/nope/pause", None).await, (404, json!({"error": "unknown dag \"nope\""})));

    // Triggers: created, repeated key, bad bodies, unknown DAG, over-size body.
    let (status, first) = post(port, "/api/v1/dags/etl/runs", Some(json!({"params": {"d": "1"}, "key": "k1"}))).await;
    assert_eq!((status, first["created"].as_bool()), (201, Some(true)));
    let (status, again) = post(port, "/api/v1/dags/etl/runs", Some(json!({"key": "k1"}))).await;
    assert_eq!((status, &again["run_id"]), (200, &first["run_id"]));
    assert_eq!(post(port, "/api/v1/dags/etl/runs", None).await.0, 201, "an empty body is a trigger without params");
    let (status, body) = call(port, "POST", "/api/v1/dags/etl/runs", Some(b"{\"params\":"), None).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().starts_with("bad trigger body: EOF while parsing"), "{body}");
    let (status, body) = post(port, "/api/v1/dags/etl/runs", Some(json!({"parms": {}}))).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("unknown field `parms`"), "{body}");
    assert_eq!(
        post(port, "/api/v1/dags/etl/runs", Some(json!({"key": "x".repeat(201)}))).await,
        (400, json!({"error": "key must be 1 to 200 characters"}))
    );
    assert_eq!(post(port, "/api/v1/dags/nope/runs", None).await, (404, json!({"error": "unknown dag \"nope\""})));
    let huge = serde_json::to_vec(&json!({"params": {"blob": "x".repeat(2 * 1024 * 1024)}})).unwrap();
    assert_eq!(call(port, "POST", "/api/v1/dags/etl/runs", Some(&huge), None).await.0, 413);

    // Runs: listing limits and filters, one run, unknown run.
    let run_id = first["run_id"].as_str().unwrap().to_string();
    served.harness.wait_final(&run_id).await;
    let (status, runs) = get(port, "/api/v1/runs?dag_id=etl&status=success&limit=10").await;
    assert_eq!(status, 200);
    assert!(
        runs.as_array().unwrap().iter().any(|r| r["run_id"] == first["run_id"] && r["task_counts"]["success"] == 1)
    );
    // Lists leave params out; the run has them.
    assert!(runs.as_array().unwrap().iter().all(|r| r.get("params").is_none()), "{runs}");
    assert_eq!(get(port, "/api/v1/runs?limit=0").await, (400, json!({"error": "limit must be 1 to 500"})));
    assert_eq!(get(port, "/api/v1/runs?limit=501").await, (400, json!({"error": "limit must be 1 to 500"})));
    assert_eq!(
        get(port, "/api/v1/runs?status=done").await,
        (400, json!({"error": "status: unknown run state \"done\""}))
    );
    let (status, run) = get(port, &format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(
        (status, run["state"].as_str(), run["tasks"][0]["task_id"].as_str()),
        (200, Some("success"), Some("extract"))
    );
    assert_eq!(run["params"], json!({"d": "1"}));
    assert_eq!(get(port, "/api/v1/runs/nope").await, (404, json!({"error": "unknown run \"nope\""})));

    // Logs.
    let (status, log) = get(port, &format!("/api/v1/runs/{run_id}/tasks/extract/logs?try=1")).await;
    assert_eq!((status, log["lines"][0].as_str(), log["next"].as_u64()), (200, Some("try 1 of extract"), Some(1)));
    assert_eq!(get(port, &format!("/api/v1/runs/{run_id}/tasks/extract/logs?from=1")).await.1["lines"], json!([]));
    assert_eq!(get(port, &format!("/api/v1/runs/{run_id}/tasks/nope/logs")).await.0, 404);
    assert_eq!(get(port, &format!("/api/v1/runs/{run_id}/tasks/extract/logs?try=2")).await.0, 404);

    // Restart and cancel: conflicts and unknown ids.
    assert_eq!(post(port, &format!("/api/v1/runs/{run_id}/restart"), None).await.0, 409);
    assert_eq!(post(port, &format!("/api/v1/runs/{run_id}/cancel"), None).await.0, 409);
    assert_eq!(post(port, "/api/v1/runs/nope/restart", None).await.0, 404);
    assert_eq!(post(port, "/api/v1/runs/nope/cancel", None).await.0, 404);
    let (_, slow) = post(port, "/api/v1/dags/slow/runs", None).await;
    let slow_id = slow["run_id"].as_str().unwrap().to_string();
    served.harness.wait_task(&slow_id, "wait", |t| t.state == dagmq_core::TaskState::Running).await;
    assert_eq!(post(port, &format!("/api/v1/runs/{slow_id}/restart"), None).await.0, 409);
    assert_eq!(
        post(port, &format!("/api/v1/runs/{slow_id}/cancel"), None).await,
        (200, json!({"run_id": slow_id, "cancelled": true}))
    );
    assert_eq!(
        post(port, &format!("/api/v1/runs/{slow_id}/restart"), None).await,
        (200, json!({"run_id": slow_id, "restarted": true}))
    );

    // Workers and stats.
    let (status, workers) = get(port, "/api/v1/workers").await;
    assert_eq!((status, workers[0]["name"].as_str()), (200, Some("worker-1")));
    let (status, stats) = get(port, "/api/v1/stats").await;
    assert_eq!((status, stats["workers"].as_u64()), (200, Some(1)));
    assert!(stats["queues"]["dagmq.tasks.default"].is_u64());
    let (status, metrics) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.as_str().unwrap().contains("dagmq_runs_finished_total{dag=\"etl\",state=\"success\"}"));
    served.harness.stop().await;
}

#[tokio::test]
async fn a_token_guards_the_api_and_metrics_but_not_health_and_the_page() {
    let served = serve_api(Some("s3cret")).await;
    let port = served.port;
    let unauthorized = (401, json!({"error": "missing or wrong bearer token"}));
    assert_eq!(call(port, "GET", "/api/v1/dags", None, None).await, unauthorized);
    assert_eq!(call(port, "GET", "/api/v1/dags", None, Some("wrong")).await, unauthorized);
    assert_eq!(call(port, "POST", "/api/v1/dags/etl/runs", None, None).await, unauthorized);
    assert_eq!(call(port, "GET", "/api/v1/dags", None, Some("s3cret")).await.0, 200);
    assert_eq!(call(port, "GET", "/healthz", None, None).await.0, 200);
    // Without a metrics token of its own, a scrape needs the API token.
    assert_eq!(call(port, "GET", "/metrics", None, None).await.0, 401);
    assert_eq!(call(port, "GET", "/metrics", None, Some("wrong")).await.0, 401);
    assert_eq!(call(port, "GET", "/metrics", None, Some("s3cret")).await.0, 200);
    assert_eq!(call(port, "GET", "/", None, None).await.0, 200);
    assert_eq!(call(port, "GET", "/ui/app.js", None, None).await.0, 200);
    served.harness.stop().await;
}

/// The head of a `GET` answer, lower case.
async fn head_of(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    text.split_once("\r\n\r\n").map_or(text.clone(), |(head, _)| head.to_string())
}

/// No page of another site may frame the UI (or any answer), and the page runs only scripts
/// from its own origin: the script is a file of its own, served as JavaScript.
#[tokio::test]
async fn the_ui_cannot_be_framed_and_runs_only_its_own_script() {
    let served = serve_api(None).await;
    let port = served.port;
    for path in ["/", "/ui/app.js", "/api/v1/dags", "/api/v1/nope"] {
        let head = head_of(port, path).await;
        assert!(head.contains("\r\nx-frame-options: deny\r\n"), "{path}: {head}");
        assert!(head.contains("frame-ancestors 'none'"), "{path}: {head}");
        assert!(head.contains("script-src 'self';"), "{path}: {head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{path}: {head}");
    }
    assert_eq!(
        dagmq_scheduler::api::CONTENT_SECURITY_POLICY.split(';').map(str::trim).find(|d| d.starts_with("script-src")),
        Some("script-src 'self'"),
        "no inline script, no eval"
    );
    assert!(head_of(port, "/ui/app.js").await.contains("content-type: text/javascript"));
    let (status, page) = get(port, "/").await;
    assert_eq!(status, 200);
    let page = page.as_str().unwrap();
    assert!(page.contains("<script src=\"/ui/app.js\"></script>"), "{page}");
    assert!(!page.contains("onclick=") && !page.contains("onchange="), "{page}");
    served.harness.stop().await;
}

/// A raw request with the given extra header lines; answers the status.
async fn raw(port: u16, method: &str, path: &str, headers: &[&str], body: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for line in headers {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// What a page on another site could make a browser send is refused; the API's own page, the
/// allowed origin and programs without an `Origin` are served.
#[tokio::test]
async fn cross_site_requests_and_rebound_hosts_are_refused() {
    let served = serve_api(None).await;
    let port = served.port;
    let trigger = "/api/v1/dags/etl/runs";
    let body = r#"{"params":{}}"#;
    let own = format!("Host: 127.0.0.1:{port}");
    let json = "Content-Type: application/json";
    // A simple cross-site POST (no preflight): text/plain, form, or JSON from another origin.
    assert_eq!(
        raw(port, "POST", trigger, &[&own, "Content-Type: text/plain", "Origin: http://evil.example"], body).await,
        403
    );
    assert_eq!(raw(port, "POST", trigger, &[&own, "Content-Type: text/plain"], body).await, 415);
    assert_eq!(
        raw(port, "POST", trigger, &[&own, "Content-Type: application/x-www-form-urlencoded"], "a=1").await,
        415
    );
    assert_eq!(raw(port, "POST", "/api/v1/dags/etl/pause", &[&own, "Origin: http://evil.example"], "").await, 403);
    assert_eq!(raw(port, "POST", "/api/v1/runs/x/cancel", &[&own, "Origin: null"], "").await, 403);
    // DNS rebinding: the right address under another name.
    assert_eq!(raw(port, "GET", "/api/v1/dags", &[&format!("Host: evil.example:{port}")], "").await, 403);
    assert_eq!(raw(port, "POST", trigger, &[&format!("Host: evil.example:{port}"), json], body).await, 403);
    // The API's own page, an allowed origin and host, and programs without Origin are served.
    let own_origin = format!("Origin: http://127.0.0.1:{port}");
    assert_eq!(raw(port, "POST", trigger, &[&own, json, &own_origin], body).await, 201);
    assert_eq!(raw(port, "POST", trigger, &[&own, json, "Origin: https://ops.example.com"], body).await, 201);
    assert_eq!(raw(port, "POST", trigger, &[&own, json], body).await, 201);
    assert_eq!(raw(port, "GET", "/api/v1/dags", &[&format!("Host: localhost:{port}")], "").await, 200);
    assert_eq!(raw(port, "GET", "/api/v1/dags", &[&format!("Host: [::1]:{port}")], "").await, 200);
    assert_eq!(raw(port, "GET", "/api/v1/dags", &["Host: dagmq.internal"], "").await, 200);
    // Names are compared without regard to case, as browsers and DNS do.
    assert_eq!(raw(port, "GET", "/api/v1/dags", &["Host: DAGMQ.Internal:9191"], "").await, 200);
    assert_eq!(raw(port, "GET", "/api/v1/dags", &["Host: LOCALHOST"], "").await, 200);
    assert_eq!(raw(port, "POST", trigger, &[&own, json, "Origin: https://OPS.example.com"], body).await, 201);
    // An IP address is never rebound: a page reaches the API under it only from that address.
    assert_eq!(raw(port, "GET", "/api/v1/dags", &[&format!("Host: 10.1.2.3:{port}")], "").await, 200);
    assert_eq!(raw(port, "GET", "/api/v1/dags", &[&format!("Host: [fe80::1]:{port}")], "").await, 200);
    assert_eq!(raw(port, "GET", "/api/v1/dags", &["Host: 10.1.2.3.nip.io"], "").await, 403);
    assert_eq!(raw(port, "GET", "/healthz", &[], "").await, 200, "no Host: no browser");
    assert_eq!(raw(port, "POST", "/api/v1/dags/etl/pause", &[&own, &own_origin], "").await, 200);
    served.harness.stop().await;
}

/// `/metrics` answers only with the metrics token when one is set.
#[tokio::test]
async fn a_metrics_token_guards_metrics() {
    let harness = Harness::start(DagRegistry::new()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, signal) = CancelSignal::new();
    let config = ApiConfig { metrics_token: Some("m3trics".into()), ..ApiConfig::default() };
    tokio::spawn(serve(listener, harness.scheduler.clone(), config, signal.clone()));
    let host = format!("Host: 127.0.0.1:{port}");
    assert_eq!(raw(port, "GET", "/metrics", &[&host], "").await, 401);
    assert_eq!(raw(port, "GET", "/metrics", &[&host, "Authorization: Bearer wrong"], "").await, 401);
    assert_eq!(raw(port, "GET", "/metrics", &[&host, "Authorization: Bearer m3trics"], "").await, 200);
    assert_eq!(raw(port, "GET", "/healthz", &[&host], "").await, 200);
    // A worker's own endpoint takes the same token.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_port = listener.local_addr().unwrap().port();
    let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(|| "# EOF\n".to_string());
    tokio::spawn(dagmq_scheduler::api::serve_metrics(
        listener,
        render.clone(),
        Some("m3trics".into()),
        None,
        signal.clone(),
    ));
    assert_eq!(raw(worker_port, "GET", "/metrics", &[&host], "").await, 401);
    assert_eq!(raw(worker_port, "GET", "/metrics", &[&host, "Authorization: Bearer m3trics"], "").await, 200);
    // Without a token its Host is checked like the API's, and its answers cannot be framed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_port = listener.local_addr().unwrap().port();
    tokio::spawn(dagmq_scheduler::api::serve_metrics(
        listener,
        render,
        None,
        Some(vec!["Ops.Example.com".into()]),
        signal.clone(),
    ));
    assert_eq!(raw(open_port, "GET", "/metrics", &[&format!("Host: 127.0.0.1:{open_port}")], "").await, 200);
    assert_eq!(raw(open_port, "GET", "/metrics", &["Host: evil.example"], "").await, 403);
    assert_eq!(raw(open_port, "GET", "/metrics", &["Host: ops.example.com"], "").await, 200);
    let head = head_of(open_port, "/metrics").await;
    assert!(head.contains("x-frame-options: deny") && head.contains("frame-ancestors 'none'"), "{head}");
    harness.stop().await;
}

#[tokio::test]
async fn a_scrape_counts_tasks_in_flight_without_reading_a_task() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(crate::support::origin()));
    let hold = || Probe { work: Duration::from_secs(60), ..Probe::new(&journal, &clock) };
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("hold")
            .task(TaskSpec::rust("a", hold()))
            .task(TaskSpec::rust("b", hold()))
            .task(TaskSpec::rust("after", Probe::new(&journal, &clock)).after(["a", "b"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    let harness = crate::support::Harness::start(dags).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, signal) = CancelSignal::new();
    tokio::spawn(serve(listener, harness.scheduler.clone(), ApiConfig::default(), signal));
    let mut runs = Vec::new();
    for _ in 0..10 {
        runs.push(harness.trigger("hold").await);
    }
    for run_id in &runs {
        for task in ["a", "b"] {
            harness.wait_task(run_id, task, |t| t.state == dagmq_core::TaskState::Running).await;
        }
    }
    // Once a heartbeat lists the 20 tries, the scrape says so, read from the scheduler's counts.
    let gauge = |body: &Value, state: &str| -> f64 {
        let text = body.as_str().unwrap();
        let line = format!("dagmq_tasks_in_flight{{state=\"{state}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(line.as_str())).unwrap().parse().unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = get(port, "/metrics").await;
        if gauge(&body, "running") == 20.0 {
            assert_eq!(gauge(&body, "queued"), 0.0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "running never reached 20: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reads = &harness.scheduler_faults.store.task_reads;
    let before = reads.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..5 {
        let (status, body) = get(port, "/metrics").await;
        assert_eq!((status, gauge(&body, "running")), (200, 20.0));
        let (_, stats) = get(port, "/api/v1/stats").await;
        assert_eq!((stats["tasks"]["running"].as_u64(), stats["tasks"]["pending"].as_u64()), (Some(20), Some(10)));
    }
    assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), before, "a scrape read tasks from the store");
    // Cancelled runs leave the counts.
    for run_id in &runs {
        harness.scheduler.cancel(run_id).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gauge(&get(port, "/metrics").await.1, "running") != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the cancelled runs stayed in the counts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    harness.stop().await;
}
