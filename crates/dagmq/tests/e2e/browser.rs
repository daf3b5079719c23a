//! The web UI in headless Chromium, driven over WebDriver (Debian's chromium and
//! chromium-driver): trigger a DAG from the page, watch its run succeed, open its graph and a
//! task's log, pause a DAG. Screenshots of each view go to `target/ui-screenshots/`, and a
//! failing test leaves one of the page it was on there as `failed-<test>.png`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Standalone, examples, free_port, text};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    shots: PathBuf,
}

/// Where a browser dropped while its thread panics keeps a screenshot of the page it showed:
/// `target/ui-screenshots/failed-<thread name>.png`, the thread name being the test's path.
fn failure_shot(shots: &std::path::Path) -> PathBuf {
    let name: String = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    shots.join(format!("failed-{name}.png"))
}

fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    // chromedriver keeps the connection open: read the head, then exactly Content-Length bytes.
    let mut raw = Vec::new();
    let mut buffer = [0u8; 65536];
    let (head_end, length) = loop {
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "chromedriver closed the connection");
        raw.extend_from_slice(&buffer[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while raw.len() < head_end + length {
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "chromedriver closed the connection mid-body");
        raw.extend_from_slice(&buffer[..n]);
    }
    serde_json::from_slice(&raw[head_end..head_end + length]).unwrap_or(Value::Null)
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `None` (outside CI) when they are missing.
    fn start() -> Option<Browser> {
        Browser::start_with(&[])
    }

    /// Like `start`, with extra Chromium flags.
    fn start_with(extra_args: &[&str]) -> Option<Browser> {
        let (chromium, chromedriver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
        if !(std::path::Path::new(chromium).exists() && std::path::Path::new(chromedriver).exists()) {
            assert!(
                !crate::cluster::required(),
                "chromium and chromium-driver are required (DAGMQ_REQUIRE_SERVICES or CI is set)"
            );
            eprintln!("skipping: chromium or chromedriver missing (apt-get install chromium chromium-driver)");
            return None;
        }
        let port = free_port();
        // The viewer's timezone is UTC whatever the machine's, so that tests can tell it from a
        // DAG's.
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .env("TZ", "UTC")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || http(port, "GET", "/status", None)["value"]["ready"] != true
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = std::env::temp_dir().join(format!("dagmq-chromium-{}", port));
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,800",
        ]
        .into_iter()
        .chain(extra_args.iter().copied())
        .map(str::to_string)
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": args
        }}}});
        let created = http(port, "POST", "/session", Some(&capabilities));
        let session =
            created["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
        let shots = target.join("ui-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Some(Browser { driver, port, session, shots })
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let answer = http(self.port, method, &format!("/session/{}{path}", self.session), body.as_ref());
        assert!(answer["value"]["error"].is_null(), "webdriver {method} {path}: {answer}");
        answer["value"].clone()
    }

    fn open(&self, url: &str) {
        self.command("POST", "/url", Some(json!({"url": url})));
    }

    fn script(&self, script: &str) -> Value {
        self.command("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// Waits until the script returns `expected`, failing with what it returned last.
    fn wait_for(&self, script: &str, expected: Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.script(script);
            if got == expected {
                return;
            }
            assert!(Instant::now() < deadline, "{script} returned {got}, expected {expected}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the element matching `selector` with a real WebDriver click. The page renders
    /// itself again every few seconds, so an element found just before a render is stale by
    /// the click: find it again then.
    fn click(&self, selector: &str) {
        for _ in 0..5 {
            self.wait_for(&format!("return document.querySelector('{selector}') !== null"), json!(true));
            let element = self.command("POST", "/element", Some(json!({"using": "css selector", "value": selector})));
            let id = element[ELEMENT].as_str().unwrap().to_string();
            let path = format!("/session/{}/element/{id}/click", self.session);
            let answer = http(self.port, "POST", &path, Some(&json!({})));
            match answer["value"]["error"].as_str() {
                None => return,
                Some("stale element reference") => continue,
                Some(_) => panic!("webdriver click {selector}: {answer}"),
            }
        }
        panic!("{selector} went stale five times in a row");
    }

    fn screenshot(&self, name: &str) {
        let data = self.command("GET", "/screenshot", None);
        let png = base64_decode(data.as_str().unwrap());
        assert_eq!(&png[1..4], b"PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// Writes the screenshot of a failing test without asserting anything: it runs while the
    /// thread unwinds, where a second panic would abort the whole test binary.
    fn keep_failure_shot(&self) {
        let path = failure_shot(&self.shots);
        let kept = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let answer = http(self.port, "GET", &format!("/session/{}/screenshot", self.session), None);
            let png = base64_decode(answer["value"].as_str()?);
            png.starts_with(b"\x89PNG").then(|| std::fs::write(&path, png).ok())?
        }));
        match kept {
            Ok(Some(())) => eprintln!("screenshot of the failing page: {}", path.display()),
            _ => eprintln!("no screenshot of the failing page could be taken"),
        }
    }

    /// Waits for the page's `confirm` (or `alert`) and accepts it; answers its text.
    fn accept_dialog(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = http(self.port, "GET", &format!("/session/{}/alert/text", self.session), None);
            if let Some(text) = answer["value"].as_str() {
                self.command("POST", "/alert/accept", Some(json!({})));
                return text.to_string();
            }
            assert!(Instant::now() < deadline, "no dialog within 30 s: {answer}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resize(&self, width: u32, height: u32) {
        self.command("POST", "/window/rect", Some(json!({"width": width, "height": height})));
    }
}

impl Drop for Browser {
    /// Ends the session and the driver; a failing test first keeps a screenshot of the page it
    /// was on (`failure_shot`), so a CI failure shows what the reader would have seen.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep_failure_shot();
        }
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => 0,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().take_while(|&&c| c != b'=').count();
        let bits = chunk.iter().take(n).fold(0u32, |acc, &c| (acc << 6) | u32::from(value(c))) << (6 * (4 - n));
        out.extend_from_slice(&bits.to_be_bytes()[1..n.max(1)]);
    }
    out
}

#[test]
fn the_ui_triggers_a_run_shows_its_graph_and_log_and_pauses_a_dag() {
    let Some(browser) = Browser::start() else { return };
    let standalone = Standalone::start(&examples(), &[]);
    let base = standalone.api.clone();

    // A page of another site that frames the UI (to steer a click onto a button under a decoy)
    // gets an empty frame: the UI's answer forbids framing.
    let framing = serve_page(format!(
        "<!doctype html><iframe id=\"ui\" src=\"{base}/#/dags\" onload=\"window.loaded = true\"></iframe>"
    ));
    browser.open(&format!("http://127.0.0.1:{framing}/"));
    browser.wait_for("return window.loaded === true", json!(true));
    let frame = browser.command("POST", "/element", Some(json!({"using": "css selector", "value": "#ui"})));
    browser.command("POST", "/frame", Some(json!({"id": frame})));
    assert_eq!(browser.script("return document.querySelectorAll('[data-nav]').length"), json!(0), "the UI was framed");
    browser.command("POST", "/frame/parent", Some(json!({})));

    browser.open(&format!("{base}/#/dags"));
    browser.wait_for("return document.querySelectorAll('tr[data-dag]').length", json!(8));
    browser.screenshot("dags");
    // The page's policy is in force; every violation of it from here on is recorded (a button
    // with an inline handler would be one, and would do nothing).
    browser.script(
        "window.violations = []; document.addEventListener('securitypolicyviolation', \
         e => window.violations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`)); \
         return null",
    );

    // Trigger from the page: the page moves to the new run, which reaches success.
    browser.click("[data-test=\"trigger-hello\"]");
    browser.wait_for("return location.hash.startsWith('#/runs/hello--manual--')", json!(true));
    browser.wait_for("return document.querySelector('h2 .state')?.dataset.state ?? null", json!("success"));
    browser.wait_for("return document.querySelectorAll('[data-test=graph] [data-node]').length", json!(3));
    browser.wait_for(
        "return [...document.querySelectorAll('[data-node]')].map(n => n.dataset.state).join(',')",
        json!("success,success,success"),
    );
    assert_eq!(browser.script("return window.violations"), json!([]), "the page broke its own policy");
    browser.screenshot("run");
    // Every task succeeded: nothing to restart, and the button says so rather than answer 409.
    assert_eq!(
        browser.script("const b = document.querySelector('[data-test=restart]'); return [b.disabled, b.title]"),
        json!([true, "every task succeeded: nothing to restart (clear a task to run it again)"])
    );

    // A branch's skipped path, in its colour.
    let hello_page = browser.script("return location.href").as_str().unwrap().to_string();
    let branch = standalone.cli(&["trigger", "branch", "--wait"]);
    assert!(branch.status.success(), "{}", String::from_utf8_lossy(&branch.stderr));
    let branch_id = text(&branch.stdout).split_whitespace().next().unwrap().to_string();
    browser.open(&format!("{base}/#/runs/{branch_id}"));
    browser.wait_for(
        "return [...document.querySelectorAll('[data-node]')].filter(n => n.dataset.state === 'skipped').length",
        json!(2),
    );
    browser.wait_for(
        "const b = document.querySelector('tr[data-task=\"bulk_load\"] .state'); \
         return b ? getComputedStyle(b).backgroundColor : null",
        json!("rgb(224, 123, 181)"),
    );
    browser.screenshot("branch-skipped");
    // Skipped tasks are not restarted either.
    assert_eq!(browser.script("return document.querySelector('[data-test=restart]').disabled"), json!(true));
    browser.open(&hello_page);
    browser.wait_for("return document.querySelectorAll('[data-test=graph] [data-node]').length", json!(3));

    // A task's log.
    browser.click("tr[data-task=\"greet\"] a");
    browser.wait_for(
        "return (document.querySelector('[data-test=log]')?.textContent ?? '').startsWith('hello from greet')",
        json!(true),
    );
    browser.screenshot("task-log");

    // Clear the task with what follows it (once confirmed): they run again as try 2.
    let hello_id = hello_page.rsplit('/').next().unwrap().to_string();
    browser.click("[data-test=clear]");
    assert_eq!(browser.accept_dialog(), format!("Run greet and every task after it again, in run {hello_id}?"));
    browser.wait_for(&format!("return location.hash === '#/runs/{hello_id}'"), json!(true));
    standalone.wait_until(Duration::from_secs(30), || {
        let run = standalone.json(&["runs", "show", &hello_id]);
        run["state"] == "success" && run["tasks"].as_array().unwrap().iter().all(|t| t["try_number"] == 2)
    });
    browser.wait_for("return document.querySelector('h2 .state')?.dataset.state ?? null", json!("success"));

    // A run's timeline: the flaky task of diamond_retry has a bar per try, the failed one and
    // then, after the retry delay, the successful one; durations have units.
    let diamond = standalone.json(&["trigger", "diamond_retry", "--wait"]);
    let diamond_id = diamond["run_id"].as_str().unwrap();
    browser.open(&format!("{base}/#/runs/{diamond_id}"));
    browser.wait_for(
        "return [...document.querySelectorAll('[data-test=gantt] rect[data-try^=\"flaky:\"]')].map(r => r.dataset.outcome).join(',')",
        json!("up_for_retry,success"),
    );
    let gap = browser.script(
        "const [a, b] = [...document.querySelectorAll('[data-test=gantt] rect[data-try^=\"flaky:\"]')]; \
         return b.x.baseVal.value - (a.x.baseVal.value + a.width.baseVal.value)",
    );
    assert!(gap.as_f64().unwrap() > 1.0, "the retry delay shows as a gap: {gap}");
    assert_eq!(browser.script("return document.querySelectorAll('[data-test=gantt] rect[data-try]').length"), json!(5));
    let took = browser.script("return document.querySelector('tr[data-task=\"left\"] td:nth-child(5)').textContent");
    assert!(took.as_str().unwrap().ends_with(" ms") || took.as_str().unwrap().ends_with(" s"), "{took}");
    browser.screenshot("gantt");

    // The DAG page: graph, schedule, and the grid of its latest runs by task, each cell a link;
    // the run durations as a chart.
    browser.open(&format!("{base}/#/dags"));
    browser.click("tr[data-dag=\"diamond_retry\"] [data-test=dag-link]");
    browser.wait_for("return document.querySelectorAll('[data-test=grid] tr[data-grid-task]').length", json!(4));
    browser.wait_for("return document.querySelectorAll('[data-test=dag-graph] [data-node]').length", json!(4));
    browser.wait_for("return document.querySelectorAll('[data-test=durations] rect[data-bar]').length", json!(1));
    assert_eq!(
        browser.script("return document.querySelector('tr[data-grid-task=\"flaky\"] a[data-cell]').dataset.cell"),
        json!("success")
    );
    browser.screenshot("dag");
    browser.click("tr[data-grid-task=\"flaky\"] a[data-cell]");
    browser.wait_for("return location.hash.endsWith('/tasks/flaky')", json!(true));

    // The stats page: tasks finished per minute over the last hour.
    browser.open(&format!("{base}/#/stats"));
    browser.wait_for("return document.querySelectorAll('[data-test=throughput] rect[data-bar]').length", json!(60));
    let finished = browser.script(
        "return [...document.querySelectorAll('[data-test=throughput] rect[data-bar]')].reduce((n, r) => n + Number(r.textContent.split(' ')[0]), 0)",
    );
    assert!(finished.as_f64().unwrap() >= 8.0, "hello and diamond_retry's tasks: {finished}");

    // Pause a DAG from the page; the API agrees.
    browser.open(&format!("{base}/#/dags"));
    browser.click("[data-test=\"pause-every_10s\"]");
    browser.wait_for("return document.querySelector('[data-test=\"paused-every_10s\"]')?.textContent", json!("paused"));
    // The runs page's filters (change listeners) narrow the list.
    browser.open(&format!("{base}/#/runs"));
    browser.wait_for("return document.querySelectorAll('tr[data-run]').length > 1", json!(true));
    browser.script(
        "window.violations = []; document.addEventListener('securitypolicyviolation', \
         e => window.violations.push(e.violatedDirective)); const s = document.getElementById('f-dag'); \
         s.value = 'branch'; s.dispatchEvent(new Event('change', {bubbles: true})); return null",
    );
    browser.wait_for("return location.hash", json!("#/runs?dag=branch&state="));
    browser.wait_for(
        "return [...document.querySelectorAll('tr[data-run] td:nth-child(2)')].map(t => t.textContent).join(',')",
        json!("branch"),
    );
    assert_eq!(browser.script("return window.violations"), json!([]));
    let dags = standalone.json(&["dags", "list"]);
    let every = dags.as_array().unwrap().iter().find(|d| d["dag_id"] == "every_10s").unwrap();
    assert_eq!(every["paused"], true);

    for (view, name) in [("#/runs", "runs"), ("#/workers", "workers"), ("#/stats", "stats")] {
        browser.open(&format!("{base}/{view}"));
        browser.wait_for(
            "return document.querySelector('main h2')?.textContent ?? ''",
            json!(name[..1].to_uppercase() + &name[1..]),
        );
        if name == "runs" {
            browser.wait_for("return document.querySelectorAll('tr[data-run]').length > 0", json!(true));
        }
        browser.screenshot(name);
    }

    // Phone width: the page still lays out (no horizontal overflow of the page itself).
    browser.resize(390, 844);
    browser.open(&format!("{base}/#/dags"));
    browser.wait_for("return document.querySelectorAll('tr[data-dag]').length", json!(8));
    browser.wait_for("return document.documentElement.scrollWidth <= window.innerWidth + 1", json!(true));
    browser.screenshot("dags-phone");
}

/// Serves `page` to every request on a free port of 127.0.0.1 (another origin than the API's).
fn serve_page(page: String) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buffer = [0u8; 8192];
            let _ = stream.read(&mut buffer);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                page.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(page.as_bytes());
        }
    });
    port
}

