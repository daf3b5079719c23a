//! Exporting the spans of runs and tries over OTLP/HTTP (JSON) with the OpenTelemetry SDK's batch
//! processor (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`; `OTEL_TRACES_EXPORTER` and the
//! protocol variables are read as [`OtlpTarget::from_settings`] says); see [`dagmq_core::trace`]
//! for what the spans are.
//!
//! Recording a span never waits: it goes into the batch processor's bounded queue (2048 spans),
//! which a thread of its own empties every second, in batches of up to 512, each POST given 10 s.
//! A full queue drops spans; a collector that is down costs the spans of the batches it
//! refused, logged once until it answers again. A stopping process gives its last spans 2 s.
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

/// Longest a stopping process waits for its last spans to be sent: a collector that is slow or
/// never answers delays the exit by this much at most (not by [`EXPORT_TIMEOUT`]).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Where spans go: OpenTelemetry's two variables, the traces-only one used as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtlpTarget {
    /// A collector's base URL (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`): spans go to
    /// `{url}/v1/traces`.
    Base(String),
    /// The URL spans are POSTed to (`--otlp-traces-endpoint`,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), as is.
    Traces(String),
}

/// OpenTelemetry's variables that dagmq reads, as the environment holds them.
#[derive(Debug, Default, Clone)]
pub struct OtelVars {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub base: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
    pub traces: Option<String>,
    /// `OTEL_TRACES_EXPORTER`: a list of exporters; dagmq has only OTLP (or `none`).
    pub exporter: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub protocol: Option<(&'static str, String)>,
    /// `OTEL_SDK_DISABLED`: `true` turns traces off, as `OTEL_TRACES_EXPORTER=none` does.
    pub sdk_disabled: Option<String>,
}

impl OtelVars {
    /// The variables of this process's environment.
    pub fn from_env() -> OtelVars {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let protocol = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
            .into_iter()
            .find_map(|name| env(name).map(|value| (name, value)));
        OtelVars {
            base: env("OTEL_EXPORTER_OTLP_ENDPOINT"),
            traces: env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            exporter: env("OTEL_TRACES_EXPORTER"),
            protocol,
            sdk_disabled: env("OTEL_SDK_DISABLED"),
        }
    }
}

/// Names of the OTLP exporter in `OTEL_TRACES_EXPORTER` (`otlp`, and Python's two).
const OTLP_EXPORTERS: [&str; 3] = ["otlp", "otlp_proto_http", "otlp_proto_grpc"];

/// Exporters that are not OTLP, which `OTEL_TRACES_EXPORTER` may name instead (`none` among
/// them); any other name is taken for a mistake and `otlp` kept.
const OTHER_EXPORTERS: [&str; 5] = ["none", "console", "logging", "zipkin", "jaeger"];

/// A variable's value as a warning shows it: quoted, and cut short.
fn shown_value(value: &str) -> String {
    let cut: String = value.chars().take(40).collect();
    match cut.len() < value.len() {
        true => format!("{cut:?}..."),
        false => format!("{cut:?}"),
    }
}

/// Where spans go, if anywhere, and what the log should say about the environment's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpChoice {
    /// The collector, or none (no spans are recorded).
    pub target: Option<OtlpTarget>,
    /// Why the environment's collector is not used, or how its variables are read otherwise
    /// than they say: a warning for the log.
    pub warning: Option<String>,
    /// Whether a flag named the target: only the headers dagmq sends go with each request then,
    /// none of the environment's OTLP headers (meant for its own collector).
    pub from_flag: bool,
}

impl OtlpTarget {
    /// The target the flags name, the traces-only one first, else the environment's
    /// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`): a flag given
    /// on the command line beats a variable the environment may hold for other programs. None
    /// when every one is unset or blank.
    ///
    /// The environment's collector is not used when `OTEL_TRACES_EXPORTER` names a non-OTLP
    /// exporter and no `otlp` (`none` turns traces off), when `OTEL_SDK_DISABLED` is `true`, nor
    /// when its protocol is `grpc` (or the exporter Python's `otlp_proto_grpc`) and the endpoint
    /// a gRPC one: port 4317, or no http:// or https:// URL (dagmq speaks OTLP/HTTP, which a gRPC
    /// port does not take); the choice's warning says so. A flag is used whatever these variables
    /// say, and its collector gets only the headers dagmq sends.
    pub fn from_settings(base: Option<&str>, traces: Option<&str>) -> OtlpChoice {
        OtlpTarget::choose([base.map(str::to_string), traces.map(str::to_string)], &OtelVars::from_env())
    }

