//! ONNX Runtime on NVIDIA GPUs: `ort-cuda` (the CUDA execution provider, with the KV cache on
//! the device) and `ort-trt` (TensorRT 10 through the provider: `build-engine --backend ort-trt`
//! writes its EP-context models).
//!
//! Not run on a GPU in this repository's CI: everything up to ONNX Runtime's provider
//! registration is tested here (library location, refusal of the CPU build, no device); the
//! binding code is shared with `ort-cpu`, which runs every golden test through it
//! (`ort_bind.rs`).

use crate::backend::{Arg, Backend, BackendOptions, Engine, KvWrite};
use crate::engine_plan::{BuildOptions, EngineBuilder, PlannedEngine, Target};
use crate::error::{EngineError, Result};
use crate::manifest::Manifest;
use crate::ort_bind::{kv_value, KvLayout, Place};
use crate::stage::Stage;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn ort_err(context: &str) -> impl FnOnce(ort::Error) -> EngineError + '_ {
    move |e| EngineError::Ort {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// Why the CUDA provider did not register, with what to install when the message names a
/// library (ONNX Runtime reports a failed dlopen of the provider or of a CUDA library).
fn provider_error(backend: &str, stage: Stage, e: ort::Error) -> EngineError {
    let m = e.to_string();
    if m.contains("libcuda.so") {
        EngineError::NoGpu {
            backend: format!("backend {backend}: "),
            why: format!("the CUDA provider cannot load the NVIDIA driver library ({m})"),
        }
    } else if m.contains("cannot open shared object") || m.contains("Failed to load") {
        EngineError::Missing {
            backend: backend.into(),
            what: "a CUDA library the provider needs".into(),
            tried: m,
            how: "reinstall with `bash scripts/setup-ort.sh --gpu` (it installs the CUDA 13, cuDNN 9 and cuBLAS wheels next to onnxruntime-gpu)".into(),
        }
    } else {
        EngineError::SessionCreate {
            stage: stage.name().into(),
            why: format!("{backend}: {m}"),
        }
    }
}

/// The GPU build of ONNX Runtime with its CUDA libraries loaded, and the device's identity:
/// what every ONNX Runtime GPU backend needs before a session.
fn gpu_environment(
    backend: &str,
    device: usize,
) -> Result<(
    &'static ort::environment::Environment,
    crate::engine_plan::GpuIdentity,
)> {
    let lib = crate::gpu::find_ort_gpu_library(backend)?;
    let gpu = crate::gpu::gpu_identity(backend, device)?;
    crate::gpu::preload_cuda_libraries(&lib).map_err(|why| EngineError::Missing {
        backend: backend.into(),
        what: "the CUDA libraries of the onnxruntime-gpu wheel".into(),
        tried: why,
        how: "reinstall with `bash scripts/setup-ort.sh --gpu`".into(),
    })?;
    let env = crate::backend::ort_environment_at(backend, &lib)?;
    Ok((env, gpu))
}

/// The version of the ONNX Runtime library at `lib`, as it reports it.
pub fn ort_library_version(lib: &Path) -> std::result::Result<String, String> {
    // SAFETY: ONNX Runtime's API base is a static table; GetVersionString returns a static
    // string. Loading the library again only adds a reference.
    unsafe {
        let l = libloading::Library::new(lib).map_err(|e| e.to_string())?;
        let base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            l.get(b"OrtGetApiBase\0").map_err(|e| e.to_string())?;
        let b = base();
        if b.is_null() {
            return Err("OrtGetApiBase returned null".into());
        }
        let v = ((*b).GetVersionString)();
        let s = std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned();
        std::mem::forget(l);
        Ok(s)
    }
}

/// The version of the TensorRT library `name` (getInferLibVersion), "major.minor.patch".
pub fn tensorrt_library_version(name: &Path) -> std::result::Result<String, String> {
    // SAFETY: getInferLibVersion takes nothing and returns an int.
    unsafe {
        let l = libloading::Library::new(name).map_err(|e| e.to_string())?;
        let f: libloading::Symbol<unsafe extern "C" fn() -> i32> =
            l.get(b"getInferLibVersion\0").map_err(|e| e.to_string())?;
        let v = f();
        std::mem::forget(l);
        // TensorRT 10+: major * 10000 + minor * 100 + patch.
        Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
    }
}

pub struct OrtCuda;

impl Backend for OrtCuda {
    fn name(&self) -> &'static str {
        "ort-cuda"
    }
    fn load(
        &self,
        dir: &Path,
        m: &Manifest,
        opts: &BackendOptions,
        verified: &[(Stage, std::sync::Arc<[u8]>)],
    ) -> Result<Box<dyn Engine>> {
        let (env, gpu) = gpu_environment(self.name(), opts.device)?;
        if opts.verbose {
            eprintln!(
                "ort-cuda: {} (compute capability {}, {:.1} GiB), driver {}",
                gpu.name,
                gpu.compute_capability,
                gpu.memory_bytes as f64 / (1u64 << 30) as f64,
                crate::gpu::driver_version().unwrap_or_else(|_| "?".into())
            );
        }
        let mut sessions = HashMap::new();
        for g in &m.graphs {
            // Scale 0 runs on `step` with an empty past: step_first is never loaded, so the
            // blocks' weights are on the device once.
            if g.stage == Stage::StepFirst {
                continue;
            }
            let bytes = crate::backend::verified_graph(verified, g)?;
            let s = cuda_session(env, dir, g, &bytes, opts)?;
            sessions.insert(g.stage, s);
        }
        Ok(Box::new(OrtCudaEngine {
            device: opts.device,
            kv: None,
            sessions,
            empty_past: true,
        }))
    }
}

