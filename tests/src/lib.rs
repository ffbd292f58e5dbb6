//! Shared helpers of the workspace tests, and the golden suite every backend instantiates.

pub mod golden_suite;

use star_artifact::dtype::Precision;
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The golden fixtures, copied into the repository (tests/fixtures) from the official set.
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

pub fn demo_model() -> PathBuf {
    PathBuf::from(star_pipeline::EMBEDDED_MODEL)
}

/// Export one fixture variant into `out` (FP32).
pub fn export_fixture(
    variant: &str,
    resolution: usize,
    out: &Path,
) -> star_artifact::manifest::Manifest {
    export_fixture_at(variant, resolution, Precision::Fp32, out)
}

/// The tests' INT8 calibration: four generations of the general prompt set. Fewer leave ranges
/// seen on too few prompts (two gave 0.107 at tiny-1024s scale 0, over the INT8 tolerance; four
/// give 0.070); the accuracy numbers in benches/RESULTS.md use full sets.
pub fn calibration(prompts: &Path) -> star_export::calibrate::CalibrationArgs {
    star_export::calibrate::CalibrationArgs {
        prompts: prompts.to_path_buf(),
        method: star_calibration::Method::Percentile(star_export::calibrate::DEFAULT_PERCENTILE),
        samples: Some(4),
        seed: 0,
    }
}

/// Export one fixture variant into `out` at a graph precision (INT8 calibrated on the general
/// prompt set).
pub fn export_fixture_at(
    variant: &str,
    resolution: usize,
    precision: Precision,
    out: &Path,
) -> star_artifact::manifest::Manifest {
    let f = fixtures();
    let a = star_export::export::ExportArgs {
        transformer: f.join(variant).join("star.pth"),
        vae: f.join("vqvae.pth"),
        text_encoder: f.join("clip_tiny"),
        tokenizer: None,
        resolution: Some(resolution),
        patch_nums: None,
        out: out.to_path_buf(),
        precision,
        cfg: None,
        top_k: None,
        top_p: None,
        quiet: true,
        allow_nonfinite: false,
        calibration: (precision == Precision::Int8)
            .then(|| calibration(&root().join("calibration/prompts/general.txt"))),
        attention_budget: None,
    };
    star_export::export::export(&a).expect("export")
}

/// `onnx.checker.check_model(full_check=True)` on every graph of a model directory, with the
/// Python `onnx` package .ci/run installs (STAR_PYTHON or ./.venv/bin/python).
pub fn onnx_check(dir: &Path) -> Result<String, String> {
    let script = r#"
import sys, glob, onnx
files = sorted(glob.glob(sys.argv[1] + '/*.onnx'))
assert files, 'no graphs'
for f in files:
    onnx.checker.check_model(f, full_check=True)
print(f'{len(files)} graphs pass onnx.checker (full_check)')
"#;
    python(script, dir)
}

/// The values of each graph of a model directory whose shape has a dimension that ONNX shape
/// inference cannot name (`unk__*`, or neither a value nor a symbol): "graph: op value" lines.
/// ONNX Runtime's memory planner can reuse no buffer for such a value and scans past it for
/// every later one (`G::annotate` in the exporter). A declared symbol is trusted here; a wrong one
/// (two values named alike whose sizes differ) shows when ONNX Runtime runs the graph: reusing a
/// buffer too small for a value is an error, which the validate and replay suites would report.
pub fn unnamed_dims(dir: &Path) -> Result<Vec<String>, String> {
    let script = r#"
import sys, glob, os, onnx
files = sorted(glob.glob(sys.argv[1] + '/*.onnx'))
assert files, 'no graphs'
for f in files:
    m = onnx.shape_inference.infer_shapes(onnx.load(f, load_external_data=False), strict_mode=True)
    op = {o: n.op_type for n in m.graph.node for o in n.output}
    typed = {v.name for v in list(m.graph.value_info) + list(m.graph.output)}
    for o, kind in op.items():
        if o and o not in typed:
            print(f'{os.path.basename(f)}: {kind} {o} (no type)')
    for v in list(m.graph.value_info) + list(m.graph.output):
        t = v.type.tensor_type
        if not t.HasField('shape') or any(
            (not d.HasField('dim_value') and not d.dim_param) or d.dim_param.startswith('unk__')
            for d in t.shape.dim
        ):
            print(f'{os.path.basename(f)}: {op.get(v.name, "?")} {v.name}')
"#;
    python(script, dir).map(|out| out.lines().map(str::to_string).collect())
}

fn python(script: &str, dir: &Path) -> Result<String, String> {
    let py = std::env::var("STAR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv/bin/python"));
    let out = std::process::Command::new(&py)
        .arg("-c")
        .arg(script)
        .arg(dir)
        .output()
        .map_err(|e| format!("running {}: {e}", py.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Where the official demo files (`star_demo_transformer.pth`, `vqvae.pth`, the CLIP folder) are
/// for the provenance test, decided from STAR_DEMO_DIR, CI and the default `../shared/demo`:
/// - STAR_DEMO_DIR set: it must hold them (asked for explicitly);
/// - otherwise the default location if it holds them;
/// - otherwise, under CI (CI set and not "false"/"0"), an error: CI always has ../shared, so a
///   missing copy there is a broken setup, not a fresh clone;
/// - otherwise Ok(None): a user's clone with nothing beside it, the check is skipped with a notice.
pub fn official_demo_dir(
    star_demo_dir: Option<&str>,
    ci: Option<&str>,
    default: &Path,
) -> Result<Option<PathBuf>, String> {
    let has =
        |d: &Path| d.join("star_demo_transformer.pth").is_file() && d.join("vqvae.pth").is_file();
    if let Some(d) = star_demo_dir.filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return if has(&d) {
            Ok(Some(d))
        } else {
            Err(format!(
                "STAR_DEMO_DIR={} does not hold the official demo files",
                d.display()
            ))
        };
    }
    if has(default) {
        return Ok(Some(default.to_path_buf()));
    }
    let under_ci = ci.is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
    if under_ci {
        return Err(format!(
            "CI is set but the official demo files are not at {} (CI lays shared/ beside the clone)",
            default.display()
        ));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_source_rules() {
        let empty = tempfile::tempdir().unwrap();
        let full = tempfile::tempdir().unwrap();
        for f in ["star_demo_transformer.pth", "vqvae.pth"] {
            std::fs::write(full.path().join(f), b"").unwrap();
        }
        let (e, f) = (empty.path(), full.path());
        // A fresh clone: nothing beside it, not CI.
        assert_eq!(official_demo_dir(None, None, e), Ok(None));
        assert_eq!(official_demo_dir(None, Some("false"), e), Ok(None));
        // CI must have them.
        assert!(official_demo_dir(None, Some("true"), e).is_err());
        assert!(official_demo_dir(None, Some("1"), e).is_err());
        // Found where they are.
        assert_eq!(
            official_demo_dir(None, Some("true"), f),
            Ok(Some(f.to_path_buf()))
        );
        assert_eq!(
            official_demo_dir(f.to_str(), None, e),
            Ok(Some(f.to_path_buf()))
        );
        // An explicit STAR_DEMO_DIR that lacks them is an error even outside CI.
        assert!(official_demo_dir(e.to_str(), None, f).is_err());
    }
}
