//! `ort-trt`: TensorRT 10 through ONNX Runtime's TensorRT provider. `build-engine --backend
//! ort-trt` writes its EP-context models; `star-run --engine` runs them on the CUDA engine of
//! `cuda.rs`.

use super::cuda::{check_placement, gpu_environment, provider_error, OrtCudaEngine};
use super::{ort_err, ort_library_version};
use crate::build::EngineBuilder;
use crate::engine::{Backend, BackendOptions, Engine};
use crate::engine_dir::checked_engine_dir;
use crate::error::{EngineError, Result};
use crate::gpu::tensorrt_library_version;
use star_artifact::dtype::Precision;
use star_artifact::engine_manifest::{BuildOptions, PlannedEngine, Target};
use star_artifact::manifest::Manifest;
use star_artifact::stage::Stage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// ONNX Runtime's TensorRT provider over an engine directory of EP-context models.
pub struct OrtTrt;

impl OrtTrt {
    fn target(device: usize) -> Result<(Target, &'static ort::environment::Environment)> {
        let b = OrtTrtBuilder::new(device)?;
        Ok((b.target, b.env))
    }
}

impl Backend for OrtTrt {
    fn name(&self) -> &'static str {
        "ort-trt"
    }
    fn load(
        &self,
        dir: &Path,
        m: &Manifest,
        opts: &BackendOptions,
        _verified: &[(Stage, std::sync::Arc<[u8]>)],
    ) -> Result<Box<dyn Engine>> {
        let mut env = None;
        let (edir, em) = checked_engine_dir(
            star_artifact::engine_manifest::EngineBackend::OrtTrt,
            opts,
            m,
            dir,
            || {
                let (t, e) = OrtTrt::target(opts.gpu.device)?;
                env = Some(e);
                Ok(t)
            },
        )?;
        let env = env.ok_or_else(|| EngineError::Unsupported("ort-trt: no environment".into()))?;
        let mut sessions = HashMap::new();
        for e in &em.plan.engines {
            let ctx = format!("loading the {} engine with ort-trt", e.stage);
            let cache = edir.join("trt-cache");
            let trt = trt_provider(e, opts.gpu.device, &em.plan.builder, &cache);
            let cuda = ort::ep::CUDA::default()
                .with_device_id(opts.gpu.device as i32)
                .build()
                .error_on_failure();
            let mut b = ort::session::Session::builder(env).map_err(ort_err(&ctx))?;
            b = b
                .with_execution_providers([trt, cuda])
                .map_err(|x| provider_error("ort-trt", e.stage, x.into()))?;
            b = b
                .with_config_entry(crate::ort::bind::PLACEMENT_CONFIG, "1")
                .map_err(|x| ort_err(&ctx)(x.into()))?;
            let s = b
                .commit_from_file(edir.join(&e.file))
                .map_err(|x| provider_error("ort-trt", e.stage, x))?;
            check_placement("ort-trt", e.stage, &s, opts)?;
            if opts.verbose {
                eprintln!(
                    "ort-trt: {} on TensorrtExecutionProvider ({} profiles, {})",
                    e.stage,
                    e.profiles.len(),
                    e.precision
                );
            }
            sessions.insert(e.stage, s);
        }
        OrtCudaEngine::boxed(opts, sessions, false)
    }
}

/// `build-engine --backend ort-trt`: each graph through ONNX Runtime's TensorRT provider with
/// one profile per scale, dumped as an EP-context model with the engine embedded.
pub struct OrtTrtBuilder {
    env: &'static ort::environment::Environment,
    device: usize,
    target: Target,
}

