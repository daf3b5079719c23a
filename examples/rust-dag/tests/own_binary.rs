//! The example of a user's own binary: its Rust DAG runs end to end, dynamic tasks included.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn healthy(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let mut response = String::new();
    stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.0 200")
}

#[test]
fn rust_dag_with_follow_ups_and_retries_succeeds() {
    let binary = env!("CARGO_BIN_EXE_rust-dag-example");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new(binary)
        .args(["standalone", "--port", &port.to_string()])
        .env_remove("DAGMQ_DAGS")
        .env_remove("DAGMQ_AMQP_URL")
        .env_remove("DAGMQ_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthy(port) {
        assert!(Instant::now() < deadline, "the example binary did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let api = format!("http://127.0.0.1:{port}");
    let client = |args: &[&str]| Command::new(binary).args(args).env("DAGMQ_API", &api).output().unwrap();
    let output = client(&["trigger", "word_count", "--param", "text=a b a c", "--wait", "--json"]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let run: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(run["state"], "success");
    let mut ids: Vec<&str> = run["tasks"].as_array().unwrap().iter().map(|t| t["task_id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, vec!["done", "flaky", "split", "split.count0", "split.count1"]);
    let flaky = run["tasks"].as_array().unwrap().iter().find(|t| t["task_id"] == "flaky").unwrap();
    assert_eq!(flaky["try_number"], 2);
}
