//! Shared helpers of the workspace tests.

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
    PathBuf::from(star_runtime::EMBEDDED_MODEL)
}

/// Export one fixture variant into `out`.
pub fn export_fixture(
    variant: &str,
    resolution: usize,
    out: &Path,
) -> star_engines::manifest::Manifest {
    let f = fixtures();
    let a = star_export::export::ExportArgs {
        transformer: f.join(variant).join("star.pth"),
        vae: f.join("vqvae.pth"),
        text_encoder: f.join("clip_tiny"),
        tokenizer: None,
        resolution: Some(resolution),
        patch_nums: None,
        out: out.to_path_buf(),
        precision: "fp32".into(),
        cfg: None,
        top_k: None,
        top_p: None,
        quiet: true,
    };
    star_export::export::export(&a).expect("export")
}

/// `onnx.checker.check_model(full_check=True)` on every graph of a model directory, with the
/// Python `onnx` package .ci/run installs (STAR_PYTHON or ./.venv/bin/python).
pub fn onnx_check(dir: &Path) -> Result<String, String> {
    let py = std::env::var("STAR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv/bin/python"));
    let script = r#"
import sys, glob, onnx
files = sorted(glob.glob(sys.argv[1] + '/*.onnx'))
assert files, 'no graphs'
for f in files:
    onnx.checker.check_model(f, full_check=True)
print(f'{len(files)} graphs pass onnx.checker (full_check)')
"#;
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
