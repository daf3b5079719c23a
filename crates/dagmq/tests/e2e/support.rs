//! Starting the binary and running CLI commands against it.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub(crate) fn dagmq() -> Command {
    without_settings(Command::new(env!("CARGO_BIN_EXE_dagmq")))
}

/// The environment variable that makes this test binary a `dagmq` program (`app::serve`): its
/// arguments, one a line.
pub(crate) const APP_ARGS: &str = "DAGMQ_E2E_APP_ARGS";

/// `dagmq` with the tests' Rust tasks (`app.rs`) and `args`: this test binary, running only
/// `app::serve`, which reads the arguments from [`APP_ARGS`].
pub(crate) fn dagmq_with_rust_tasks(args: &[String]) -> Command {
    let mut command = without_settings(Command::new(std::env::current_exe().expect("the test binary's path")));
    command
        .args(["app::serve", "--exact", "--nocapture", "--quiet", "--test-threads=1"])
        .env(APP_ARGS, args.join("\n"));
    command
}

/// `command` without the settings a developer's environment may hold.
pub(crate) fn without_settings(mut command: Command) -> Command {
    for variable in [
        "DAGMQ_API",
        "DAGMQ_DAGS",
        "DAGMQ_API_TOKEN",
        "DAGMQ_CONFIG",
        "DAGMQ_AMQP_URL",
        "DAGMQ_REDIS_URL",
        "DAGMQ_NAMESPACE",
        "DAGMQ_AMQP_URL_FILE",
        "DAGMQ_REDIS_URL_FILE",
        "DAGMQ_API_TOKEN_FILE",
        "DAGMQ_METRICS_TOKEN",
        "DAGMQ_METRICS_TOKEN_FILE",
        "DAGMQ_TLS_CA",
        "DAGMQ_TLS_CERT",
        "DAGMQ_TLS_KEY",
        "DAGMQ_NOTIFY_WEBHOOK",
        "DAGMQ_NOTIFY_WEBHOOK_FILE",
        "DAGMQ_ALLOWED_HOST",
        "DAGMQ_ALLOWED_ORIGINS",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_SDK_DISABLED",
    ] {
        command.env_remove(variable);
    }
    command
}

/// The repository's example DAGs.
pub(crate) fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/dags")
}

/// A free loopback port.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free port for a server a test starts and may restart (a broker node, a Redis): below
/// Linux's ephemeral range (32768 and up), so no outgoing connection of any process takes it
/// between the choice and the server's listen, or while the server is down. A port from
/// [`free_port`] is in that range: a RabbitMQ node once failed to start, its distribution port
/// taken meanwhile. Ports are handed out in turn, from a start that differs by process.
pub(crate) fn server_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = FIRST + (std::process::id().wrapping_mul(97).wrapping_add(n) % COUNT);
        let port = u16::try_from(port).expect("below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + COUNT);
}

/// A `dagmq standalone` process, killed when dropped.
pub(crate) struct Standalone {
    pub child: Child,
    pub api: String,
}

impl Standalone {
    /// Starts it on a free port and waits until its API answers.
    pub(crate) fn start(dags: &Path, extra_env: &[(&str, &str)]) -> Standalone {
        Standalone::launch(dags, extra_env, &[])
    }

    /// Like `start`, with extra flags.
    pub(crate) fn start_with_args(dags: &Path, args: &[&str]) -> Standalone {
        Standalone::launch(dags, &[], args)
    }

    /// Like `start`, with its log (stderr) in `log`.
    pub(crate) fn start_logged(dags: &Path, log: &Path) -> Standalone {
        Standalone::start_logged_with(dags, log, &[])
    }

    /// Like `start_logged`, with extra flags.
    pub(crate) fn start_logged_with(dags: &Path, log: &Path, args: &[&str]) -> Standalone {
        Standalone::spawn(dags, &[], args, Stdio::from(std::fs::File::create(log).unwrap()))
    }

    /// Like `start_logged`, with extra environment variables and flags.
    pub(crate) fn start_logged_env(dags: &Path, log: &Path, extra_env: &[(&str, &str)], args: &[&str]) -> Standalone {
        Standalone::spawn(dags, extra_env, args, Stdio::from(std::fs::File::create(log).unwrap()))
    }

    /// Like `start`, with extra environment variables and flags.
    pub(crate) fn spawn_with(dags: &Path, extra_env: &[(&str, &str)], args: &[&str]) -> Standalone {
        Standalone::launch(dags, extra_env, args)
    }

