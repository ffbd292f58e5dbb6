//! Export -> onnx.checker -> validate -> replay for both fixture models (every stage and every
//! recorded tensor within 1e-4 relative, metric in the README).

use star_engines::backend::BackendOptions;
use star_runtime::pipeline::Pipeline;
use star_tests::*;

fn full_cycle(variant: &str, resolution: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let m = export_fixture(variant, resolution, &out);
    assert!(m.graphs.len() > 10);
    let checked = onnx_check(&out).unwrap_or_else(|e| panic!("onnx.checker failed: {e}"));
    println!("{checked}");

    let golden = fixtures().join(variant);
    let rep = star_export::validate::validate(&out, &golden, BackendOptions::default())
        .expect("validate");
    println!("{}", rep.table());
    assert!(
        rep.checks.len() > 100,
        "validate compared only {} tensors",
        rep.checks.len()
    );
    assert!(rep.all_pass(), "validate: {} failures", rep.failures());

    let mut p = Pipeline::open(&out, BackendOptions::default()).unwrap();
    let rep = star_runtime::replay::replay(&mut p, &golden).expect("replay");
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

#[test]
fn tiny_256_export_validate_replay() {
    full_cycle("tiny-256", 256);
}

#[test]
fn tiny_1024s_with_stable_sampler_export_validate_replay() {
    full_cycle("tiny-1024s", 1024);
}
