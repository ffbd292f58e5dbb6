//! The node placement the GPU backends check (ONNX Runtime's graph-assignment record, read
//! through the raw API), exercised on the CPU provider: every node of the demo decoder is
//! reported, on CPUExecutionProvider, and its convolutions count as compute nodes.

use std::path::Path;

#[test]
fn placement_lists_every_node_with_its_provider() {
    let env = star_engines::backend::ort_environment().expect("bash scripts/setup-ort.sh");
    let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-model/decoder.onnx");
    let s = ort::session::Session::builder(env)
        .unwrap()
        .with_config_entry(star_engines::ort_bind::PLACEMENT_CONFIG, "1")
        .unwrap()
        .commit_from_file(&graph)
        .unwrap();
    let placed = star_engines::ort_bind::placement(&s).unwrap();
    assert!(placed.len() > 10, "{placed:?}");
    assert!(
        placed.iter().all(|(ep, _, _)| ep == "CPUExecutionProvider"),
        "{placed:?}"
    );
    let cpu = star_engines::ort_bind::cpu_compute_nodes(&placed);
    assert!(cpu.iter().any(|n| n.ends_with("(Conv)")), "{cpu:?}");
}
