//! Counters, gauges and histograms with labels, rendered in the Prometheus text format.
//! Plain atomics and maps: no I/O, no clock; the caller observes values it measured.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Label values of one series, in the order of the family's label names.
type Labels = Vec<String>;

/// One metric family.
#[derive(Debug)]
pub struct Family {
    /// Metric name.
    name: &'static str,
    /// Help text.
    help: &'static str,
    /// Label names.
    labels: &'static [&'static str],
    /// What it is and its series.
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Counter(Mutex<BTreeMap<Labels, f64>>),
    Gauge(Mutex<BTreeMap<Labels, f64>>),
    Histogram { buckets: &'static [f64], series: Mutex<BTreeMap<Labels, HistogramSeries>> },
}

/// Bucket counts, sum and count of one histogram series.
#[derive(Debug, Clone, Default)]
struct HistogramSeries {
    /// Observations at or below each bucket bound.
    buckets: Vec<u64>,
    /// Sum of observations.
    sum: f64,
    /// Number of observations.
    count: u64,
}

impl Family {
    /// A counter.
    pub const fn counter(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        Family { name, help, labels, kind: Kind::Counter(Mutex::new(BTreeMap::new())) }
    }

    /// A gauge.
    pub const fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        Family { name, help, labels, kind: Kind::Gauge(Mutex::new(BTreeMap::new())) }
    }

    /// A histogram with these bucket bounds (ascending).
    pub const fn histogram(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Family {
        Family { name, help, labels, kind: Kind::Histogram { buckets, series: Mutex::new(BTreeMap::new()) } }
    }

    /// Adds to a counter (or gauge).
    pub fn add(&self, labels: &[&str], value: f64) {
        if let Kind::Counter(series) | Kind::Gauge(series) = &self.kind {
            *lock(series).entry(owned(labels)).or_insert(0.0) += value;
        }
    }

    /// Increments a counter by one.
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }

    /// The value of one series of a counter or gauge (0 when it has none yet).
    pub fn value(&self, labels: &[&str]) -> f64 {
        match &self.kind {
            Kind::Counter(series) | Kind::Gauge(series) => lock(series).get(&owned(labels)).copied().unwrap_or(0.0),
            Kind::Histogram { .. } => 0.0,
        }
    }

    /// Sets a gauge.
    pub fn set(&self, labels: &[&str], value: f64) {
        if let Kind::Gauge(series) = &self.kind {
            lock(series).insert(owned(labels), value);
        }
    }

    /// Replaces every series of a gauge (for values computed at scrape time).
    pub fn replace_all(&self, values: impl IntoIterator<Item = (Vec<String>, f64)>) {
        if let Kind::Gauge(series) = &self.kind {
            let mut series = lock(series);
            series.clear();
            series.extend(values);
        }
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, labels: &[&str], value: f64) {
        if let Kind::Histogram { buckets, series } = &self.kind {
            let mut series = lock(series);
            let entry = series
                .entry(owned(labels))
                .or_insert_with(|| HistogramSeries { buckets: vec![0; buckets.len()], ..HistogramSeries::default() });
            for (i, bound) in buckets.iter().enumerate() {
                if value <= *bound {
                    entry.buckets[i] += 1;
                }
            }
            entry.sum += value;
            entry.count += 1;
        }
    }

    /// Appends the family in the text format.
    pub fn render(&self, out: &mut String) {
        let kind = match self.kind {
            Kind::Counter(_) => "counter",
            Kind::Gauge(_) => "gauge",
            Kind::Histogram { .. } => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        match &self.kind {
            Kind::Counter(series) | Kind::Gauge(series) => {
                for (labels, value) in lock(series).iter() {
                    let _ = writeln!(out, "{}{} {}", self.name, label_text(self.labels, labels, None), number(*value));
                }
            }
            Kind::Histogram { buckets, series } => {
                for (labels, s) in lock(series).iter() {
                    for (bound, count) in buckets.iter().zip(&s.buckets) {
                        let le = number(*bound);
                        let _ =
                            writeln!(out, "{}_bucket{} {count}", self.name, label_text(self.labels, labels, Some(&le)));
                    }
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {}",
                        self.name,
                        label_text(self.labels, labels, Some("+Inf")),
                        s.count
                    );
                    let _ =
                        writeln!(out, "{}_sum{} {}", self.name, label_text(self.labels, labels, None), number(s.sum));
                    let _ = writeln!(out, "{}_count{} {}", self.name, label_text(self.labels, labels, None), s.count);
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn owned(labels: &[&str]) -> Labels {
    labels.iter().map(|l| l.to_string()).collect()
}

fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 { format!("{}", value as i64) } else { format!("{value}") }
}

fn label_text(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut pairs: Vec<String> = names.iter().zip(values).map(|(n, v)| format!("{n}=\"{}\"", escape(v))).collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if pairs.is_empty() { String::new() } else { format!("{{{}}}", pairs.join(",")) }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let runs = Family::counter("dagmq_runs_total", "Finished runs.", &["dag", "state"]);
        runs.inc(&["etl", "success"]);
        runs.inc(&["etl", "success"]);
        runs.inc(&["a\"b", "failed"]);
        let lag = Family::gauge("dagmq_lag_seconds", "Lag.", &[]);
        lag.set(&[], 0.25);
        let duration = Family::histogram("dagmq_task_seconds", "Durations.", &["dag"], &[0.1, 1.0]);
        duration.observe(&["etl"], 0.05);
        duration.observe(&["etl"], 0.5);
        duration.observe(&["etl"], 3.0);
        assert_eq!(runs.value(&["etl", "success"]), 2.0);
        assert_eq!(runs.value(&["etl", "failed"]), 0.0);
        assert_eq!(lag.value(&[]), 0.25);
        let mut out = String::new();
        for family in [&runs, &lag, &duration] {
            family.render(&mut out);
        }
        assert_eq!(
            out,
            "# HELP dagmq_runs_total Finished runs.\n# TYPE dagmq_runs_total counter\n\
             dagmq_runs_total{dag=\"a\\\"b\",state=\"failed\"} 1\n\
             dagmq_runs_total{dag=\"etl\",state=\"success\"} 2\n\
             # HELP dagmq_lag_seconds Lag.\n# TYPE dagmq_lag_seconds gauge\ndagmq_lag_seconds 0.25\n\
             # HELP dagmq_task_seconds Durations.\n# TYPE dagmq_task_seconds histogram\n\
             dagmq_task_seconds_bucket{dag=\"etl\",le=\"0.1\"} 1\n\
             dagmq_task_seconds_bucket{dag=\"etl\",le=\"1\"} 2\n\
             dagmq_task_seconds_bucket{dag=\"etl\",le=\"+Inf\"} 3\n\
             dagmq_task_seconds_sum{dag=\"etl\"} 3.55\n\
             dagmq_task_seconds_count{dag=\"etl\"} 3\n"
        );
    }
}
