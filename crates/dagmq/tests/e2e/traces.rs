//! OpenTelemetry traces: a small OTLP/HTTP receiver (JSON) takes the spans a real scheduler and
//! worker export, and the tests check the tree: one trace per run, its root span, one span per
//! try, each a child of its run's root span, with the try's attributes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;
use crate::support::{Standalone, dagmq, examples, free_port, text};

/// An OTLP/HTTP collector on a loopback port: keeps every span POSTed to `/v1/traces`.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

/// One received span, as the tests read it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    start: u64,
    end: u64,
    attributes: BTreeMap<String, String>,
    error: bool,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (kept, seen) = (spans.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (kept, seen) = (kept.clone(), seen.clone());
                std::thread::spawn(move || serve(stream, &kept, &seen));
            }
        });
        Receiver { port, spans, requests }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The spans received once `done` holds for them, failing after `limit`.
    fn wait_for(&self, limit: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "spans not as expected within {limit:?}; requests {:?}; spans: {spans:#?}",
                self.requests.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Serves one HTTP/1.1 connection: each request's JSON body is read as an OTLP export.
fn serve(stream: TcpStream, kept: &Mutex<Vec<Span>>, seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        let mut content_type = String::new();
        let mut authorization = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "content-type" => content_type = value.trim().to_string(),
                "authorization" => authorization = value.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        seen.lock().unwrap().push(format!("{} ({content_type}) [{authorization}]", request_line.trim_end()));
        if request_line.starts_with("POST /v1/traces ") && content_type == "application/json" {
            let export: Value = serde_json::from_slice(&body).unwrap();
            kept.lock().unwrap().extend(read_export(&export));
            writer
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
        } else {
            writer.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").unwrap();
        }
    }
}

/// The spans of an `ExportTraceServiceRequest` in OTLP's JSON encoding.
fn read_export(export: &Value) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource in export["resourceSpans"].as_array().unwrap() {
        let service = attributes(&resource["resource"]["attributes"]).remove("service.name").unwrap_or_default();
        for scope in resource["scopeSpans"].as_array().unwrap() {
            for span in scope["spans"].as_array().unwrap() {
                let number = |v: &Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap();
                spans.push(Span {
                    service: service.clone(),
                    trace_id: span["traceId"].as_str().unwrap().to_string(),
                    span_id: span["spanId"].as_str().unwrap().to_string(),
                    parent_span_id: span["parentSpanId"].as_str().unwrap_or("").to_string(),
                    name: span["name"].as_str().unwrap().to_string(),
                    start: number(&span["startTimeUnixNano"]),
                    end: number(&span["endTimeUnixNano"]),
                    attributes: attributes(&span["attributes"]),
                    // STATUS_CODE_ERROR is 2.
                    error: span["status"]["code"].as_u64() == Some(2) || span["status"]["code"] == "STATUS_CODE_ERROR",
                });
            }
        }
    }
    spans
}

/// OTLP key-values as text.
fn attributes(list: &Value) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for kv in list.as_array().into_iter().flatten() {
        let value = &kv["value"];
        let text = match (&value["stringValue"], &value["intValue"]) {
            (Value::String(s), _) => s.clone(),
            (_, Value::String(s)) => s.clone(),
            (_, Value::Number(n)) => n.to_string(),
            _ => value.to_string(),
        };
        map.insert(kv["key"].as_str().unwrap().to_string(), text);
    }
    map
}

/// The runs' tries, as the API shows them: (run id, task id) to its number of tries.
fn tries_of(run: &Value) -> BTreeMap<String, u64> {
    run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] != "skipped")
        .map(|t| (t["task_id"].as_str().unwrap().to_string(), t["try_number"].as_u64().unwrap()))
        .collect()
}

/// Whether every run of `runs` has its root span and a span for each of its tries.
fn complete(spans: &[Span], runs: &[Value]) -> bool {
    runs.iter().all(|run| {
        let id = run["run_id"].as_str().unwrap();
        let of_run: Vec<&Span> =
            spans.iter().filter(|s| s.attributes.get("dagmq.run_id").map(String::as_str) == Some(id)).collect();
        let tries: u64 = tries_of(run).values().sum();
        of_run.iter().any(|s| s.parent_span_id.is_empty())
            && of_run.iter().filter(|s| !s.parent_span_id.is_empty()).count() as u64 >= tries
    })
}

