//! The GPU build of ONNX Runtime on a machine without a GPU: its CUDA libraries load, the CUDA
//! provider registers, and a session on it fails with ONNX Runtime's own error instead of
//! running on the CPU. Needs `scripts/setup-ort.sh --gpu` (2.5 GB, not installed by CI: the test
//! says so and passes without checking anything).

use std::path::Path;

#[test]
fn cuda_provider_of_the_gpu_wheel_refuses_without_a_device() {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-gpu");
    let Some(lib) = star_engines::ort::ort_library_in_venv(&venv) else {
        eprintln!("skipped: no .venv-gpu (bash scripts/setup-ort.sh --gpu)");
        return;
    };
    if Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has a GPU (scripts/gpu-check.sh tests it)");
        return;
    }
    let loaded = star_engines::ort::cuda::preload_cuda_libraries(&lib).unwrap();
    let names: Vec<String> = loaded
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for want in ["libcudart.so.13", "libcublas.so.13", "libcudnn.so.9"] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want} not in {names:?}"
        );
    }
    let env = star_engines::ort::ort_environment_at("ort-cuda", &lib).unwrap();
    let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-model/decoder.onnx");
    let ep = ort::ep::CUDA::default().build().error_on_failure();
    let r = ort::session::Session::builder(env)
        .unwrap()
        .with_execution_providers([ep])
        .map_err(|e| e.to_string())
        .and_then(|mut b| b.commit_from_file(&graph).map_err(|e| e.to_string()));
    let Err(e) = r else {
        panic!("a CUDA session was created without a GPU");
    };
    eprintln!("{e}");
    assert!(e.to_lowercase().contains("cuda"), "{e}");
}
