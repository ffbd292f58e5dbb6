//! Engine directories up to the TensorRT / ONNX Runtime GPU API: the build plan derived from a
//! model manifest (one engine per graph, one exact-shape optimization profile per scale it
//! serves), its snapshots for the fixture models and a d30/1024 key list, and the engine
//! manifest's round trip and refusal of another GPU or library version.

use star_artifact::check::{expected_io, required_stages};
use star_artifact::engine_manifest::{
    plan, BuildOptions, BuiltEngine, EngineBackend, EngineManifest, GpuIdentity, Plan, Target,
};
use star_artifact::manifest::{GraphEntry, Manifest, ModelConfig, SamplingDefaults};
use star_engines::Stage;
use std::path::Path;

fn redacted(mut p: Plan) -> Plan {
    p.model.path = "<model>".into();
    p
}

fn plan_of(dir: &Path, backend: EngineBackend) -> Plan {
    let m = Manifest::load(dir).unwrap();
    redacted(plan(&m, dir, backend, &BuildOptions::default()).unwrap())
}

/// Every planned profile is exactly the manifest's profile of that scale with the batch bound,
/// and `step` leaves scale 0 to `step_first`.
fn check_against_manifest(m: &Manifest, p: &Plan) {
    assert_eq!(p.engines.len(), m.graphs.len());
    for (e, g) in p.engines.iter().zip(&m.graphs) {
        assert_eq!(e.stage, g.stage);
        assert_eq!(e.precision, g.precision);
        let want: Vec<Option<usize>> = if g.scales.is_empty() {
            vec![None]
        } else {
            g.scales
                .iter()
                .copied()
                .filter(|&s| !(g.stage == Stage::Step && s == 0))
                .map(Some)
                .collect()
        };
        let got: Vec<Option<usize>> = e.profiles.iter().map(|p| p.scale).collect();
        assert_eq!(got, want, "{}", g.stage);
        for (i, pr) in e.profiles.iter().enumerate() {
            assert_eq!(pr.index, i);
            let specs = match pr.scale {
                Some(s) => &g.profile(s).unwrap().inputs,
                None => &g.inputs,
            };
            assert_eq!(pr.inputs.len(), specs.len());
            for (t, spec) in pr.inputs.iter().zip(specs) {
                assert_eq!(t.name, spec.name);
                assert!(t.dims.iter().all(|&d| d > 0), "{} {:?}", t.name, t.dims);
            }
        }
    }
}

#[test]
fn demo_plan_snapshot() {
    let dir = star_tests::demo_model();
    let p = plan_of(&dir, EngineBackend::TensorRt);
    check_against_manifest(&Manifest::load(&dir).unwrap(), &p);
    insta::assert_snapshot!("demo_plan", p.summary());
    // plan.json round-trips.
    let text = serde_json::to_string_pretty(&p).unwrap();
    let back: Plan = serde_json::from_str(&text).unwrap();
    assert_eq!(back, p);
}

#[test]
fn ort_trt_plan_carries_the_provider_profile_strings() {
    let p = plan_of(&star_tests::demo_model(), EngineBackend::OrtTrt);
    let step = p.engines.iter().find(|e| e.stage == Stage::Step).unwrap();
    assert_eq!(step.file, "step_ctx.onnx");
    let shapes = step.ort_trt_profile_shapes.as_deref().unwrap();
    // One group per profile (scales 1..3), each naming every input once.
    assert_eq!(shapes.matches("x:").count(), 3);
    assert!(
        shapes.starts_with("x:2x4x192,past_0:1x2x2x3x64,past_1:1x2x2x3x64,"),
        "{shapes}"
    );
    insta::assert_snapshot!("demo_ort_trt_step_shapes", shapes);
    let tensorrt = plan_of(&star_tests::demo_model(), EngineBackend::TensorRt);
    assert!(tensorrt
        .engines
        .iter()
        .all(|e| e.ort_trt_profile_shapes.is_none()));
}

#[test]
fn fixture_plan_snapshots() {
    for (variant, res) in [("tiny-256", 256), ("tiny-1024s", 1024)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let m = star_tests::export_fixture(variant, res, &dir);
        let p = plan_of(&dir, EngineBackend::TensorRt);
        check_against_manifest(&m, &p);
        insta::assert_snapshot!(format!("{variant}_plan"), p.summary());
    }
}