/// Checks the tree of each run: its own trace, one root span, one span per try (a retried task
/// has two), each a child of the root span, attributes present.
fn check_trees(spans: &[Span], runs: &[Value], worker: &str, scheduler_service: &str, worker_service: &str) {
    let mut traces = std::collections::BTreeSet::new();
    for run in runs {
        let run_id = run["run_id"].as_str().unwrap();
        let dag_id = run["dag_id"].as_str().unwrap();
        let of_run: Vec<&Span> =
            spans.iter().filter(|s| s.attributes.get("dagmq.run_id").map(String::as_str) == Some(run_id)).collect();
        let roots: Vec<&&Span> = of_run.iter().filter(|s| s.parent_span_id.is_empty()).collect();
        assert_eq!(roots.len(), 1, "one root span for {run_id}: {of_run:#?}");
        let root = roots[0];
        assert_eq!(root.name, format!("run {dag_id}"));
        assert_eq!(root.service, scheduler_service);
        assert_eq!(root.attributes["dagmq.dag_id"], dag_id);
        assert_eq!(root.attributes["dagmq.state"], run["state"].as_str().unwrap());
        assert!(root.start <= root.end && root.start > 0, "{root:?}");
        assert!(traces.insert(root.trace_id.clone()), "each run has a trace of its own");
        assert!(of_run.iter().all(|s| s.trace_id == root.trace_id), "one trace per run: {of_run:#?}");
        let try_spans: Vec<&&Span> = of_run.iter().filter(|s| !s.parent_span_id.is_empty()).collect();
        let mut counted: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for span in &try_spans {
            assert_eq!(span.parent_span_id, root.span_id, "a try's parent is its run's root span: {span:?}");
            assert_eq!(span.service, worker_service);
            let task = &span.attributes["dagmq.task_id"];
            assert_eq!(span.name, format!("try {task}"));
            assert_eq!(span.attributes["dagmq.dag_id"], dag_id);
            assert_eq!(span.attributes["dagmq.worker"], worker);
            assert!(span.attributes.contains_key("dagmq.state"), "{span:?}");
            assert!(span.start <= span.end && span.start >= root.start && span.end <= root.end, "{span:?} in {root:?}");
            counted.entry(task.clone()).or_default().push(span.attributes["dagmq.try_number"].parse().unwrap());
        }
        for (task, tries) in tries_of(run) {
            let mut numbers = counted.remove(&task).unwrap_or_default();
            numbers.sort_unstable();
            assert_eq!(numbers, (1..=tries).collect::<Vec<_>>(), "one span per try of {task} in {run_id}");
        }
        assert!(counted.is_empty(), "spans of tasks the run does not have: {counted:?}");
    }
}

#[test]
fn standalone_exports_a_trace_per_run_with_a_span_per_try() {
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let standalone = Standalone::start_with_args(&examples(), &["--otlp-endpoint", &endpoint, "--name", "solo"]);
    let retried = standalone.json(&["trigger", "diamond_retry", "--wait"]);
    let plain = standalone.json(&["trigger", "hello", "--wait"]);
    assert_eq!(retried["state"], "success");
    assert_eq!(tries_of(&retried)["flaky"], 2, "the flaky task is tried twice: {retried}");
    let runs = [retried, plain];
    let spans = receiver.wait_for(Duration::from_secs(30), |spans| complete(spans, &runs));
    check_trees(&spans, &runs, "solo", "dagmq", "dagmq");
    // The failed first try of the flaky task is an error span; its second is not.
    let flaky: Vec<&Span> =
        spans.iter().filter(|s| s.attributes.get("dagmq.task_id").map(String::as_str) == Some("flaky")).collect();
    let by_try = |n: &str| flaky.iter().find(|s| s.attributes["dagmq.try_number"] == n).unwrap();
    assert_eq!((by_try("1").attributes["dagmq.state"].as_str(), by_try("1").error), ("up_for_retry", true));
    assert_eq!((by_try("2").attributes["dagmq.state"].as_str(), by_try("2").error), ("success", false));
}

