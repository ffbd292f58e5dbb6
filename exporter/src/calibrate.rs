//! INT8 calibration: the FP32 graphs, built with probes on every block linear's input, generate
//! over a prompt file (so every scale, sampler sub-step and guidance row sees the inputs it sees
//! in use); `star-calibration` gathers the statistics and picks one range per tensor; the table
//! is written beside the INT8 graphs as JSON and as TensorRT's calibration-cache text.

use crate::error::{io_err, ExportError, Result};
use star_artifact::hash::sha256_bytes;
use star_artifact::manifest::{FileEntry, Manifest};
use star_artifact::stage::io;
use star_calibration::{ActivationStats, CalibrationTable, Method};
use star_engines::options::BackendOptions;
use star_engines::Tensor;
use star_pipeline::pipeline::{GenParams, Hooks, Pipeline};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const TABLE_FILE: &str = "calibration.json";
pub const TRT_CACHE_FILE: &str = "calibration.cache";
/// The default percentile of `--calibration-method percentile`.
pub const DEFAULT_PERCENTILE: f64 = 99.99;

#[derive(Clone, Debug)]
pub struct CalibrationArgs {
    pub prompts: PathBuf,
    pub method: Method,
    /// Generations to run (prompts are taken in order, cycling); default: one per prompt.
    pub samples: Option<usize>,
    /// Generation i uses seed `seed + i`.
    pub seed: u64,
}

/// `entropy`, `max`, `percentile` (99.99) or `percentile=P` with 0 < P <= 100.
pub fn parse_method(s: &str) -> std::result::Result<Method, String> {
    match s {
        "entropy" => Ok(Method::Entropy),
        "max" => Ok(Method::Max),
        "percentile" => Ok(Method::Percentile(DEFAULT_PERCENTILE)),
        other => match other.strip_prefix("percentile=").map(str::parse::<f64>) {
            Some(Ok(p)) if p > 0.0 && p <= 100.0 => Ok(Method::Percentile(p)),
            Some(_) => Err(format!(
                "'{other}': the percentile must be a number in (0, 100]"
            )),
            None => Err(format!(
                "'{other}' is not a calibration method (entropy, percentile, percentile=P, max)"
            )),
        },
    }
}

pub fn method_name(m: Method) -> String {
    match m {
        Method::Entropy => "entropy".into(),
        Method::Max => "max".into(),
        Method::Percentile(p) => format!("percentile={p}"),
    }
}

pub struct Prompts {
    pub list: Vec<String>,
    pub sha256: String,
}

/// A prompts file: UTF-8, one prompt per line; blank lines and lines starting with `#` are
/// skipped.
pub fn read_prompts(c: &CalibrationArgs) -> Result<Prompts> {
    let (list, bytes) =
        star_pipeline::args::read_prompts_file(&c.prompts).map_err(ExportError::Calibration)?;
    if c.samples == Some(0) {
        return Err(ExportError::Calibration(
            "--calibration-samples must be at least 1".into(),
        ));
    }
    Ok(Prompts {
        list,
        sha256: sha256_bytes(&bytes),
    })
}

struct Collect {
    stats: BTreeMap<String, ActivationStats>,
    err: Option<String>,
}

impl Hooks for Collect {
    fn probing(&self) -> bool {
        true
    }
    fn probe(&mut self, name: &str, t: &Tensor) {
        let Some(tensor) = name.strip_prefix(io::PROBE_PREFIX) else {
            return;
        };
        let Some(v) = t.as_f32() else {
            self.err
                .get_or_insert(format!("probe {tensor} is not float32"));
            return;
        };
        if let Err(e) = self.stats.entry(tensor.to_string()).or_default().observe(v) {
            self.err.get_or_insert(format!("at {tensor}: {e}"));
        }
    }
}

