//! What the exported graphs are, beyond the golden suite (`golden_ort_cpu.rs`): TensorRT-parser
//! operators only, INT8 and FP16 lowering, records of several prompts, one copy of the weights,
//! the large-step sessions, non-finite records refused, head-grouped attention.

use star_artifact::dtype::Precision;
use star_engines::options::BackendOptions;
use star_pipeline::pipeline::Pipeline;
use star_tests::*;

/// Operators of the exported graphs, all in onnx-tensorrt's supported list (so the same graphs can
/// build TensorRT engines); a new operator must be checked against it before it is added here.
/// The sample graph's (TopK, the comparisons, Where, And/Or, Floor, GatherElements, the
/// reductions) were checked against onnx-tensorrt's operators.md for TensorRT 10/11: TopK takes
/// k up to 3840 there, so a vocabulary above that needs --top-k at most 3840 on TensorRT.
const TENSORRT_PARSER_OPS: &[&str] = &[
    "Add",
    "And",
    "Cast",
    "Clip",
    "Concat",
    "Conv",
    "CumSum",
    "DequantizeLinear",
    "Div",
    "Equal",
    "Erf",
    "Exp",
    "Floor",
    "Gather",
    "GatherElements",
    "Greater",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "Less",
    "LessOrEqual",
    "MatMul",
    "Max",
    "Min",
    "Mul",
    "Or",
    "Pow",
    "QuantizeLinear",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceSum",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "TopK",
    "Transpose",
    "Unsqueeze",
    "Where",
];

#[test]
fn graphs_use_only_tensorrt_parser_operators_at_opset_17() {
    let mut seen = std::collections::BTreeSet::new();
    for precision in Precision::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        let m = export_fixture_at("tiny-1024s", 1024, precision, &out);
        ops_of(&m, &out, &mut seen);
    }
    println!("operators used: {seen:?}");
}

fn ops_of(
    m: &star_artifact::manifest::Manifest,
    out: &std::path::Path,
    seen: &mut std::collections::BTreeSet<String>,
) {
    for g in &m.graphs {
        let bytes = std::fs::read(out.join(&g.file)).unwrap();
        let model = star_artifact::onnx::decode_model(&bytes).unwrap();
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
}

fn initializers(
    out: &std::path::Path,
    file: &str,
) -> (
    star_artifact::onnx::GraphProto,
    std::collections::HashMap<String, star_artifact::onnx::TensorProto>,
) {
    let model = star_artifact::onnx::decode_model(&std::fs::read(out.join(file)).unwrap()).unwrap();
    let g = model.graph.unwrap();
    let inits = g
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    (g, inits)
}

/// An initializer's bytes in the model directory's weights file (external data).
fn external_bytes(out: &std::path::Path, t: &star_artifact::onnx::TensorProto) -> Vec<u8> {
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
            .unwrap()
    };
    let (off, len): (usize, usize) = (
        get("offset").parse().unwrap(),
        get("length").parse().unwrap(),
    );
    std::fs::read(out.join(get("location"))).unwrap()[off..off + len].to_vec()
}