/// Runs three retried runs under a standalone exporting to `endpoint`, a collector that fails:
/// they end as fast as ever, and the failure is logged once.
fn runs_complete_despite(endpoint: &str, name: &str) {
    let dir = std::env::temp_dir().join(format!("dagmq-traces-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("standalone.log");
    let standalone = Standalone::start_logged_with(&examples(), &log, &["--otlp-endpoint", endpoint]);
    let started = Instant::now();
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(standalone.json(&["trigger", "diamond_retry", "--wait"]));
    }
    for run in &runs {
        assert_eq!(run["state"], "success", "{run}");
    }
    // Each run waits 1 s for its retry; exporting adds nothing to that.
    assert!(started.elapsed() < Duration::from_secs(30), "runs took {:?}", started.elapsed());
    // The failure is logged, once, however many exports failed (one a second).
    standalone
        .wait_until(Duration::from_secs(30), || std::fs::read_to_string(&log).unwrap().contains("exporting spans"));
    std::thread::sleep(Duration::from_secs(2));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("exporting spans to").count(), 1, "{text}");
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_collector_that_refuses_connections_costs_spans_only() {
    // Nothing listens on this port: every export is refused.
    runs_complete_despite(&format!("http://127.0.0.1:{}", free_port()), "refused");
}

#[test]
fn a_collector_that_never_answers_costs_spans_only() {
    // Connections are taken (the listen backlog) and never answered: each export waits out its
    // 10 s timeout on the export thread, not in any try.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://127.0.0.1:{}", silent.local_addr().unwrap().port());
    runs_complete_despite(&endpoint, "silent");
    drop(silent);
}

#[test]
fn distributed_scheduler_and_worker_export_one_trace_per_run() {
    // A worker started with OTEL_EXPORTER_OTLP_ENDPOINT (the standard variable) joins the trace
    // of each run that the scheduler (--otlp-endpoint) ends, through RabbitMQ's headers.
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let Some(mut cluster) = Cluster::new(&[("retry.toml", RETRY)]) else { return };
    cluster.scheduler_flags(&["--otlp-endpoint", &endpoint]);
    cluster.start_scheduler();
    cluster.next_env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    cluster.start_worker("w1");
    cluster.wait_for_workers(1);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let trigger = cluster.json(&["trigger", "retry"]);
        runs.push(cluster.wait_run(trigger["run_id"].as_str().unwrap(), Duration::from_secs(60)));
    }
    for run in &runs {
        assert_eq!(run["state"], "success", "{run}: {}", cluster.logs_text());
        assert_eq!(tries_of(run)["flaky"], 2, "{run}");
    }
    let spans = receiver.wait_for(Duration::from_secs(30), |spans| complete(spans, &runs));
    check_trees(&spans, &runs, "w1", "dagmq-scheduler", "dagmq-worker");
}

/// A DAG whose middle task fails its first try (its marker in the run's own directory).
const RETRY: &str = r#"
id = "retry"
[[task]]
id = "first"
run = "noop"
[[task]]
id = "flaky"
after = ["first"]
command = ["sh", "-c", "m=/tmp/dagmq-trace-$DAGMQ_RUN_ID; if [ -e $m ]; then rm -f $m; else touch $m; exit 3; fi"]
retries = 1
retry_delay = "1s"
[[task]]
id = "last"
after = ["flaky"]
run = "noop"
"#;

#[test]
fn an_otlp_endpoint_that_is_not_an_http_url_is_a_usage_error() {
    const BASE: &str = "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): ";
    const TRACES: &str = "--otlp-traces-endpoint (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT): ";
    for (args, env, named) in [
        (vec!["standalone", "--otlp-endpoint", "collector:4318"], None, BASE),
        (vec!["standalone"], Some(("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector")), BASE),
        (vec!["standalone", "--otlp-traces-endpoint", "collector:4318/v1/traces"], None, TRACES),
        (vec!["standalone"], Some(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://collector/v1/traces")), TRACES),
    ] {
        let mut command = dagmq();
        command.args(&args).args(["--port", &free_port().to_string()]);
        if let Some((name, value)) = env {
            command.env(name, value);
        }
        let output = command.output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {}", text(&output.stderr));
        assert!(text(&output.stderr).contains(named), "{}", text(&output.stderr));
    }
}

#[test]
fn the_traces_only_variable_is_used_as_is_and_beats_the_collectors_base_url() {
    // OpenTelemetry's OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the URL spans are POSTed to (no
    // /v1/traces added); set beside OTEL_EXPORTER_OTLP_ENDPOINT, it is the one used.
    let receiver = Receiver::start();
    let traces = format!("{}/v1/traces", receiver.endpoint());
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let standalone = Standalone::start(
        &examples(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &nowhere), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &traces)],
    );
    let run = standalone.json(&["trigger", "hello", "--wait"]);
    assert_eq!(run["state"], "success", "{run}");
    receiver.wait_for(Duration::from_secs(30), |spans| !spans.is_empty());
    let requests = receiver.requests.lock().unwrap().clone();
    assert!(requests.iter().all(|r| r.starts_with("POST /v1/traces ")), "{requests:?}");
    drop(standalone);

    // A flag beats the variables: an environment set for other programs does not take dagmq's
    // spans elsewhere.
    let flagged = Receiver::start();
    let standalone = Standalone::spawn_with(
        &examples(),
        &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &format!("{nowhere}/v1/traces"))],
        &["--otlp-endpoint", &flagged.endpoint()],
    );
    let run = standalone.json(&["trigger", "hello", "--wait"]);
    assert_eq!(run["state"], "success", "{run}");
    flagged.wait_for(Duration::from_secs(30), |spans| !spans.is_empty());
}

