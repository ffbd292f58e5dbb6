//! The node placement the GPU backends check (ONNX Runtime's graph-assignment record, read
//! through the raw API), exercised on the CPU provider: every node of the demo decoder is
//! reported, on CPUExecutionProvider, and its convolutions count as compute nodes.

use std::path::Path;

#[test]
fn placement_lists_every_node_with_its_provider() {
    let env = star_engines::ort::ort_environment().expect("bash scripts/setup-ort.sh");
    let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-model/decoder.onnx");
    let s = ort::session::Session::builder(env)
        .unwrap()
        .with_config_entry(star_engines::ort::bind::PLACEMENT_CONFIG, "1")
        .unwrap()
        .commit_from_file(&graph)
        .unwrap();
    let placed = star_engines::ort::bind::placement(&s).unwrap();
    assert!(placed.len() > 10, "{placed:?}");
    assert!(
        placed.iter().all(|(ep, _, _)| ep == "CPUExecutionProvider"),
        "{placed:?}"
    );
    let cpu = star_engines::ort::bind::cpu_compute_nodes(&placed);
    assert!(cpu.iter().any(|(op, _)| op == "Conv"), "{cpu:?}");
    // The refusal's list names every node, grouped by operator type.
    let listed = star_engines::ort::bind::describe_cpu_nodes(&cpu);
    for (_, name) in &cpu {
        assert!(
            listed.contains(name.as_str()),
            "{name} missing from {listed}"
        );
    }
    assert!(listed.contains("Conv x"), "{listed}");
}

/// The shared environment allocator ort-cuda registers per device, exercised with the CPU
/// provider (the same ONNX Runtime call; only a GPU can show the CUDA arena): a session that
/// uses the environment's allocators runs.
#[test]
fn sessions_can_share_the_environment_allocator() {
    let env = star_engines::ort::ort_environment().expect("bash scripts/setup-ort.sh");
    star_engines::ort::bind::register_env_allocator(env, star_engines::ort::Place::Host).unwrap();
    let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-model/decoder.onnx");
    let mut s = ort::session::Session::builder(env)
        .unwrap()
        .with_env_allocators()
        .unwrap()
        .commit_from_file(&graph)
        .unwrap();
    let input = s.inputs()[0].name().to_string();
    let shape = [1usize, 16, 4, 4];
    let x = ort::value::Tensor::<f32>::from_array((shape, vec![0.1f32; shape.iter().product()]))
        .unwrap();
    let out = s.run(ort::inputs![input.as_str() => x]).unwrap();
    let (shape, _) = out["image"].try_extract_tensor::<f32>().unwrap();
    assert_eq!(&shape[..], &[1, 3, 64, 64]);
}
