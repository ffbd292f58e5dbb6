//! The golden suite, one for every backend: each fixture model exported at a precision, checked
//! (`onnx.checker`, named shapes, the per-block KV I/O), then `validate` (every stage on recorded
//! inputs) and `replay` (every recorded generation) on the backend at the precision's tolerance
//! (`star_artifact::golden::tolerance`). A backend's test file instantiates it with
//! `golden_suite!`, one module per precision, as tract's test-rt does per runtime.
//!
//! Engines with a host-memory policy (ort-cpu) are also run the way d30 runs (the large-step
//! path) and as a one-shot run gives sessions and the cache back. GPU backends run where a GPU
//! is; elsewhere their instantiations compile and say they were skipped.

use crate::{export_fixture_at, fixtures, onnx_check};
pub use star_artifact::dtype::Precision;
use star_engines::options::BackendOptions;
use star_pipeline::pipeline::Pipeline;
use std::path::Path;

/// `mod $precision { #[test] fn tiny_256() … #[test] fn tiny_1024s_with_stable_sampler() … }`
/// for each (module name, backend, precision) given.
#[macro_export]
macro_rules! golden_suite {
    ($($name:ident: $backend:literal, $precision:ident;)+) => {
        $(
            mod $name {
                #[test]
                fn tiny_256() {
                    $crate::golden_suite::cycle(
                        $backend,
                        $crate::golden_suite::Precision::$precision,
                        "tiny-256", 256);
                }
                #[test]
                fn tiny_1024s_with_stable_sampler() {
                    $crate::golden_suite::cycle(
                        $backend,
                        $crate::golden_suite::Precision::$precision,
                        "tiny-1024s", 1024);
                }
            }
        )+
    };
}

/// Why `backend` cannot run on this machine, if it cannot (no GPU for the GPU backends); such a
/// suite says so and checks nothing.
pub fn unavailable(backend: &str) -> Option<String> {
    use star_artifact::engine_manifest::EngineBackend;
    if backend == "ort-cpu" {
        return None;
    }
    if let Err(e) = star_engines::gpu::gpu_identity(backend, 0) {
        return Some(e.to_string());
    }
    let library = match EngineBackend::parse(backend) {
        Some(b) => star_engines::registry::engine_builder(b, None, 0).err(),
        None => star_engines::ort::find_ort_gpu_library(backend).err(),
    };
    library.map(|e| e.to_string())
}

/// The whole cycle of one fixture on one backend at one precision.
pub fn cycle(backend: &str, precision: Precision, variant: &str, resolution: usize) {
    if let Some(why) = unavailable(backend) {
        eprintln!("notice: golden suite on {backend} skipped on this machine: {why}");
        return;
    }
    let tol = star_artifact::golden::tolerance(precision);
    println!("== {variant} on {backend} at {precision} (tolerance {tol:e})");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let m = export_fixture_at(variant, resolution, precision, &out);
    assert_eq!(m.precision, precision);
    check_export(&m, &out);
    let engines = engine_dir(backend, &out, tmp.path());
    let opts = || BackendOptions {
        engine_dir: engines.clone(),
        ..BackendOptions::named(backend, 0)
    };
    let golden = fixtures().join(variant);
    validate_and_replay(&out, &golden, opts());
    if Pipeline::open(&out, opts())
        .unwrap()
        .md
        .memory_policy()
        .is_some()
    {
        host_memory_paths(&m, &out, &golden, opts);
    }
}

/// For an engine backend (tensorrt, ort-trt): its engines, built from the model directory with
/// `build-engine`; None for the backends that run model directories.
fn engine_dir(backend: &str, model: &Path, tmp: &Path) -> Option<std::path::PathBuf> {
    star_artifact::engine_manifest::EngineBackend::parse(backend)?;
    let out = tmp.join("engines");
    let a = star_export::build_engine::BuildEngineArgs {
        model: model.to_path_buf(),
        backend: backend.to_string(),
        out: out.clone(),
        options: Default::default(),
        tensorrt_lib: None,
        device: 0,
        dry_run: false,
        quiet: true,
    };
    star_export::build_engine::build_engine(&a).expect("build-engine");
    Some(out)
}

/// One graph per stage kind, whatever the number of scales; every graph passes
/// `onnx.checker` with every value's shape named; `step` has one past and one K/V per block.
fn check_export(m: &star_artifact::manifest::Manifest, out: &Path) {
    let stages: Vec<&str> = m.graphs.iter().map(|g| g.stage.name()).collect();
    let mut want = vec![
        "text_encoder",
        "text_kv",
        "step_first",
        "step",
        "sample",
        "vq",
        "decoder",
    ];
    if m.config.sampler_blocks > 0 {
        want.insert(4, "sampler");
    }
    assert_eq!(stages, want);
    let checked = onnx_check(out).unwrap_or_else(|e| panic!("onnx.checker failed: {e}"));
    println!("{checked}");
    assert_named_shapes(out);
    assert_block_kv_io(out, m.config.depth);
}