/// The released d30 at 1024 px with the stable sampler, FP16: the manifest star-export would
/// write, from the config and schedule alone (no 7 GB export in a test).
fn d30_1024_manifest() -> Manifest {
    let config: ModelConfig = serde_json::from_str(
        r#"{"depth": 30, "width": 1920, "heads": 30, "head_dim": 64, "vocab": 4096, "cvae": 32, "text_width": 1024, "sampler_blocks": 3,
            "text": {"width": 1024, "layers": 23, "heads": 16, "mlp": 4096, "vocab": 49408, "max_positions": 77, "act": "gelu", "eps": 1e-05, "eos_id": 49407, "bos_id": 49406, "pad_id": 0},
            "vq": {"vocab": 4096, "cvae": 32, "decoder_widths": [640, 320, 320, 160, 160], "phi_count": 4}}"#,
    )
    .unwrap();
    let schedule = star_artifact::schedule::derive(
        &[1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64],
        4,
        true,
    )
    .unwrap();
    let graphs = required_stages(&config, &schedule)
        .into_iter()
        .map(|stage| {
            let (inputs, outputs, scales, profiles) = expected_io(
                stage,
                &config,
                &schedule,
                star_artifact::manifest::kv_cache_dtype(star_artifact::dtype::Precision::Fp16),
            );
            GraphEntry {
                stage,
                file: stage.file(),
                sha256: "0".repeat(64),
                precision: stage.graph_precision(star_artifact::dtype::Precision::Fp16),
                inputs,
                outputs,
                scales,
                profiles,
                probes: vec![],
            }
        })
        .collect();
    Manifest {
        schema_version: star_artifact::manifest::SCHEMA_VERSION,
        producer: "test".into(),
        precision: star_artifact::dtype::Precision::Fp16,
        kv_cache_dtype: star_artifact::manifest::kv_cache_dtype(
            star_artifact::dtype::Precision::Fp16,
        ),
        opset: 17,
        config,
        schedule,
        sampling_defaults: SamplingDefaults {
            cfg: 4.0,
            top_k: 600,
            top_p: 0.8,
        },
        graphs,
        files: vec![],
        model_hash: "d30-1024-fp16".into(),
        calibration: None,
    }
}

#[test]
fn d30_1024_key_list_snapshot() {
    let m = d30_1024_manifest();
    let p = redacted(
        plan(
            &m,
            Path::new("d30"),
            EngineBackend::TensorRt,
            &BuildOptions::default(),
        )
        .unwrap(),
    );
    check_against_manifest(&m, &p);
    let step = p.engines.iter().find(|e| e.stage == Stage::Step).unwrap();
    assert_eq!(
        step.profiles.len(),
        13,
        "scales 1..13 (scale 0 on step_first)"
    );
    // The largest profile: scale 13 (64x64 tokens) after a past of 5,355 tokens (9,451 in all).
    let last = step.profiles.last().unwrap();
    assert_eq!(last.scale, Some(13));
    // One past view per block, (past, 2, B2, H, hd), and one K/V output per block.
    for i in [0, 29] {
        let past = last.inputs.iter().find(|t| t.name == format!("past_{i}"));
        assert_eq!(past.unwrap().dims, vec![5355, 2, 2, 30, 64]);
        let new = last
            .outputs
            .iter()
            .find(|t| t.name == format!("kv_new_{i}"));
        assert_eq!(new.unwrap().dims, vec![4096, 2, 2, 30, 64]);
    }
    assert!(!last.inputs.iter().any(|t| t.name == "past_30"));
    insta::assert_snapshot!("d30_1024_fp16_plan", p.summary());
}

fn target(gpu: &str, cc: &str, trt: &str, ort: Option<&str>) -> Target {
    Target {
        gpu: GpuIdentity {
            name: gpu.into(),
            compute_capability: cc.into(),
            memory_bytes: 80 << 30,
        },
        tensorrt: trt.into(),
        onnxruntime: ort.map(str::to_string),
    }
}

fn recorded(backend: EngineBackend, t: Target) -> EngineManifest {
    let p = plan(
        &d30_1024_manifest(),
        Path::new("/models/d30-fp16"),
        backend,
        &BuildOptions {
            batch: 1,
            workspace_gb: Some(8.0),
            opt_level: 4,
        },
    )
    .unwrap();
    EngineManifest {
        schema_version: star_artifact::engine_manifest::ENGINE_SCHEMA_VERSION,
        producer: "star-export test".into(),
        target: t,
        built: p
            .engines
            .iter()
            .map(|e| BuiltEngine {
                stage: e.stage,
                file: e.file.clone(),
                bytes: 1,
                sha256: "0".repeat(64),
                build_seconds: 1.0,
            })
            .collect(),
        plan: p,
    }
}

#[test]
fn engine_manifest_round_trips() {
    let em = recorded(
        EngineBackend::TensorRt,
        target("NVIDIA H100 80GB HBM3", "9.0", "11.4.0", None),
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("engine.json"),
        serde_json::to_string_pretty(&em).unwrap(),
    )
    .unwrap();
    assert_eq!(EngineManifest::load(tmp.path()).unwrap(), em);
    // Another schema version is refused with the rebuild hint.
    let text = std::fs::read_to_string(tmp.path().join("engine.json"))
        .unwrap()
        .replacen("\"schema_version\": 1", "\"schema_version\": 0", 1);
    std::fs::write(tmp.path().join("engine.json"), text).unwrap();
    let e = EngineManifest::load(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("rebuild it"), "{e}");
}