/// The INT8 graphs are what TensorRT's strongly typed networks take: every QuantizeLinear and
/// DequantizeLinear has an explicit int8 zero-point of 0; weights are per output channel
/// (axis 1, one scale per column), activations per tensor with a scale from the calibration
/// table; every block linear is quantized and the logits head is not.
#[test]
fn int8_graphs_are_symmetric_qdq_with_zero_point_0() {
    use star_artifact::onnx::dtype;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let m = export_fixture_at("tiny-256", 256, Precision::Int8, &out);
    let cal = m.calibration.as_ref().expect("a calibration record");
    assert_eq!(cal.weight_bits, star_artifact::manifest::INT8_WEIGHT_BITS);
    let table = star_calibration::CalibrationTable::from_json(
        &std::fs::read_to_string(out.join(&cal.table_file)).unwrap(),
    )
    .unwrap();
    assert_eq!(table.hash(), cal.table_sha256);
    let cache = std::fs::read_to_string(out.join(&cal.trt_cache_file)).unwrap();
    assert!(cache.starts_with("TRT-"));
    assert_eq!(cache.lines().count(), table.amax.len() + 1);
    for line in cache.lines().skip(1) {
        let (name, hex) = line.split_once(": ").expect("tensor: hex");
        let scale = f32::from_bits(u32::from_str_radix(hex, 16).unwrap());
        assert_eq!(
            scale,
            star_calibration::int8_scale(table.amax[name]),
            "{name}"
        );
    }
    // depth x (qkv, proj, cross q, cross proj, fc1, fc2)
    assert_eq!(table.amax.len(), 6 * m.config.depth);
    for stage in ["step.onnx", "step_first.onnx"] {
        let (g, inits) = initializers(&out, stage);
        let (mut q, mut dq_w) = (0, 0);
        for n in &g.node {
            if n.op_type != "QuantizeLinear" && n.op_type != "DequantizeLinear" {
                continue;
            }
            let zp = &inits[&n.input[2]];
            assert_eq!(zp.data_type, dtype::INT8, "{stage}: {}", n.name);
            assert!(
                zp.raw_data.iter().all(|&b| b == 0),
                "{stage}: non-zero zero-point"
            );
            let x = &inits.get(&n.input[0]);
            if n.op_type == "QuantizeLinear" {
                q += 1;
                // Per-tensor activation scale: a scalar equal to table amax / 127.
                let sc = &inits[&n.input[1]];
                assert!(sc.dims.is_empty());
                let v = f32::from_le_bytes(sc.raw_data[..4].try_into().unwrap());
                let amax = table.amax[&n.input[0]];
                assert!(
                    (v - amax / 127.0).abs() <= 1e-6 * v.abs().max(1e-12),
                    "{}",
                    n.input[0]
                );
            } else if let Some(w) = x {
                dq_w += 1;
                assert_eq!(w.data_type, dtype::INT8);
                // 7-bit weights: no CPU's INT8 product saturates (INT8_WEIGHT_BITS).
                let bytes = external_bytes(&out, w);
                assert!(
                    bytes.iter().all(|&b| (b as i8).unsigned_abs() <= 63),
                    "{stage}: {} has weights outside [-63, 63]",
                    n.input[0]
                );
                assert!(bytes.iter().any(|&b| (b as i8).unsigned_abs() == 63));
                let axis = n.attribute.iter().find(|a| a.name == "axis").map(|a| a.i);
                assert_eq!(axis, Some(1), "per output channel");
                assert_eq!(inits[&n.input[1]].dims, vec![w.dims[1]]);
            }
        }
        assert_eq!(q, 6 * m.config.depth, "{stage}: quantized activations");
        assert_eq!(dq_w, 6 * m.config.depth, "{stage}: quantized weights");
        assert!(
            inits.contains_key("star/head_logits.weight^T"),
            "{stage}: the head stays FP32"
        );
    }
}