/// Every stage on recorded inputs (validate), then every recorded generation (replay).
fn validate_and_replay(out: &Path, golden: &Path, opts: BackendOptions) {
    let rep = star_export::validate::validate(out, golden, opts.clone()).expect("validate");
    println!("{}", rep.table());
    assert!(
        rep.checks.len() > 100,
        "validate compared only {} tensors",
        rep.checks.len()
    );
    assert!(rep.all_pass(), "validate: {} failures", rep.failures());
    let mut p = Pipeline::open(out, opts).unwrap();
    let rep = star_pipeline::replay::replay(&mut p, golden).expect("replay");
    println!("{}", rep.table());
    assert!(
        rep.checks.len() > 100,
        "replay compared only {} tensors",
        rep.checks.len()
    );
    assert!(rep.all_pass(), "replay: {} failures", rep.failures());
    for must in ["text.input_ids", "image"] {
        assert!(
            rep.checks.iter().any(|c| c.tensor == must),
            "replay did not compare {must}"
        );
    }
}

/// An engine that keeps its sessions in host memory (ort-cpu), run as a model whose `step`
/// passes LARGE_STEP_BYTES (d30) runs: the scales of at most EARLY_TOKENS tokens on a session
/// that is not pre-packed, the larger ones (169 and 256 tokens at 256 px, up to 4096 at 1024)
/// on the pre-packed one; and as a one-shot run gives its sessions and cache back.
fn host_memory_paths(
    m: &star_artifact::manifest::Manifest,
    out: &Path,
    golden: &Path,
    opts: impl Fn() -> BackendOptions,
) {
    let mut large = opts();
    large.cpu.large_step_bytes = 0;
    let mut p = Pipeline::open(out, large).unwrap();
    let rep = star_pipeline::replay::replay(&mut p, golden).expect("replay, large step");
    assert!(
        rep.all_pass(),
        "replay with the early scales unpacked: {} failures\n{}",
        rep.failures(),
        rep.table()
    );
    // Each recorded generation ran its early scales, and only those, unpacked; the others
    // on the pre-packed session.
    let early = m
        .schedule
        .patch_nums
        .iter()
        .filter(|&&p| p * p <= star_engines::ort::cpu::EARLY_TOKENS)
        .count();
    let records = star_artifact::golden::generation_records(golden)
        .unwrap()
        .len();
    assert!(early > 0 && early < m.schedule.patch_nums.len());
    let policy = p.md.memory_policy().expect("a host-memory policy");
    assert_eq!(policy.unpacked_step_runs(), early * records);
    for session in ["step.unpacked", "step"] {
        assert!(
            p.timings.get(&format!("session_create[{session}]")) > 0.0,
            "the {session} session was not created"
        );
    }
    if m.config.sampler_blocks > 0 {
        // As a one-shot d30/1024 run does it: the text stages given back once the prompt is
        // encoded, the sampler's and decoder's sessions during the last step (created again
        // after it), and the cache right after the last step, before the sampler's sub-steps.
        let mut q = Pipeline::open(out, opts()).unwrap();
        q.kv_release_bytes = 0;
        q.one_shot = true;
        let rep = star_pipeline::replay::replay(&mut q, golden).expect("one-shot replay");
        assert!(
            rep.all_pass(),
            "one-shot replay, cache released before the sampler: {} failures",
            rep.failures()
        );
        assert!(q.md.kv_shape().is_none(), "the cache was not given back");
    }
}

/// Every value of every graph has a shape in values and symbols: ONNX Runtime's memory planner
/// reuses buffers between values of the same shape only, and one with an unnamed dimension
/// stays on its free list (at d30 that made session creation 9 s longer).
pub fn assert_named_shapes(dir: &std::path::Path) {
    let unnamed = crate::unnamed_dims(dir).unwrap_or_else(|e| panic!("shape inference: {e}"));
    assert!(
        unnamed.is_empty(),
        "{} values with an unnamed dimension:\n{}",
        unnamed.len(),
        unnamed.join("\n")
    );
}

/// `step` takes one past and gives one K/V per block, and each past is first joined to its
/// block's new K/V (nothing but a Shape reads it otherwise): ONNX Runtime runs a node as soon as its inputs exist, so anything else done
/// to a past input alone (a transpose, a pick) would run for every block at the start of the
/// step and keep a copy of the whole past alive (4.9 GB at d30/1024's last scale).
pub fn assert_block_kv_io(dir: &std::path::Path, depth: usize) {
    use star_artifact::stage::io;
    let bytes = std::fs::read(dir.join("step.onnx")).unwrap();
    let g = star_artifact::onnx::decode_model(&bytes)
        .unwrap()
        .graph
        .unwrap();
    let inputs: Vec<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
    let outputs: Vec<&str> = g.output.iter().map(|v| v.name.as_str()).collect();
    for i in 0..depth {
        let past = io::past(i);
        assert!(inputs.contains(&past.as_str()), "no input {past}");
        assert!(
            outputs.contains(&io::kv_new(i).as_str()),
            "no output kv_new_{i}"
        );
        // Reading its length (the scale's first token) copies nothing.
        let users: Vec<_> = g
            .node
            .iter()
            .filter(|n| n.input.contains(&past) && n.op_type != "Shape")
            .collect();
        assert_eq!(users.len(), 1, "{past} has {} consumers", users.len());
        let u = users[0];
        assert_eq!(u.op_type, "Concat", "{past} feeds a {}", u.op_type);
        assert!(
            u.input
                .iter()
                .all(|x| *x == past || !inputs.contains(&x.as_str())),
            "{past} is joined to another graph input"
        );
    }
    assert!(!inputs.contains(&io::past(depth).as_str()));
}