#[test]
fn engine_directories_of_other_gpus_and_versions_are_refused_with_the_rebuild_command() {
    let h100 = target("NVIDIA H100 80GB HBM3", "9.0", "11.4.0", None);
    let em = recorded(EngineBackend::TensorRt, h100.clone());
    let dir = Path::new("/engines/d30");
    let model = Path::new("/models/d30-fp16");
    assert!(em.mismatches(&h100).is_empty());
    em.check_target(dir, model, &h100).unwrap();
    let cases = [
        (
            target("NVIDIA A100-SXM4-80GB", "8.0", "11.4.0", None),
            "GPU compute capability",
        ),
        (target("NVIDIA H200", "9.0", "11.4.0", None), "GPU"),
        (
            target("NVIDIA H100 80GB HBM3", "9.0", "11.5.1", None),
            "TensorRT version",
        ),
        (
            target("NVIDIA H100 80GB HBM3", "9.0", "10.13.3", None),
            "TensorRT major version",
        ),
    ];
    for (here, what) in cases {
        let m = em.mismatches(&here);
        assert_eq!(m[0].what, what, "{here:?}");
        let e = em.check_target(dir, model, &here).unwrap_err().to_string();
        assert!(e.contains(&format!("built for {what} ")), "{e}");
        assert!(
            e.contains("star-export build-engine --model /models/d30-fp16 --backend tensorrt --out /engines/d30 --workspace-gb 8 --opt-level 4"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
    }
    // An A100 differs in both name and compute capability: the first is named, the other listed.
    let e = em
        .check_target(
            dir,
            model,
            &target("NVIDIA A100-SXM4-80GB", "8.0", "11.4.0", None),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("(also: GPU)"), "{e}");
    // The model run from another place (--model): the rebuild command names that place.
    let e = em
        .check_target(
            dir,
            Path::new("/mnt/d30"),
            &target("NVIDIA H200", "9.0", "11.4.0", None),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("build-engine --model /mnt/d30 --backend tensorrt"),
        "{e}"
    );

    // ort-trt engines also record ONNX Runtime: another minor version is refused.
    let ort = recorded(
        EngineBackend::OrtTrt,
        target("NVIDIA H100 80GB HBM3", "9.0", "10.13.3", Some("1.31.1")),
    );
    assert!(ort
        .mismatches(&target(
            "NVIDIA H100 80GB HBM3",
            "9.0",
            "10.13.3",
            Some("1.31.0")
        ))
        .is_empty());
    let m = ort.mismatches(&target(
        "NVIDIA H100 80GB HBM3",
        "9.0",
        "10.13.3",
        Some("1.30.2"),
    ));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].what, "ONNX Runtime version");
}

#[test]
fn engine_directory_of_another_model_is_refused() {
    let em = recorded(
        EngineBackend::TensorRt,
        target("NVIDIA H100 80GB HBM3", "9.0", "11.4.0", None),
    );
    let mut other = d30_1024_manifest();
    other.model_hash = "something-else".into();
    let e = em
        .check_model(
            Path::new("/engines/d30"),
            &other,
            Path::new("/models/other"),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("source model"), "{e}");
    assert!(
        e.contains("--model /models/other --backend tensorrt"),
        "{e}"
    );
    em.check_model(
        Path::new("/engines/d30"),
        &d30_1024_manifest(),
        Path::new("/x"),
    )
    .unwrap();
}

#[test]
fn build_options_are_checked() {
    let m = Manifest::load(&star_tests::demo_model()).unwrap();
    for (o, needle) in [
        (
            BuildOptions {
                batch: 0,
                ..Default::default()
            },
            "--batch",
        ),
        (
            BuildOptions {
                opt_level: 6,
                ..Default::default()
            },
            "0 to 5",
        ),
        (
            BuildOptions {
                workspace_gb: Some(0.0),
                ..Default::default()
            },
            "--workspace-gb",
        ),
        (
            BuildOptions {
                workspace_gb: Some(f64::NAN),
                ..Default::default()
            },
            "--workspace-gb",
        ),
    ] {
        let e = plan(&m, Path::new("m"), EngineBackend::TensorRt, &o)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
    // Batch 2: guidance rows are 4.
    let p = plan(
        &m,
        Path::new("m"),
        EngineBackend::TensorRt,
        &BuildOptions {
            batch: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let x = &p
        .engines
        .iter()
        .find(|e| e.stage == Stage::Step)
        .unwrap()
        .profiles[0]
        .inputs[0];
    assert_eq!(x.dims[0], 4);
}
