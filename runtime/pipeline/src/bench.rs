//! `star-run bench`: warm-up, repeated generations, per-stage median / p90 / min, a human table and
//! JSON beside it.

use crate::pipeline::ScaleTimes;
use crate::pipeline::{GenParams, NoHooks, Pipeline, Result};
use std::collections::BTreeMap;

pub struct BenchResult {
    pub table: String,
    pub json: serde_json::Value,
}

fn stats(v: &mut [f64]) -> (f64, f64, f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let q = |f: f64| v[((n as f64 - 1.0) * f).round() as usize];
    let mean = v.iter().sum::<f64>() / n as f64;
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    (q(0.5), q(0.9), v[0], mean, sd)
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

pub fn bench(
    p: &mut Pipeline,
    prompt: &str,
    params: &GenParams,
    warmup: usize,
    runs: usize,
    threads: usize,
    partial_images: usize,
) -> Result<BenchResult> {
    if let Some(m) = p.md.memory_policy() {
        m.load_all()?;
    }
    let prompts = vec![prompt.to_string()];
    let mut scales = ScaleTimes::default();
    for _ in 0..warmup.max(usize::from(partial_images > 0)) {
        p.timings.clear();
        p.generate(&prompts, "", params, &mut scales)?;
    }
    // Previews where the server would put them: from the warm-up's scale times.
    let previewed;
    let params = if partial_images > 0 {
        previewed = GenParams {
            previews: crate::preview::preview_scales(&scales.0, partial_images),
            ..params.clone()
        };
        &previewed
    } else {
        params
    };
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut overhead = vec![];
    let mut transfers = star_engines::values::Transfers::default();
    for _ in 0..runs.max(1) {
        p.timings.clear();
        p.md.take_transfers();
        p.generate(&prompts, "", params, &mut NoHooks)?;
        // Every generation copies the same: the last one's are reported.
        transfers = p.md.take_transfers();
        for (k, (ms, _)) in &p.timings.ms {
            samples.entry(k.clone()).or_default().push(*ms);
        }
        let e2e = p.timings.get("end_to_end");
        overhead.push(100.0 * (e2e - p.timings.backend_ms()) / e2e);
    }
    let m = &p.md.manifest;
    let head = format!(
        "machine: {}\nbackend: {} (threads {}), precision {}, model {} (d{}, {} scales, {}px), batch 1, KV cache {}, warm-up {warmup}, runs {runs}\n",
        machine(),
        p.md.opts.name,
        if threads == 0 { "all".to_string() } else { threads.to_string() },
        m.precision,
        m.model_hash,
        m.config.depth,
        m.schedule.patch_nums.len(),
        m.schedule.image_size,
        if params.recompute_past { "off (earlier scales re-run)" } else { "on" }
    );
    let device = p.md.device();
    let mut table = head.clone();
    if let Some(d) = &device {
        // Stage timings are host timers around calls that return only once their outputs are
        // on the host (the device work is finished), so no separate synchronisation is needed.
        table.push_str(&format!("device: {d}\n"));
    }
    table.push_str(&format!(
        "{:<18} {:>10} {:>10} {:>10} {:>16}\n",
        "stage", "median ms", "p90 ms", "min ms", "mean ± std"
    ));
    let mut rows = serde_json::Map::new();
    let order = |k: &str| if k == "end_to_end" { 1 } else { 0 };
    let mut keys: Vec<&String> = samples.keys().collect();
    keys.sort_by_key(|k| (order(k), (*k).clone()));
    for k in keys {
        let mut v = samples[k].clone();
        let (med, p90, min, mean, sd) = stats(&mut v);
        table.push_str(&format!(
            "{k:<18} {med:>10.3} {p90:>10.3} {min:>10.3} {:>9.3} ± {sd:<6.3}\n",
            mean
        ));
        rows.insert(k.clone(), serde_json::json!({"median_ms": med, "p90_ms": p90, "min_ms": min, "mean_ms": mean, "std_ms": sd}));
    }
    let (oh_med, ..) = stats(&mut overhead.clone());
    table.push_str(&format!("runtime overhead (end to end minus ONNX Runtime calls): median {oh_med:.2}% of end to end\n"));
    if !params.previews.is_empty() {
        table.push_str(&format!(
            "previews: after scales {:?} (partial_images {partial_images}); \"preview\" is their decoder time per generation\n",
            params.previews
        ));
    }
    let t = &transfers.total;
    table.push_str(&format!(
        "transfers per generation: host -> engine {} B, engine -> host {} B, {} copies\n",
        t.host_to_engine_bytes, t.engine_to_host_bytes, t.host_copies
    ));
    let json = serde_json::json!({
        "machine": machine(), "backend": p.md.opts.name, "threads": threads, "precision": m.precision,
        "model_hash": m.model_hash, "kv_cache": !params.recompute_past, "warmup": warmup, "runs": runs, "stages": rows, "runtime_overhead_pct_median": oh_med, "device": device,
        "transfers": transfers, "previews": params.previews,
    });
    Ok(BenchResult { table, json })
}
