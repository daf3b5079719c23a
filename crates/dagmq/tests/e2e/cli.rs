//! The CLI as a Unix tool: pipes that close early, plain dates, and logs fit for files and
//! collectors.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{Standalone, dagmq, examples, text};

/// Runs `command` with its standard output a pipe whose reading end is already closed (a
/// `| head` that has read what it wanted), so its first write fails with `EPIPE`.
fn into_closed_pipe(mut command: Command) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    command.stdout(writer).stderr(Stdio::piped()).output().expect("run dagmq")
}

#[test]
fn a_closed_pipe_ends_client_commands_quietly() {
    let standalone = Standalone::start(&examples(), &[]);
    let run = standalone.json(&["trigger", "hello"]);
    let run_id = run["run_id"].as_str().expect("a run id").to_string();
    for args in [
        vec!["runs", "list"],
        vec!["runs", "list", "--json"],
        vec!["dags", "list"],
        vec!["runs", "show", &run_id],
        vec!["trigger", "hello", "--wait", "--json"],
        vec!["workers"],
    ] {
        let mut command = dagmq();
        command.args(&args).env("DAGMQ_API", &standalone.api);
        let output = into_closed_pipe(command);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {}", text(&output.stderr));
        let stderr = text(&output.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
    }
}

#[test]
fn backfill_takes_plain_dates_and_says_what_it_expects_otherwise() {
    let standalone = Standalone::start(&examples(), &[]);
    // nightly_etl runs at 02:00 Warsaw time: one point on 2026-11-01, at 01:00 UTC.
    let answer =
        standalone.json(&["dags", "backfill", "nightly_etl", "--from", "2026-11-01", "--to", "2026-11-01T23:59"]);
    assert_eq!(answer["runs"], serde_json::json!(["nightly_etl--scheduled--20261101T010000.000Z"]), "{answer}");

    let output = standalone.cli(&["dags", "backfill", "nightly_etl", "--from", "Nov 1", "--to", "2026-11-02"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("backfill from: \"Nov 1\" is not a time: expected an RFC 3339 time")
            && stderr.contains("a date (2026-11-01: midnight in the DAG's timezone)"),
        "{stderr}"
    );
}

/// The log of a standalone process started with `env`, once it has started.
fn standalone_log(env: &[(&str, &str)]) -> String {
    let port = crate::support::free_port();
    let log = std::env::temp_dir().join(format!("dagmq-cli-log-{}-{port}.log", std::process::id()));
    let mut command = dagmq();
    command
        .args(["standalone", "--dags"])
        .arg(examples())
        .args(["--port", &port.to_string()])
        .env("DAGMQ_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("the log file")));
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("start dagmq standalone");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    while !read().contains("api on http://") {
        assert!(std::time::Instant::now() < deadline, "no 'api on' line within 30 s: {}", read());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    let _ = std::fs::remove_file(&log);
    text
}

#[test]
fn logs_have_no_colours_off_a_terminal_and_are_json_on_request() {
    let plain = standalone_log(&[]);
    assert!(!plain.contains('\u{1b}'), "escape codes in a log file: {plain:?}");
    assert!(plain.contains(" INFO "), "{plain}");

    let json = standalone_log(&[("DAGMQ_LOG_FORMAT", "json")]);
    let lines: Vec<&str> = json.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(value["timestamp"].is_string() && value["level"].is_string(), "{line}");
        assert!(value["message"].is_string(), "{line}");
    }
    assert!(lines.iter().any(|line| line.contains("api on http://")), "{json}");

    let output = dagmq().args(["validate", "--dags"]).arg(examples()).env("DAGMQ_LOG_FORMAT", "xml").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(text(&output.stderr).trim(), "error: DAGMQ_LOG_FORMAT=\"xml\": expected text or json");
}

/// What a standalone process started with `env` on a terminal (`script` gives it one) writes
/// there, up to its "api on" line; it is then stopped.
fn terminal_log(env: &[(&str, &str)]) -> String {
    let port = crate::support::free_port();
    let inner = format!(
        "echo pid=$$; exec timeout 60 '{}' standalone --dags '{}' --port {port}",
        env!("CARGO_BIN_EXE_dagmq"),
        examples().display()
    );
    let mut command = crate::support::without_settings(std::process::Command::new("script"));
    command
        .args(["-qfec", &inner, "/dev/null"])
        .env("DAGMQ_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("start script(1) from util-linux");
    let mut stdout = child.stdout.take().unwrap();
    let shown = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let shown = shown.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buffer) {
                shown.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        })
    };
    let read = || shown.lock().unwrap().clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !read().contains("api on http://") {
        assert!(std::time::Instant::now() < deadline, "no 'api on' line within 30 s: {:?}", read());
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = read();
    let pid = text.split("pid=").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("the shell's pid");
    // `timeout` (the shell's pid after exec) hands the TERM on to dagmq.
    let _ = std::process::Command::new("kill").args(["-TERM", pid]).status();
    let _ = child.wait();
    let _ = reader.join();
    text
}

#[test]
fn logs_are_coloured_on_a_terminal_unless_no_color_is_set() {
    let coloured = terminal_log(&[]);
    assert!(coloured.contains("\u{1b}["), "no escape codes on a terminal: {coloured:?}");
    for no_color in ["1", "true"] {
        let plain = terminal_log(&[("NO_COLOR", no_color)]);
        assert!(plain.contains(" INFO "), "{plain:?}");
        assert!(!plain.contains('\u{1b}'), "escape codes with NO_COLOR={no_color}: {plain:?}");
    }
    // An empty NO_COLOR does not count (no-color.org).
    assert!(terminal_log(&[("NO_COLOR", "")]).contains("\u{1b}["));
}

/// A loopback server that answers every connection with `answer` (nothing: it closes at once)
/// for as long as the test runs; its address.
fn peer_answering(answer: &'static [u8]) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut request);
            let _ = std::io::Write::write_all(&mut stream, answer);
        }
    });
    address
}