impl OrtTrtBuilder {
    pub fn new(device: usize) -> Result<Self> {
        let backend = "ort-trt";
        let lib = crate::ort::find_ort_gpu_library(backend)?;
        let dir = lib.parent().unwrap_or(Path::new("."));
        if !dir.join("libonnxruntime_providers_tensorrt.so").is_file() {
            return Err(EngineError::Missing {
                backend: backend.into(),
                what: "ONNX Runtime's TensorRT provider".into(),
                tried: format!(
                    "no libonnxruntime_providers_tensorrt.so in {}",
                    dir.display()
                ),
                how: "install the onnxruntime-gpu wheel with `bash scripts/setup-ort.sh --gpu`"
                    .into(),
            });
        }
        let trt = PathBuf::from("libnvinfer.so.10");
        let tensorrt = tensorrt_library_version(&trt).map_err(|why| EngineError::Missing {
            backend: backend.into(),
            what: "TensorRT 10 (the provider links libnvinfer.so.10)".into(),
            tried: format!("libnvinfer.so.10 on the library path: {why}"),
            how: "install TensorRT 10 for CUDA 13 and add its lib directory to LD_LIBRARY_PATH (native TensorRT 11 is --backend tensorrt)".into(),
        })?;
        let (env, gpu) = gpu_environment(backend, device)?;
        // Recorded and checked when the engines are loaded: an unknown version would make the
        // directory unloadable, so it is an error now.
        let onnxruntime = Some(
            ort_library_version(&lib).map_err(|why| EngineError::Missing {
                backend: backend.into(),
                what: "the ONNX Runtime version".into(),
                tried: format!("{}: {why}", lib.display()),
                how: "reinstall with `bash scripts/setup-ort.sh --gpu`".into(),
            })?,
        );
        Ok(OrtTrtBuilder {
            env,
            device,
            target: Target {
                gpu,
                tensorrt,
                onnxruntime,
            },
        })
    }
}

/// The TensorRT provider for one planned engine: its profiles, its precision, caches in `cache`.
pub fn trt_provider(
    e: &PlannedEngine,
    device: usize,
    opts: &BuildOptions,
    cache: &Path,
) -> ort::ep::ExecutionProviderDispatch {
    let shapes = e.ort_trt_profile_shapes.clone().unwrap_or_default();
    let mut p = ort::ep::TensorRT::default()
        .with_device_id(device as i32)
        .with_engine_cache(true)
        .with_engine_cache_path(cache.display())
        .with_timing_cache(true)
        .with_timing_cache_path(cache.display())
        .with_builder_optimization_level(opts.opt_level as u8)
        // FP16 and INT8 come from the graph: its FP16 weights and Q/DQ nodes; the flags let
        // TensorRT 10 (not strongly typed) keep them instead of widening to FP32.
        .with_fp16(e.precision != Precision::Fp32)
        .with_int8(e.precision == Precision::Int8);
    if !shapes.is_empty() {
        p = p
            .with_profile_min_shapes(&shapes)
            .with_profile_opt_shapes(&shapes)
            .with_profile_max_shapes(&shapes);
    }
    if let Some(w) = opts.workspace_gb {
        p = p.with_max_workspace_size((w * (1u64 << 30) as f64) as usize);
    }
    p.build().error_on_failure()
}

impl EngineBuilder for OrtTrtBuilder {
    fn target(&self) -> &Target {
        &self.target
    }

    fn build(
        &mut self,
        e: &PlannedEngine,
        graph: &Path,
        out: &Path,
        opts: &BuildOptions,
    ) -> Result<()> {
        let ctx = format!("building the {} engine with ort-trt", e.stage);
        let cache = out.parent().unwrap_or(Path::new(".")).join("trt-cache");
        std::fs::create_dir_all(&cache).map_err(crate::error::io_err(&cache))?;
        let trt = trt_provider(e, self.device, opts, &cache);
        let mut b = ort::session::Session::builder(self.env).map_err(ort_err(&ctx))?;
        b = b
            .with_execution_providers([trt])
            .map_err(|x| provider_error("ort-trt", e.stage, x.into()))?;
        // The EP-context model: the engine embedded in one node, loaded without rebuilding.
        for (k, v) in [
            ("ep.context_enable", "1".to_string()),
            ("ep.context_embed_mode", "1".to_string()),
            ("ep.context_file_path", out.display().to_string()),
        ] {
            b = b
                .with_config_entry(k, v)
                .map_err(|x| ort_err(&ctx)(x.into()))?;
        }
        b.commit_from_file(graph)
            .map_err(|x| EngineError::SessionCreate {
                stage: e.stage.name().into(),
                why: format!("ort-trt: {x}"),
            })?;
        if !out.is_file() {
            return Err(EngineError::SessionCreate {
                stage: e.stage.name().into(),
                why: format!("ort-trt wrote no EP-context model at {}", out.display()),
            });
        }
        Ok(())
    }
}