const TARGETS: &str = r#"
id = "quick"
[[task]]
id = "say"
command = ["sh", "-c", "echo '{\"said\": \"hi\"}' > \"$DAGMQ_OUTPUT\""]
"#;

const SLOW_DAG: &str = r#"
id = "slow"
[[task]]
id = "wait"
command = ["sleep", "120"]
"#;

const BROKEN: &str = r#"
id = "broken"
[[task]]
id = "boom"
command = ["false"]
"#;

/// What a hostile page tries: a `text/plain` trigger and a JSON one, cancel, restart and pause
/// without a body, a cancel by form, and reading the API. Each outcome lands in `window.results`.
const HOSTILE: &str = r#"<!doctype html><html><body>
<form id="form" method="POST" enctype="text/plain" action="API/api/v1/runs/SLOW/cancel" target="sink">
<input name='{"x":"' value='"}'></form><iframe name="sink"></iframe>
<script>
const api = "API";
window.results = {};
async function attempt(name, request) {
  try { const r = await request(); window.results[name] = r.type + " " + r.status; }
  catch (e) { window.results[name] = "blocked"; }
}
(async () => {
  await attempt("trigger_text", () => fetch(api + "/api/v1/dags/quick/runs",
    {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: '{"params":{}}'}));
  await attempt("trigger_json", () => fetch(api + "/api/v1/dags/quick/runs",
    {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"}));
  await attempt("cancel", () => fetch(api + "/api/v1/runs/SLOW/cancel", {method: "POST", mode: "no-cors"}));
  await attempt("restart", () => fetch(api + "/api/v1/runs/BROKEN/restart", {method: "POST", mode: "no-cors"}));
  await attempt("pause", () => fetch(api + "/api/v1/dags/quick/pause", {method: "POST", mode: "no-cors"}));
  await attempt("read", () => fetch(api + "/api/v1/dags"));
  document.getElementById("form").submit();
  window.done = true;
})();
</script></body></html>"#;

#[test]
fn pages_of_other_origins_cannot_command_the_api_but_the_ui_can() {
    let Some(browser) = Browser::start_with(&["--host-resolver-rules=MAP rebound.test 127.0.0.1"]) else { return };
    let dir = std::env::temp_dir().join(format!("dagmq-hostile-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, body) in [("quick.toml", TARGETS), ("slow.toml", SLOW_DAG), ("broken.toml", BROKEN)] {
        std::fs::write(dir.join(name), body).unwrap();
    }
    let log = dir.join("dagmq.log");
    let standalone = Standalone::start_logged(&dir, &log);
    let base = standalone.api.clone();
    let run_of = |dag: &str| standalone.json(&["trigger", dag])["run_id"].as_str().unwrap().to_string();
    let state_of = |run: &str| standalone.json(&["runs", "show", run])["state"].as_str().unwrap().to_string();
    let slow = run_of("slow");
    let broken = run_of("broken");
    standalone.wait_until(Duration::from_secs(30), || state_of(&broken) == "failed" && state_of(&slow) == "running");

    // A page of another origin (another port of 127.0.0.1) tries everything.
    let page = HOSTILE.replace("API", &base).replace("SLOW", &slow).replace("BROKEN", &broken);
    let hostile = serve_page(page);
    browser.open(&format!("http://127.0.0.1:{hostile}/"));
    browser.wait_for("return window.done === true", json!(true));
    let results = browser.script("return window.results");
    // The JSON trigger and the read need a CORS grant, which the API never gives; the others are
    // sent (opaque answers) and refused by the server.
    assert_eq!(results["trigger_json"], "blocked", "{results}");
    assert_eq!(results["read"], "blocked", "{results}");
    for name in ["trigger_text", "cancel", "restart", "pause"] {
        assert_eq!(results[name], "opaque 0", "{name}: {results}");
    }
    // They reached the API and were refused: five POSTs with a foreign Origin (the four fetches
    // and the form), all logged.
    standalone.wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).unwrap_or_default().matches("refused a cross-site request: origin").count() >= 5
    });
    // Nothing happened.
    assert_eq!(state_of(&slow), "running");
    assert_eq!(state_of(&broken), "failed");
    assert_eq!(standalone.json(&["runs", "list", "--dag", "quick"]), json!([]));
    let dags = standalone.json(&["dags", "list"]);
    assert_eq!(dags.as_array().unwrap().iter().find(|d| d["dag_id"] == "quick").unwrap()["paused"], false);

    // DNS rebinding: a name of the attacker's that resolves to 127.0.0.1 is the page's own origin,
    // so its requests carry no foreign Origin; the Host check refuses them, page and API alike.
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    browser.open(&format!("http://rebound.test:{port}/"));
    browser.wait_for("return document.body.textContent.includes('is not this API')", json!(true));
    browser.script(
        "window.rebound = null; fetch('/api/v1/dags/quick/runs', {method: 'POST', headers: {'Content-Type': \
         'application/json'}, body: '{}'}).then(r => { window.rebound = r.status; }); return null",
    );
    browser.wait_for("return window.rebound", json!(403));
    assert_eq!(standalone.json(&["runs", "list", "--dag", "quick"]), json!([]));

    // The UI itself triggers, cancels and restarts.
    browser.open(&format!("{base}/#/dags"));
    browser.click("[data-test=\"trigger-quick\"]");
    browser.wait_for("return document.querySelector('h2 .state')?.dataset.state ?? null", json!("success"));
    // The run page shows the task's output.
    browser.wait_for(
        "return document.querySelector('tr[data-task=\"say\"] [data-test=output]')?.textContent ?? null",
        json!("{\"said\":\"hi\"}"),
    );
    // Suspend and resume from the run page: the task's try stops and shows `suspended` in its
    // colour, and resuming starts a new try.
    browser.open(&format!("{base}/#/runs/{slow}"));
    browser.click("[data-test=\"suspend\"]");
    browser.wait_for("return document.querySelector('h2 .state')?.dataset.state ?? null", json!("suspended"));
    browser.wait_for(
        "const b = document.querySelector('tr[data-task] .state'); \
         return b ? [b.dataset.state, getComputedStyle(b).backgroundColor] : null",
        json!(["suspended", "rgb(184, 134, 11)"]),
    );
    browser.wait_for("return document.querySelector('[data-test=resume]').disabled", json!(false));
    browser.screenshot("suspended");
    assert_eq!(state_of(&slow), "suspended");
    browser.click("[data-test=\"resume\"]");
    browser.wait_for("return document.querySelector('h2 .state')?.dataset.state ?? null", json!("running"));
    standalone.wait_until(Duration::from_secs(30), || {
        let run = standalone.json(&["runs", "show", &slow]);
        run["tasks"][0]["try_number"] == 2 && run["tasks"][0]["state"] == "running"
    });
    browser.click("[data-test=\"cancel\"]");
    browser.wait_for("return document.querySelector('h2 .state')?.dataset.state ?? null", json!("cancelled"));
    assert_eq!(state_of(&slow), "cancelled");
    browser.open(&format!("{base}/#/runs/{broken}"));
    browser.click("[data-test=\"restart\"]");
    standalone.wait_until(Duration::from_secs(30), || {
        let run = standalone.json(&["runs", "show", &broken]);
        run["tasks"][0]["try_number"] == 2 && run["state"] == "failed"
    });
    browser.screenshot("restarted");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_dag_page_builds_its_trigger_form_from_the_params_schema() {
    let Some(browser) = Browser::start() else { return };
    let standalone = Standalone::start(&examples(), &[]);
    let base = standalone.api.clone();

    // A field per param, with its type, default and allowed values.
    browser.open(&format!("{base}/#/dags/params"));
    browser.wait_for("return document.querySelectorAll('#trigger-form [data-param]').length", json!(4));
    browser.wait_for("return document.querySelector('[data-param=date]').type", json!("date"));
    browser.wait_for("return document.querySelector('[data-param=limit]').type", json!("number"));
    browser.wait_for(
        "return [...document.querySelectorAll('select[data-param=mode] option')].map(o => o.value).join(',')",
        json!(",full,incremental"),
    );
    browser.wait_for(
        "return document.querySelector('[data-test=\"param-mode\"]').textContent.includes('default incremental')",
        json!(true),
    );
    browser.wait_for("return document.querySelector('[data-param=who]').placeholder", json!("world"));
    browser.wait_for("return document.querySelector('#trigger-json')", json!(null));
    browser.screenshot("trigger-form");

    // What is typed survives the page's refreshes; empty fields get the defaults.
    browser.script(
        "document.querySelector('[data-param=date]').value = '2026-11-22'; \
         document.querySelector('[data-param=mode]').value = 'full'; \
         document.querySelector('[data-param=limit]').value = '7'; \
         document.querySelector('[data-param=who]').value = 'x; touch PWNED #'; return null",
    );
    let updated = browser.script("return document.getElementById('updated').textContent");
    browser.wait_for(&format!("return document.getElementById('updated').textContent !== {updated}"), json!(true));
    browser.wait_for("return document.querySelector('[data-param=limit]').value", json!("7"));
    browser.click("[data-test=\"trigger-submit\"]");
    browser.wait_for("return location.hash.startsWith('#/runs/params--manual--')", json!(true));
    browser.wait_for("return document.querySelector('h2 .state')?.dataset.state ?? null", json!("success"));
    let run_id = browser.script("return decodeURIComponent(location.hash.slice(7))").as_str().unwrap().to_string();
    let run = standalone.json(&["runs", "show", &run_id]);
    assert_eq!(
        run["params"],
        json!({"date": "2026-11-22", "mode": "full", "limit": 7, "who": "x; touch PWNED #"}),
        "typed values as JSON types, the defaults for the rest"
    );

    // A DAG without a schema gets the JSON box.
    browser.open(&format!("{base}/#/dags/hello"));
    browser.wait_for("return document.querySelector('#trigger-json') !== null", json!(true));
    browser.script("document.querySelector('#trigger-json').value = '{\"anything\": [1]}'; return null");
    browser.click("[data-test=\"trigger-submit\"]");
    browser.wait_for("return location.hash.startsWith('#/runs/hello--manual--')", json!(true));
    let run_id = browser.script("return decodeURIComponent(location.hash.slice(7))").as_str().unwrap().to_string();
    assert_eq!(standalone.json(&["runs", "show", &run_id])["params"], json!({"anything": [1]}));

    // A refused trigger shows the scheduler's reason.
    browser.open(&format!("{base}/#/dags/params"));
    browser.wait_for("return document.querySelectorAll('#trigger-form [data-param]').length", json!(4));
    browser.script("document.querySelector('[data-param=limit]').value = '2.5'; return null");
    browser.click("[data-test=\"trigger-submit\"]");
    let reason = json!("dag \"params\": param \"limit\": expected an integer, got 2.5");
    browser.wait_for("return document.getElementById('banner').textContent", reason.clone());
    // The reason stays through the page's refreshes (it used to go with the next one, 1.5 s
    // later, or at once when a refresh begun before the click ended after it), and goes with
    // the next attempt.
    let updated = browser.script("return document.getElementById('updated').textContent");
    browser.wait_for(&format!("return document.getElementById('updated').textContent !== {updated}"), json!(true));
    assert_eq!(browser.script("return document.getElementById('banner').textContent"), reason);
    browser.script("document.querySelector('[data-param=limit]').value = '3'; return null");
    browser.click("[data-test=\"trigger-submit\"]");
    browser.wait_for("return location.hash.startsWith('#/runs/params--manual--')", json!(true));
    browser.wait_for("return document.getElementById('banner').textContent", json!(""));
}

/// Contrast of each state badge's and graph node's text on its colour, as WCAG computes it,
/// for every state: `STATE badge|node RATIO` for those under `min`.
const CONTRAST_SCRIPT: &str = r#"
const rgb = c => c.match(/[\d.]+/g).slice(0, 3).map(Number);
const lum = c => { const [r, g, b] = rgb(c).map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
const area = document.createElement("div");
area.id = "contrast-check";
area.innerHTML = STATES.map(badge).join(" ") + graph(STATES.map(s => ({task_id: s, state: s, after: []})), "");
document.body.appendChild(area);
const low = [];
for (const b of area.querySelectorAll(".state")) {
  const r = ratio(getComputedStyle(b).color, getComputedStyle(b).backgroundColor);
  if (r < arguments[0]) low.push(`${b.dataset.state} badge ${r.toFixed(2)}`);
}
for (const n of area.querySelectorAll("[data-node]")) {
  const r = ratio(getComputedStyle(n.querySelector("text")).fill, getComputedStyle(n.querySelector("rect")).fill);
  if (r < arguments[0]) low.push(`${n.dataset.state} node ${r.toFixed(2)}`);
}
const counted = area.querySelectorAll(".state").length + area.querySelectorAll("[data-node]").length;
area.remove();
return {counted, low};
"#;

#[test]
fn a_failing_browser_test_keeps_a_screenshot_of_the_page_it_was_on() {
    let Some(probe) = Browser::start() else { return };
    let shots = probe.shots.clone();
    drop(probe);
    let name = "browser_failure_probe";
    let path = shots.join(format!("failed-{name}.png"));
    let _ = std::fs::remove_file(&path);
    let page = serve_page("<!doctype html><h1 id=shown>the page a failing test was on</h1>".to_string());
    let failed = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let browser = Browser::start().unwrap();
            browser.open(&format!("http://127.0.0.1:{page}/"));
            browser.wait_for("return document.getElementById('shown') !== null", json!(true));
            panic!("a test failing with the page open");
        })
        .unwrap()
        .join();
    assert!(failed.is_err(), "the probe thread was meant to fail");
    let png = std::fs::read(&path).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
    assert!(png.starts_with(b"\x89PNG"), "{} is not a PNG", path.display());
    assert!(png.len() > 1000, "{} is too small to show a page ({} bytes)", path.display(), png.len());
}

#[test]
fn state_colours_meet_wcag_aa() {
    let Some(browser) = Browser::start() else { return };
    let standalone = Standalone::start(&examples(), &[]);
    browser.open(&format!("{}/#/dags", standalone.api));
    browser.wait_for("return document.querySelectorAll('tr[data-dag]').length > 0", json!(true));
    // The page colours every state a task has and every outcome a try ends with (a task's
    // states, and `interrupted` for a try whose worker was lost).
    let mut states: Vec<&str> = dagmq_core::TaskState::ALL.iter().map(|state| state.as_str()).collect();
    states.push("interrupted");
    assert_eq!(browser.script("return STATES"), json!(states), "the states the page colours");
    let checked = browser.command("POST", "/execute/sync", Some(json!({"script": CONTRAST_SCRIPT, "args": [4.5]})));
    assert_eq!(checked["counted"], json!(22), "eleven states, a badge and a node each: {checked}");
    if checked["low"] != json!([]) {
        browser.screenshot("contrast");
    }
    assert_eq!(checked["low"], json!([]), "text under 4.5:1 on its state's colour");
}

/// A directory with the DAGs of the log page's test: `chatty` writes 200 lines at once, then a
/// line every 100 ms until the file `stop` exists; `flaky` fails its first try.
fn log_page_dags() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dagmq-ui-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stop = dir.join("stop");
    std::fs::write(
        dir.join("chatty.toml"),
        format!(
            "id = \"chatty\"\n[[task]]\nid = \"talk\"\ncommand = [\"sh\", \"-c\", \"i=0; while [ $i -lt 200 ]; do echo line \
             $i; i=$((i+1)); done; while [ ! -e {} ]; do echo line $i; i=$((i+1)); sleep 0.1; done\"]\n",
            stop.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("flaky.toml"),
        "id = \"flaky\"\n[[task]]\nid = \"once\"\nretries = 1\nretry_delay = \"1s\"\ncommand = [\"sh\", \"-c\", \
         \"echo try $DAGMQ_TRY; [ $DAGMQ_TRY -ge 2 ]\"]\n",
    )
    .unwrap();
    dir
}

/// Lines in the log box.
const LOG_LINES: &str = "(document.querySelector('pre[data-test=log]')?.textContent.split('\\n').length ?? 0)";

#[test]
fn the_log_page_appends_in_place_keeps_scroll_and_selection_and_shows_each_trys_own_state() {
    let Some(browser) = Browser::start() else { return };
    let dir = log_page_dags();
    let standalone = Standalone::start(&dir, &[]);
    let base = standalone.api.clone();
    let run = standalone.json(&["trigger", "chatty"]);
    let run_id = run["run_id"].as_str().unwrap().to_string();
    browser.open(&format!("{base}/#/runs/{run_id}/tasks/talk"));
    browser.wait_for(&format!("return ({LOG_LINES}) >= 210"), json!(true));

    // Scrolled up to read: new lines are appended to the same box, and the view stays put.
    let lines = browser.script(&format!(
        "const p = document.querySelector('pre[data-test=log]'); p.dataset.mark = 'kept'; p.scrollTop = 0; return {LOG_LINES}"
    ));
    browser.wait_for(&format!("return ({LOG_LINES}) >= {} ", lines.as_u64().unwrap() + 5), json!(true));
    assert_eq!(
        browser.script("const p = document.querySelector('pre[data-test=log]'); return [p.dataset.mark, p.scrollTop]"),
        json!(["kept", 0]),
        "the box was replaced or scrolled"
    );
    // At the bottom, it follows the tail.
    browser.script("const p = document.querySelector('pre[data-test=log]'); p.scrollTop = p.scrollHeight; return null");
    let lines = browser.script(&format!("return {LOG_LINES}")).as_u64().unwrap();
    browser.wait_for(&format!("return ({LOG_LINES}) >= {}", lines + 5), json!(true));
    browser.wait_for(
        "const p = document.querySelector('pre[data-test=log]'); return p.scrollHeight - p.scrollTop - p.clientHeight < 4",
        json!(true),
    );
    // Selected text stays selected across refreshes (three refresh intervals).
    browser.script(
        "const p = document.querySelector('pre[data-test=log]'); const r = document.createRange(); \
         r.setStart(p.firstChild, 0); r.setEnd(p.firstChild, 6); getSelection().removeAllRanges(); \
         getSelection().addRange(r); window.selectedAt = Date.now(); return null",
    );
    browser.wait_for("return Date.now() - window.selectedAt > 4500", json!(true));
    assert_eq!(browser.script("return getSelection().toString()"), json!("line 0"));
    browser.script("getSelection().removeAllRanges(); return null");
    std::fs::write(dir.join("stop"), "").unwrap();
    browser.wait_for("return document.querySelector('[data-test=try-state] .state')?.dataset.state", json!("success"));
    // A finished try whose log has been read is not fetched any more, however long it stays
    // open (its last read is made to look 31 s old: the page once polled every 30 s).
    browser.wait_for("return page.settled", json!(true));
    browser.script(
        "page.renderedAt -= 31000; window.renderedAt = page.renderedAt; window.watchedAt = Date.now(); return null",
    );
    browser.wait_for("return Date.now() - window.watchedAt > 4500", json!(true));
    assert_eq!(
        browser.script("return page.renderedAt === window.renderedAt"),
        json!(true),
        "a settled page was polled"
    );
    browser.screenshot("log");

    // Each try shows its own state and times.
    let flaky = standalone.json(&["trigger", "flaky", "--wait"]);
    assert_eq!(flaky["state"], "success", "{flaky}");
    let flaky_id = flaky["run_id"].as_str().unwrap();
    let task = &standalone.json(&["runs", "show", flaky_id])["tasks"][0];
    let first = &task["tries"][0];
    assert_eq!(first["try_number"], 1, "{task}");
    browser.open(&format!("{base}/#/runs/{flaky_id}/tasks/once?try=1"));
    browser.wait_for(
        "return document.querySelector('pre[data-test=log]')?.textContent.split('\\n')[0] ?? null",
        json!("try 1"),
    );
    assert_eq!(
        browser.script("return document.querySelector('[data-test=try-state] .state').dataset.state"),
        first["outcome"],
        "try 1 shows its own outcome, not the task's state"
    );
    let times = browser.script("return document.querySelector('[data-test=try-times]').textContent");
    assert!(times.as_str().unwrap().starts_with("try 1: worker "), "{times}");
    let start_of = |at: &Value| browser.script(&format!("return whenText({at})")).as_str().unwrap().to_string();
    assert!(times.as_str().unwrap().contains(&format!("started {}", start_of(&first["started_at"]))), "{times}");
    // And why it failed, filed with it.
    let error = first["error"].as_str().unwrap_or_else(|| panic!("try 1's error is filed with it: {first}"));
    assert_eq!(browser.script("return document.querySelector('#task-head .error')?.textContent ?? null"), json!(error));
    browser.open(&format!("{base}/#/runs/{flaky_id}/tasks/once?try=2"));
    browser.wait_for(
        "return document.querySelector('pre[data-test=log]')?.textContent.split('\\n')[0] ?? null",
        json!("try 2"),
    );
    browser.wait_for("return document.querySelector('[data-test=try-state] .state').dataset.state", json!("success"));
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

/// For each edge of the graph in `selector`, the boxes other than its ends that the drawn edge
/// passes through (sampled every 2 px): `from>to crosses NODE`.
const EDGE_CROSSINGS: &str = r#"
const svg = document.querySelector(arguments[0] + " svg");
const boxes = [...svg.querySelectorAll("[data-node]")].map(g => { const r = g.querySelector("rect");
  return {id: g.dataset.node, x: +r.getAttribute("x"), y: +r.getAttribute("y"), w: +r.getAttribute("width"), h: +r.getAttribute("height")}; });
const crossings = [];
const edges = [...svg.querySelectorAll("[data-edge]")];
for (const e of edges) {
  const [from, to] = e.dataset.edge.split(">");
  const length = e.getTotalLength();
  for (let at = 0; at <= length; at += 2) {
    const p = e.getPointAtLength(at);
    for (const b of boxes) if (b.id !== from && b.id !== to && p.x > b.x && p.x < b.x + b.w && p.y > b.y && p.y < b.y + b.h) {
      const text = `${from}>${to} crosses ${b.id}`;
      if (!crossings.includes(text)) crossings.push(text);
    }
  }
}
return {edges: edges.map(e => e.dataset.edge).sort(), crossings};
"#;

#[test]
fn graph_edges_go_around_boxes_and_the_dag_page_shows_the_latest_runs_colours() {
    let Some(browser) = Browser::start() else { return };
    let dir = std::env::temp_dir().join(format!("dagmq-ui-graph-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // c depends on a directly and through b: the edge a>c skips b's column. e depends on a
    // directly too, skipping three columns.
    std::fs::write(
        dir.join("skip.toml"),
        "id = \"skip\"\n\
         [[task]]\nid = \"a\"\ncommand = [\"true\"]\n\
         [[task]]\nid = \"b\"\ncommand = [\"true\"]\nafter = [\"a\"]\n\
         [[task]]\nid = \"c\"\ncommand = [\"true\"]\nafter = [\"a\", \"b\"]\n\
         [[task]]\nid = \"d_with_a_name_longer_than_a_box\"\ncommand = [\"true\"]\nafter = [\"c\"]\n\
         [[task]]\nid = \"e\"\ncommand = [\"true\"]\nafter = [\"a\", \"d_with_a_name_longer_than_a_box\"]\n",
    )
    .unwrap();
    let standalone = Standalone::start(&dir, &[]);
    browser.open(&format!("{}/#/dags/skip", standalone.api));
    browser.wait_for("return document.querySelectorAll('[data-test=dag-graph] [data-node]').length", json!(5));
    let drawn = browser.command(
        "POST",
        "/execute/sync",
        Some(json!({"script": EDGE_CROSSINGS, "args": ["[data-test=dag-graph]"]})),
    );
    assert_eq!(
        drawn["edges"],
        json!(["a>b", "a>c", "a>e", "b>c", "c>d_with_a_name_longer_than_a_box", "d_with_a_name_longer_than_a_box>e"]),
        "{drawn}"
    );
    assert_eq!(drawn["crossings"], json!([]), "edges drawn behind boxes");
    assert_eq!(
        browser
            .script("return document.querySelector('[data-node=d_with_a_name_longer_than_a_box] title').textContent"),
        json!("d_with_a_name_longer_than_a_box: queued"),
        "the full name on hover"
    );
    browser.screenshot("dag-graph");
    // After a run, the DAG page's nodes take that run's colours.
    let run = standalone.json(&["trigger", "skip", "--wait"]);
    assert_eq!(run["state"], "success", "{run}");
    browser.wait_for(
        "return [...document.querySelectorAll('[data-test=dag-graph] [data-node]')].map(n => n.dataset.state).join(',')",
        json!("success,success,success,success,success"),
    );
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn at_900_px_a_runs_failure_is_on_its_first_screen_and_times_name_their_timezone() {
    let Some(browser) = Browser::start() else { return };
    let dir = std::env::temp_dir().join(format!("dagmq-ui-narrow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("breaks.toml"),
        "id = \"breaks\"\ntimezone = \"Asia/Tokyo\"\n\
         [[task]]\nid = \"extract_the_customer_orders_of_the_day\"\ncommand = [\"sh\", \"-c\", \"echo \
         rows=1234567890123456789012345678901234567890\"]\n\
         [[task]]\nid = \"load_into_the_warehouse\"\ncommand = [\"sh\", \"-c\", \"echo the warehouse refused the \
         load: relation orders_2026_12_07_staging_area_for_the_nightly_job does not exist; exit 3\"]\nafter = \
         [\"extract_the_customer_orders_of_the_day\"]\n\
         [[task]]\nid = \"report\"\ncommand = [\"true\"]\nafter = [\"load_into_the_warehouse\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("warsaw.toml"),
        "id = \"warsaw\"\nschedule = \"0 0 2 * * *\"\ntimezone = \"Europe/Warsaw\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let standalone = Standalone::start(&dir, &[]);
    let run_id = standalone.json(&["trigger", "breaks"])["run_id"].as_str().unwrap().to_string();
    standalone.wait_until(Duration::from_secs(30), || standalone.json(&["runs", "show", &run_id])["state"] == "failed");
    browser.resize(900, 900);
    browser.open(&format!("{}/#/runs/{run_id}", standalone.api));
    browser.wait_for(
        "return document.querySelector('[data-failed]')?.dataset.failed ?? null",
        json!("load_into_the_warehouse"),
    );
    browser.screenshot("run-900");
    // A finished run's page asks the API for nothing more while it stays open (it polled every
    // 1.5 s, then every 30 s).
    browser.wait_for("return page.settled", json!(true));
    browser.script("performance.clearResourceTimings(); window.watchedAt = Date.now(); return null");
    browser.wait_for("return Date.now() - window.watchedAt > 4500", json!(true));
    assert_eq!(
        browser.script(
            "return performance.getEntriesByType('resource').filter(e => new URL(e.name).pathname.startsWith('/api/')).length"
        ),
        json!(0),
        "a finished run's page was polled"
    );
    // The failure and its reason are on the first screen, and nothing needs scrolling sideways.
    let seen = browser.script(
        "const f = document.querySelector('[data-failed] .error').getBoundingClientRect(); \
         const t = document.querySelector('[data-test=tasks]'); \
         return {failure_below: f.bottom <= innerHeight, page_fits: document.documentElement.scrollWidth <= innerWidth, \
                 table_fits: t.scrollWidth <= t.clientWidth, \
                 reason: document.querySelector('[data-failed] .error').textContent}",
    );
    assert_eq!(seen["failure_below"], json!(true), "{seen}");
    assert_eq!(seen["page_fits"], json!(true), "{seen}");
    assert_eq!(seen["table_fits"], json!(true), "{seen}");
    assert!(seen["reason"].as_str().unwrap().contains("exited with status 3"), "{seen}");
    // With the last lines of its log, kept with the try (no log read).
    let tail = browser.script("return document.querySelector('[data-tail=load_into_the_warehouse]').textContent");
    assert!(
        tail.as_str().unwrap().starts_with("the warehouse refused the load: relation orders_2026_12_07_staging_area")
            && tail.as_str().unwrap().ends_with("[dagmq] try 1 failed: command exited with status 3"),
        "{tail}"
    );
    // The header has the run's start, end and duration.
    let header = browser.script("return document.querySelector('[data-test=run-times]').textContent");
    assert!(["started ", ", ended ", ", took "].iter().all(|part| header.as_str().unwrap().contains(part)), "{header}");
    // "Failed only" leaves the failed task alone in the table.
    browser.click("[data-test=failed-only]");
    browser.wait_for(
        "return [...document.querySelectorAll('tr[data-task]')].map(r => r.dataset.task).join()",
        json!("load_into_the_warehouse"),
    );
    // Times say which timezone they are in: a run's are in its DAG's (Tokyo, GMT+9), with the
    // viewer's (UTC) on hover, on the run page, the runs list and the log page alike.
    let run_times = "return [...document.querySelectorAll('[data-test=run-times] time, main .row .muted time, \
                     [data-failed] time, tr[data-task] time')].map(t => [t.textContent, t.title])";
    assert_zoned(&browser.script(run_times), 5);
    browser.open(&format!("{}/#/runs", standalone.api));
    browser.wait_for(&format!("return document.querySelector('tr[data-run=\"{run_id}\"] time') !== null"), json!(true));
    assert_zoned(
        &browser.script(&format!(
            "return [...document.querySelectorAll('tr[data-run=\"{run_id}\"] time')].map(t => [t.textContent, t.title])"
        )),
        1,
    );
    browser.open(&format!("{}/#/runs/{run_id}/tasks/load_into_the_warehouse", standalone.api));
    browser.wait_for("return document.querySelectorAll('[data-test=try-times] time').length", json!(2));
    assert_zoned(
        &browser.script(
            "return [...document.querySelectorAll('[data-test=try-times] time')].map(t => [t.textContent, t.title])",
        ),
        2,
    );
    // A DAG's schedule times are in its own timezone, with the viewer's on hover.
    browser.open(&format!("{}/#/dags", standalone.api));
    browser.wait_for("return document.querySelector('tr[data-dag=warsaw] time') !== null", json!(true));
    let next =
        browser.script("const t = document.querySelector('tr[data-dag=warsaw] time'); return [t.textContent, t.title]");
    let [shown, hover] = [next[0].as_str().unwrap(), next[1].as_str().unwrap()];
    assert!(
        shown.ends_with("GMT+1") || shown.ends_with("CET") || shown.ends_with("GMT+2") || shown.ends_with("CEST"),
        "{next}"
    );
    assert!(hover.ends_with("UTC (yours)"), "{next}");
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What of the page at `hash` needs scrolling sideways: the page itself, or a card other than a
/// chart's or the DAG grid's (those scroll inside their card).
const SIDEWAYS: &str = r#"
const over = [];
if (document.documentElement.scrollWidth > innerWidth) over.push(`page ${document.documentElement.scrollWidth} > ${innerWidth}`);
for (const card of document.querySelectorAll("main .card")) {
  if (card.querySelector("svg, table.grid")) continue;
  if (card.scrollWidth > card.clientWidth) over.push(`${card.dataset.test || card.querySelector("h3, b, th")?.textContent} ${card.scrollWidth} > ${card.clientWidth}`);
}
return over;
"#;

#[test]
fn at_900_px_no_list_page_needs_sideways_scrolling() {
    let Some(browser) = Browser::start() else { return };
    let standalone = Standalone::start(&examples(), &[]);
    for dag in ["hello", "params", "etl_outputs"] {
        let run = standalone.json(&["trigger", dag, "--wait"]);
        assert!(run["run_id"].is_string(), "{run}");
    }
    browser.resize(900, 900);
    for (view, ready) in [
        ("dags", "tr[data-dag=hello] .sq"),
        ("runs", "tr[data-run]"),
        ("workers", "tr[data-worker]"),
        ("capacity", "[data-worker-use]"),
    ] {
        browser.open(&format!("{}/#/{view}", standalone.api));
        browser.wait_for(&format!("return document.querySelector('{ready}') !== null"), json!(true));
        let over = browser.script(SIDEWAYS);
        browser.screenshot(&format!("{view}-900"));
        assert_eq!(over, json!([]), "at 900 px the {view} page needs sideways scrolling");
        // The actions stay on screen.
        if view == "dags" {
            let right = browser
                .script("return document.querySelector('[data-test=trigger-hello]').getBoundingClientRect().right");
            assert!(right.as_f64().unwrap() <= 900.0, "the Trigger button is off screen at x {right}");
        }
    }
    // The runs list pages back through older runs, 100 at a time.
    let backfill = standalone.json(&["dags", "backfill", "nightly_etl", "--from", "2026-06-01", "--to", "2026-09-30"]);
    assert_eq!(backfill["runs"].as_array().map(Vec::len), Some(121), "{backfill}");
    browser.open(&format!("{}/#/runs?dag=nightly_etl", standalone.api));
    browser.wait_for("return document.querySelectorAll('tr[data-run]').length", json!(100));
    assert_eq!(browser.script("return document.querySelector('[data-test=newer]')"), Value::Null);
    browser.click("[data-test=older]");
    browser.wait_for("return document.querySelectorAll('tr[data-run]').length", json!(21));
    assert_eq!(
        browser.script("return document.querySelector('tr[data-run]:last-child').dataset.run"),
        json!("nightly_etl--scheduled--20260601T000000.000Z"),
        "the oldest run last"
    );
    assert_eq!(browser.script("return document.querySelector('[data-test=older]')"), Value::Null);
    browser.click("[data-test=newer]");
    browser.wait_for("return document.querySelectorAll('tr[data-run]').length", json!(100));
}

#[test]
fn an_unknown_run_or_dag_replaces_the_page_before_with_why() {
    let Some(browser) = Browser::start() else { return };
    let standalone = Standalone::start(&examples(), &[]);
    browser.open(&format!("{}/#/dags/hello", standalone.api));
    browser.wait_for("return document.querySelector('[data-test=dag-graph] svg') !== null", json!(true));
    for (hash, said, nav) in
        [("#/runs/nope", "unknown run \"nope\"", "runs"), ("#/dags/nope", "unknown dag \"nope\"", "dags")]
    {
        browser.script(&format!("location.hash = '{hash}'; return null"));
        browser.wait_for("return document.querySelector('[data-test=page-error]')?.textContent ?? null", json!(said));
        assert_eq!(browser.script("return document.querySelector('main h2').textContent"), json!("Not found"));
        assert_eq!(browser.script("return document.querySelector('[data-test=dag-graph]')"), Value::Null, "{hash}");
        assert_eq!(browser.script("return document.querySelector('header a.active').dataset.nav"), json!(nav));
        // And back to a page that exists.
        browser.script("location.hash = '#/dags/hello'; return null");
        browser.wait_for("return document.querySelector('[data-test=dag-graph] svg') !== null", json!(true));
        assert_eq!(browser.script("return document.querySelector('[data-test=page-error]')"), Value::Null);
    }
    // A page seen before, reached again while the API does not answer, comes back when it does,
    // though its answers have not changed (the same ETags), a finished run's page too.
    let run = standalone.json(&["trigger", "hello", "--wait"]);
    let run_id = run["run_id"].as_str().unwrap().to_string();
    browser.script(&format!("location.hash = '#/runs/{run_id}'; return null"));
    browser.wait_for("return document.querySelector('[data-test=tasks]') !== null && page.settled", json!(true));
    browser.script("location.hash = '#/workers'; return null");
    browser.wait_for("return document.querySelector('main h2')?.textContent ?? null", json!("Workers"));
    browser.script("window.realFetch = window.fetch; window.fetch = () => Promise.reject(new TypeError('Failed to fetch')); return null");
    browser.script(&format!("location.hash = '#/runs/{run_id}'; return null"));
    browser.wait_for(
        "return document.querySelector('[data-test=page-error]')?.textContent ?? null",
        json!("Failed to fetch"),
    );
    browser.script("window.fetch = window.realFetch; return null");
    browser.wait_for("return document.querySelector('[data-test=tasks]') !== null", json!(true));
    assert_eq!(browser.script("return document.querySelector('[data-test=page-error]')"), Value::Null);
}

/// Asserts that `times` (pairs of shown text and hover title) are at least `least`, each shown
/// in Tokyo's time (GMT+9) with the viewer's UTC time on hover.
fn assert_zoned(times: &Value, least: usize) {
    let times = times.as_array().unwrap();
    assert!(times.len() >= least, "{} times, expected at least {least}: {times:?}", times.len());
    for time in times {
        let [shown, hover] = [time[0].as_str().unwrap(), time[1].as_str().unwrap()];
        assert!(shown.ends_with("GMT+9") && hover.ends_with("UTC (yours)"), "{time}");
    }
}

#[test]
fn the_capacity_page_shows_pools_limits_held_runs_and_worker_slots() {
    let Some(browser) = Browser::start() else { return };
    let dir = std::env::temp_dir().join(format!("dagmq-ui-capacity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gate = dir.join("go");
    std::fs::write(
        dir.join("slow.toml"),
        format!(
            "id = \"slow\"\nmax_active_runs = 1\nmax_active_tasks = 1\n\
             [[task]]\nid = \"hold\"\npool = \"db\"\ncommand = [\"sh\", \"-c\", \"while [ ! -e {0} ]; do sleep 0.1; done\"]\n\
             [[task]]\nid = \"next\"\npool = \"db\"\ncommand = [\"sh\", \"-c\", \"while [ ! -e {0} ]; do sleep 0.1; done\"]\n",
            gate.display()
        ),
    )
    .unwrap();
    let standalone = Standalone::start_with_args(&dir, &["--pool", "db=2", "--concurrency", "4"]);
    let first = standalone.json(&["trigger", "slow"])["run_id"].as_str().unwrap().to_string();
    let second = standalone.json(&["trigger", "slow"])["run_id"].as_str().unwrap().to_string();
    // One of the first run's two tasks runs; the other waits for the DAG's max_active_tasks.
    let states = || -> Vec<(Value, Value)> {
        let run = standalone.json(&["runs", "show", &first]);
        run["tasks"].as_array().unwrap().iter().map(|t| (t["state"].clone(), t["waiting_for"].clone())).collect()
    };
    standalone.wait_until(Duration::from_secs(30), || states().iter().any(|(state, _)| state == "running"));
    let mut seen = states();
    seen.sort_by_key(|(state, _)| state.to_string());
    assert_eq!(
        seen,
        [(json!("pending"), json!("max_active_tasks")), (json!("running"), Value::Null)],
        "one task runs, one waits"
    );
    let held = standalone.json(&["runs", "show", &second]);
    assert_eq!((&held["state"], &held["waiting_for"]), (&json!("queued"), &json!("max_active_runs 1/1")), "{held}");

    browser.open(&format!("{}/#/capacity", standalone.api));
    browser.wait_for(
        "return document.querySelector('tr[data-pool=db] [data-test=use]')?.textContent ?? null",
        json!("1/2"),
    );
    assert_eq!(
        browser.script("return document.querySelector('tr[data-dag-use=slow] [data-test=runs]').textContent"),
        json!("1/1")
    );
    assert_eq!(
        browser.script("return document.querySelector('tr[data-dag-use=slow] [data-test=tasks]').textContent"),
        json!("1/1"),
        "max_active_tasks in use"
    );
    assert_eq!(
        browser.script(
            "return [...document.querySelectorAll('tr[data-held]')].map(r => [r.dataset.held, r.cells[1].textContent])"
        ),
        json!([[second, "max_active_runs 1/1"]])
    );
    // A worker's running tries reach the registry with its next heartbeat (every 5 s).
    browser.wait_for("return document.querySelector('[data-worker-use] [data-test=slots]').textContent", json!("1/4"));
    // The worker pool: nothing queued on it (the waiting task waits for max_active_tasks, not for
    // a worker), one worker of 4 slots consuming it.
    assert_eq!(
        browser.script(
            "const r = document.querySelector('tr[data-queue=default]'); \
             return [r.querySelector('[data-test=queued]').textContent, r.querySelector('[data-test=consumers]').textContent]"
        ),
        json!(["0", "1 (4 slots)"])
    );
    browser.screenshot("capacity");
    browser.open(&format!("{}/#/runs/{second}", standalone.api));
    browser.wait_for(
        "return document.querySelector('[data-test=run-waiting]')?.textContent ?? null",
        json!("waiting for max_active_runs 1/1"),
    );
    browser.open(&format!("{}/#/runs/{first}", standalone.api));
    browser.wait_for(
        "return [...document.querySelectorAll('tr[data-task] [data-test=waiting]')].map(w => w.textContent).join()",
        json!("waiting for max_active_tasks"),
    );
    browser.open(&format!("{}/#/workers", standalone.api));
    browser.wait_for(
        "return document.querySelector('[data-worker] [data-test=slots]')?.textContent ?? null",
        json!("1 used, 3 free of 4"),
    );
    std::fs::write(&gate, "").unwrap();
    for run in [&first, &second] {
        standalone
            .wait_until(Duration::from_secs(30), || standalone.json(&["runs", "show", run])["state"] == "success");
    }
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sets an `<input>`'s value as a person typing it would (the page keeps typed values across
/// its refreshes).
fn type_into(browser: &Browser, selector: &str, value: &str) {
    browser.wait_for(&format!("return document.querySelector('{selector}') !== null"), json!(true));
    browser.script(&format!(
        "const i = document.querySelector('{selector}'); i.value = '{value}'; \
         i.dispatchEvent(new Event('input', {{bubbles: true}})); return null"
    ));
}

#[test]
fn the_dag_page_backfills_pages_through_runs_marks_their_kind_and_reads_only_the_grid() {
    let Some(browser) = Browser::start() else { return };
    let dir = std::env::temp_dir().join(format!("dagmq-ui-grid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("daily.toml"),
        "id = \"daily\"\nschedule = \"0 0 2 * * *\"\ntimezone = \"Europe/Warsaw\"\nstart = \"2026-01-01T00:00:00Z\"\n\
         paused = true\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\n[[task]]\nid = \"b\"\ncommand = [\"true\"]\nafter = [\"a\"]\n",
    )
    .unwrap();
    let standalone = Standalone::start(&dir, &[]);
    browser.open(&format!("{}/#/dags/daily", standalone.api));
    type_into(&browser, "#backfill-from", "2026-10-01");
    type_into(&browser, "#backfill-to", "2026-10-30");
    browser.click("[data-test=backfill-submit]");
    browser.wait_for(
        "return document.querySelector('[data-test=backfill-result]')?.textContent ?? null",
        // Dates are midnight in Warsaw: the 02:00 points of 1 to 29 October.
        json!("29 runs: 29 created, 0 existing"),
    );
    standalone.wait_until(Duration::from_secs(60), || {
        standalone.json(&["runs", "list", "--limit", "100"]).as_array().unwrap().iter().all(|r| r["state"] == "success")
    });
    // The newest 25 runs, each column marked with its kind; the bars are labelled with times.
    browser.wait_for("return document.querySelectorAll('[data-run-column]').length", json!(25));
    assert_eq!(
        browser.script("return [...new Set([...document.querySelectorAll('[data-run-column]')].map(c => c.dataset.kind + ' ' + c.querySelector('.kind').textContent))]"),
        json!(["backfill B"])
    );
    // A bar per run, each titled with its run's kind and logical date in the DAG's timezone; the
    // labels under them are times in the DAG's timezone too (the points are 02:00 in Warsaw).
    browser.wait_for(
        "return [...document.querySelectorAll('[data-run-column]')].every(c => c.title.includes(': success, '))",
        json!(true),
    );
    let titles = browser.script(
        "return [...document.querySelectorAll('[data-test=durations] rect[data-bar] title')].map(t => t.textContent)",
    );
    let titles = titles.as_array().unwrap();
    assert_eq!(titles.len(), 25, "{titles:?}");
    for title in titles {
        let title = title.as_str().unwrap();
        assert!(title.contains(", backfill, logical date ") && title.contains(" 2:00:00 AM GMT+"), "{title}");
    }
    let columns = browser.script("return [...document.querySelectorAll('[data-run-column]')].map(c => c.title)");
    assert_eq!(columns, json!(titles), "a run's column and its bar say the same");
    let labels = browser.script(
        "return [...document.querySelectorAll('[data-test=durations] text.axis')].slice(2).map(t => t.textContent)",
    );
    assert!(labels.as_array().unwrap().len() >= 4, "{labels}");
    assert!(
        labels.as_array().unwrap().iter().all(|l| l.as_str().unwrap().ends_with(", 2:00 AM")),
        "labels not at the DAG's time of its points: {labels}"
    );
    // Side by side without overlapping.
    let overlaps = browser.script(
        "const boxes = [...document.querySelectorAll('[data-test=durations] text.axis')].slice(2).map(t => t.getBBox()); \
         return boxes.slice(1).filter((b, i) => b.x < boxes[i].x + boxes[i].width + 2).length",
    );
    assert_eq!(overlaps, json!(0), "labels overlap: {labels}");
    // Runs within a minute of each other are told apart by their seconds, not labelled alike.
    assert_eq!(
        browser.script(
            "return barLabels(['2026-12-07T23:34:00Z', '2026-12-07T23:34:10Z', '2026-12-07T23:35:00Z'], 'UTC')"
        ),
        json!(["11:34:00 PM", "11:34:10 PM", "11:35:00 PM"])
    );
    assert_eq!(
        browser.script("return barLabels(['2026-12-07T10:00:00Z', '2026-12-07T11:00:00Z'], 'Europe/Warsaw')"),
        json!(["11:00 AM", "12:00 PM"])
    );
    // A manual run is marked as such beside them.
    standalone.json(&["trigger", "daily", "--wait"]);
    browser.wait_for(
        "return [...document.querySelectorAll('[data-run-column]')].map(c => c.dataset.kind + ' ' + c.querySelector('.kind').textContent).pop()",
        json!("manual M"),
    );
    assert_eq!(browser.script("return document.querySelectorAll('[data-run-column]').length"), json!(25));
    // Older runs are a page away, and back.
    browser.click("[data-test=older]");
    browser.wait_for("return document.querySelectorAll('[data-run-column]').length", json!(5));
    assert_eq!(browser.script("return document.querySelector('[data-test=older]')"), Value::Null);
    browser.click("[data-test=newer]");
    browser.wait_for("return document.querySelectorAll('[data-run-column]').length", json!(25));
    // The page reads the DAG and its grid, not every run's document.
    browser.script("performance.clearResourceTimings(); window.watchedAt = Date.now(); return null");
    browser.wait_for("return Date.now() - window.watchedAt > 3500", json!(true));
    let fetched = browser.script(
        "return [...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).pathname))].sort()",
    );
    assert_eq!(fetched, json!(["/api/v1/dags/daily", "/api/v1/dags/daily/grid"]), "what the DAG page fetched");
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory with `gated`: `wait` runs until the file `go` exists (`go` in the directory),
/// then `after` (a noop) runs; and `quick`, one noop.
fn gated_dags(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dagmq-ui-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("gated.toml"),
        format!(
            "id = \"gated\"\n[[task]]\nid = \"wait_for_the_go_file\"\ncommand = [\"sh\", \"-c\", \"while [ ! -e {} ]; do \
             sleep 0.1; done\"]\n[[task]]\nid = \"after\"\nrun = \"noop\"\nafter = [\"wait_for_the_go_file\"]\n",
            dir.join("go").display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("quick.toml"), "id = \"quick\"\n[[task]]\nid = \"only\"\nrun = \"noop\"\n").unwrap();
    dir
}

/// Selects the text of the first element matching `selector` and remembers the selection.
fn select_text(browser: &Browser, selector: &str) -> Value {
    browser.wait_for(&format!("return document.querySelector('{selector}') !== null"), json!(true));
    browser.script(&format!(
        "const r = document.createRange(); r.selectNodeContents(document.querySelector('{selector}')); \
         getSelection().removeAllRanges(); getSelection().addRange(r); return getSelection().toString()"
    ))
}

#[test]
fn pages_update_in_place_keeping_selection_and_scroll() {
    let Some(browser) = Browser::start() else { return };
    let dir = gated_dags("in-place");
    let standalone = Standalone::start(&dir, &[]);
    let base = standalone.api.clone();
    for _ in 0..3 {
        standalone.json(&["trigger", "quick", "--wait"]);
    }
    let run_id = standalone.json(&["trigger", "gated"])["run_id"].as_str().unwrap().to_string();
    let row_state =
        |task: &str| format!("return document.querySelector('tr[data-task={task}] .state')?.dataset.state ?? null");

    // The run page: text selected in the tasks table stays selected while a task changes
    // state, and the changed row shows its new state.
    browser.open(&format!("{base}/#/runs/{run_id}"));
    browser.wait_for(&row_state("wait_for_the_go_file"), json!("running"));
    // A mark on the node itself (not an attribute, which an update may rewrite).
    browser.script("document.querySelector('[data-test=tasks]').mark = 'kept'; return null");
    let selected = select_text(&browser, "tr[data-task=wait_for_the_go_file] td a");
    assert_eq!(selected, json!("wait_for_the_go_file"));
    std::fs::write(dir.join("go"), "").unwrap();
    browser.wait_for(&row_state("after"), json!("success"));
    browser.wait_for(&row_state("wait_for_the_go_file"), json!("success"));
    assert_eq!(browser.script("return getSelection().toString()"), selected, "the selection was lost");
    assert_eq!(
        browser.script("return document.querySelector('[data-test=tasks]').mark ?? null"),
        json!("kept"),
        "the tasks card was built again instead of updated"
    );
    browser.script("getSelection().removeAllRanges(); return null");

    // The runs list, its table made wider than the window so that it scrolls sideways (the
    // list itself wraps to fit): a new run appears, a run changes state, and the table stays
    // where the reader scrolled it, with the selection.
    std::fs::remove_file(dir.join("go")).unwrap();
    browser.resize(560, 800);
    browser.script(
        "const wide = document.createElement('style'); wide.textContent = '#view .card table { min-width: 1200px; }'; \
         document.head.appendChild(wide); return null",
    );
    browser.open(&format!("{base}/#/runs"));
    browser.wait_for(&format!("return document.querySelector('tr[data-run=\"{run_id}\"]') !== null"), json!(true));
    let scrolled = browser.script(
        "const c = document.querySelector('#view .card:last-child'); c.mark = 'kept'; c.scrollLeft = 60; \
         return c.scrollLeft",
    );
    assert!(scrolled.as_u64().unwrap() > 0, "the runs table does not scroll sideways at 560 px: {scrolled}");
    let selected = select_text(&browser, &format!("tr[data-run=\"{run_id}\"] td a"));
    // The DAG filter has the focus (a keyboard user on it).
    browser.script("document.getElementById('f-dag').focus(); return null");
    let second = standalone.json(&["trigger", "gated"])["run_id"].as_str().unwrap().to_string();
    browser.wait_for(
        &format!("return document.querySelector('tr[data-run=\"{second}\"] .state')?.dataset.state ?? null"),
        json!("running"),
    );
    std::fs::write(dir.join("go"), "").unwrap();
    browser.wait_for(
        &format!("return document.querySelector('tr[data-run=\"{second}\"] .state')?.dataset.state ?? null"),
        json!("success"),
    );
    assert_eq!(
        browser.script(
            "const c = document.querySelector('#view .card:last-child'); return [c.mark ?? null, c.scrollLeft]"
        ),
        json!(["kept", scrolled]),
        "the runs table was built again or scrolled back"
    );
    assert_eq!(browser.script("return getSelection().toString()"), selected, "the selection was lost");
    assert_eq!(browser.script("return document.activeElement.id"), json!("f-dag"), "the focus moved");
    browser.screenshot("runs-in-place");
    // An opened <details> stays open through an update of its text.
    assert_eq!(
        browser.script(
            "const box = document.createElement('div'); box.innerHTML = '<details><summary>why</summary>old</details>'; \
             box.firstChild.open = true; morph(box, '<details><summary>why</summary>new</details>'); \
             return [box.firstChild.open, box.firstChild.textContent]"
        ),
        json!([true, "whynew"])
    );
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Watches the page for `seconds` while nothing changes: nothing in it may change (but the
/// running durations, which count up), and each of its API requests must be a 304 (less than
/// 1 KB moved, by the resource timings). Returns how many requests it made.
/// Starts counting what the page changes in its view: each attribute or text changed and each
/// node added or removed counts one (a running duration's ticking left out). Read with
/// [`changes_counted`].
fn count_changes(browser: &Browser) {
    browser.script(
        "window.changes = 0; window.counter?.disconnect(); window.counter = new MutationObserver(list => { \
           for (const m of list) { const at = m.target.nodeType === 1 ? m.target : m.target.parentElement; \
             if (at?.closest('[data-since]')) continue; \
             window.changes += m.type === 'childList' ? m.addedNodes.length + m.removedNodes.length : 1; } }); \
         window.counter.observe(document.getElementById('view'), {subtree: true, childList: true, attributes: true, characterData: true}); \
         return null",
    );
}

/// What the page changed since [`count_changes`].
fn changes_counted(browser: &Browser) -> u64 {
    browser.script("window.counter.disconnect(); return window.changes").as_u64().unwrap()
}

fn assert_quiet(browser: &Browser, seconds: u64, what: &str) -> usize {
    browser.script(
        "performance.clearResourceTimings(); window.mutations = []; window.watchedAt = Date.now(); \
         window.watcher?.disconnect(); window.watcher = new MutationObserver(list => { for (const m of list) { \
           const at = m.target.nodeType === 1 ? m.target : m.target.parentElement; \
           if (!at?.closest('[data-since]')) window.mutations.push(at?.outerHTML.slice(0, 120) ?? m.type); } }); \
         window.watcher.observe(document.getElementById('view'), {subtree: true, childList: true, attributes: true, characterData: true}); \
         return null",
    );
    browser.wait_for(&format!("return Date.now() - window.watchedAt > {}", seconds * 1000), json!(true));
    let seen = browser.script(
        "window.watcher.disconnect(); return [window.mutations.slice(0, 5), performance.getEntriesByType('resource')\
         .filter(e => new URL(e.name).pathname.startsWith('/api/')).map(e => [new URL(e.name).pathname, e.transferSize])]",
    );
    assert_eq!(seen[0], json!([]), "{what}: changed although nothing changed: {seen}");
    let requests = seen[1].as_array().unwrap();
    assert!(!requests.is_empty(), "{what}: no request at all in {seconds} s: {seen}");
    assert!(
        requests.iter().all(|r| r[1].as_u64().unwrap() < 1024),
        "{what}: an answer that had not changed was sent again: {seen}"
    );
    requests.len()
}

#[test]
fn an_open_page_on_which_nothing_changes_costs_only_304s_and_no_update() {
    let Some(browser) = Browser::start() else { return };
    let dir = gated_dags("quiet");
    let standalone = Standalone::start(&dir, &[]);
    let base = standalone.api.clone();
    for _ in 0..3 {
        standalone.json(&["trigger", "quick", "--wait"]);
    }
    let run_id = standalone.json(&["trigger", "gated"])["run_id"].as_str().unwrap().to_string();
    // A running run's page, its task waiting: the run document does not change.
    browser.open(&format!("{base}/#/runs/{run_id}"));
    browser.wait_for(
        "return document.querySelector('tr[data-task=wait_for_the_go_file] .state')?.dataset.state ?? null",
        json!("running"),
    );
    assert_quiet(&browser, 5, "the run page");
    // Its running durations still count up without a new answer.
    let took = "document.querySelector('[data-test=run-times] b').textContent";
    let before = browser.script(&format!("return {took}"));
    browser.wait_for(&format!("return {took} !== {before}"), json!(true));
    // The DAG page with its grid and graph, the runs list, the DAG list, capacity (the workers
    // page changes with every heartbeat).
    for page in ["dags/quick", "dags/gated", "runs", "dags", "capacity"] {
        browser.open(&format!("{base}/#/{page}"));
        browser.wait_for("return page.shown === location.hash", json!(true));
        assert_quiet(&browser, 4, page);
    }
    // And a change still shows in the grid and the graph, with the text selected in the grid
    // still selected.
    browser.open(&format!("{base}/#/dags/gated"));
    browser.wait_for(
        "return [...document.querySelectorAll('[data-test=grid] [data-cell]')].map(c => c.dataset.cell).join()",
        json!("running,pending"),
    );
    let selected = select_text(&browser, "tr[data-grid-task=wait_for_the_go_file] td");
    std::fs::write(dir.join("go"), "").unwrap();
    browser.wait_for(
        "return [...document.querySelectorAll('[data-test=grid] [data-cell]')].map(c => c.dataset.cell).join()",
        json!("success,success"),
    );
    browser.wait_for(
        "return [...document.querySelectorAll('[data-test=dag-graph] [data-node]')].map(n => n.dataset.state).join()",
        json!("success,success"),
    );
    assert_eq!(browser.script("return getSelection().toString()"), selected, "the selection was lost");
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tasks in the large DAG of `a_2000_task_dags_page_and_runs_page_touch_only_what_a_changed_task_shows`.
const LARGE: usize = 2000;

/// The most nodes and values one task's change may touch on a page of [`LARGE`] tasks: the
/// cells, boxes, counts and times that show it, a tenth of one rebuilt table.
const MOST_CHANGES: u64 = 200;

#[test]
fn a_2000_task_dags_page_and_runs_page_touch_only_what_a_changed_task_shows() {
    let Some(browser) = Browser::start() else { return };
    let dir = std::env::temp_dir().join(format!("dagmq-ui-large-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // `gate` waits for the file `g`, `gate_2` for `g2`, `hold` for `h`; every other task waits
    // for `hold`.
    let wait = |file: &str| {
        format!("command = [\"sh\", \"-c\", \"while [ ! -e {} ]; do sleep 0.1; done\"]", dir.join(file).display())
    };
    let mut dag = format!(
        "id = \"large\"\nmax_active_tasks = 256\n[[task]]\nid = \"gate\"\n{}\n[[task]]\nid = \"gate_2\"\n{}\n\
         [[task]]\nid = \"hold\"\n{}\n",
        wait("g"),
        wait("g2"),
        wait("h")
    );
    for i in 0..LARGE - 3 {
        dag.push_str(&format!("[[task]]\nid = \"step_{i:04}\"\nrun = \"noop\"\nafter = [\"hold\"]\n"));
    }
    std::fs::write(dir.join("large.toml"), dag).unwrap();
    let standalone = Standalone::start(&dir, &[]);
    let base = standalone.api.clone();
    // Finished runs first, then one whose `gate` and `hold` wait.
    for file in ["g", "g2", "h"] {
        std::fs::write(dir.join(file), "").unwrap();
    }
    for _ in 0..4 {
        let run = standalone.json(&["trigger", "large", "--wait"]);
        assert_eq!(run["state"], "success", "{}", run["state"]);
    }
    for file in ["g", "g2", "h"] {
        std::fs::remove_file(dir.join(file)).unwrap();
    }
    let run_id = standalone.json(&["trigger", "large"])["run_id"].as_str().unwrap().to_string();
    browser.open(&format!("{base}/#/dags/large"));
    let gate = "const row = document.querySelector('tr[data-grid-task=gate]'); \
                return row ? row.cells[row.cells.length - 1].querySelector('[data-cell]')?.dataset.cell ?? null : null";
    browser.wait_for(gate, json!("running"));
    browser.wait_for("return document.querySelectorAll('tr[data-grid-task]').length", json!(LARGE));
    let first = browser.script("return page.scriptMs");
    // Nothing changes: no update, only 304s.
    assert_quiet(&browser, 5, "the large DAG's page");
    // One task changes: the page shows it, in well under 100 ms of script.
    let updates = browser.script("return page.scriptTimes.length").as_u64().unwrap() as usize;
    count_changes(&browser);
    std::fs::write(dir.join("g"), "").unwrap();
    browser.wait_for(gate, json!("success"));
    assert_eq!(
        browser.script("return document.querySelector('[data-test=dag-graph] [data-node=gate]').dataset.state"),
        json!("success"),
        "the graph's box"
    );
    let changes = changes_counted(&browser);
    let times = browser.script(&format!("return page.scriptTimes.slice({updates})"));
    eprintln!(
        "the 2,000-task DAG page: first drawn in {first} ms, updated for one task in {times} ms, {changes} nodes and values changed"
    );
    // What the update cost is measured by what it touched, not by a clock (a loaded machine
    // stretches any time): one task's cell, its graph box, the run's counts and header, never
    // the grid's 2,000 rows (a rebuild changes thousands).
    assert!(!times.as_array().unwrap().is_empty(), "no update");
    assert!(changes < MOST_CHANGES, "one task's change rewrote {changes} nodes and values of the page");
    browser.screenshot("large-dag");

    // The run's page: its table of 2,000 tasks rewrites only the row that changed.
    browser.open(&format!("{base}/#/runs/{run_id}"));
    let gate_2 = "return document.querySelector('tr[data-task=gate_2] .state')?.dataset.state ?? null";
    browser.wait_for(gate_2, json!("running"));
    assert_quiet(&browser, 3, "the large run's page");
    let updates = browser.script("return page.scriptTimes.length").as_u64().unwrap() as usize;
    count_changes(&browser);
    std::fs::write(dir.join("g2"), "").unwrap();
    browser.wait_for(gate_2, json!("success"));
    let changes = changes_counted(&browser);
    let times = browser.script(&format!("return page.scriptTimes.slice({updates})"));
    eprintln!("the 2,000-task run's page: updated for one task in {times} ms, {changes} nodes and values changed");
    assert!(!times.as_array().unwrap().is_empty(), "no update");
    assert!(changes < MOST_CHANGES, "one task's change rewrote {changes} nodes and values of the page");
    std::fs::write(dir.join("h"), "").unwrap();
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Counts the page's POSTs (`window.posts`) and their answers (`window.answered`); with `delay_ms`,
/// each POST is sent that much later (a slow network).
fn count_posts(browser: &Browser, delay_ms: u64) {
    browser.script(&format!(
        "const f = window.fetch; window.posts = 0; window.answered = 0; \
         window.fetch = (u, o) => {{ if (!o || o.method !== 'POST') return f(u, o); window.posts++; \
           return new Promise(r => setTimeout(r, {delay_ms})).then(() => f(u, o)) \
             .finally(() => {{ window.answered++; }}); }}; return null"
    ));
}

/// Waits for the page to be refreshed once more (its "updated" line changes).
fn wait_for_a_refresh(browser: &Browser) {
    let updated = browser.script("return document.getElementById('updated').textContent");
    browser.wait_for(&format!("return document.getElementById('updated').textContent !== {updated}"), json!(true));
}

/// An action's error belongs to the page and the attempt it was made from: one answered after
/// the reader went to another page does not show there (found by the review of the banner).
#[test]
fn an_actions_error_answered_after_navigation_does_not_show_on_the_new_page() {
    let Some(browser) = Browser::start() else { return };
    let standalone = Standalone::start(&examples(), &[]);
    let base = standalone.api.clone();
    browser.open(&format!("{base}/#/dags/params"));
    browser.wait_for("return document.querySelectorAll('#trigger-form [data-param]').length", json!(4));
    count_posts(&browser, 1500);
    browser.script("document.querySelector('[data-param=limit]').value = '2.5'; return null");
    browser.click("[data-test=\"trigger-submit\"]");
    // The reader goes elsewhere before the refusal arrives.
    browser.script("location.hash = '#/workers'; return null");
    browser.wait_for("return window.posts === 1 && window.answered === 1", json!(true));
    wait_for_a_refresh(&browser);
    assert_eq!(browser.script("return location.hash"), json!("#/workers"));
    assert_eq!(browser.script("return document.getElementById('banner').textContent"), json!(""));
}

/// A refresh that fails (the scheduler is gone) shows though an action's error is in the
/// banner, and the action's error stays beside it (found by the review: it hid the failure).
#[test]
fn a_lost_scheduler_shows_beside_an_actions_error_and_alone() {
    let Some(browser) = Browser::start() else { return };
    let standalone = Standalone::start(&examples(), &[]);
    let base = standalone.api.clone();
    browser.open(&format!("{base}/#/dags/params"));
    browser.wait_for("return document.querySelectorAll('#trigger-form [data-param]').length", json!(4));
    browser.script("document.querySelector('[data-param=limit]').value = '2.5'; return null");
    browser.click("[data-test=\"trigger-submit\"]");
    let reason = "dag \"params\": param \"limit\": expected an integer, got 2.5";
    browser.wait_for("return document.getElementById('banner').textContent", json!(reason));
    drop(standalone);
    let both = format!(
        "const t = document.getElementById('banner').textContent; return t !== {reason:?} && t.endsWith(' | ' + {reason:?})"
    );
    browser.wait_for(&both, json!(true));

    // Without an action's error, the lost scheduler shows alone.
    let standalone = Standalone::start(&examples(), &[]);
    browser.open(&format!("{}/#/dags/params", standalone.api));
    browser.wait_for("return document.querySelectorAll('#trigger-form [data-param]').length", json!(4));
    browser.wait_for("return document.getElementById('banner').textContent", json!(""));
    drop(standalone);
    browser.wait_for("return document.getElementById('banner').textContent !== ''", json!(true));
}

/// A double-click on Cancel sends one cancel, and no refusal of a second one shows for a cancel
/// that worked (found by the review: the second click's "already cancelled" stayed for good).
#[test]
fn a_double_click_on_cancel_sends_one_cancel_and_shows_no_error() {
    let Some(browser) = Browser::start() else { return };
    let dir = std::env::temp_dir().join(format!("dagmq-double-click-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("slow.toml"),
        "id = \"slow\"\n[[task]]\nid = \"s\"\nrun = \"sleep\"\nargs = { ms = 60000 }\n",
    )
    .unwrap();
    let standalone = Standalone::start(&dir, &[]);
    let base = standalone.api.clone();
    let run = standalone.json(&["trigger", "slow"]);
    let run_id = run["run_id"].as_str().unwrap_or_else(|| panic!("{run}")).to_string();
    browser.open(&format!("{base}/#/runs/{run_id}"));
    browser.wait_for("return document.querySelector('[data-test=cancel]')?.disabled ?? null", json!(false));
    count_posts(&browser, 0);
    // Two clicks before the page renders again.
    browser.script("const b = document.querySelector('[data-test=cancel]'); b.click(); b.click(); return null");
    browser.wait_for("return document.querySelector('h2 .state')?.dataset.state ?? null", json!("cancelled"));
    browser.wait_for("return window.answered === window.posts", json!(true));
    wait_for_a_refresh(&browser);
    assert_eq!(browser.script("return [window.posts, document.getElementById('banner').textContent]"), json!([1, ""]));
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}
