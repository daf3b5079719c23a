//! Counters, gauges and histograms with labels, on the `prometheus-client` crate and rendered
//! in its OpenMetrics text format (which Prometheus scrapes). This module keeps the small
//! interface the scheduler and the worker use: label values given in the order of the family's
//! label names, gauges replaced whole at scrape time, and a value read without creating a series.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family as Series, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label names and values of one series.
type LabelSet = Vec<(String, String)>;

/// Makes a family's histograms with its bucket bounds.
#[derive(Debug, Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// One metric family.
#[derive(Debug)]
pub struct Family {
    /// Label names.
    labels: &'static [&'static str],
    /// What it is and its series.
    kind: Kind,
    /// A registry of this family alone, for encoding.
    registry: Registry,
}

#[derive(Debug)]
enum Kind {
    Counter(Series<LabelSet, Counter<f64, AtomicU64>>),
    Gauge(Series<LabelSet, Gauge<f64, AtomicU64>>),
    Histogram(Series<LabelSet, Histogram, Buckets>),
    /// A counter without labels (rendered without `{}`).
    OneCounter(Counter<f64, AtomicU64>),
    /// A gauge without labels.
    OneGauge(Gauge<f64, AtomicU64>),
}

impl Family {
    /// A counter. Its name ends in `_total`, as exposed; `help` is one sentence.
    pub fn counter(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        let mut registry = Registry::default();
        let (name, help) = (name.strip_suffix("_total").unwrap_or(name), sentence(help));
        let kind = if labels.is_empty() {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            Kind::OneCounter(counter)
        } else {
            let series = Series::default();
            registry.register(name, help, series.clone());
            Kind::Counter(series)
        };
        Family { labels, kind, registry }
    }

    /// A gauge.
    pub fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        let mut registry = Registry::default();
        let kind = if labels.is_empty() {
            let gauge = Gauge::default();
            registry.register(name, sentence(help), gauge.clone());
            Kind::OneGauge(gauge)
        } else {
            let series = Series::default();
            registry.register(name, sentence(help), series.clone());
            Kind::Gauge(series)
        };
        Family { labels, kind, registry }
    }

    /// A histogram with these bucket bounds (ascending).
    pub fn histogram(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Family {
        let series = Series::new_with_constructor(Buckets(buckets));
        let mut registry = Registry::default();
        registry.register(name, sentence(help), series.clone());
        Family { labels, kind: Kind::Histogram(series), registry }
    }

    /// Adds to a counter (or gauge).
    pub fn add(&self, labels: &[&str], value: f64) {
        match &self.kind {
            Kind::Counter(series) => {
                series.get_or_create(&self.set_of(labels)).inc_by(value);
            }
            Kind::Gauge(series) => {
                series.get_or_create(&self.set_of(labels)).inc_by(value);
            }
            Kind::OneCounter(counter) => {
                counter.inc_by(value);
            }
            Kind::OneGauge(gauge) => {
                gauge.inc_by(value);
            }
            Kind::Histogram(_) => {}
        }
    }

    /// Increments a counter by one.
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }

    /// The value of one series of a counter or gauge (0 when it has none yet; none is made).
    pub fn value(&self, labels: &[&str]) -> f64 {
        let set = self.set_of(labels);
        match &self.kind {
            Kind::Counter(series) => series.get(&set).map_or(0.0, |c| c.get()),
            Kind::Gauge(series) => series.get(&set).map_or(0.0, |g| g.get()),
            Kind::OneCounter(counter) => counter.get(),
            Kind::OneGauge(gauge) => gauge.get(),
            Kind::Histogram(_) => 0.0,
        }
    }

    /// Sets a gauge.
    pub fn set(&self, labels: &[&str], value: f64) {
        match &self.kind {
            Kind::Gauge(series) => {
                series.get_or_create(&self.set_of(labels)).set(value);
            }
            Kind::OneGauge(gauge) => {
                gauge.set(value);
            }
            _ => {}
        }
    }

    /// Replaces every series of a gauge (for values computed at scrape time).
    pub fn replace_all(&self, values: impl IntoIterator<Item = (Vec<String>, f64)>) {
        if let Kind::Gauge(series) = &self.kind {
            series.clear();
            for (labels, value) in values {
                let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                series.get_or_create(&self.set_of(&labels)).set(value);
            }
        }
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, labels: &[&str], value: f64) {
        if let Kind::Histogram(series) = &self.kind {
            series.get_or_create(&self.set_of(labels)).observe(value);
        }
    }

    /// Appends the family in the text format (without the closing `# EOF` that [`render`] adds).
    pub fn render(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = encode_registry(out, &self.registry);
    }

    /// The label set of `values`, paired with the family's label names. The encoder writes
    /// values as they are, so they are escaped here (`\\`, `\"`, `\n`).
    fn set_of(&self, values: &[&str]) -> LabelSet {
        self.labels.iter().zip(values).map(|(name, value)| (name.to_string(), escape(value))).collect()
    }
}