/// FP16 graphs: every block and plain projection multiplies FP16 weights; the logits head,
/// norms and softmax stay FP32 (no FP16 LayerNormalization or Softmax input).
#[test]
fn fp16_graphs_keep_norms_softmax_and_head_in_fp32() {
    use star_artifact::onnx::dtype;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let m = export_fixture_at("tiny-1024s", 1024, Precision::Fp16, &out);
    for g in m.graphs.iter().filter(|g| g.precision == Precision::Fp16) {
        let (graph, inits) = initializers(&out, &g.file);
        let mut f16 = std::collections::HashSet::new();
        for (name, t) in &inits {
            if t.data_type == dtype::FLOAT16 {
                f16.insert(name.clone());
            }
        }
        // The KV cache's past inputs are FP16 at this precision.
        for i in &graph.input {
            let t = i.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
            if t.is_some_and(|t| t.elem_type == dtype::FLOAT16) {
                f16.insert(i.name.clone());
            }
        }
        // FP16 values flow through operators that keep the element type.
        const KEEPS: &[&str] = &[
            "MatMul",
            "Add",
            "Concat",
            "Transpose",
            "Reshape",
            "Slice",
            "Split",
            "Squeeze",
            "Unsqueeze",
            "Gather",
            "Identity",
        ];
        for n in &graph.node {
            if n.op_type == "Cast" {
                let to = n.attribute.iter().find(|a| a.name == "to").unwrap().i as i32;
                if to == dtype::FLOAT16 {
                    f16.insert(n.output[0].clone());
                }
            } else if KEEPS.contains(&n.op_type.as_str())
                && n.input.first().is_some_and(|i| f16.contains(i))
            {
                f16.extend(n.output.iter().cloned());
            }
        }
        let mut fp16_matmuls = 0;
        for n in &graph.node {
            match n.op_type.as_str() {
                "LayerNormalization" | "Softmax" | "ReduceL2" => {
                    assert!(!f16.contains(&n.input[0]), "{}: {} in FP16", g.file, n.name)
                }
                "MatMul" => {
                    let w = n.input.iter().find(|i| inits.contains_key(*i));
                    match w {
                        Some(w) if w.contains("head_logits") => {
                            assert_eq!(inits[w].data_type, dtype::FLOAT, "{}: head", g.file)
                        }
                        Some(w) => {
                            assert_eq!(inits[w].data_type, dtype::FLOAT16, "{}: {w}", g.file);
                            fp16_matmuls += 1;
                        }
                        None => assert!(
                            n.input.iter().all(|i| f16.contains(i)),
                            "{}: attention product {} not in FP16",
                            g.file,
                            n.name
                        ),
                    }
                }
                _ => {}
            }
        }
        // Step graphs: 6 linears per block (self- and cross-attention, FFN); the sampler:
        // 4 per refiner block plus its 3 input projections.
        let want = match g.stage {
            star_engines::Stage::Sampler => 4 * m.config.sampler_blocks + 3,
            _ => 6 * m.config.depth,
        };
        assert_eq!(fp16_matmuls, want, "{}", g.file);
    }
}

#[test]
fn records_of_several_prompts_are_handled_explicitly() {
    // A copy of tiny-256/gen_b1 whose index says it was made from two different prompts.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    export_fixture("tiny-256", 256, &out);
    let variant = tmp.path().join("set/two-prompts");
    std::fs::create_dir_all(&variant).unwrap();
    let src = fixtures().join("tiny-256");
    std::fs::copy(
        src.join("gen_b1.safetensors"),
        variant.join("gen_b1.safetensors"),
    )
    .unwrap();
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("gen_b1.json")).unwrap()).unwrap();
    index["info"]["call"]["prompts"] = serde_json::json!([
        "a photo of an astronaut riding a horse on mars",
        "a red car"
    ]);
    std::fs::write(variant.join("gen_b1.json"), index.to_string()).unwrap();

    let rep = star_export::validate::validate(&out, &variant, BackendOptions::default())
        .expect("validate");
    assert!(rep.all_pass());
    assert!(
        rep.checks.iter().all(|c| c.stage == "text_encoder"),
        "only the text encoder is comparable: {}",
        rep.table()
    );

    let mut p = Pipeline::open(&out, BackendOptions::default()).unwrap();
    let err = star_pipeline::replay::replay(&mut p, &variant)
        .err()
        .expect("replay must refuse")
        .to_string();
    assert!(err.contains("2 different prompts"), "{err}");
}

