//! TLS to the broker, the store and HTTP peers, against real servers this test starts: a
//! RabbitMQ node of its own (own name, ports, config and data) with only a TLS listener, a
//! `redis-server` with only a TLS port, and HTTPS peers in this process. Both servers require a
//! client certificate. The certificates are made at test time with the `openssl` command.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{Cluster, required};
use crate::support::{Standalone, dagmq, free_port, parse_metrics, text};

/// Whether a program is on the PATH (or at an absolute path).
fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
}

/// Whether the TLS tests can run here: `None` skips (outside CI only).
fn tools() -> Option<()> {
    let missing: Vec<&str> =
        ["openssl", "redis-server", "rabbitmq-server"].into_iter().filter(|program| !have(program)).collect();
    if missing.is_empty() {
        return Some(());
    }
    assert!(!required(), "the TLS tests need {missing:?} (DAGMQ_REQUIRE_SERVICES=1)");
    eprintln!("skipping: {missing:?} not installed");
    None
}

/// A CA made for one test, with a server certificate for `localhost`/127.0.0.1, a client
/// certificate, and a second CA that signed none of them.
pub(crate) struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    pub(crate) fn new() -> TestCa {
        let dir = std::env::temp_dir().join(format!("dagmq-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let ca = |name: &str, subject: &str| {
            let mut args = vec!["req", "-x509", "-days", "2", "-subj", subject];
            args.extend(ec);
            let key = format!("{name}.key");
            let pem = format!("{name}.pem");
            args.extend(["-keyout", &key, "-out", &pem]);
            openssl(&dir, &args);
        };
        ca("ca", "/CN=dagmq test CA");
        ca("other-ca", "/CN=some other CA");
        for (name, subject) in [("server", "/CN=localhost"), ("client", "/CN=dagmq-client")] {
            let (key, csr, pem, ext) =
                (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
            let mut args = vec!["req", "-subj", subject, "-keyout", &key, "-out", &csr];
            args.extend(ec);
            openssl(&dir, &args);
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-days",
                    "2",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-extfile",
                    &ext,
                    "-out",
                    &pem,
                ],
            );
        }
        // The servers may run as another user (RabbitMQ's own, under root).
        Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status().unwrap();
        TestCa { dir }
    }

    pub(crate) fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The flags that trust this CA and present the client certificate.
    pub(crate) fn flags(&self) -> Vec<String> {
        vec![
            "--tls-ca".into(),
            self.file("ca.pem"),
            "--tls-cert".into(),
            self.file("client.pem"),
            "--tls-key".into(),
            self.file("client.key"),
        ]
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(output.status.success(), "openssl {args:?}: {}", text(&output.stderr));
}

/// Polls until `port` accepts a TCP connection, failing after `limit` or when `child` exits.
fn wait_for_port(port: u16, limit: Duration, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + limit;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the server exited ({status}) before listening: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "port {port} not open within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills a process group started with `process_group(0)`.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", child.id())]).status();
    let _ = child.wait();
}

/// A server this test started in a process group of its own, killed (group and all) when
/// dropped.
struct TestServer {
    port: u16,
    child: Child,
}

