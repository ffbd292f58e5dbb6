//! `star-export build-engine`: --dry-run writes and prints the plan with no GPU and no TensorRT;
//! every refusal (bad option, missing library, build without the tensorrt feature) is one line,
//! exit code 2, and leaves nothing at --out.

use std::path::{Path, PathBuf};
use std::process::Command;

fn demo() -> PathBuf {
    star_cli_test::demo_model()
}

use star_cli_test::Out;

fn star_export(args: &[&str], env: &[(&str, &str)]) -> Out {
    star_cli_test::run(env!("CARGO_BIN_EXE_star-export"), args, env)
}

fn refused(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("engines");
    let mut a = vec!["build-engine", "--out", out.to_str().unwrap()];
    a.extend_from_slice(args);
    let o = star_export(&a, env);
    assert_eq!(o.code, 2, "stdout: {} stderr: {}", o.stdout, o.stderr);
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
    assert!(o.stderr.contains(needle), "'{needle}' not in: {}", o.stderr);
    assert!(!out.exists(), "something was written at --out");
    let stray: Vec<_> = std::fs::read_dir(t.path()).unwrap().flatten().collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

/// A shared library whose `getInferLibVersion` reports `version` (TensorRT's encoding), built
/// with the system C compiler; None (and a notice) where there is none.
#[allow(dead_code)]
fn fake_tensorrt(version: i32) -> Option<PathBuf> {
    let dir = tempfile::tempdir().unwrap().keep();
    let src = dir.join("v.c");
    std::fs::write(
        &src,
        format!("int getInferLibVersion(void) {{ return {version}; }}\n"),
    )
    .unwrap();
    let lib = dir.join("libnvinfer.so.10");
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("notice: no C compiler, the TensorRT-version test is skipped");
        return None;
    }
    Some(lib)
}

#[test]
fn dry_run_writes_and_prints_the_plan() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("engines");
    let o = star_export(
        &[
            "build-engine",
            "--model",
            demo().to_str().unwrap(),
            "--backend",
            "tensorrt",
            "--out",
            out.to_str().unwrap(),
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let written = std::fs::read_to_string(out.join("plan.json")).unwrap();
    assert_eq!(o.stdout, written);
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["plan.json"]);
    let plan: star_artifact::engine_manifest::Plan = serde_json::from_str(&written).unwrap();
    // text_encoder, text_kv, step_first, step, sample, vq, decoder (the demo has no sampler).
    assert_eq!(plan.engines.len(), 7);
    assert!(Path::new(&plan.model.path).is_absolute());
    // The out directory now exists: a second dry run is refused.
    let again = star_export(
        &[
            "build-engine",
            "--model",
            demo().to_str().unwrap(),
            "--backend",
            "ort-trt",
            "--out",
            out.to_str().unwrap(),
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(again.code, 2);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
}

#[test]
fn bad_options_are_refused_before_any_work() {
    let m = demo();
    let m = m.to_str().unwrap();
    let base = ["--model", m, "--backend", "tensorrt", "--dry-run"];
    let with = |extra: &[&'static str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    refused(&with(&["--opt-level", "6"]), &[], "0 to 5");
    refused(&with(&["--batch", "0"]), &[], "--batch");
    refused(&with(&["--workspace-gb", "0"]), &[], "--workspace-gb");
    refused(
        &["--model", m, "--backend", "cuda-magic", "--dry-run"],
        &[],
        "backend 'cuda-magic' is not available in this build (available: ort-trt, tensorrt)",
    );
    refused(
        &[
            "--model",
            "/nonexistent/model",
            "--backend",
            "tensorrt",
            "--dry-run",
        ],
        &[],
        "/nonexistent/model",
    );
}

#[test]
fn a_build_without_its_library_is_refused() {
    let m = demo();
    let m = m.to_str().unwrap();
    // This test binary is built without the tensorrt feature unless CI asks for it.
    if !cfg!(feature = "tensorrt") {
        refused(
            &["--model", m, "--backend", "tensorrt"],
            &[],
            "no TensorRT support; rebuild with `cargo build --release -p star-export -p star-runtime --features tensorrt`",
        );
    }
    if cfg!(feature = "tensorrt") {
        // No TensorRT on this machine: the names tried, and how to point at one.
        refused(
            &["--model", m, "--backend", "tensorrt"],
            &[("STAR_TENSORRT_LIB", "/nonexistent/libnvinfer.so.11")],
            "backend tensorrt: the TensorRT 11 library not found (/nonexistent/libnvinfer.so.11:",
        );
        refused(
            &[
                "--model",
                m,
                "--backend",
                "tensorrt",
                "--tensorrt-lib",
                "/nonexistent/lib.so",
            ],
            &[],
            "set STAR_TENSORRT_LIB=/path/to/libnvinfer.so.11 (or star-export build-engine --tensorrt-lib PATH)",
        );
        // A library of another major version: a stand-in libnvinfer reporting TensorRT 10.13.3.
        if let Some(lib) = fake_tensorrt(101303) {
            refused(
                &[
                    "--model",
                    m,
                    "--backend",
                    "tensorrt",
                    "--tensorrt-lib",
                    lib.to_str().unwrap(),
                ],
                &[],
                "is TensorRT 10.13.3; this backend needs TensorRT 11",
            );
        }
    }
    refused(
        &["--model", m, "--backend", "ort-trt"],
        &[("ORT_GPU_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
        "GPU build of ONNX Runtime not found",
    );
}