/// Every session takes its weights from one shared pool: each external initializer is loaded once
/// (ONNX Runtime would otherwise give each per-scale session a private copy; see RESULTS.md).
#[test]
fn sessions_share_one_copy_of_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let m = export_fixture("tiny-1024s", 1024, &out);
    let mut names = std::collections::HashMap::new();
    for g in &m.graphs {
        let model =
            star_artifact::onnx::decode_model(&std::fs::read(out.join(&g.file)).unwrap()).unwrap();
        for t in model.graph.unwrap().initializer {
            if t.data_location == 1 {
                let len: usize = t
                    .external_data
                    .iter()
                    .find(|e| e.key == "length")
                    .unwrap()
                    .value
                    .parse()
                    .unwrap();
                names.insert(t.name, len);
            }
        }
    }
    let mut md = star_engines::model_dir::ModelDir::open(&out, BackendOptions::default()).unwrap();
    md.memory_policy().expect("ort-cpu").load_all().unwrap();
    let (values, bytes) = md.memory_policy().expect("ort-cpu").shared_weights();
    assert_eq!(
        values,
        names.len(),
        "one shared value per distinct external initializer"
    );
    assert_eq!(bytes, names.values().sum::<usize>());
    assert!(bytes as u64 <= std::fs::metadata(out.join("weights.bin")).unwrap().len());
}

/// Every scale's logits of a generation.
#[derive(Default)]
struct Logits(std::collections::BTreeMap<usize, Vec<f32>>);

impl star_pipeline::pipeline::Hooks for Logits {
    fn observing(&self) -> bool {
        true
    }
    fn observe(&mut self, what: star_pipeline::observe::Obs, t: &star_artifact::tensor::Tensor) {
        if let star_pipeline::observe::Obs::Logits(scale) = what {
            self.0.insert(scale, t.as_f32().unwrap().to_vec());
        }
    }
}

/// A large `step` (LARGE_STEP_BYTES) runs each scale on the session its token count names, never
/// on the one that happens to be ready: a one-shot pipeline (sessions created in the background)
/// and a warm one (every session created first, as `bench` and `serve` do) give the same logits
/// at every scale and the same images, bit for bit, generation after generation (the second
/// faults the early session's released pages back in). The two GEMM paths do round differently
/// (the early scales' logits differ from those of a pipeline that pre-packs every scale), so a
/// choice by readiness would show. The fixture at 256 px switches sessions at scale 8 (169
/// tokens).
#[test]
fn large_step_sessions_are_chosen_by_the_schedule_alone() {
    use star_engines::ort::cpu::EARLY_TOKENS;
    use star_pipeline::pipeline::GenParams;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let m = export_fixture("tiny-256", 256, &out);
    let early: Vec<usize> = (0..m.schedule.patch_nums.len())
        .filter(|&i| m.schedule.patch_nums[i].pow(2) <= EARLY_TOKENS)
        .collect();
    assert!(!early.is_empty() && early.len() < m.schedule.patch_nums.len());
    let large = || {
        let mut o = BackendOptions::default();
        o.cpu.large_step_bytes = 0;
        o
    };
    let prompts = ["a red circle".to_string(), "a blue square".to_string()];
    let mut warm = Pipeline::open(&out, large()).unwrap();
    warm.md
        .memory_policy()
        .expect("ort-cpu")
        .load_all()
        .unwrap();
    let mut once = Pipeline::open(&out, large()).unwrap();
    once.one_shot = true;
    once.kv_release_bytes = 0;
    let mut packed = Pipeline::open(&out, BackendOptions::default()).unwrap();
    let mut rounding_differs = false;
    for seed in [5, 6] {
        let p = GenParams::defaults(&warm, seed);
        let (mut lw, mut lo, mut lp) = (Logits::default(), Logits::default(), Logits::default());
        let a = warm.generate(&prompts, "", &p, &mut lw).unwrap();
        let b = once.generate(&prompts, "", &p, &mut lo).unwrap();
        packed.generate(&prompts, "", &p, &mut lp).unwrap();
        assert_eq!(lw.0.len(), m.schedule.patch_nums.len());
        assert!(
            lw.0 == lo.0,
            "seed {seed}: one-shot logits differ from the warm pipeline's"
        );
        assert!(
            a.image.as_f32().unwrap() == b.image.as_f32().unwrap(),
            "seed {seed}: the one-shot image differs from the warm pipeline's"
        );
        rounding_differs |= early.iter().any(|si| lw.0[si] != lp.0[si]);
    }
    assert!(
        rounding_differs,
        "the unpacked and pre-packed sessions gave identical early logits: this test cannot tell them apart"
    );
    // Exactly the early scales of each generation ran unpacked (the others pre-packed).
    assert_eq!(
        warm.md
            .memory_policy()
            .expect("ort-cpu")
            .unpacked_step_runs(),
        2 * early.len()
    );
    assert_eq!(
        once.md
            .memory_policy()
            .expect("ort-cpu")
            .unpacked_step_runs(),
        2 * early.len()
    );
    assert!(warm.timings.get("session_create[step.unpacked]") > 0.0);
    assert_eq!(
        packed
            .md
            .memory_policy()
            .expect("ort-cpu")
            .unpacked_step_runs(),
        0
    );
    assert_eq!(packed.timings.get("session_create[step.unpacked]"), 0.0);
}