impl TestServer {
    /// Starts `command` with its output in `log` and waits up to `limit` for `port` to open.
    fn start(mut command: Command, port: u16, log: &Path, limit: Duration) -> TestServer {
        command.stdin(Stdio::null()).stdout(std::fs::File::create(log).unwrap()).stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        wait_for_port(port, limit, &mut child, log);
        TestServer { port, child }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// A RabbitMQ node of its own with one TLS listener that requires a client certificate.
fn start_tls_rabbit(ca: &TestCa) -> TestServer {
    let port = free_port();
    let dir = ca.dir.join(format!("rabbit-{port}"));
    std::fs::create_dir_all(dir.join("mnesia")).unwrap();
    std::fs::write(
        dir.join("rabbit.conf"),
        format!(
            "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n",
            ca.file("ca.pem"),
            ca.file("server.pem"),
            ca.file("server.key")
        ),
    )
    .unwrap();
    // The script under /usr/lib runs the node as the calling user; the one in /usr/sbin
    // switches to the rabbitmq user in a session of its own, out of reach of kill_group.
    let program = ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("rabbitmq-server");
    let log = dir.join("out.log");
    let d = |name: &str| dir.join(name).display().to_string();
    let mut command = Command::new(program);
    command
        .env("HOME", &dir)
        .env("RABBITMQ_NODENAME", format!("dagmq-tls-{port}@localhost"))
        .env("RABBITMQ_NODE_PORT", free_port().to_string())
        .env("RABBITMQ_DIST_PORT", free_port().to_string())
        .env("RABBITMQ_CONFIG_FILE", d("rabbit"))
        .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
        .env("RABBITMQ_LOG_BASE", d("log"))
        .env("RABBITMQ_LOGS", "-")
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("plugins"))
        .env("RABBITMQ_PID_FILE", d("pid"))
        .env("RABBITMQ_FEATURE_FLAGS_FILE", d("mnesia/feature_flags"));
    TestServer::start(command, port, &log, Duration::from_secs(120))
}

/// A `redis-server` with only a TLS port, requiring a client certificate.
fn start_tls_redis(ca: &TestCa) -> TestServer {
    let port = free_port();
    let log = ca.dir.join(format!("redis-{port}.log"));
    let mut command = Command::new("redis-server");
    command
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--tls-cert-file", &ca.file("server.pem"), "--tls-key-file", &ca.file("server.key")])
        .args(["--tls-ca-cert-file", &ca.file("ca.pem"), "--tls-auth-clients", "yes"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(&ca.dir);
    TestServer::start(command, port, &log, Duration::from_secs(30))
}

const FANOUT: &str = r#"
id = "fan"
[[task]]
id = "start"
command = ["true"]
[[task]]
id = "a"
command = ["true"]
after = ["start"]
[[task]]
id = "b"
command = ["true"]
after = ["start"]
[[task]]
id = "c"
command = ["true"]
after = ["start"]
[[task]]
id = "end"
command = ["true"]
after = ["a", "b", "c"]
"#;

#[test]
fn scheduler_and_two_workers_run_a_dag_over_tls_to_rabbitmq_and_redis() {
    if tools().is_none() {
        return;
    }
    let Some(mut cluster) = Cluster::new(&[("fan.toml", FANOUT)]) else { return };
    let ca = TestCa::new();
    let rabbit = start_tls_rabbit(&ca);
    let redis = start_tls_redis(&ca);
    cluster.amqp = format!("amqps://guest:guest@localhost:{}/%2f", rabbit.port);
    cluster.redis = format!("rediss://localhost:{}", redis.port);
    let flags = ca.flags();
    cluster.common_flags(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    cluster.start_scheduler();
    cluster.start_worker("tls-1");
    cluster.start_worker("tls-2");
    cluster.wait_for_workers(2);
    let run_id = cluster.trigger("fan");
    let run = cluster.wait_run(&run_id, Duration::from_secs(60));
    assert_eq!(run["state"], "success", "{run}");
    let tasks = run["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 5);
    assert!(tasks.iter().all(|t| t["state"] == "success"), "{run}");
    let logs = cluster.logs_text();
    assert!(logs.contains("connected to rabbitmq"), "{logs}");
    assert!(logs.contains(&format!("amqps://guest:***@localhost:{}", rabbit.port)), "{logs}");
    assert!(!logs.contains("guest:guest"), "no password in the logs: {logs}");
}

/// Runs `dagmq scheduler` against the given URLs, expecting it to fail at connect: its stderr.
fn scheduler_refused(amqp: &str, redis: &str, flags: &[String]) -> String {
    let output = dagmq()
        .args(["scheduler", "--amqp", amqp, "--redis", redis, "--port", &free_port().to_string()])
        .args(["--namespace", &format!("dagmq-tls-refused-{}", free_port())])
        .args(flags)
        .env("DAGMQ_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "stderr: {}", text(&output.stderr));
    text(&output.stderr)
}

/// Runs `dagmq standalone` with its store at `redis`, expecting it to fail at connect: its stderr.
fn standalone_refused(redis: &str, flags: &[String]) -> String {
    let output = dagmq()
        .args(["standalone", "--redis", redis, "--port", &free_port().to_string()])
        .args(["--namespace", &format!("dagmq-tls-refused-{}", free_port())])
        .args(flags)
        .env("DAGMQ_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "stderr: {}", text(&output.stderr));
    text(&output.stderr)
}

#[test]
fn a_certificate_that_does_not_verify_is_a_clear_error_naming_the_server() {
    if tools().is_none() {
        return;
    }
    let ca = TestCa::new();
    let rabbit = start_tls_rabbit(&ca);
    let redis = start_tls_redis(&ca);
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", rabbit.port);
    let rediss = format!("rediss://localhost:{}", redis.port);
    let mut wrong_ca = ca.flags();
    wrong_ca[1] = ca.file("other-ca.pem");

    let err = scheduler_refused(&amqps, &rediss, &wrong_ca);
    assert!(err.contains(&format!("rabbitmq amqps://guest:***@localhost:{}", rabbit.port)), "{err}");
    assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
    assert!(err.contains("--tls-ca"), "the error says what to check: {err}");
    assert!(!err.contains("guest:guest"), "no password in errors: {err}");

    // Redis refuses the same way (a standalone: its queue in memory, its store in Redis).
    let err = standalone_refused(&rediss, &wrong_ca);
    assert!(err.contains(&format!("redis rediss://localhost:{}", redis.port)), "{err}");
    assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
    // Without a client certificate, the server's refusal is named.
    let ca_only = vec!["--tls-ca".to_string(), ca.file("ca.pem")];
    let err = standalone_refused(&rediss, &ca_only);
    assert!(err.contains("CertificateRequired") || err.contains("certificate required"), "{err}");
    // TLS flags with a plain URL beside are refused before any connection, never left unused.
    let plain = dagmq()
        .args(["scheduler", "--amqp", "amqp://guest:guest@127.0.0.1:5672/%2f", "--redis", &rediss])
        .args(&ca_only)
        .output()
        .unwrap();
    assert_eq!(plain.status.code(), Some(2), "{}", text(&plain.stderr));
    assert!(text(&plain.stderr).contains("RabbitMQ URL is a plain amqp://"), "{}", text(&plain.stderr));

    // Nor is a CA quietly dropped when the system's roots are used: same refusal, never plain.
    let err = scheduler_refused(&amqps, &rediss, &[]);
    assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");

    // A file that is not a certificate is refused before any connection.
    let err = dagmq()
        .args(["scheduler", "--amqp", &amqps, "--redis", &rediss, "--tls-ca"])
        .arg(ca.file("client.key"))
        .output()
        .unwrap();
    assert_eq!(err.status.code(), Some(2));
    assert!(text(&err.stderr).contains("client.key: no PEM block \"BEGIN CERTIFICATE\""), "{}", text(&err.stderr));
}

/// What an HTTPS peer received: method, path and body of each request.
type Received = Arc<Mutex<Vec<(String, String, String)>>>;

/// An HTTPS server in this process, on a free port, with `ca`'s server certificate (or
/// `other-ca`'s when `wrong_ca`). It answers the nth request with `answers[n]` (the last one
/// repeats), or, with `upstream`, forwards every request there: a TLS proxy in front of an API.
struct HttpsPeer {
    port: u16,
    received: Received,
    _runtime: tokio::runtime::Runtime,
}

impl HttpsPeer {
    fn start(ca: &TestCa, answers: Vec<u16>, upstream: Option<u16>) -> HttpsPeer {
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(ca.dir.join("server.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(ca.dir.join("server.key")).unwrap();
        let config =
            tokio_rustls::rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Received = Arc::default();
        let log = received.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                let log = log.clone();
                let answers = answers.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let Some((head, body)) = read_request(&mut tls).await else { return };
                    let mut words = head.split_whitespace();
                    let (method, path) =
                        (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.push((method.clone(), path.clone(), String::from_utf8_lossy(&body).into_owned()));
                        log.len() - 1
                    };
                    let response = match upstream {
                        Some(port) => forward(port, &head, &body).await,
                        None => {
                            let status = answers[n.min(answers.len() - 1)];
                            format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}")
                                .into_bytes()
                        }
                    };
                    let _ = tls.write_all(&response).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        HttpsPeer { port, received, _runtime: runtime }
    }

    fn received(&self) -> Vec<(String, String, String)> {
        self.received.lock().unwrap().clone()
    }
}

/// Reads one request: its head (up to the blank line) and its `Content-Length` body.
async fn read_request(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0usize);
    let mut body = data[end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some((head, body))
}

/// Sends a request to a plain HTTP server on loopback, as a TLS-terminating proxy would (its
/// own `Host`, one request per connection), and answers the whole response.
async fn forward(port: u16, head: &str, body: &[u8]) -> Vec<u8> {
    let mut lines = head.split("\r\n");
    let mut request = format!("{}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n", lines.next().unwrap_or(""));
    for line in lines {
        let lower = line.to_ascii_lowercase();
        if !(lower.starts_with("host:") || lower.starts_with("connection:")) {
            request.push_str(line);
            request.push_str("\r\n");
        }
    }
    request.push_str("\r\n");
    let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    upstream.write_all(request.as_bytes()).await.unwrap();
    upstream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    upstream.read_to_end(&mut response).await.unwrap();
    response
}

const FAILING: &str = r#"
id = "breaks"
[[task]]
id = "boom"
command = ["false"]
alert_on_failure = true
"#;

fn dags_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dagmq-{name}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, body) in files {
        std::fs::write(dir.join(file), body).unwrap();
    }
    dir
}

fn metric(standalone: &Standalone, series: &str) -> f64 {
    let port: u16 = standalone.api.rsplit(':').next().unwrap().parse().unwrap();
    let (_, body) = crate::support::http_get(port, "/metrics");
    parse_metrics(&body).get(series).copied().unwrap_or(0.0)
}

#[test]
fn webhooks_go_over_https_with_retries_and_failures_are_counted() {
    if !have("openssl") {
        assert!(!required(), "the TLS tests need openssl");
        return;
    }
    let ca = TestCa::new();
    let dags = dags_dir("webhook", &[("breaks.toml", FAILING)]);
    // Two 503s, then a 200: three POSTs, one notification sent.
    let hook = HttpsPeer::start(&ca, vec![503, 503, 200], None);
    let url = format!("https://localhost:{}/hooks/dagmq", hook.port);
    let standalone = Standalone::start_with_args(&dags, &["--notify-webhook", &url, "--tls-ca", &ca.file("ca.pem")]);
    let run = standalone.json(&["trigger", "breaks"]);
    let run_id = run["run_id"].as_str().unwrap().to_string();
    standalone.wait_until(Duration::from_secs(30), || {
        metric(&standalone, "dagmq_notifications_total{outcome=\"sent\"}") == 1.0
    });
    let posts = hook.received();
    assert_eq!(posts.len(), 3, "{posts:?}");
    for (method, path, body) in &posts {
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/hooks/dagmq"));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (body["kind"].as_str(), body["run_id"].as_str(), body["task_id"].as_str()),
            (Some("failure"), Some(run_id.as_str()), Some("boom"))
        );
    }
    assert_eq!(metric(&standalone, "dagmq_notifications_total{outcome=\"failed\"}"), 0.0);
    drop(standalone);

    // A webhook whose certificate does not verify: nothing is sent, the failure is counted.
    let untrusted =
        Standalone::start_with_args(&dags, &["--notify-webhook", &url, "--tls-ca", &ca.file("other-ca.pem")]);
    let before = hook.received().len();
    untrusted.json(&["trigger", "breaks"]);
    untrusted.wait_until(Duration::from_secs(30), || {
        metric(&untrusted, "dagmq_notifications_total{outcome=\"failed\"}") == 1.0
    });
    assert_eq!(hook.received().len(), before, "no request reaches a server that did not verify");
    let _ = std::fs::remove_dir_all(&dags);
}

#[test]
fn the_cli_reaches_an_https_api_and_refuses_one_it_cannot_verify() {
    if !have("openssl") {
        assert!(!required(), "the TLS tests need openssl");
        return;
    }
    let ca = TestCa::new();
    let standalone = Standalone::start(&crate::support::examples(), &[]);
    let port: u16 = standalone.api.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = HttpsPeer::start(&ca, vec![], Some(port));
    let api = format!("https://localhost:{}", proxy.port);

    let output =
        dagmq().args(["trigger", "hello", "--wait", "--api", &api, "--tls-ca", &ca.file("ca.pem")]).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let output = dagmq()
        .args(["dags", "list", "--json", "--api", &api])
        .env("DAGMQ_TLS_CA", ca.file("ca.pem"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let dags: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(dags.as_array().unwrap().iter().any(|d| d["dag_id"] == "hello"), "{dags}");

    // Without the CA the handshake fails, and no request reaches the proxy.
    let before = proxy.received().len();
    let refused = dagmq().args(["dags", "list", "--api", &api]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let err = text(&refused.stderr);
    assert!(err.contains(&format!("GET {api}/api/v1/dags")) && err.contains("UnknownIssuer"), "{err}");
    assert_eq!(proxy.received().len(), before);
}
