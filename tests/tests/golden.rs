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

/// Operators of the exported graphs, all in onnx-tensorrt's supported list (so the same graphs can
/// build TensorRT engines); a new operator must be checked against it before it is added here.
const TENSORRT_PARSER_OPS: &[&str] = &[
    "Add",
    "Cast",
    "Clip",
    "Concat",
    "Conv",
    "CumSum",
    "Div",
    "Equal",
    "Erf",
    "Gather",
    "Identity",
    "LayerNormalization",
    "MatMul",
    "Max",
    "Mul",
    "ReduceL2",
    "ReduceMean",
    "Reshape",
    "Resize",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
];

#[test]
fn graphs_use_only_tensorrt_parser_operators_at_opset_17() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let m = export_fixture("tiny-1024s", 1024, &out);
    let mut seen = std::collections::BTreeSet::new();
    for g in &m.graphs {
        let bytes = std::fs::read(out.join(&g.file)).unwrap();
        let model = star_engines::onnx::decode_model(&bytes).unwrap();
        assert_eq!(model.opset_import[0].version, 17, "{}", g.file);
        for n in &model.graph.as_ref().unwrap().node {
            assert!(
                TENSORRT_PARSER_OPS.contains(&n.op_type.as_str()),
                "{}: operator {} is not on the TensorRT list",
                g.file,
                n.op_type
            );
            seen.insert(n.op_type.clone());
        }
        // Every initializer that is not a small inline constant lives in the one shared file.
        for t in &model.graph.as_ref().unwrap().initializer {
            if t.raw_data.is_empty() {
                assert_eq!(t.data_location, 1, "{}: {}", g.file, t.name);
                assert_eq!(t.external_data[0].value, "weights.bin");
            }
        }
    }
    println!("operators used: {seen:?}");
}