fn cuda_session(
    env: &ort::environment::Environment,
    dir: &Path,
    g: &crate::manifest::GraphEntry,
    bytes: &[u8],
    opts: &BackendOptions,
) -> Result<ort::session::Session> {
    let stage = g.stage;
    let ctx = format!("creating the {stage} session on ort-cuda");
    // Every session allocates from the environment's one CUDA arena (registered once per
    // device), so the device holds one arena whose peak is the process's, not one per stage.
    share_device_allocator(env, opts.device)?;
    let ep = ort::ep::CUDA::default()
        .with_device_id(opts.device as i32)
        .with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested)
        // FP32 graphs compute in FP32: TF32 matrix products would miss the FP32 tolerance.
        // FP16 and INT8 graphs are judged at their own tolerance, and the FP32 parts of them
        // (norms, softmax, the logits heads) may use TF32 as the official release does.
        .with_tf32(g.precision != "fp32")
        .build()
        .error_on_failure();
    let mut b = ort::session::Session::builder(env).map_err(ort_err(&ctx))?;
    b = b
        .with_execution_providers([ep])
        .map_err(|e| provider_error("ort-cuda", stage, e.into()))?;
    b = b
        .with_env_allocators()
        .map_err(|e| ort_err(&ctx)(e.into()))?;
    b = b
        .with_config_entry(crate::ort_bind::PLACEMENT_CONFIG, "1")
        .map_err(|e| ort_err(&ctx)(e.into()))?;
    b = b
        .with_config_entry(
            "session.model_external_initializers_file_folder_path",
            dir.to_string_lossy(),
        )
        .map_err(|e| ort_err(&ctx)(e.into()))?;
    let s = b
        .commit_from_memory(bytes)
        .map_err(|e| provider_error("ort-cuda", stage, e))?;
    check_placement("ort-cuda", stage, &s, opts)?;
    Ok(s)
}

/// Refuse a session whose compute nodes ONNX Runtime placed on the CPU (shape arithmetic is
/// expected there: the GPU providers leave it on the host on purpose), unless
/// --allow-cpu-fallback; with --verbose, say where the nodes went.
fn check_placement(
    backend: &str,
    stage: Stage,
    s: &ort::session::Session,
    opts: &BackendOptions,
) -> Result<()> {
    let placed = crate::ort_bind::placement(s).map_err(|m| EngineError::SessionCreate {
        stage: stage.name().into(),
        why: format!("{backend}: reading the node placement: {m}"),
    })?;
    if opts.verbose {
        let mut per: std::collections::BTreeMap<&str, usize> = Default::default();
        for (ep, _, _) in &placed {
            *per.entry(ep.as_str()).or_default() += 1;
        }
        let list: Vec<String> = per.iter().map(|(ep, n)| format!("{n} on {ep}")).collect();
        eprintln!(
            "{backend}: {stage}: {} nodes: {}",
            placed.len(),
            list.join(", ")
        );
    }
    let cpu = crate::ort_bind::cpu_compute_nodes(&placed);
    if cpu.is_empty() {
        return Ok(());
    }
    let listed = crate::ort_bind::describe_cpu_nodes(&cpu);
    if !opts.allow_cpu_fallback {
        return Err(EngineError::SessionCreate {
            stage: stage.name().into(),
            why: format!(
                "{backend}: {} compute node(s) of {stage} would run on the CPU: {listed}; pass --allow-cpu-fallback to accept that",
                cpu.len()
            ),
        });
    }
    if opts.verbose {
        eprintln!(
            "{backend}: {stage}: {} compute node(s) run on the CPU (--allow-cpu-fallback): {listed}",
            cpu.len()
        );
    }
    Ok(())
}