#[test]
fn the_environments_collector_is_left_unused_when_its_exporter_is_none_or_the_sdk_disabled() {
    // OpenTelemetry's OTEL_TRACES_EXPORTER=none and OTEL_SDK_DISABLED=true turn traces off: no
    // span goes to the environment's collector, and the log says why. A flag is still used, and
    // the environment's OTLP headers (a token for its own collector) do not go with it.
    let dir = std::env::temp_dir().join(format!("dagmq-traces-off-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("standalone.log");
    for (var, value, says) in [
        ("OTEL_TRACES_EXPORTER", "none", "OTEL_TRACES_EXPORTER=\"none\" turns traces off; no spans are sent"),
        ("OTEL_SDK_DISABLED", "true", "OTEL_SDK_DISABLED=true turns traces off; no spans are sent"),
    ] {
        let receiver = Receiver::start();
        let environment = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            // A token and a content type meant for the environment's collector.
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20ENV-COLLECTOR-TOKEN,x-team=env,Content-Type=text/plain".to_string(),
            ),
            (var, value.to_string()),
        ];
        let environment: Vec<(&str, &str)> = environment.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut standalone = Standalone::start_logged_env(&examples(), &log, &environment, &[]);
        let run = standalone.json(&["trigger", "hello", "--wait"]);
        assert_eq!(run["state"], "success", "{run}");
        // A stopping process sends what spans it has before it exits.
        let pid = standalone.child.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while standalone.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "still running 60 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(receiver.requests.lock().unwrap().clone(), Vec::<String>::new(), "{var}={value}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(says), "{var}={value}: the log does not say why: {text}");
        assert!(!text.contains("traces go to an OTLP collector"), "{text}");

        let flagged = Receiver::start();
        let url = format!("http://spans:pw@127.0.0.1:{}", flagged.port);
        let standalone = Standalone::spawn_with(&examples(), &environment, &["--otlp-endpoint", &url]);
        let run = standalone.json(&["trigger", "hello", "--wait"]);
        assert_eq!(run["state"], "success", "{run}");
        flagged.wait_for(Duration::from_secs(30), |spans| !spans.is_empty());
        let requests = flagged.requests.lock().unwrap().clone();
        // `spans:pw` as basic auth, not the environment's token; JSON, not the environment's
        // content type (the receiver keeps only JSON exports: the spans waited for above).
        assert!(requests.iter().all(|r| r.ends_with("(application/json) [Basic c3BhbnM6cHc=]")), "{requests:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_password_in_the_otlp_endpoint_is_never_logged() {
    // A collector behind basic auth given in the URL: the warning about a failed export names
    // the endpoint with its password masked, whatever the HTTP client's error says.
    let dir = std::env::temp_dir().join(format!("dagmq-traces-password-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("standalone.log");
    let endpoint = format!("http://spans:hunter2secret@127.0.0.1:{}", free_port());
    let standalone = Standalone::start_logged_with(&examples(), &log, &["--otlp-endpoint", &endpoint]);
    let run = standalone.json(&["trigger", "hello", "--wait"]);
    assert_eq!(run["state"], "success", "{run}");
    standalone
        .wait_until(Duration::from_secs(30), || std::fs::read_to_string(&log).unwrap().contains("exporting spans"));
    drop(standalone);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("hunter2secret"), "the password is in the log: {text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seconds a standalone with nothing running takes from SIGTERM to its exit, its spans exported
/// to `endpoint`.
fn seconds_to_stop(endpoint: &str) -> f64 {
    let mut standalone = Standalone::start_with_args(&examples(), &["--otlp-endpoint", endpoint]);
    let run = standalone.json(&["trigger", "hello", "--wait"]);
    assert_eq!(run["state"], "success", "{run}");
    // The run's spans are waiting for export (every second), or being exported.
    let pid = standalone.child.id().to_string();
    let started = Instant::now();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = started + Duration::from_secs(60);
    while standalone.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "still running 60 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed().as_secs_f64()
}

#[test]
fn a_collector_that_never_answers_delays_shutdown_by_at_most_the_documented_wait() {
    // The README: the last spans are given at most 2 s on shutdown.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let took = seconds_to_stop(&endpoint);
    assert!(took < 4.0, "stopping took {took:.1} s with a collector that never answers");
    drop(silent);
}

#[test]
fn credentials_in_the_otlp_endpoint_reach_the_collector_as_basic_auth() {
    // A collector behind basic auth, its user and password in the URL:
    // each export carries them as an Authorization header, and the URL it asks for has none.
    let receiver = Receiver::start();
    let endpoint = format!("http://spans:pw@127.0.0.1:{}", receiver.port);
    let standalone = Standalone::start_with_args(&examples(), &["--otlp-endpoint", &endpoint]);
    let run = standalone.json(&["trigger", "hello", "--wait"]);
    assert_eq!(run["state"], "success", "{run}");
    receiver.wait_for(Duration::from_secs(30), |spans| !spans.is_empty());
    let requests = receiver.requests.lock().unwrap().clone();
    assert!(
        requests.iter().all(|r| r.starts_with("POST /v1/traces ") && r.ends_with("[Basic c3BhbnM6cHc=]")),
        "{requests:?}"
    );
}
