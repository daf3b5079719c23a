//! dagmq's own secrets and the network, tried against the real binary: what a task's process
//! inherits, what `--help`, logs and errors show, who may scrape `/metrics`, what the UI's
//! headers allow, which `Host` an API without a token answers, TLS flags with cleartext URLs,
//! and what run lists carry.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Standalone, WebhookReceiver, dagmq, free_port, text};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS: &str = "redis://127.0.0.1:6379";

/// A fresh directory with the given DAG files.
fn dags_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dagmq-security-{name}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, body) in files {
        std::fs::write(dir.join(file), body).unwrap();
    }
    dir
}

/// A client command against `standalone` with its API token.
fn client(standalone: &Standalone, token: &str, args: &[&str]) -> Output {
    dagmq().args(args).env("DAGMQ_API", &standalone.api).env("DAGMQ_API_TOKEN", token).output().unwrap()
}

/// The port of a standalone's API.
fn port_of(standalone: &Standalone) -> u16 {
    standalone.api.rsplit(':').next().unwrap().parse().unwrap()
}

/// One HTTP/1.0 request with the given header lines (a `Host: 127.0.0.1` unless one is given):
/// status, head (lower case) and body.
fn request(port: u16, path: &str, headers: &[&str]) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head = format!("GET {path} HTTP/1.0\r\n");
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
        head.push_str("Host: 127.0.0.1\r\n");
    }
    for line in headers {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// A DAG whose one task prints its environment.
const ENV_DAG: &str = "id = \"envdump\"\n[[task]]\nid = \"env\"\ncommand = [\"env\"]\n";

/// Runs `envdump` in `standalone` and reads its task's log through the API.
fn task_environment(standalone: &Standalone, token: &str) -> String {
    let run = client(standalone, token, &["trigger", "envdump", "--wait", "--json"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let run: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(run["state"], "success", "{run}");
    let log = client(standalone, token, &["logs", run["run_id"].as_str().unwrap(), "env"]);
    assert!(log.status.success(), "{}", text(&log.stderr));
    text(&log.stdout)
}

#[test]
fn a_task_inherits_none_of_dagmqs_secrets() {
    let dir = dags_dir("env", &[("envdump.toml", ENV_DAG)]);
    let receiver = WebhookReceiver::start();
    let webhook = format!("{}/hook-s3cr3t", receiver.url);
    // A namespace per standalone: a killed scheduler's lease outlives it.
    let namespace = || format!("dagmq-e2e-env-{}-{}", std::process::id(), free_port());
    let leaked_names =
        ["DAGMQ_API_TOKEN", "DAGMQ_METRICS_TOKEN", "DAGMQ_AMQP_URL", "DAGMQ_REDIS_URL", "DAGMQ_NOTIFY_WEBHOOK"];

    // Every secret given directly.
    let first_namespace = namespace();
    let standalone = Standalone::start(
        &dir,
        &[
            ("DAGMQ_API_TOKEN", "api-t0ken-direct"),
            ("DAGMQ_METRICS_TOKEN", "metrics-t0ken-direct"),
            ("DAGMQ_AMQP_URL", AMQP),
            ("DAGMQ_REDIS_URL", REDIS),
            ("DAGMQ_NAMESPACE", &first_namespace),
            ("DAGMQ_NOTIFY_WEBHOOK", &webhook),
            ("DAGMQ_E2E_CANARY", "inherited"),
        ],
    );
    let environment = task_environment(&standalone, "api-t0ken-direct");
    // The task did print its environment: what is not a secret is there.
    assert!(environment.contains("DAGMQ_E2E_CANARY=inherited"), "{environment}");
    assert!(environment.contains("DAGMQ_TASK_ID=env"), "{environment}");
    assert!(environment.contains(&format!("DAGMQ_NAMESPACE={first_namespace}")), "{environment}");
    for secret in leaked_names.iter().copied().chain(["api-t0ken-direct", "metrics-t0ken-direct", AMQP, "hook-s3cr3t"])
    {
        assert!(!environment.contains(secret), "{secret} reached the task:\n{environment}");
    }
    drop(standalone);

    // Every secret in a file.
    let files = dags_dir("env-files", &[]);
    let file = |name: &str, value: &str| {
        let path = files.join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        path.display().to_string()
    };
    let (api, metrics, amqp, redis, hook) = (
        file("api", "api-t0ken-file"),
        file("metrics", "metrics-t0ken-file"),
        file("amqp", AMQP),
        file("redis", REDIS),
        file("hook", &webhook),
    );
    // The config file may hold the webhook URL: its path is kept from tasks too.
    let config = file("config.toml", "# nothing set here");
    let standalone = Standalone::start(
        &dir,
        &[
            ("DAGMQ_API_TOKEN_FILE", &api),
            ("DAGMQ_METRICS_TOKEN_FILE", &metrics),
            ("DAGMQ_AMQP_URL_FILE", &amqp),
            ("DAGMQ_REDIS_URL_FILE", &redis),
            ("DAGMQ_NOTIFY_WEBHOOK_FILE", &hook),
            ("DAGMQ_CONFIG", &config),
            ("DAGMQ_NAMESPACE", &namespace()),
        ],
    );
    let environment = task_environment(&standalone, "api-t0ken-file");
    assert!(environment.contains("DAGMQ_TASK_ID=env"), "{environment}");
    for secret in leaked_names.iter().copied().chain([files.to_str().unwrap(), "t0ken-file", "DAGMQ_CONFIG"]) {
        assert!(!environment.contains(secret), "{secret} reached the task:\n{environment}");
    }
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&files);
}

#[test]
fn help_shows_no_value_of_a_secret_setting() {
    for command in ["standalone", "scheduler", "worker"] {
        let output = dagmq()
            .args([command, "--help"])
            .env("DAGMQ_AMQP_URL", "amqp://dagmq:HelpSecretA@rabbit/%2f")
            .env("DAGMQ_REDIS_URL", "redis://:HelpSecretR@redis")
            .env("DAGMQ_NOTIFY_WEBHOOK", "https://hooks.example/HelpSecretW")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
        let help = text(&output.stdout);
        // A worker sends no notification: its help has no webhook setting.
        let names: &[&str] = if command == "worker" {
            &["DAGMQ_AMQP_URL", "DAGMQ_REDIS_URL"]
        } else {
            &["DAGMQ_AMQP_URL", "DAGMQ_REDIS_URL", "DAGMQ_NOTIFY_WEBHOOK"]
        };
        for name in names {
            assert!(help.contains(name), "{command} --help names {name}:\n{help}");
        }
        assert!(!help.contains("HelpSecret"), "{command} --help shows a secret:\n{help}");
    }
}

/// Runs `dagmq scheduler` with `args`, which must fail: its exit code and stderr.
fn scheduler_fails(args: &[&str]) -> (Option<i32>, String) {
    let mut child = dagmq()
        .args(["scheduler", "--port", &free_port().to_string()])
        .args(["--namespace", &format!("dagmq-e2e-refused-{}-{}", std::process::id(), free_port())])
        .args(args)
        .env("DAGMQ_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("dagmq scheduler {args:?} kept running; it logged:\n{}", text(&output.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (output.status.code(), text(&output.stderr))
}

#[test]
fn service_urls_are_masked_by_a_url_parser_in_errors() {
    // The broker refuses the connection: its URL, password and all, is in the error, masked.
    let (code, stderr) =
        scheduler_fails(&["--amqp", "amqp://guest:Rabbit@Pw:x@127.0.0.1:1/%2f", "--redis", "redis://127.0.0.1:1"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("amqp://guest:***@127.0.0.1:1/%2f"), "{stderr}");
    assert!(!stderr.contains("Pw"), "{stderr}");
    // The broker is reached, the store is not.
    let (code, stderr) = scheduler_fails(&["--amqp", AMQP, "--redis", "redis://:Redis@Pw@127.0.0.1:1"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("redis://:***@127.0.0.1:1"), "{stderr}");
    assert!(stderr.contains("amqp://guest:***@127.0.0.1:5672/%2f"), "the broker's URL is logged masked: {stderr}");
    assert!(!stderr.contains("Pw") && !stderr.contains("guest:guest"), "{stderr}");
}

#[test]
fn tls_flags_with_a_cleartext_url_are_refused() {
    let dir = dags_dir("tls-flags", &[]);
    let pem = dir.join("ca.pem");
    std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let ca = pem.display().to_string();
    let (code, stderr) = scheduler_fails(&["--amqp", AMQP, "--redis", "rediss://127.0.0.1:6380", "--tls-ca", &ca]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-ca") && stderr.contains("RabbitMQ URL is a plain amqp://"), "{stderr}");
    assert!(stderr.contains("use amqps://"), "{stderr}");
    let (code, stderr) = scheduler_fails(&["--amqp", AMQP, "--redis", REDIS, "--tls-ca", &ca]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) =
        scheduler_fails(&["--amqp", "amqps://guest:guest@127.0.0.1:5671/%2f", "--redis", REDIS, "--tls-ca", &ca]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("Redis URL is a plain redis://"), "{stderr}");
    // A client with TLS flags and a plain http:// API would send its token in cleartext.
    let output = dagmq()
        .args(["dags", "list", "--api", "http://127.0.0.1:9", "--tls-ca", &ca])
        .env("DAGMQ_API_TOKEN", "t0k3n-in-clear")
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--tls-ca") && stderr.contains("plain http://"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

const FAILING_DAG: &str = "id = \"bad\"\n[[task]]\nid = \"boom\"\ncommand = [\"false\"]\n";

#[test]
fn webhooks_come_from_the_environment_or_a_file_and_logs_show_only_scheme_and_host() {
    let dir = dags_dir("webhook", &[("bad.toml", FAILING_DAG)]);
    // Nothing listens there: the failed POSTs are logged, naming only the scheme and host.
    let closed = free_port();
    let webhook = format!("http://127.0.0.1:{closed}/hook/s3cr3t-path?token=t0k3n");
    let log = dir.join("dagmq.log");
    let standalone = Standalone::start_logged_with(&dir, &log, &["--notify-webhook", &webhook]);
    let run = standalone.cli(&["trigger", "bad"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    let logged = loop {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        if logged.contains("notification not delivered") {
            break logged;
        }
        assert!(Instant::now() < deadline, "no failed notification logged:\n{logged}");
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(standalone);
    assert!(logged.contains(&format!("notification webhook http://127.0.0.1:{closed}: cannot connect")), "{logged}");
    let announced = logged.lines().find(|l| l.contains("failure notifications go to a webhook")).unwrap_or_default();
    assert!(announced.ends_with(&format!("http://127.0.0.1:{closed}")), "{logged}");
    assert!(!logged.contains("s3cr3t") && !logged.contains("t0k3n"), "{logged}");

    // From the environment, and from a file: the notification arrives at the whole URL.
    for from_file in [false, true] {
        let receiver = WebhookReceiver::start();
        let url = format!("{}/s3cr3t", receiver.url);
        let hook_file = dir.join("hook-url");
        std::fs::write(&hook_file, &url).unwrap();
        let hook_file = hook_file.display().to_string();
        let env = if from_file {
            ("DAGMQ_NOTIFY_WEBHOOK_FILE", hook_file.as_str())
        } else {
            ("DAGMQ_NOTIFY_WEBHOOK", url.as_str())
        };
        let standalone = Standalone::start(&dir, &[env]);
        let run = standalone.json(&["trigger", "bad"]);
        let bodies = receiver.wait_for(1, Duration::from_secs(30));
        let (request_line, body) = bodies[0].split_once('\n').unwrap();
        assert_eq!(request_line, "POST /hook/s3cr3t HTTP/1.1", "from a file: {from_file}");
        let notification: Value = serde_json::from_str(body).unwrap();
        assert_eq!(notification["run_id"], run["run_id"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_need_the_api_token_when_no_metrics_token_is_set() {
    let dir = dags_dir("metrics", &[("envdump.toml", ENV_DAG)]);
    let worker_port = free_port();
    let standalone = Standalone::spawn_with(
        &dir,
        &[("DAGMQ_API_TOKEN", "api-t0ken")],
        &["--bind", "0.0.0.0", "--metrics-port", &worker_port.to_string()],
    );
    for port in [port_of(&standalone), worker_port] {
        assert_eq!(request(port, "/metrics", &[]).0, 401, "port {port}");
        assert_eq!(request(port, "/metrics", &["Authorization: Bearer wrong"]).0, 401, "port {port}");
        let (status, _, body) = request(port, "/metrics", &["Authorization: Bearer api-t0ken"]);
        assert_eq!(status, 200, "port {port}: {body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
    drop(standalone);

    // A metrics token of its own: that one, and only that one, scrapes.
    let worker_port = free_port();
    let standalone = Standalone::spawn_with(
        &dir,
        &[("DAGMQ_API_TOKEN", "api-t0ken"), ("DAGMQ_METRICS_TOKEN", "m3trics")],
        &["--metrics-port", &worker_port.to_string()],
    );
    for port in [port_of(&standalone), worker_port] {
        assert_eq!(request(port, "/metrics", &[]).0, 401, "port {port}");
        assert_eq!(request(port, "/metrics", &["Authorization: Bearer api-t0ken"]).0, 401, "port {port}");
        assert_eq!(request(port, "/metrics", &["Authorization: Bearer m3trics"]).0, 200, "port {port}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_ui_forbids_framing_and_inline_scripts() {
    let standalone = Standalone::start(&crate::support::examples(), &[]);
    let port = port_of(&standalone);
    let (status, head, page) = request(port, "/", &[]);
    assert_eq!(status, 200);
    assert!(head.contains("\r\nx-frame-options: deny"), "{head}");
    let policy = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .unwrap_or_else(|| panic!("no content-security-policy: {head}"));
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    let scripts = policy.split(';').map(str::trim).find(|d| d.starts_with("script-src")).unwrap();
    assert_eq!(scripts, "script-src 'self'");
    // The page's script is a file of its own; no element carries a handler.
    assert!(page.contains("<script src=\"/ui/app.js\"></script>"), "{page}");
    assert_eq!(page.matches("<script").count(), 1, "{page}");
    let (status, head, script) = request(port, "/ui/app.js", &[]);
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    for text in [&page, &script] {
        let lower = text.to_ascii_lowercase();
        for handler in [" onclick=", " onchange=", " onsubmit=", " oninput=", " onload=", "javascript:"] {
            assert!(!lower.contains(handler), "{handler} in the UI");
        }
    }
    // Every answer, the API's and refusals too, forbids framing.
    let (status, head, _) = request(port, "/api/v1/dags", &[]);
    assert_eq!(status, 200);
    assert!(head.contains("\r\nx-frame-options: deny"), "{head}");
    let (status, head, _) = request(port, "/", &["Host: rebound.example"]);
    assert_eq!(status, 403);
    assert!(head.contains("\r\nx-frame-options: deny"), "{head}");
}

#[test]
fn insecure_on_every_address_keeps_the_host_check() {
    let dir = dags_dir("hosts", &[("envdump.toml", ENV_DAG)]);
    let standalone = Standalone::start_with_args(&dir, &["--bind", "0.0.0.0", "--insecure"]);
    let port = port_of(&standalone);
    let host = |name: &str| request(port, "/api/v1/dags", &[&format!("Host: {name}")]).0;
    assert_eq!(host("evil.example"), 403, "a rebound name");
    assert_eq!(host(&format!("evil.example:{port}")), 403, "a rebound name with the port");
    assert_eq!(host(&format!("127.0.0.1:{port}")), 200);
    assert_eq!(host(&format!("localhost:{port}")), 200);
    assert_eq!(host(&format!("10.1.2.3:{port}")), 200, "an IP address is never rebound");
    assert_eq!(host(&format!("[fe80::1]:{port}")), 200);
    drop(standalone);

    // Names of the API's own: by flag and by environment.
    let standalone =
        Standalone::start_with_args(&dir, &["--bind", "0.0.0.0", "--insecure", "--allowed-host", "evil.example"]);
    let port = port_of(&standalone);
    let host = |name: &str| request(port, "/api/v1/dags", &[&format!("Host: {name}")]).0;
    assert_eq!(host("evil.example"), 200);
    assert_eq!(host(&format!("evil.example:{port}")), 200);
    assert_eq!(host("other.example"), 403);
    drop(standalone);
    let standalone = Standalone::spawn_with(
        &dir,
        &[("DAGMQ_ALLOWED_HOST", "dagmq.example,ops.example:9191")],
        &["--bind", "0.0.0.0", "--insecure"],
    );
    let port = port_of(&standalone);
    let host = |name: &str| request(port, "/api/v1/dags", &[&format!("Host: {name}")]).0;
    assert_eq!(host("dagmq.example"), 200);
    assert_eq!(host("ops.example:9191"), 200);
    assert_eq!(host("evil.example"), 403);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_lists_leave_params_out_and_the_run_has_them() {
    let dir = dags_dir("lists", &[("envdump.toml", ENV_DAG)]);
    let standalone = Standalone::start(&dir, &[]);
    let big = "x".repeat(60_000);
    let run = standalone.json(&["trigger", "envdump", "--param", &format!("big={big}"), "--wait"]);
    let run_id = run["run_id"].as_str().unwrap();
    assert_eq!(run["params"]["big"].as_str().map(str::len), Some(60_000), "the run has its params");
    let port = port_of(&standalone);
    for path in ["/api/v1/runs?limit=500", "/api/v1/runs?dag_id=envdump"] {
        let (status, _, body) = request(port, path, &[]);
        assert_eq!(status, 200);
        assert!(body.len() < 10_000, "{path}: {} bytes", body.len());
        let runs: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(runs[0]["run_id"], run_id);
        assert!(runs[0].get("params").is_none(), "{path}: {body}");
        assert_eq!(runs[0]["task_counts"]["success"], 1);
    }
    let listed = standalone.json(&["runs", "list"]);
    assert!(listed[0].get("params").is_none(), "{listed}");
    let shown = standalone.json(&["runs", "show", run_id]);
    assert_eq!(shown["params"]["big"].as_str().map(str::len), Some(60_000));
    let _ = std::fs::remove_dir_all(&dir);
}