/// Registers, once per device, a CUDA arena allocator in ONNX Runtime's environment
/// (CreateAndRegisterAllocatorV2) that sessions created `with_env_allocators` share.
fn share_device_allocator(env: &ort::environment::Environment, device: usize) -> Result<()> {
    static DONE: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&device) {
        return Ok(());
    }
    crate::ort_bind::register_env_allocator(env, Place::Cuda(device as i32)).map_err(|m| {
        EngineError::SessionCreate {
            stage: "(all)".into(),
            why: format!("ort-cuda: registering the shared CUDA allocator of device {device}: {m}"),
        }
    })?;
    done.push(device);
    Ok(())
}

pub struct OrtCudaEngine {
    device: usize,
    // Field order is drop order: the cache (allocated by a session's allocator) first.
    kv: Option<(ort::value::Tensor<f32>, KvLayout)>,
    sessions: HashMap<Stage, ort::session::Session>,
    /// ort-cuda runs scale 0 on `step` (an empty past); TensorRT engines need `step_first`.
    empty_past: bool,
}

impl Engine for OrtCudaEngine {
    fn run(
        &mut self,
        stage: Stage,
        inputs: &[(&str, Arg<'_>)],
        kv_at: Option<KvWrite>,
    ) -> Result<HashMap<String, Tensor>> {
        let cache = self
            .kv
            .as_mut()
            .map(|(t, l)| (t.data_ptr_mut() as *mut u8, *l));
        // SAFETY: the engine's device cache, alive and not reallocated during the run.
        let (values, mut in_place) = unsafe {
            crate::ort_bind::stage_values(
                stage,
                inputs,
                kv_at,
                cache,
                Place::Cuda(self.device as i32),
            )?
        };
        let session = self
            .sessions
            .get_mut(&stage)
            .ok_or_else(|| EngineError::Unsupported(format!("this model has no {stage} graph")))?;
        let refs: Vec<(&str, &ort::value::DynValue)> =
            values.iter().map(|(n, v)| (n.as_str(), v)).collect();
        crate::ort_bind::run_bound(session, stage.name(), &refs, &mut in_place, None)
    }

    fn kv_alloc(&mut self, shape: [usize; 6]) -> Result<()> {
        if matches!(&self.kv, Some((_, l)) if l.shape == shape) {
            return Ok(());
        }
        self.kv = None;
        let session = self
            .sessions
            .get(&Stage::Step)
            .ok_or_else(|| EngineError::Unsupported("this model has no step graph".into()))?;
        let ctx = "allocating the KV cache on the device";
        let info = Place::Cuda(self.device as i32)
            .memory_info()
            .map_err(|m| ort_err(ctx)(ort::Error::new(m)))?;
        let alloc = ort::memory::Allocator::new(session, info).map_err(ort_err(ctx))?;
        let t = ort::value::Tensor::<f32>::new(&alloc, shape.map(|d| d as i64).to_vec()).map_err(
            |e| {
                EngineError::Unsupported(format!(
                    "ort-cuda: the KV cache of {:.2} GB does not fit on the device: {e}",
                    KvLayout { shape }.bytes() as f64 / 1e9
                ))
            },
        )?;
        self.kv = Some((t, KvLayout { shape }));
        Ok(())
    }

    fn kv_release(&mut self) {
        self.kv = None;
    }

    fn kv_shape(&self) -> Option<[usize; 6]> {
        self.kv.as_ref().map(|(_, l)| l.shape)
    }

    fn kv_read(&self, begin: usize, n: usize) -> Result<Tensor> {
        let (t, layout) = self
            .kv
            .as_ref()
            .ok_or_else(|| EngineError::Unsupported("KV cache read before kv_alloc".into()))?;
        let ctx = "reading the KV cache from the device";
        let mut data = Vec::with_capacity(layout.depth() * n * layout.token_floats());
        for i in 0..layout.depth() {
            // SAFETY: the region is inside the cache (checked by kv_value); it is only read.
            let v = unsafe {
                kv_value(
                    t.data_ptr() as *mut u8,
                    layout,
                    i,
                    begin,
                    n,
                    Place::Cuda(self.device as i32),
                )
            }
            .map_err(|m| ort_err(ctx)(ort::Error::new(m)))?;
            let v = v
                .downcast::<ort::value::TensorValueType<f32>>()
                .map_err(ort_err(ctx))?;
            let host = v
                .to(ort::memory::AllocationDevice::CPU, 0)
                .map_err(ort_err(ctx))?;
            let (_, d) = host.try_extract_tensor::<f32>().map_err(ort_err(ctx))?;
            data.extend_from_slice(d);
        }
        let mut shape = layout.shape.to_vec();
        shape[1] = n;
        Ok(Tensor::f32(shape, data))
    }

    fn takes_empty_past(&self) -> bool {
        self.empty_past
    }
    fn device(&self) -> Option<String> {
        Some(crate::gpu::device_report(self.device))
    }
}

/// An engine directory's manifest, checked against the model directory being opened and against
/// this machine (GPU, compute capability, library versions) before anything is loaded.
pub fn checked_engine_dir(
    backend: crate::engine_plan::EngineBackend,
    opts: &BackendOptions,
    m: &Manifest,
    model_dir: &Path,
    here: impl FnOnce() -> Result<Target>,
) -> Result<(PathBuf, crate::engine_plan::EngineManifest)> {
    use crate::engine_plan::EngineManifest;
    let dir = opts.engine_dir.clone().ok_or_else(|| {
        EngineError::Unsupported(format!(
            "backend {0} runs engine directories: build one with `star-export build-engine --model {1} --backend {0} --out ENGINE_DIR`, then run `star-run --engine ENGINE_DIR`",
            backend.name(),
            model_dir.display()
        ))
    })?;
    let em = EngineManifest::load(&dir)?;
    if em.plan.backend != backend {
        return Err(EngineError::Unsupported(format!(
            "{} holds {} engines, not {}",
            dir.display(),
            em.plan.backend.name(),
            backend.name()
        )));
    }
    em.check_model(&dir, m, model_dir)?;
    em.check_target(&dir, model_dir, &here()?)?;
    em.verify_files(&dir)?;
    Ok((dir, em))
}

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
            crate::engine_plan::EngineBackend::OrtTrt,
            opts,
            m,
            dir,
            || {
                let (t, e) = OrtTrt::target(opts.device)?;
                env = Some(e);
                Ok(t)
            },
        )?;
        let env = env.ok_or_else(|| EngineError::Unsupported("ort-trt: no environment".into()))?;
        let mut sessions = HashMap::new();
        for e in &em.plan.engines {
            let ctx = format!("loading the {} engine with ort-trt", e.stage);
            let cache = edir.join("trt-cache");
            let trt = trt_provider(e, opts.device, &em.plan.builder, &cache);
            let cuda = ort::ep::CUDA::default()
                .with_device_id(opts.device as i32)
                .build()
                .error_on_failure();
            let mut b = ort::session::Session::builder(env).map_err(ort_err(&ctx))?;
            b = b
                .with_execution_providers([trt, cuda])
                .map_err(|x| provider_error("ort-trt", e.stage, x.into()))?;
            b = b
                .with_config_entry(crate::ort_bind::PLACEMENT_CONFIG, "1")
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
        Ok(Box::new(OrtCudaEngine {
            device: opts.device,
            kv: None,
            sessions,
            empty_past: false,
        }))
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
        let lib = crate::gpu::find_ort_gpu_library(backend)?;
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
        .with_fp16(e.precision != "fp32")
        .with_int8(e.precision == "int8");
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