/// A whole exposition: every family, then `# EOF`.
pub fn render<'a>(families: impl IntoIterator<Item = &'a Family>) -> String {
    let mut out = String::new();
    for family in families {
        family.render(&mut out);
    }
    let _ = encode_eof(&mut out);
    out
}

/// A label value as the text format quotes it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The encoder ends help texts with a full stop of its own.
fn sentence(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_openmetrics_text_format() {
        let runs = Family::counter("dagmq_runs_total", "Finished runs.", &["dag", "state"]);
        runs.inc(&["etl", "success"]);
        runs.inc(&["etl", "success"]);
        runs.inc(&["a\"b", "failed"]);
        let lag = Family::gauge("dagmq_lag_seconds", "Lag.", &[]);
        lag.set(&[], 0.25);
        let depth = Family::gauge("dagmq_depth", "Depth.", &["queue"]);
        depth.replace_all([(vec!["a".to_string()], 3.0)]);
        depth.replace_all([(vec!["b".to_string()], 4.0)]);
        let duration = Family::histogram("dagmq_task_seconds", "Durations.", &["dag"], &[0.1, 1.0]);
        duration.observe(&["etl"], 0.05);
        duration.observe(&["etl"], 0.5);
        duration.observe(&["etl"], 3.0);
        assert_eq!(runs.value(&["etl", "success"]), 2.0);
        assert_eq!(runs.value(&["etl", "failed"]), 0.0);
        assert_eq!(lag.value(&[]), 0.25);
        assert_eq!((depth.value(&["a"]), depth.value(&["b"])), (0.0, 4.0));
        let out = render([&runs, &lag, &depth, &duration]);
        let mut lines: Vec<&str> = out.lines().collect();
        // Series of a family come in no fixed order.
        lines[2..4].sort_unstable();
        assert_eq!(
            lines,
            [
                "# HELP dagmq_runs Finished runs.",
                "# TYPE dagmq_runs counter",
                "dagmq_runs_total{dag=\"a\\\"b\",state=\"failed\"} 1.0",
                "dagmq_runs_total{dag=\"etl\",state=\"success\"} 2.0",
                "# HELP dagmq_lag_seconds Lag.",
                "# TYPE dagmq_lag_seconds gauge",
                "dagmq_lag_seconds 0.25",
                "# HELP dagmq_depth Depth.",
                "# TYPE dagmq_depth gauge",
                "dagmq_depth{queue=\"b\"} 4.0",
                "# HELP dagmq_task_seconds Durations.",
                "# TYPE dagmq_task_seconds histogram",
                "dagmq_task_seconds_sum{dag=\"etl\"} 3.55",
                "dagmq_task_seconds_count{dag=\"etl\"} 3",
                "dagmq_task_seconds_bucket{le=\"0.1\",dag=\"etl\"} 1",
                "dagmq_task_seconds_bucket{le=\"1.0\",dag=\"etl\"} 2",
                "dagmq_task_seconds_bucket{le=\"+Inf\",dag=\"etl\"} 3",
                "# EOF",
            ]
        );
    }
}
