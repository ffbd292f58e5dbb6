//! Prometheus metrics: counters and histograms kept by the handlers and the worker, rendered by
//! `/metrics`.

use std::collections::BTreeMap;

/// Prometheus histograms: cumulative buckets, sum, count.
#[derive(Clone, Default)]
pub(crate) struct Histogram {
    pub(crate) counts: Vec<u64>,
    pub(crate) sum: f64,
    pub(crate) count: u64,
}

pub(crate) const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub(crate) const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0];

impl Histogram {
    pub(crate) fn observe(&mut self, buckets: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; buckets.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(buckets) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str, buckets: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in buckets.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            out.push_str(&format!("{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}\n"));
        }
        out.push_str(&format!(
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}\n",
            self.count
        ));
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        out.push_str(&format!("{name}_sum{braces} {}\n", self.sum));
        out.push_str(&format!("{name}_count{braces} {}\n", self.count));
    }
}

#[derive(Default)]
pub(crate) struct Metrics {
    /// Responses by (route template, status).
    pub(crate) requests: BTreeMap<(String, u16), u64>,
    /// Response time (to the head; a stream's events come after) by (route, status class).
    pub(crate) duration: BTreeMap<(String, String), Histogram>,
    pub(crate) queue_wait: Histogram,
    pub(crate) batch: Histogram,
    pub(crate) scale: BTreeMap<usize, Histogram>,
    pub(crate) rejected: BTreeMap<String, u64>,
    pub(crate) cancelled: u64,
}