#[test]
fn an_api_address_that_is_not_dagmq_is_named_as_such() {
    let web =
        peer_answering(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\n<h1>x</h1");
    let closes = peer_answering(b"");
    // Other servers that answer JSON: an error like RabbitMQ's management API's, and a success.
    let json_error = peer_answering(
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 49\r\n\r\n\
          {\"error\":\"Object Not Found\",\"reason\":\"Not Found\"}",
    );
    let json_list = peer_answering(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]");
    for (api, what) in [
        (web, "GET /api/v1/runs?limit=20&offset=0 answered HTTP 404 without JSON"),
        (closes, "GET "),
        (
            json_error,
            "GET /api/v1/runs?limit=20&offset=0 answered HTTP 404 ({\"error\":\"Object Not Found\",\"reason\":\"Not Found\"}) \
             without the dagmq-api header",
        ),
        (json_list, "GET /api/v1/runs?limit=20&offset=0 answered HTTP 200 ([]) without the dagmq-api header"),
    ] {
        let output = dagmq().args(["runs", "list", "--api", &api]).output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.starts_with(&format!("error: {what}")), "{stderr}");
        assert!(
            stderr.trim_end().ends_with(&format!(
                "{api} does not answer like a dagmq scheduler's API (set --api or DAGMQ_API to it)"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn runs_list_pages_back_with_offset_and_sends_its_filters_as_values() {
    let standalone = Standalone::start(&examples(), &[]);
    let backfill = standalone.json(&["dags", "backfill", "nightly_etl", "--from", "2026-06-01", "--to", "2026-06-10"]);
    // Midnight of 10 June in Warsaw comes before that day's 02:00 point: nine runs.
    assert_eq!(backfill["runs"].as_array().map(Vec::len), Some(9), "{backfill}");
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["runs", "list", "--dag", "nightly_etl"];
        all.extend_from_slice(args);
        let runs = standalone.json(&all);
        runs.as_array()
            .unwrap_or_else(|| panic!("{runs}"))
            .iter()
            .map(|r| r["run_id"].as_str().unwrap().to_string())
            .collect()
    };
    let newest = ids(&["--limit", "4"]);
    let older = ids(&["--limit", "4", "--offset", "4"]);
    let oldest = ids(&["--limit", "4", "--offset", "8"]);
    assert_eq!((newest.len(), older.len(), oldest.len()), (4, 4, 1));
    assert_eq!(oldest.last().map(String::as_str), Some("nightly_etl--scheduled--20260601T000000.000Z"));
    let all: std::collections::BTreeSet<&String> = newest.iter().chain(&older).chain(&oldest).collect();
    assert_eq!(all.len(), 9, "each run on one page");
    // A status is one value: a `&` in it cannot add a parameter.
    let output = standalone.cli(&["runs", "list", "--status", "failed&dag_id=hello"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(text(&output.stderr).contains("status: "), "{}", text(&output.stderr));
}

#[test]
fn an_https_api_address_of_a_plain_http_server_says_so() {
    let plain = peer_answering(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    let https = plain.replace("http://", "https://");
    let output = dagmq().args(["runs", "list", "--api", &https]).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        text(&output.stderr).contains("(the server does not answer in TLS: is it a plain http:// address?)"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn the_help_of_dags_and_runs_names_every_subcommand() {
    for group in ["dags", "runs"] {
        let output = dagmq().args([group, "--help"]).output().unwrap();
        let help = text(&output.stdout);
        let summary = help.lines().next().unwrap_or_default().to_lowercase();
        let commands = help.split("Commands:").nth(1).unwrap_or_default().split("Options:").next().unwrap_or_default();
        let names: Vec<&str> =
            commands.lines().filter_map(|line| line.split_whitespace().next()).filter(|name| *name != "help").collect();
        assert!(names.len() >= 4, "{help}");
        for name in names {
            assert!(summary.contains(name), "`{group} --help` says {summary:?}, which leaves out {name}");
        }
    }
}

#[test]
fn runs_show_lists_tasks_in_graph_order() {
    let dir = std::env::temp_dir().join(format!("dagmq-cli-order-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("order.toml"),
        "id = \"order\"\n[[task]]\nid = \"m_last\"\ncommand = [\"true\"]\nafter = [\"a_second\"]\n\
         [[task]]\nid = \"z_first\"\ncommand = [\"true\"]\n\
         [[task]]\nid = \"a_second\"\ncommand = [\"true\"]\nafter = [\"z_first\"]\n",
    )
    .unwrap();
    let standalone = Standalone::start(&dir, &[]);
    let run = standalone.json(&["trigger", "order", "--wait"]);
    let run_id = run["run_id"].as_str().unwrap_or_else(|| panic!("{run}")).to_string();
    let shown = standalone.json(&["runs", "show", &run_id]);
    let order: Vec<&str> =
        shown["tasks"].as_array().unwrap().iter().map(|task| task["task_id"].as_str().unwrap()).collect();
    assert_eq!(order, ["z_first", "a_second", "m_last"]);
    let table = text(&standalone.cli(&["runs", "show", &run_id]).stdout);
    let rows: Vec<&str> = table.lines().skip_while(|line| !line.starts_with("TASK")).collect();
    assert!(rows[0].starts_with("TASK") && rows[0].contains("WAITING FOR"), "{table}");
    let ids: Vec<&str> = rows[1..].iter().filter_map(|row| row.split_whitespace().next()).collect();
    assert_eq!(ids, ["z_first", "a_second", "m_last"], "{table}");
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_task_on_a_pool_no_worker_consumes_says_so_and_the_scheduler_logs_it() {
    let dir = std::env::temp_dir().join(format!("dagmq-cli-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("gpu.toml"),
        "id = \"gpu\"\nmax_active_runs = 1\n[[task]]\nid = \"train\"\ncommand = [\"true\"]\nqueue = \"gpu\"\n",
    )
    .unwrap();
    let log = dir.join("standalone.log");
    let standalone = Standalone::start_logged(&dir, &log);
    let run_id = standalone.json(&["trigger", "gpu"])["run_id"].as_str().unwrap().to_string();
    let waiting = || standalone.json(&["runs", "show", &run_id])["tasks"][0]["waiting_for"].clone();
    // The scheduler looks at the worker registry every 5 s.
    standalone.wait_until(Duration::from_secs(15), || waiting() == "no live worker consumes pool gpu");
    let table = text(&standalone.cli(&["runs", "show", &run_id]).stdout);
    assert!(
        table.lines().any(|row| row.starts_with("train") && row.contains("queued  no live worker consumes pool gpu")),
        "{table}"
    );
    // The capacity answer names the pool's backlog and that nobody consumes it.
    let (status, _, body) = get_with(&standalone.api, "/api/v1/capacity", "");
    assert_eq!(status, 200, "{body}");
    let capacity: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        capacity["queues"],
        serde_json::json!([
            {"queue": "default", "queued": 0, "running": 0, "workers": 1, "slots": capacity["workers"][0]["concurrency"]},
            {"queue": "gpu", "queued": 1, "running": 0, "workers": 0, "slots": 0,
             "waiting_for": "no live worker consumes pool gpu"},
        ]),
        "{capacity}"
    );
    // Logged at the second look that finds it so.
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    let line = "tasks queued on pool \"gpu\" wait: no live worker consumes it (live workers consume: default)";
    standalone.wait_until(Duration::from_secs(15), || logged().contains(line));
    // `trigger --wait` says what its run waits for, here behind the first run (max_active_runs)...
    let mut waiter = dagmq()
        .args(["trigger", "gpu", "--wait"])
        .env("DAGMQ_API", &standalone.api)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut progress = std::io::BufReader::new(waiter.stderr.take().unwrap());
    let mut said = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !said.contains("; waiting: max_active_runs 1/1") {
        assert!(std::time::Instant::now() < deadline, "no waiting reason within 30 s: {said}");
        assert!(std::io::BufRead::read_line(&mut progress, &mut said).unwrap() > 0, "ended early: {said}");
    }
    let _ = waiter.kill();
    let _ = waiter.wait();
    // ... as `runs show` does for the run (its tasks have their WAITING FOR column).
    let held = standalone.json(&["runs", "list", "--dag", "gpu", "--status", "queued"]);
    let held_id = held[0]["run_id"].as_str().unwrap_or_else(|| panic!("{held}")).to_string();
    let shown = text(&standalone.cli(&["runs", "show", &held_id]).stdout);
    assert!(shown.contains("\nstate    queued\nwaiting  max_active_runs 1/1\n"), "{shown}");
    let cancelled = standalone.cli(&["runs", "cancel", &held_id]);
    assert!(cancelled.status.success(), "{cancelled:?}");
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GET of `path` with `extra` headers: (status, headers in lower case, body).
fn get_with(api: &str, path: &str, extra: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let address = api.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{extra}\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn api_answers_carry_an_etag_and_an_unchanged_one_costs_a_304() {
    let standalone = Standalone::start(&examples(), &[]);
    let (status, head, body) = get_with(&standalone.api, "/api/v1/dags", "");
    assert_eq!(status, 200);
    assert!(head.contains("cache-control: no-cache, private"), "{head}");
    assert!(head.contains("dagmq-api: v1"), "every answer names the API: {head}");
    let tag = head.lines().find_map(|line| line.strip_prefix("etag: ")).expect("an etag").to_string();
    assert!(!body.is_empty());
    let (status, head, body) = get_with(&standalone.api, "/api/v1/dags", &format!("If-None-Match: {tag}\r\n"));
    assert_eq!((status, body.as_str()), (304, ""), "unchanged");
    assert!(head.contains("dagmq-api: v1"), "{head}");
    let (status, head, _) = get_with(&standalone.api, "/api/v1/runs/nope", "");
    assert_eq!(status, 404);
    assert!(head.contains("dagmq-api: v1"), "an error names the API too: {head}");
    assert!(standalone.cli(&["dags", "pause", "hello"]).status.success());
    let (status, head, _) = get_with(&standalone.api, "/api/v1/dags", &format!("If-None-Match: {tag}\r\n"));
    assert_eq!(status, 200, "changed: the whole answer again");
    assert!(!head.contains(&format!("etag: {tag}")), "{head}");
}

#[test]
fn each_role_takes_only_its_own_flags_and_lists_only_them() {
    for (role, foreign) in [
        (
            "worker",
            vec!["--port", "9", "--pool", "db=1", "--retention", "1d", "--insecure", "--allowed-origin", "https://x"],
        ),
        (
            "scheduler",
            vec!["--concurrency", "4", "--queues", "gpu", "--no-eager", "--metrics-port", "9", "--grace-period", "5s"],
        ),
    ] {
        let help = text(&dagmq().args([role, "--help"]).output().unwrap().stdout);
        for flag in foreign.iter().filter(|f| f.starts_with("--")) {
            assert!(!help.contains(&format!("{flag} ")), "`{role} --help` lists {flag}:\n{help}");
            let mut args = vec![role, *flag];
            if let Some(value) = foreign.iter().skip_while(|f| *f != flag).nth(1).filter(|v| !v.starts_with("--")) {
                args.push(value);
            }
            let output = dagmq().args(&args).output().unwrap();
            assert_eq!(output.status.code(), Some(2), "{args:?}");
            assert!(
                text(&output.stderr).contains(&format!("unexpected argument '{flag}'")),
                "{args:?}: {}",
                text(&output.stderr)
            );
        }
    }
    let worker = text(&dagmq().args(["worker", "--help"]).output().unwrap().stdout);
    for flag in ["--concurrency", "--queues", "--grace-period", "--amqp", "--redis", "--dags", "--otlp-endpoint"] {
        assert!(worker.contains(flag), "`worker --help` leaves out {flag}");
    }
    let scheduler = text(&dagmq().args(["scheduler", "--help"]).output().unwrap().stdout);
    for flag in
        ["--port", "--pool", "--retention", "--notify-webhook", "--amqp", "--redis", "--dags", "--otlp-endpoint"]
    {
        assert!(scheduler.contains(flag), "`scheduler --help` leaves out {flag}");
    }
    // The grace period has a flag, checked like every duration.
    let output = dagmq().args(["worker", "--grace-period", "soon"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("--grace-period: "), "{}", text(&output.stderr));
    // A worker of no slots is a usage error, not a worker of one that says 0.
    for role in ["worker", "standalone"] {
        let output = dagmq().args([role, "--concurrency", "0", "--dags"]).arg(examples()).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{role}: {output:?}");
        assert!(
            text(&output.stderr).contains("--concurrency is 0: a worker needs at least 1 slot"),
            "{}",
            text(&output.stderr)
        );
    }
}

#[test]
fn listing_offsets_past_the_bound_are_a_clear_400() {
    let standalone = Standalone::start(&examples(), &[]);
    for path in ["/api/v1/runs?offset=10000001", "/api/v1/dags/hello/grid?offset=18446744073709551615"] {
        let (status, _, body) = get_with(&standalone.api, path, "");
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("offset must be at most 10000000"), "{path}: {body}");
    }
    let (status, _, body) = get_with(&standalone.api, "/api/v1/runs?offset=10000000", "");
    assert_eq!((status, body.as_str()), (200, "[]"));
}

#[test]
fn a_query_string_the_api_cannot_read_is_a_json_400_that_names_the_parameter() {
    let standalone = Standalone::start(&examples(), &[]);
    for (path, names) in [
        ("/api/v1/runs?limit=many", "limit"),
        ("/api/v1/runs?status=sideways", "status"),
        ("/api/v1/dags/hello/grid?offset=-1", "offset"),
        ("/api/v1/runs/nope/tasks/t/logs?from=x", "from"),
    ] {
        let (status, _, body) = get_with(&standalone.api, path, "");
        assert_eq!(status, 400, "{path}: {body}");
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("{path}: no error field: {body}"));
        assert!(error.contains(names), "{path}: the error does not name {names}: {error}");
    }
}

/// The DAG grid tags its answer itself, from what it shows: a poll on which nothing changed is
/// a 304, a task that changes state changes the tag, and a finished run keeps one tag (read
/// from the store once, then from the grid's cache).
#[test]
fn the_grid_is_a_304_until_a_task_changes_and_a_finished_run_keeps_its_tag() {
    let dir = std::env::temp_dir().join(format!("dagmq-grid-tag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("gated.toml"),
        format!(
            "id = \"gated\"\n[[task]]\nid = \"wait\"\ncommand = [\"sh\", \"-c\", \"while [ ! -e {} ]; do sleep 0.1; \
             done\"]\n[[task]]\nid = \"after\"\nrun = \"noop\"\nafter = [\"wait\"]\n",
            dir.join("go").display()
        ),
    )
    .unwrap();
    let standalone = Standalone::start(&dir, &[]);
    let path = "/api/v1/dags/gated/grid";
    let tag_of = |head: &str| head.lines().find_map(|line| line.strip_prefix("etag: ")).expect("an etag").to_string();
    let run_id = standalone.json(&["trigger", "gated"])["run_id"].as_str().unwrap().to_string();
    standalone.wait_until(Duration::from_secs(30), || {
        standalone.json(&["runs", "show", &run_id])["tasks"][0]["state"] == "running"
    });
    let (status, head, body) = get_with(&standalone.api, path, "");
    assert_eq!(status, 200);
    assert!(head.contains("cache-control: no-cache, private"), "{head}");
    assert!(body.contains("\"wait\":\"running\""), "{body}");
    let running = tag_of(&head);
    let (status, _, body) = get_with(&standalone.api, path, &format!("If-None-Match: {running}\r\n"));
    assert_eq!((status, body.as_str()), (304, ""), "nothing changed");
    std::fs::write(dir.join("go"), "").unwrap();
    standalone
        .wait_until(Duration::from_secs(30), || standalone.json(&["runs", "show", &run_id])["state"] == "success");
    let (status, head, body) = get_with(&standalone.api, path, &format!("If-None-Match: {running}\r\n"));
    assert_eq!(status, 200, "the run finished: {head}");
    assert!(body.contains("\"wait\":\"success\",") || body.contains("\"wait\":\"success\"}"), "{body}");
    let finished = tag_of(&head);
    assert_ne!(finished, running);
    for _ in 0..2 {
        let (status, _, _) = get_with(&standalone.api, path, &format!("If-None-Match: {finished}\r\n"));
        assert_eq!(status, 304, "a finished run's grid changed its tag");
    }
    drop(standalone);
    let _ = std::fs::remove_dir_all(&dir);
}
