//! The side-effect log of the crash and chaos tests: every execution of a task appends a `start`
//! record when it begins and an `end` record when its process is done (`start RUN TASK TRY
//! NANOS`), so a checker can tell what really ran, and when, apart from what the store says.

use std::io::Write;
use std::path::Path;

/// One record of the log.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// A `start` record, else an `end`.
    pub start: bool,
    pub run: String,
    pub task: String,
    pub try_number: u32,
    /// Nanoseconds since the epoch (`date +%s%N`).
    pub at: u128,
}

/// Every record of `log`, in the order written (none when it does not exist yet).
pub(crate) fn read(log: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            Some(Record {
                start: *parts.first()? == "start",
                run: parts.get(1)?.to_string(),
                task: parts.get(2)?.to_string(),
                try_number: parts.get(3)?.parse().ok()?,
                at: parts.get(4)?.parse().ok()?,
            })
        })
        .collect()
}

/// Now, as the log stamps records: nanoseconds since the epoch.
pub(crate) fn now() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
}

/// Appends a record (for Rust tasks; command tasks use [`command`]).
pub(crate) fn append(log: &Path, start: bool, run: &str, task: &str, try_number: u32) {
    let at = now();
    let what = if start { "start" } else { "end" };
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("the side-effect log opens");
    // One write of one short line: appends of concurrent tasks do not interleave.
    let _ = file.write_all(format!("{what} {run} {task} {try_number} {at}\n").as_bytes());
}

/// The TOML `command = [...]` line of a task that records its start, runs the shell script
/// `body`, records its end and exits with `body`'s status.
pub(crate) fn command(log: &Path, body: &str) -> String {
    let record = |what: &str| {
        format!("echo \"{what} $DAGMQ_RUN_ID $DAGMQ_TASK_ID $DAGMQ_TRY $(date +%s%N)\" >> '{}'", log.display())
    };
    let script = format!("{}; {body}\nstatus=$?; {}; exit $status", record("start"), record("end"));
    format!("command = [\"sh\", \"-c\", {}]\n", toml_string(&script))
}

/// `text` as a TOML basic string.
pub(crate) fn toml_string(text: &str) -> String {
    let escaped = text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!("\"{escaped}\"")
}