    fn launch(dags: &Path, extra_env: &[(&str, &str)], args: &[&str]) -> Standalone {
        Standalone::spawn(dags, extra_env, args, Stdio::null())
    }

    fn spawn(dags: &Path, extra_env: &[(&str, &str)], args: &[&str], stderr: Stdio) -> Standalone {
        let port = free_port();
        let mut command = dagmq();
        command
            .args(["standalone", "--dags"])
            .arg(dags)
            .args(["--port", &port.to_string()])
            .args(args)
            .env("DAGMQ_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start dagmq standalone");
        let standalone = Standalone { child, api: format!("http://127.0.0.1:{port}") };
        standalone.wait_until(Duration::from_secs(30), || healthy(port));
        standalone
    }

    /// Runs a client command against this process.
    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        dagmq().args(args).env("DAGMQ_API", &self.api).output().expect("run dagmq client")
    }

    /// Runs a client command and parses its JSON output.
    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let output = self.cli(&all);
        assert!(output.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
    }

    /// Polls `condition` every 50 ms until it holds, failing after `limit`.
    pub(crate) fn wait_until(&self, limit: Duration, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !condition() {
            assert!(Instant::now() < deadline, "condition not met within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain `GET`: status code and body.
pub(crate) fn http_get(port: u16, path: &str) -> (u16, String) {
    http_request(port, &format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n"))
}

/// A `POST` of a JSON body to the API at `base` (`http://127.0.0.1:PORT`): status code and body.
pub(crate) fn http_post_json(base: &str, path: &str, body: &str) -> (u16, String) {
    let port: u16 = base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a base URL with a port");
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http_request(port, &request)
}

/// Sends one HTTP/1.0 request as written and reads the whole answer.
fn http_request(port: u16, request: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// Parses the OpenMetrics text format: `name{labels}` to value; panics on a malformed line or
/// an exposition that does not end with `# EOF`.
pub(crate) fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut values = std::collections::BTreeMap::new();
    assert!(text.ends_with("# EOF\n"), "the exposition does not end with # EOF: {text}");
    for line in text.lines() {
        if line == "# EOF" || ["# HELP ", "# TYPE ", "# UNIT "].iter().any(|p| line.starts_with(p)) {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("malformed metrics line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end].chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        values.insert(series.to_string(), value);
    }
    values
}

/// Whether `GET /healthz` answers 200.
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let mut response = String::new();
    stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.0 200")
}

/// Text of an output stream.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a `dagmq` client command against the mode under test (standalone or a cluster), so one
/// scenario checks both.
pub(crate) type Cli<'a> = &'a dyn Fn(&[&str]) -> Output;

/// A client command through `cli` with `--json`, which must succeed, parsed.
pub(crate) fn cli_json(cli: Cli, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = cli(&all);
    assert!(output.status.success(), "{args:?}: {}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A webhook receiver on loopback: answers every POST with 204 and keeps its body. Its thread
/// never blocks for long (accepts poll, reads time out), so a notification that never comes
/// fails the test that waits for it instead of hanging the suite; it stops when dropped.
pub(crate) struct WebhookReceiver {
    /// The URL to give `--notify-webhook`.
    pub url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebhookReceiver {
    pub(crate) fn start() -> WebhookReceiver {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (bodies, stop) = (bodies.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Some(body) = read_post(stream) {
                                bodies.lock().unwrap().push(body);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        WebhookReceiver { url, bodies, stop, thread: Some(thread) }
    }

    /// The bodies received so far, in order.
    pub(crate) fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    /// Waits until `count` bodies have arrived, at most `limit`; answers them.
    pub(crate) fn wait_for(&self, count: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let bodies = self.bodies();
            if bodies.len() >= count {
                return bodies;
            }
            assert!(Instant::now() < deadline, "{count} webhook POSTs expected within {limit:?}, got {bodies:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one HTTP request (10 s at most), answers 204 and returns its body; `None` for a
/// connection that sent no whole request.
fn read_post(mut stream: std::net::TcpStream) -> Option<String> {
    use std::io::{BufRead, BufReader};
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        if header == "\r\n" {
            break;
        }
        if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    stream.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").ok()?;
    Some(format!("{}\n{}", request_line.trim_end(), String::from_utf8_lossy(&body)))
}