    /// The choice of `[base, traces]` flags and the variables, in that order of precedence.
    fn choose(flags: [Option<String>; 2], vars: &OtelVars) -> OtlpChoice {
        let given =
            |value: &Option<String>| value.as_deref().map(str::trim).filter(|url| !url.is_empty()).map(str::to_string);
        let [base_flag, traces_flag] = &flags;
        let flagged = given(traces_flag).map(OtlpTarget::Traces).or_else(|| given(base_flag).map(OtlpTarget::Base));
        if flagged.is_some() {
            return OtlpChoice { target: flagged, warning: None, from_flag: true };
        }
        let Some(target) =
            given(&vars.traces).map(OtlpTarget::Traces).or_else(|| given(&vars.base).map(OtlpTarget::Base))
        else {
            return OtlpChoice { target: None, warning: None, from_flag: false };
        };
        let unused = |why: String| OtlpChoice {
            target: None,
            warning: Some(format!("{why}; no spans are sent (a flag, --otlp-endpoint, would send them)")),
            from_flag: false,
        };
        if vars.sdk_disabled.as_deref().is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return unused("OTEL_SDK_DISABLED=true turns traces off".to_string());
        }
        let mut warnings = Vec::new();
        let names: Vec<String> = vars.exporter.as_deref().map_or_else(Vec::new, |list| {
            list.split(',').map(|n| n.trim().to_ascii_lowercase()).filter(|n| !n.is_empty()).collect()
        });
        if let Some(list) = &vars.exporter {
            let otlp = |n: &String| OTLP_EXPORTERS.contains(&n.as_str());
            let unknown: Vec<&String> =
                names.iter().filter(|n| !otlp(n) && !OTHER_EXPORTERS.contains(&n.as_str())).collect();
            if !names.is_empty() && !names.iter().any(otlp) && unknown.is_empty() {
                let why = match names.iter().all(|n| n == "none") {
                    true => format!("OTEL_TRACES_EXPORTER={} turns traces off", shown_value(list)),
                    false => format!("OTEL_TRACES_EXPORTER={}: dagmq exports traces over OTLP only", shown_value(list)),
                };
                return unused(why);
            }
            if !unknown.is_empty() {
                warnings.push(format!(
                    "OTEL_TRACES_EXPORTER={} names an exporter dagmq does not know (it has otlp, or none): spans go \
                     over OTLP",
                    shown_value(list)
                ));
            }
        }
        // The protocol as given (the variable, and the value it holds), and what it asks for:
        // its variable's, else gRPC when the exporter is Python's `otlp_proto_grpc` (a name read
        // as gRPC wherever it appears).
        let asks = |value: &str| match value.trim().to_ascii_lowercase() {
            grpc if grpc == "otlp_proto_grpc" => "grpc".to_string(),
            other => other,
        };
        let protocol = match &vars.protocol {
            Some((name, value)) => Some((*name, value.as_str(), asks(value))),
            None if names.iter().any(|n| n == "otlp_proto_grpc") => {
                Some(("OTEL_TRACES_EXPORTER", "otlp_proto_grpc", "grpc".to_string()))
            }
            None => None,
        };
        if let Some((name, value, asked)) = protocol {
            match asked.as_str() {
                "http/json" | "http/protobuf" => {}
                "grpc" if !matches!(target.http_port(), Some(port) if port != 4317) => {
                    return unused(format!(
                        "{name}={}: the endpoint is a gRPC one (port 4317, or no http:// or https:// URL), \
                         and dagmq sends spans over OTLP/HTTP (JSON) (give the collector's HTTP address, port \
                         4318 by default, with --otlp-endpoint)",
                        shown_value(value)
                    ));
                }
                "grpc" => warnings.push(format!(
                    "{name}={}: dagmq sends spans over OTLP/HTTP (JSON), which the collector must take at its \
                     address",
                    shown_value(value)
                )),
                _ => warnings.push(format!(
                    "{name}={} is not one of grpc, http/protobuf, http/json: spans are sent over OTLP/HTTP (JSON)",
                    shown_value(value)
                )),
            }
        }
        let warning = (!warnings.is_empty()).then(|| warnings.join("; "));
        OtlpChoice { target: Some(target), warning, from_flag: false }
    }

    /// The port of the target's URL (the one it names, or its scheme's) when it is an http:// or
    /// https:// URL with a host; none otherwise (`collector:4317`, as gRPC endpoints are given).
    fn http_port(&self) -> Option<u16> {
        let url = reqwest::Url::parse(self.url()).ok()?;
        let http = matches!(url.scheme(), "http" | "https") && url.host().is_some();
        http.then(|| url.port_or_known_default()).flatten()
    }

    /// The URL spans are POSTed to, and the option that gave it (for errors).
    fn traces_url(&self) -> (String, &'static str) {
        match self {
            OtlpTarget::Base(url) => {
                // `/v1/traces` goes at the end of the path, before a query the URL may have; a
                // URL that does not parse is refused later, naming the option.
                let traces = match reqwest::Url::parse(url) {
                    Ok(mut parsed) if !parsed.cannot_be_a_base() => {
                        let path = format!("{}/v1/traces", parsed.path().trim_end_matches('/'));
                        parsed.set_path(&path);
                        parsed.to_string()
                    }
                    _ => format!("{}/v1/traces", url.trim_end_matches('/')),
                };
                (traces, "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)")
            }
            OtlpTarget::Traces(url) => (url.clone(), "--otlp-traces-endpoint (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)"),
        }
    }

    /// The URL as given, for the log (masked by the caller).
    pub fn url(&self) -> &str {
        match self {
            OtlpTarget::Base(url) | OtlpTarget::Traces(url) => url,
        }
    }
}

