//! Exporting the spans of runs and tries over OTLP/HTTP (JSON) with the OpenTelemetry SDK's batch
//! processor (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`); see [`dagmq_core::trace`] for
//! what the spans are.
//!
//! Recording a span never waits: it goes into the batch processor's bounded queue (2048 spans),
//! which a thread of its own empties every second, in batches of up to 512, each POST given 10 s.
//! A full queue drops spans; a collector that is down costs the spans of the batches it
//! refused, logged once until it answers again.
//!
//! The requests go through the workspace's reqwest client (rustls, the `--tls-*` flags), run on
//! the process's tokio runtime: the batch processor's thread has no runtime of its own.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use dagmq_core::TlsSettings;
use dagmq_core::trace::{FinishedSpan, SpanSink, SpanValue};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};

/// Longest a POST of one batch of spans may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Spans waiting for export at most; more are dropped.
const MAX_QUEUE: usize = 2048;

/// How often the waiting spans are sent.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// A span sink exporting over OTLP/HTTP; [`OtlpSink::shutdown`] sends what is left.
#[derive(Debug)]
pub struct OtlpSink {
    /// The SDK's batch processor, with its OTLP exporter.
    processor: BatchSpanProcessor,
    /// The scope every span is reported under (`dagmq`, this version).
    scope: InstrumentationScope,
}

impl OtlpSink {
    /// A sink sending to `{endpoint}/v1/traces` (`endpoint` as in `OTEL_EXPORTER_OTLP_ENDPOINT`:
    /// the collector's base URL) as service `service` (`dagmq-scheduler`, ...). Must be called
    /// inside the tokio runtime, which then carries the requests.
    pub fn start(endpoint: &str, service: &str, tls: &TlsSettings) -> Result<OtlpSink, String> {
        let base = endpoint.trim().trim_end_matches('/');
        let traces = format!("{base}/v1/traces");
        let http = crate::client::HttpClient::new(&traces, tls, EXPORT_TIMEOUT)
            .map_err(|e| format!("--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): {e}"))?;
        let client = OnRuntime {
            client: http.inner().clone(),
            runtime: tokio::runtime::Handle::try_current().map_err(|e| format!("no async runtime: {e}"))?,
            shown: http.shown().to_string(),
            failing: Arc::new(AtomicBool::new(false)),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(traces)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): {e}"))?;
        let config =
            BatchConfigBuilder::default().with_max_queue_size(MAX_QUEUE).with_scheduled_delay(EXPORT_EVERY).build();
        let mut processor = BatchSpanProcessor::builder(exporter).with_batch_config(config).build();
        processor.set_resource(
            &Resource::builder_empty()
                .with_service_name(service.to_string())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let scope = InstrumentationScope::builder("dagmq").with_version(env!("CARGO_PKG_VERSION")).build();
        Ok(OtlpSink { processor, scope })
    }

    /// Sends the spans still waiting (waiting at most [`EXPORT_TIMEOUT`]) and stops the export
    /// thread. Call it off the runtime's threads (`spawn_blocking`): it blocks.
    pub fn shutdown(&self) {
        if let Err(err) = self.processor.shutdown_with_timeout(EXPORT_TIMEOUT) {
            tracing::warn!("stopping the span export: {err}");
        }
    }
}

impl SpanSink for OtlpSink {
    fn record(&self, span: FinishedSpan) {
        self.processor.on_end(span_data(span, &self.scope));
    }
}

/// The SDK's form of a finished span.
fn span_data(span: FinishedSpan, scope: &InstrumentationScope) -> SpanData {
    let context = SpanContext::new(
        TraceId::from_bytes(span.trace_id),
        SpanId::from_bytes(span.span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    let attributes = span
        .attributes
        .into_iter()
        .map(|(key, value)| match value {
            SpanValue::Str(text) => KeyValue::new(key, text),
            SpanValue::Int(number) => KeyValue::new(key, number),
        })
        .collect();
    SpanData {
        span_context: context,
        parent_span_id: span.parent_span_id.map_or(SpanId::INVALID, SpanId::from_bytes),
        // A try's parent, the run's root span, is another process's.
        parent_span_is_remote: span.parent_span_id.is_some(),
        span_kind: if span.parent_span_id.is_some() { SpanKind::Consumer } else { SpanKind::Internal },
        name: Cow::Owned(span.name),
        start_time: SystemTime::from(span.start),
        end_time: SystemTime::from(span.end),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match span.error {
            Some(error) => Status::error(error),
            // Unset, as OpenTelemetry asks of instrumentation for what did not fail.
            None => Status::Unset,
        },
        instrumentation_scope: scope.clone(),
    }
}

/// The OTLP exporter's HTTP client: the workspace's reqwest client, its requests run on the
/// process's tokio runtime. Logs the first failure of a series, and the recovery.
#[derive(Debug, Clone)]
struct OnRuntime {
    /// The client (TLS as the `--tls-*` flags say).
    client: reqwest::Client,
    /// The runtime the requests run on.
    runtime: tokio::runtime::Handle,
    /// The endpoint as logs show it (a password masked).
    shown: String,
    /// Whether the last request failed.
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move { client.send_bytes(request).await });
        let result = match sent.await {
            Ok(result) => result,
            Err(err) => Err(Box::new(err) as HttpError),
        };
        let failure = match &result {
            Ok(response) if !response.status().is_success() => Some(format!("answered {}", response.status())),
            Ok(_) => None,
            Err(err) => Some(error_chain(err.as_ref())),
        };
        match failure {
            Some(why) => {
                if !self.failing.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "exporting spans to {}: {why}; spans are dropped until it answers (logged once)",
                        self.shown
                    );
                }
            }
            None => {
                if self.failing.swap(false, Ordering::SeqCst) {
                    tracing::info!("exporting spans to {} again", self.shown);
                }
            }
        }
        result
    }
}

/// An error with its causes, `: `-separated.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
