//! Distributed traces of runs: one trace per run, a root span for the run (the scheduler's),
//! one span per try (the worker's), and the W3C `traceparent` that joins them.
//!
//! A run's trace id and root span id are derived from its run id ([`TraceParent::of_run`]), so
//! any scheduler (after a failover too) and any worker names the same trace without storing
//! anything. Task messages carry the parent as the `traceparent` header
//! ([`TRACEPARENT_HEADER`]); a message without one (an outside producer, an older scheduler)
//! gets the run's derived parent.
//!
//! This crate only describes finished spans ([`FinishedSpan`]) and hands them to a
//! [`SpanSink`]; the `dagmq` binary's sink exports them over OTLP. Recording a span never waits.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The message header that carries a task message's trace parent, as W3C Trace Context's
/// `traceparent` (`00-<trace id>-<parent span id>-01`).
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A trace and the span a new span is a child of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace (16 bytes, never all zero).
    pub trace_id: [u8; 16],
    /// The parent span (8 bytes, never all zero).
    pub span_id: [u8; 8],
}

impl TraceParent {
    /// The trace of run `run_id` and its root span, derived from the run id alone.
    pub fn of_run(run_id: &str) -> TraceParent {
        let high = fnv1a(0x6461_676d_7174_7261, run_id.as_bytes());
        let low = fnv1a(0x6461_676d_7174_7262, run_id.as_bytes());
        let span = fnv1a(0x6461_676d_7172_756e, run_id.as_bytes());
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&high.to_be_bytes());
        trace_id[8..].copy_from_slice(&low.to_be_bytes());
        TraceParent { trace_id: nonzero(trace_id), span_id: nonzero(span.to_be_bytes()) }
    }

    /// Reads a `traceparent` header (version 00, or a later version's first four fields as the
    /// specification says); `None` for anything else, including all-zero ids.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let header = header.trim();
        let mut fields = header.split('-');
        let version = fields.next()?;
        let trace = fields.next()?;
        let span = fields.next()?;
        let flags = fields.next()?;
        if version.len() != 2 || version == "ff" || (version == "00" && fields.next().is_some()) {
            return None;
        }
        if flags.len() != 2 || !flags.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?;
        let span_id: [u8; 8] = hex(span)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, span_id })
    }

    /// The `traceparent` header naming this parent, sampled.
    pub fn header(&self) -> String {
        format!("00-{}-{}-01", to_hex(&self.trace_id), to_hex(&self.span_id))
    }

    /// The parent a task message of run `run_id` names: its `traceparent` header when it has a
    /// valid one, the run's derived root span otherwise.
    pub fn of_message(header: Option<&str>, run_id: &str) -> TraceParent {
        header.and_then(TraceParent::parse).unwrap_or_else(|| TraceParent::of_run(run_id))
    }
}

/// The headers of a task message of run `run_id`: its trace parent.
pub fn task_headers(run_id: &str) -> Vec<(String, String)> {
    vec![(TRACEPARENT_HEADER.to_string(), TraceParent::of_run(run_id).header())]
}

/// A new random span id.
pub fn new_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    id.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    nonzero(id)
}

/// A span attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum SpanValue {
    /// Text.
    Str(String),
    /// A whole number.
    Int(i64),
}

/// A span that has ended, ready for export.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedSpan {
    /// Its trace.
    pub trace_id: [u8; 16],
    /// Its own id.
    pub span_id: [u8; 8],
    /// Its parent; `None` for a trace's root span.
    pub parent_span_id: Option<[u8; 8]>,
    /// What it stands for: `run <dag>` or `try <task>`.
    pub name: String,
    /// When it began.
    pub start: DateTime<Utc>,
    /// When it ended.
    pub end: DateTime<Utc>,
    /// Attributes (`dagmq.run_id`, ...).
    pub attributes: Vec<(&'static str, SpanValue)>,
    /// Why it failed, for a span whose outcome is a failure (the span's error status).
    pub error: Option<String>,
}

/// Where finished spans go. `record` must not wait: a sink that cannot keep up drops spans.
pub trait SpanSink: Send + Sync + fmt::Debug {
    /// Takes one finished span.
    fn record(&self, span: FinishedSpan);
}

/// A sink that may be absent: tracing off costs nothing.
pub type Spans = Option<Arc<dyn SpanSink>>;

/// FNV-1a (64-bit) over `bytes` from `seed`: stable across builds and platforms, unlike the
/// standard library's hasher, which is what a derived id needs.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut hash = seed ^ 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final mix, so that run ids differing in their last byte differ in every byte.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash
}

/// `id`, or the same with its last byte 1 when it is all zero (an invalid id in W3C and OTLP).
fn nonzero<const N: usize>(mut id: [u8; N]) -> [u8; N] {
    if id.iter().all(|&b| b == 0) {
        id[N - 1] = 1;
    }
    id
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

/// `N` bytes from exactly `2N` lower-case hex digits (the only case W3C allows).
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0u8; N];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        bytes[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_names_the_same_trace_every_time_and_runs_differ() {
        let a = TraceParent::of_run("run-1");
        assert_eq!(a, TraceParent::of_run("run-1"));
        let b = TraceParent::of_run("run-2");
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
        assert_eq!(a.header().len(), 55);
    }

    /// Pinned: every build must derive the same ids, or schedulers and workers of two versions
    /// (a rolling upgrade, a failover to an older standby) would split a run's trace.
    #[test]
    fn derived_ids_are_stable_across_builds() {
        let parent = TraceParent::of_run("manual__2026-01-01T00:00:00+00:00");
        assert_eq!(parent.header(), PINNED);
    }

    const PINNED: &str = "00-c2ea6436bdeebb6d48c2f881b71099fe-c2e5bc6033de2494-01";

    #[test]
    fn a_header_reads_back() {
        let parent = TraceParent::of_run("x");
        assert_eq!(TraceParent::parse(&parent.header()), Some(parent));
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let read = TraceParent::parse(text).expect("valid");
        assert_eq!(to_hex(&read.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&read.span_id), "00f067aa0ba902b7");
        // A later version may add fields after the flags.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
    }

    #[test]
    fn a_bad_header_is_ignored_and_the_run_names_the_parent() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
            assert_eq!(TraceParent::of_message(Some(bad), "r"), TraceParent::of_run("r"));
        }
        assert_eq!(TraceParent::of_message(None, "r"), TraceParent::of_run("r"));
    }

    #[test]
    fn new_span_ids_differ() {
        assert_ne!(new_span_id(), new_span_id());
    }
}