/// Overwrite the first element of an f32 tensor of a .safetensors file in place.
fn poison_first_f32(file: &std::path::Path, name: &str, value: f32) {
    let at = {
        let st = star_artifact::safetensors::SafeTensors::open(file).unwrap();
        let e = &st.entries[name];
        assert_eq!(
            e.dtype,
            star_artifact::safetensors::DType::F32,
            "{name} is not F32"
        );
        st.file_offset(e)
    };
    let mut b = std::fs::read(file).unwrap();
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(file, b).unwrap();
}

/// A recorded tensor that validate feeds to a stage must be finite; a damaged record is refused
/// with the tensor named, not compared into a meaningless pass or fail.
#[test]
fn validate_refuses_a_non_finite_recorded_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    export_fixture("tiny-256", 256, &out);
    let golden = tmp.path().join("fixtures/tiny-256");
    std::fs::create_dir_all(&golden).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-256"))
        .unwrap()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("gen_") {
            std::fs::copy(e.path(), golden.join(e.file_name())).unwrap();
        }
    }
    poison_first_f32(&golden.join("gen_b1.safetensors"), "text.hidden", f32::NAN);
    let e = star_export::validate::validate(&out, &golden, BackendOptions::default())
        .err()
        .expect("a NaN input was accepted")
        .to_string();
    assert!(
        e.contains("tensor 'text.hidden' holds a non-finite value (NaN at flat index 0)"),
        "{e}"
    );
}

/// Each weight is stored once and referenced by at most two graphs (the transformer blocks by
/// step_first and step; the codebook by vq and sampler): what lets one TensorRT engine per graph,
/// or one device upload per ORT session, hold every weight once.
#[test]
fn no_weight_is_referenced_by_more_than_two_graphs() {
    for (variant, res, precision) in [
        ("tiny-256", 256, Precision::Fp32),
        ("tiny-1024s", 1024, Precision::Fp32),
        ("tiny-1024s", 1024, Precision::Fp16),
        ("tiny-256", 256, Precision::Int8),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        let m = export_fixture_at(variant, res, precision, &out);
        let mut refs: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut offsets: std::collections::BTreeMap<String, String> = Default::default();
        for g in &m.graphs {
            let model =
                star_artifact::onnx::decode_model(&std::fs::read(out.join(&g.file)).unwrap())
                    .unwrap();
            for t in model.graph.unwrap().initializer {
                if t.data_location == 1 {
                    refs.entry(t.name.clone()).or_default().push(g.file.clone());
                    let off = t.external_data.iter().find(|e| e.key == "offset").unwrap();
                    offsets.insert(t.name, off.value.clone());
                }
            }
        }
        for (name, graphs) in &refs {
            assert!(
                graphs.len() <= 2,
                "{variant}: {name} is referenced by {graphs:?}"
            );
        }
        // Stored once: distinct tensors never share an offset.
        let distinct: std::collections::BTreeSet<&String> = offsets.values().collect();
        assert_eq!(
            distinct.len(),
            offsets.len(),
            "{variant}: a tensor is stored twice"
        );
        let shared: Vec<_> = refs.iter().filter(|(_, g)| g.len() == 2).collect();
        assert!(
            !shared.is_empty(),
            "{variant}: expected the blocks shared by step_first and step"
        );
    }
}