/// A span sink exporting over OTLP/HTTP; [`OtlpSink::shutdown`] sends what is left.
#[derive(Debug)]
pub struct OtlpSink {
    /// The SDK's batch processor, with its OTLP exporter.
    processor: BatchSpanProcessor,
    /// The scope every span is reported under (`dagmq`, this version).
    scope: InstrumentationScope,
}

impl OtlpSink {
    /// A sink sending to `target` as service `service` (`dagmq-scheduler`, ...); `from_flag`:
    /// a flag named it ([`OtlpChoice::from_flag`]). Must be called inside the tokio runtime,
    /// which then carries the requests.
    pub fn start(target: &OtlpTarget, from_flag: bool, service: &str, tls: &TlsSettings) -> Result<OtlpSink, String> {
        let (traces, option) = target.traces_url();
        let http =
            crate::client::HttpClient::new(&traces, tls, EXPORT_TIMEOUT).map_err(|e| format!("{option}: {e}"))?;
        // A user and password in the URL go as basic auth, as reqwest sends them for a request it
        // builds itself; the exporter's requests (built from the URL) would drop them, so the
        // exporter gets the URL without them and the header instead.
        let probe = http
            .inner()
            .post(&traces)
            .build()
            .map_err(|e| format!("{option}: {:?} is not a URL: {}", http.shown(), e.without_url()))?;
        let traces = probe.url().to_string();
        let mut headers = std::collections::HashMap::new();
        let authorization = probe.headers().get(reqwest::header::AUTHORIZATION).cloned();
        if let Some(value) = authorization.as_ref().and_then(|v| v.to_str().ok()) {
            headers.insert(reqwest::header::AUTHORIZATION.as_str().to_string(), value.to_string());
        }
        // The SDK adds the environment's OTLP headers to every request; they are meant for the
        // environment's collector, not for one a flag names (a token would go to another host).
        let own_headers_only = from_flag;
        let client = OnRuntime {
            client: http.inner().clone(),
            runtime: tokio::runtime::Handle::try_current().map_err(|e| format!("no async runtime: {e}"))?,
            shown: http.shown().to_string(),
            failing: Arc::new(AtomicBool::new(false)),
            own_headers_only,
            authorization,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(traces)
            .with_headers(headers)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("{option}: {e}"))?;
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

    /// Sends the spans still waiting (waiting at most [`SHUTDOWN_WAIT`]; what is not sent by
    /// then is lost) and stops the export thread. Call it off the runtime's threads
    /// (`spawn_blocking`): it blocks.
    pub fn shutdown(&self) {
        if let Err(err) = self.processor.shutdown_with_timeout(SHUTDOWN_WAIT) {
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
    /// Whether each request carries only the headers dagmq sends (a flag named the collector:
    /// none of the environment's OTLP headers).
    own_headers_only: bool,
    /// The basic auth of the collector's URL, put back should a foreign header have replaced it.
    authorization: Option<reqwest::header::HeaderValue>,
}

#[async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, mut request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        if self.own_headers_only {
            // A flag's collector: only what dagmq itself sends, whatever headers the SDK took
            // from the environment (they may replace the content type, or carry a token).
            let headers = request.headers_mut();
            let kept: Vec<_> = [reqwest::header::CONTENT_ENCODING, reqwest::header::USER_AGENT]
                .into_iter()
                .filter_map(|name| headers.get(&name).cloned().map(|value| (name, value)))
                .collect();
            headers.clear();
            headers.extend(kept);
            headers
                .insert(reqwest::header::CONTENT_TYPE, reqwest::header::HeaderValue::from_static("application/json"));
            if let Some(value) = &self.authorization {
                headers.insert(reqwest::header::AUTHORIZATION, value.clone());
            }
        }
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move { client.send_bytes(request).await });
        let result = match sent.await {
            // reqwest's errors name the URL, a password in it too: they go without it (the
            // warning below names the endpoint masked; the SDK may keep or show the error).
            Ok(result) => result.map_err(|err| match err.downcast::<reqwest::Error>() {
                Ok(err) => Box::new(err.without_url()) as HttpError,
                Err(err) => err,
            }),
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

#[cfg(test)]
mod tests {
    use super::{OtelVars, OtlpChoice, OtlpTarget};

    fn some(value: &str) -> Option<String> {
        Some(value.to_string())
    }

    fn vars(base: Option<String>, traces: Option<String>) -> OtelVars {
        OtelVars { base, traces, ..OtelVars::default() }
    }

    fn target(flags: [Option<String>; 2], vars: &OtelVars) -> Option<OtlpTarget> {
        OtlpTarget::choose(flags, vars).target
    }

    /// A flag beats every variable, the traces-only one beats the base one of its kind, and a
    /// blank value counts as unset.
    #[test]
    fn flags_beat_variables_and_the_traces_only_url_beats_the_base() {
        let base = || OtlpTarget::Base("http://flag".into());
        let traces = || OtlpTarget::Traces("http://flag/t".into());
        assert_eq!(target([some("http://flag"), None], &vars(some("http://b"), some("http://v/t"))), Some(base()));
        assert_eq!(target([some("http://flag"), some("http://flag/t")], &vars(None, None)), Some(traces()));
        assert_eq!(
            target([None, None], &vars(some("http://b"), some("http://v/t"))),
            Some(OtlpTarget::Traces("http://v/t".into()))
        );
        assert_eq!(
            target([some(" "), None], &vars(some("http://b"), some(""))),
            Some(OtlpTarget::Base("http://b".into()))
        );
        assert_eq!(target([None, some("")], &vars(None, some("  "))), None);
    }

    /// `OTEL_TRACES_EXPORTER` naming other exporters and no `otlp`, `OTEL_SDK_DISABLED=true`,
    /// or a `grpc` protocol on gRPC's port keep the environment's collector unused, with a
    /// warning that says why; a flag is used whatever they say.
    #[test]
    fn the_exporter_and_protocol_variables_can_keep_the_environments_collector_unused() {
        let env = |exporter: Option<&str>, protocol: Option<(&'static str, &str)>| OtelVars {
            base: some("http://c:4317"),
            exporter: exporter.map(str::to_string),
            protocol: protocol.map(|(n, v)| (n, v.to_string())),
            ..OtelVars::default()
        };
        let base = Some(OtlpTarget::Base("http://c:4317".into()));
        let unused = |vars: &OtelVars, says: &str| {
            let choice = OtlpTarget::choose([None, None], vars);
            assert_eq!(choice.target, None, "{vars:?}");
            let warning = choice.warning.unwrap();
            assert!(warning.contains(says) && warning.contains("no spans are sent"), "{warning}");
        };
        let used = |vars: &OtelVars, says: Option<&str>| {
            let choice = OtlpTarget::choose([None, None], vars);
            assert_eq!(choice.target, base, "{vars:?}");
            match says {
                Some(says) => assert!(choice.warning.as_deref().unwrap_or_default().contains(says), "{choice:?}"),
                None => assert_eq!(choice.warning, None, "{vars:?}"),
            }
        };
        unused(&env(Some("none"), None), "OTEL_TRACES_EXPORTER=\"none\" turns traces off");
        unused(
            &env(Some("zipkin, console"), None),
            "OTEL_TRACES_EXPORTER=\"zipkin, console\": dagmq exports traces over OTLP only",
        );
        unused(
            &env(None, Some(("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))),
            "OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\": the endpoint is a gRPC one",
        );
        // gRPC endpoints are often given without a scheme: never an http:// collector.
        for endpoint in ["otel-collector:4317", "127.0.0.1:4317", "collector:4318", "http://[::1]:4317"] {
            let vars = OtelVars { base: some(endpoint), ..env(None, Some(("P", "grpc"))) };
            unused(&vars, "the endpoint is a gRPC one");
        }
        // Python's exporter names: OTLP, and `otlp_proto_grpc` says gRPC when no protocol does.
        used(&env(Some("otlp_proto_http"), None), None);
        unused(
            &env(Some("otlp_proto_grpc"), None),
            "OTEL_TRACES_EXPORTER=\"otlp_proto_grpc\": the endpoint is a gRPC one",
        );
        used(&env(Some("otlp_proto_grpc"), Some(("P", "http/json"))), None);
        unused(&env(Some("otlp"), Some(("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "gRPC"))), "PROTOCOL=\"gRPC\"");
        unused(&OtelVars { sdk_disabled: some(" TRUE"), ..env(None, None) }, "OTEL_SDK_DISABLED=true");
        used(&env(Some("otlp"), None), None);
        used(&env(Some("console, OTLP"), Some(("P", "http/protobuf"))), None);
        used(&env(None, None), None);
        used(&env(Some(" , "), None), None);
        used(&OtelVars { sdk_disabled: some("false"), ..env(None, None) }, None);
        // A name dagmq does not know is taken for a mistake: OTLP, as the default is.
        used(&env(Some("otpl"), None), Some("OTEL_TRACES_EXPORTER=\"otpl\" names an exporter dagmq does not know"));
        used(&env(None, Some(("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift"))), Some("=\"thrift\" is not one of"));
        // A collector that takes gRPC and OTLP/HTTP at one address (a hosted one on 443) is used.
        let hosted = OtelVars { base: some("https://otlp.example.com"), ..env(None, Some(("P", "grpc"))) };
        let choice = OtlpTarget::choose([None, None], &hosted);
        assert_eq!(choice.target, Some(OtlpTarget::Base("https://otlp.example.com".into())));
        assert!(choice.warning.unwrap().contains("which the collector must take at its address"));
        // A value is shown quoted and cut short.
        let long = "x".repeat(100) + "\nsecond line";
        let warning = OtlpTarget::choose([None, None], &env(Some(&long), None)).warning.unwrap();
        assert!(warning.contains(&format!("\"{}\"...", "x".repeat(40))) && !warning.contains('\n'), "{warning}");
        // A flag is the operator's word for this process: used, and nothing to warn about.
        let flagged = OtlpTarget::choose([some("http://f:4318"), None], &env(Some("none"), Some(("P", "grpc"))));
        assert_eq!(
            flagged,
            OtlpChoice { target: Some(OtlpTarget::Base("http://f:4318".into())), warning: None, from_flag: true }
        );
    }

    /// A collector's base URL gets `/v1/traces` at the end of its path, before its query; the
    /// traces-only URL is used as is.
    #[test]
    fn the_base_url_gets_the_traces_path_before_its_query() {
        let url = |target: OtlpTarget| target.traces_url().0;
        assert_eq!(url(OtlpTarget::Base("http://c:4318".into())), "http://c:4318/v1/traces");
        assert_eq!(url(OtlpTarget::Base("http://c:4318/".into())), "http://c:4318/v1/traces");
        assert_eq!(url(OtlpTarget::Base("http://c:4318/otlp/".into())), "http://c:4318/otlp/v1/traces");
        assert_eq!(url(OtlpTarget::Base("https://u:p@c/x?k=v".into())), "https://u:p@c/x/v1/traces?k=v");
        assert_eq!(url(OtlpTarget::Traces("http://c/t?k=v".into())), "http://c/t?k=v");
    }
}
