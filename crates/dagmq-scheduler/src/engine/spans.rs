//! The root span of each run that ends (see [`dagmq_core::trace`]): its ids derived from the run
//! id, so whichever scheduler ends the run emits the span the workers' try spans name as parent.

use dagmq_core::trace::{FinishedSpan, SpanValue, TraceParent};
use dagmq_core::{RunRecord, RunState};

use super::Engine;

impl Engine {
    /// Hands the root span of the run `record`, just ended, to the span sink, if there is one.
    /// It spans from the run's start (its creation, for a run that never started) to its end.
    pub(super) fn record_run_span(&self, record: &RunRecord) {
        if let Some(spans) = &self.config.spans {
            spans.record(run_span(record, self.now_cache));
        }
    }
}

/// The root span of the run `record`, ended at `now` unless the record says when.
pub(super) fn run_span(record: &RunRecord, now: chrono::DateTime<chrono::Utc>) -> FinishedSpan {
    let parent = TraceParent::of_run(&record.run_id);
    let start = record.started_at.unwrap_or(record.created_at);
    let end = record.ended_at.unwrap_or(now).max(start);
    let kind = serde_json::to_value(record.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    FinishedSpan {
        trace_id: parent.trace_id,
        span_id: parent.span_id,
        parent_span_id: None,
        name: format!("run {}", record.dag_id),
        start,
        end,
        attributes: vec![
            ("dagmq.dag_id", SpanValue::Str(record.dag_id.clone())),
            ("dagmq.run_id", SpanValue::Str(record.run_id.clone())),
            ("dagmq.state", SpanValue::Str(record.state.as_str().to_string())),
            ("dagmq.run_kind", SpanValue::Str(kind)),
            ("dagmq.logical_date", SpanValue::Str(record.logical_date.to_rfc3339())),
        ],
        error: (record.state == RunState::Failed).then(|| "the run failed".to_string()),
    }
}