/// Generate over the prompts with the probed FP32 graphs in `dir` and choose the ranges.
pub fn calibrate(
    dir: &Path,
    c: &CalibrationArgs,
    prompts: &Prompts,
    quiet: bool,
    started: Instant,
) -> Result<CalibrationTable> {
    let mut p = Pipeline::open(dir, BackendOptions::default()).map_err(run_err)?;
    let n = c.samples.unwrap_or(prompts.list.len());
    let mut hooks = Collect {
        stats: BTreeMap::new(),
        err: None,
    };
    for i in 0..n {
        let prompt = &prompts.list[i % prompts.list.len()];
        let params = GenParams::defaults(&p, c.seed.wrapping_add(i as u64));
        p.generate(std::slice::from_ref(prompt), "", &params, &mut hooks)
            .map_err(run_err)?;
        if let Some(e) = hooks.err.take() {
            return Err(ExportError::Calibration(format!(
                "generation {} ('{prompt}'): {e}",
                i + 1
            )));
        }
        if !quiet {
            eprintln!(
                "calibration [{:>3}/{n}] {:>7.2}s  {prompt}",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    if hooks.stats.is_empty() {
        return Err(ExportError::Calibration(
            "the calibration graphs produced no probes".into(),
        ));
    }
    let amax = hooks
        .stats
        .iter()
        .map(|(k, s)| (k.clone(), c.method.amax(s)))
        .collect();
    Ok(CalibrationTable {
        method: c.method,
        samples: n,
        amax,
    })
}

fn run_err(e: star_pipeline::pipeline::RunError) -> ExportError {
    ExportError::Calibration(e.to_string())
}

/// TensorRT's calibration-cache text: a header naming the calibrator, then one
/// `tensor: hex` line per tensor, hex being the IEEE-754 bits of the scale (amax/127, floored as
/// in the graphs). For implicit-quantization tools run on the FP32 graphs (whose tensors carry
/// these names); TensorRT ignores a cache for a network with explicit Q/DQ, such as our INT8
/// graphs. The header's version is TensorRT 10.0.0's (100000); TensorRT skips a cache whose
/// header names another version, so users of other versions rewrite that number. TensorRT has no
/// percentile calibrator: percentile tables carry the entropy header, the closest in kind.
pub fn trt_cache(t: &CalibrationTable) -> String {
    let algo = match t.method {
        Method::Max => "MinMaxCalibration",
        _ => "EntropyCalibration2",
    };
    let mut s = format!("TRT-100000-{algo}\n");
    for (name, amax) in &t.amax {
        s.push_str(&format!(
            "{name}: {:x}\n",
            star_calibration::int8_scale(*amax).to_bits()
        ));
    }
    s
}

/// Write the table files into the INT8 directory, list them and record the calibration in the
/// manifest (which the caller writes).
pub fn record(
    mut m: Manifest,
    dir: &Path,
    t: &CalibrationTable,
    c: &CalibrationArgs,
    prompts: &Prompts,
) -> Result<Manifest> {
    for (file, text) in [(TABLE_FILE, t.to_json()), (TRT_CACHE_FILE, trt_cache(t))] {
        let p = dir.join(file);
        std::fs::write(&p, &text).map_err(io_err(&p))?;
        m.files.push(FileEntry {
            file: file.into(),
            bytes: text.len() as u64,
            sha256: sha256_bytes(text.as_bytes()),
        });
    }
    m.calibration = Some(star_artifact::manifest::Calibration {
        method: method_name(c.method),
        samples: t.samples,
        seed: c.seed,
        prompts_sha256: prompts.sha256.clone(),
        table_file: TABLE_FILE.into(),
        trt_cache_file: TRT_CACHE_FILE.into(),
        table_sha256: t.hash(),
        weight_bits: star_artifact::manifest::INT8_WEIGHT_BITS,
    });
    m.model_hash = star_artifact::check::model_hash(&m);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_name() {
        assert_eq!(parse_method("entropy"), Ok(Method::Entropy));
        assert_eq!(parse_method("max"), Ok(Method::Max));
        assert_eq!(
            parse_method("percentile"),
            Ok(Method::Percentile(DEFAULT_PERCENTILE))
        );
        assert_eq!(
            parse_method("percentile=99.9"),
            Ok(Method::Percentile(99.9))
        );
        for bad in [
            "percentile=0",
            "percentile=101",
            "percentile=x",
            "minmax",
            "",
        ] {
            assert!(parse_method(bad).is_err(), "{bad}");
        }
        assert_eq!(method_name(Method::Percentile(99.9)), "percentile=99.9");
    }

    #[test]
    fn trt_cache_holds_scales_as_float_bits() {
        let mut amax = BTreeMap::new();
        amax.insert("star/blocks.0.ffn.fc1.input".to_string(), 127.0f32);
        amax.insert("a".to_string(), 5.0748);
        let t = CalibrationTable {
            method: Method::Entropy,
            samples: 1,
            amax,
        };
        let s = trt_cache(&t);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "TRT-100000-EntropyCalibration2");
        // amax 127 -> scale 1.0 -> 0x3f800000.
        assert_eq!(lines[2], "star/blocks.0.ffn.fc1.input: 3f800000");
        let hex = lines[1].strip_prefix("a: ").unwrap();
        let scale = f32::from_bits(u32::from_str_radix(hex, 16).unwrap());
        assert!((scale * 127.0 - 5.0748).abs() < 1e-4);
    }
}