/// A reduced-precision directory relabelled as another precision (labels are not in the model
/// hash) is refused from the graphs' contents, before any session is created.
#[test]
fn relabelled_precision_is_refused_from_the_graphs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    export_fixture_at("tiny-256", 256, Precision::Fp16, &out);
    let mp = out.join("manifest.json");
    let text = std::fs::read_to_string(&mp).unwrap();
    // Relabelled consistently, the KV cache's dtype too: only the graph files can tell.
    let relabelled = text
        .replace("\"fp16\"", "\"fp32\"")
        .replace("\"float16\"", "\"float32\"");
    std::fs::write(&mp, relabelled).unwrap();
    let e = star_engines::model_dir::ModelDir::open(&out, BackendOptions::default())
        .err()
        .expect("an FP16 directory labelled fp32 was opened")
        .to_string();
    assert!(e.contains("multiplies float16 weights"), "{e}");
}

/// Self-attention over groups of heads (what the exporter does when all heads' scores at the
/// largest scale would pass the attention budget, as at d30/1024) is the same function: the
/// stable-sampler fixture exported with every head in its own group validates and replays at
/// the FP32 tolerance.
#[test]
fn head_grouped_attention_validates_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let f = fixtures();
    let a = star_export::export::ExportArgs {
        transformer: f.join("tiny-1024s/star.pth"),
        vae: f.join("vqvae.pth"),
        text_encoder: f.join("clip_tiny"),
        tokenizer: None,
        resolution: Some(1024),
        patch_nums: None,
        out: out.clone(),
        precision: Precision::Fp32,
        cfg: None,
        top_k: None,
        top_p: None,
        quiet: true,
        allow_nonfinite: false,
        calibration: None,
        // One byte: every group is a single head.
        attention_budget: Some(1),
    };
    let m = star_export::export::export(&a).expect("export");
    star_tests::golden_suite::assert_named_shapes(&out);
    let heads = m.config.heads;
    assert!(heads > 1, "the fixture needs several heads to split");
    // The step graph really is split: one score MatMul per head per block.
    let step = std::fs::read(out.join("step.onnx")).unwrap();
    let model = star_artifact::onnx::decode_model(&step).unwrap();
    let softmaxes = model
        .graph
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type == "Softmax")
        .count();
    // Self-attention per head, cross-attention whole, per block.
    assert_eq!(softmaxes, m.config.depth * (heads + 1));
    let golden = fixtures().join("tiny-1024s");
    let opts = || BackendOptions::named("ort-cpu", 0);
    let rep = star_export::validate::validate(&out, &golden, opts()).expect("validate");
    assert!(
        rep.all_pass(),
        "validate: {} failures\n{}",
        rep.failures(),
        rep.table()
    );
    let mut p = Pipeline::open(&out, opts()).unwrap();
    let rep = star_pipeline::replay::replay(&mut p, &golden).expect("replay");
    assert!(
        rep.all_pass(),
        "replay: {} failures\n{}",
        rep.failures(),
        rep.table()
    );
}

#[test]
fn head_groups_fit_the_budget() {
    use star_export::graph::transformer::head_groups;
    use star_export::graph::DEFAULT_ATTENTION_BUDGET as B;
    // d30 at 1024 px: 30 heads, scale 13 (4096 tokens) over 9451 keys -> groups of 2 heads
    // (620 MB; 3 heads would be 929 MB).
    assert_eq!(head_groups(30, 4096, 9451, B), 15);
    // Its stable sampler: 4097 x 4097 -> groups of 6 heads (806 MB).
    assert_eq!(head_groups(30, 4097, 4097, B), 5);
    // d16 at 256 px, the demo: one group.
    assert_eq!(head_groups(16, 256, 680, B), 1);
    assert_eq!(head_groups(3, 16, 30, B), 1);
    // Nothing fits: one head per group.
    assert_eq!(head_groups(4, 100, 100, 1), 4);
}
