//! Moves a try's log lines and progress from the task to the store in batches, off the task's
//! path: the task never waits for the store. Whatever arrives while one write is in flight goes
//! into the next write.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use dagmq_core::Store;
use dagmq_core::records::{LOG_TAIL_LINE_BYTES, LOG_TAIL_LINES};
use dagmq_core::store::{LOG_BYTES_CUT_MARKER, LOG_CUT_MARKER, MAX_LOG_BYTES_PER_TRY, MAX_LOG_LINES_PER_TRY, cut_line};
use dagmq_core::task::{LogSink, ProgressSink};
use tokio::sync::mpsc;

/// One item from a running try.
enum Item {
    /// A log line.
    Line(String),
    /// The latest progress.
    Progress(f64),
}

/// The task's side: implements both sinks by sending to the flusher.
///
/// The channel is bounded by what a try may log: every line is cut to
/// [`MAX_LOG_LINE_BYTES`], and once a try has sent [`MAX_LOG_LINES_PER_TRY`] lines or
/// [`MAX_LOG_BYTES_PER_TRY`] bytes, one cut marker follows and further lines are dropped here.
/// So however fast a task prints and however slow the store is, a try holds at most about
/// 1 MiB of log in memory, and the task never waits for the store.
#[derive(Clone)]
pub(crate) struct ChannelSink {
    /// To the flusher.
    sender: mpsc::UnboundedSender<Item>,
    /// Secret parameter values, masked in every line.
    secrets: Arc<Vec<String>>,
    /// Lines and bytes sent so far, and whether the log was cut.
    sent: Arc<Mutex<Sent>>,
}

/// What a try's sink has sent.
#[derive(Default)]
struct Sent {
    /// Lines sent.
    lines: usize,
    /// Bytes of lines sent.
    bytes: usize,
    /// Whether the cut marker was sent.
    cut: bool,
    /// The last lines, for [`ChannelSink::tail`].
    tail: VecDeque<String>,
}

impl Sent {
    /// Keeps `line` among the last [`LOG_TAIL_LINES`], cut to [`LOG_TAIL_LINE_BYTES`].
    fn keep(&mut self, line: &str) {
        if self.tail.len() == LOG_TAIL_LINES {
            self.tail.pop_front();
        }
        let mut end = line.len().min(LOG_TAIL_LINE_BYTES);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        self.tail.push_back(line[..end].to_string());
    }
}

impl ChannelSink {
    /// The last lines sent (masked like every line), oldest first, the cut marker included.
    pub(crate) fn tail(&self) -> Vec<String> {
        self.sent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).tail.iter().cloned().collect()
    }
}

impl LogSink for ChannelSink {
    fn line(&self, line: String) {
        let line = cut_line(line);
        let line = if self.secrets.is_empty() { line } else { dagmq_core::task::mask_line(&line, &self.secrets) };
        let mut sent = self.sent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if sent.cut {
            return;
        }
        if sent.lines >= MAX_LOG_LINES_PER_TRY || sent.bytes + line.len() > MAX_LOG_BYTES_PER_TRY {
            sent.cut = true;
            let marker = if sent.lines >= MAX_LOG_LINES_PER_TRY { LOG_CUT_MARKER } else { LOG_BYTES_CUT_MARKER };
            sent.keep(marker);
            let _ = self.sender.send(Item::Line(marker.to_string()));
            return;
        }
        sent.lines += 1;
        sent.bytes += line.len();
        sent.keep(&line);
        let _ = self.sender.send(Item::Line(line));
    }
}

impl ProgressSink for ChannelSink {
    fn set(&self, fraction: f64) {
        let _ = self.sender.send(Item::Progress(fraction));
    }
}

/// A sink for one try and its flusher: a future to poll beside the try (no task of its own),
/// which ends, having written everything, once every sink clone is dropped.
pub(crate) fn start(
    store: Arc<dyn Store>,
    run_id: String,
    task_id: String,
    try_number: u32,
    secrets: Vec<String>,
) -> (ChannelSink, impl Future<Output = ()>) {
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let flusher = async move {
        let mut lines = Vec::new();
        let mut progress = None;
        loop {
            let first = receiver.recv().await;
            let done = first.is_none();
            for item in first.into_iter().chain(std::iter::from_fn(|| receiver.try_recv().ok())) {
                match item {
                    Item::Line(line) => lines.push(line),
                    Item::Progress(p) => progress = Some(p),
                }
            }
            if !lines.is_empty() {
                if let Err(err) = store.append_log(&run_id, &task_id, try_number, &lines).await {
                    tracing::error!(run = %run_id, task = %task_id, "writing log: {err}");
                }
                lines.clear();
            }
            if let Some(p) = progress.take()
                && let Err(err) = store.set_progress(&run_id, &task_id, try_number, p).await
            {
                tracing::error!(run = %run_id, task = %task_id, "writing progress: {err}");
            }
            if done {
                return;
            }
        }
    };
    (ChannelSink { sender, secrets: Arc::new(secrets), sent: Arc::new(Mutex::new(Sent::default())) }, flusher)
}
