//! Per-stage wall-clock samples of a generation, split into time inside the backend (ONNX Runtime
//! calls) and the runtime's own work.

use std::collections::BTreeMap;

#[derive(Default, Clone)]
pub struct Timings {
    /// label -> (sum of ms in this generation, is backend time)
    pub ms: BTreeMap<String, (f64, bool)>,
}

impl Timings {
    pub fn add(&mut self, label: &str, ms: f64, backend: bool) {
        let e = self.ms.entry(label.to_string()).or_insert((0.0, backend));
        e.0 += ms;
    }
    pub fn clear(&mut self) {
        self.ms.clear();
    }
    pub fn backend_ms(&self) -> f64 {
        self.ms.values().filter(|(_, b)| *b).map(|(m, _)| m).sum()
    }
    pub fn get(&self, label: &str) -> f64 {
        self.ms.get(label).map(|x| x.0).unwrap_or(0.0)
    }
}
