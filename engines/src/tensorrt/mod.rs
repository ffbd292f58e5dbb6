//! Native TensorRT 11 (the `tensorrt` cargo feature): `build-engine --backend tensorrt` builds one
//! strongly typed engine per graph with one optimization profile per scale (MIN = OPT = MAX), and
//! `star-run --engine` runs them with every buffer on the device: one execution context per
//! profile sharing one scratch allocation, the KV cache as one device allocation whose past is
//! bound by address and whose new region each step writes in place, one CUDA stream.
//!
//! Built against TensorRT 11.4's headers (bundled by `trtx`); `libnvinfer.so.11` and
//! `libnvonnxparser.so.11` are loaded at run time. Not run against a real TensorRT in this
//! repository: no machine here has one (README). Everything up to the TensorRT API — library
//! lookup, version check, plan, engine manifest, profile shapes — is tested.

use crate::build::EngineBuilder;
use crate::engine::{Arg, Backend, BackendOptions, Engine, Input, KvWrite};
use crate::error::{EngineError, Result};
use crate::gpu::{device_memory, CudaKv};
use crate::kv_cache::{KvCache, KvStore};
use star_artifact::dtype::{Dtype, Precision};
use star_artifact::engine_manifest::{
    BuildOptions, EngineBackend, PlannedEngine, PlannedProfile, Target, TensorShape,
};
use star_artifact::manifest::Manifest;
use star_artifact::stage::{io, Stage};
use star_artifact::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const BACKEND: &str = "tensorrt";

fn trt_err(context: &str, e: impl std::error::Error) -> EngineError {
    EngineError::Unsupported(format!(
        "tensorrt: {context}: {}",
        crate::gpu::error_chain(&e)
    ))
}

/// TensorRT's log, kept: a failed parse or build is reported with TensorRT's own messages (the
/// parser names the failing node), not just "failed".
#[derive(Default, Clone)]
struct Collect(Arc<Mutex<Vec<String>>>);

impl trtx::LogHandler for Collect {
    fn log(&self, severity: trtx::Severity, message: &str) {
        if severity <= trtx::Severity::Error {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(message.trim().to_string());
        }
    }
}

impl Collect {
    fn take(&self) -> String {
        let v = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        if v.is_empty() {
            "TensorRT logged no error".into()
        } else {
            v.join(" | ")
        }
    }
}

/// TensorRT keeps the first logger it is given for the whole process: one logger, with its
/// collected errors, for every builder and runtime.
fn logger() -> Result<(&'static trtx::Logger, &'static Collect)> {
    static LOGGER: std::sync::OnceLock<std::result::Result<(trtx::Logger, Collect), String>> =
        std::sync::OnceLock::new();
    match LOGGER.get_or_init(|| {
        let log = Collect::default();
        trtx::Logger::new(log.clone())
            .map(|l| (l, log))
            .map_err(|e| crate::gpu::error_chain(&e))
    }) {
        Ok((l, c)) => Ok((l, c)),
        Err(e) => Err(EngineError::Unsupported(format!(
            "tensorrt: creating the logger: {e}"
        ))),
    }
}

/// The loaded library: which file, and its version as it reports it.
struct Loaded {
    path: PathBuf,
    version: String,
}

static LOADED: std::sync::OnceLock<std::result::Result<Loaded, EngineError>> =
    std::sync::OnceLock::new();

/// Find, version-check and load libnvinfer (and the ONNX parser beside it): `--tensorrt-lib`,
/// then STAR_TENSORRT_LIB, then `libnvinfer.so.11` and `libnvinfer.so` on the library path.
fn load_library(explicit: Option<&Path>) -> Result<&'static Loaded> {
    let r = LOADED.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = vec![];
        if let Some(p) = explicit {
            candidates.push(p.to_path_buf());
        } else if let Ok(p) = std::env::var("STAR_TENSORRT_LIB") {
            candidates.push(PathBuf::from(p));
        } else {
            candidates.push(format!("libnvinfer.so.{}", crate::gpu::TENSORRT_MIN.0).into());
            candidates.push("libnvinfer.so".into());
        }
        let mut tried = vec![];
        for c in &candidates {
            let version = match crate::gpu::tensorrt_library_version(c) {
                Ok(v) => v,
                Err(why) => {
                    tried.push(format!("{}: {why}", c.display()));
                    continue;
                }
            };
            if let Err(why) = crate::gpu::check_tensorrt_version(&version) {
                return Err(EngineError::Unsupported(format!(
                    "backend tensorrt: {} is {why} (TensorRT 10 is --backend ort-trt); point STAR_TENSORRT_LIB (or build-engine --tensorrt-lib) at such a libnvinfer",
                    c.display()
                )));
            }
            trtx::dynamically_load_tensorrt(Some(c.as_path()))
                .map_err(|e| trt_err(&format!("loading {}", c.display()), e))?;
            return Ok(Loaded {
                path: c.clone(),
                version,
            });
        }
        Err(EngineError::Missing {
            backend: BACKEND.into(),
            what: "the TensorRT 11 library".into(),
            tried: tried.join("; "),
            how: "install TensorRT 11 and point at it: set STAR_TENSORRT_LIB=/path/to/libnvinfer.so.11 (or star-export build-engine --tensorrt-lib PATH), or add its lib directory to LD_LIBRARY_PATH".into(),
        })
    });
    match r {
        Ok(l) => Ok(l),
        Err(e) => Err(EngineError::Unsupported(e.to_string())),
    }
}

/// TensorRT's ONNX parser of the same installation (beside libnvinfer when a path was given).
fn load_parser() -> Result<()> {
    let lib = LOADED
        .get()
        .and_then(|r| r.as_ref().ok())
        .map(|l| l.path.clone())
        .unwrap_or_default();
    let parser = lib
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join("libnvonnxparser.so.11"))
        .unwrap_or_else(|| PathBuf::from("libnvonnxparser.so.11"));
    trtx::dynamically_load_tensorrt_onnxparser(Some(parser.as_path())).map_err(|e| {
        EngineError::Missing {
            backend: BACKEND.into(),
            what: "TensorRT's ONNX parser (needed to build engines)".into(),
            tried: format!("{}: {}", parser.display(), crate::gpu::error_chain(&e)),
            how: "install TensorRT 11's libnvonnxparser.so.11 beside libnvinfer".into(),
        }
    })
}

fn target(lib: Option<&Path>, device: usize) -> Result<Target> {
    let l = load_library(lib)?;
    let gpu = crate::gpu::gpu_identity(BACKEND, device)?;
    Ok(Target {
        gpu,
        tensorrt: l.version.clone(),
        onnxruntime: None,
    })
}

pub struct TrtBuilder {
    target: Target,
    /// The primary context of `--device`, current on the building thread: TensorRT builds and
    /// times its kernels on the current device.
    cu: Arc<cudarc::driver::CudaContext>,
    log: &'static Collect,
    logger: &'static trtx::Logger,
}

impl TrtBuilder {
    pub fn new(lib: Option<&Path>, device: usize) -> Result<Self> {
        let target = target(lib, device)?;
        // Building parses ONNX: the parser library too (running does not need it).
        load_parser()?;
        let (logger, log) = logger()?;
        let cu = cudarc::driver::CudaContext::new(device)
            .map_err(|e| trt_err("creating the CUDA context", e))?;
        Ok(TrtBuilder {
            target,
            cu,
            log,
            logger,
        })
    }
}

fn dims(t: &TensorShape) -> trtx::trtx_sys::Dims64 {
    trtx::trtx_sys::Dims64::from_slice(&t.dims)
}

impl EngineBuilder for TrtBuilder {
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
        let failed = |what: &str, log: &Collect| {
            EngineError::Unsupported(format!(
                "tensorrt: {what} {} failed: {}",
                graph.display(),
                log.take()
            ))
        };
        self.cu
            .bind_to_thread()
            .map_err(|x| trt_err("making the build device current", x))?;
        let mut builder =
            trtx::Builder::new(self.logger).map_err(|x| trt_err("creating the builder", x))?;
        // TensorRT 11 networks are strongly typed: the precision is the graph's (FP16 weights,
        // Q/DQ for INT8), no builder flag is involved.
        let network = builder
            .create_network(0)
            .map_err(|x| trt_err("creating the network", x))?;
        let mut parser = trtx::OnnxParser::new(network, self.logger)
            .map_err(|x| trt_err("creating the ONNX parser", x))?;
        // From the file: the parser resolves the external weights (weights.bin) beside it.
        parser
            .parse_from_file(&graph.to_string_lossy(), trtx::Severity::Warning as i32)
            .map_err(|_| failed("parsing", self.log))?;
        let mut config = builder
            .create_config()
            .map_err(|x| trt_err("creating the builder config", x))?;
        if let Some(w) = opts.workspace_gb {
            config.set_memory_pool_limit(
                trtx::MemoryPoolType::kWORKSPACE,
                (w * (1u64 << 30) as f64) as usize,
            );
        }
        config.set_builder_optimization_level(opts.opt_level as i32);
        if e.precision == Precision::Fp32 {
            // FP32 means FP32: TensorRT would otherwise run FP32 matrix products in TF32.
            config.clear_flag(trtx::BuilderFlag::kTF32);
        }
        for p in &e.profiles {
            let mut prof = builder
                .creata_optimization_profile()
                .map_err(|x| trt_err("creating a profile", x))?;
            for t in &p.inputs {
                let d = dims(t);
                for sel in [
                    trtx::OptProfileSelector::kMIN,
                    trtx::OptProfileSelector::kOPT,
                    trtx::OptProfileSelector::kMAX,
                ] {
                    prof.set_dimensions(&t.name, sel, &d).map_err(|x| {
                        trt_err(&format!("profile {} input {}", p.index, t.name), x)
                    })?;
                }
            }
            // A `scale` input that selects per-scale tables feeds shapes (Slice bounds,
            // Reshape): TensorRT takes it as a shape tensor, whose value the profile fixes. For
            // an input that is not one, TensorRT refuses the values; that refusal is expected.
            if let Some(sc) = p.scale {
                if p.inputs
                    .iter()
                    .any(|t| t.name == star_artifact::stage::io::SCALE)
                {
                    let v = [sc as i64];
                    let mut all = true;
                    for sel in [
                        trtx::OptProfileSelector::kMIN,
                        trtx::OptProfileSelector::kOPT,
                        trtx::OptProfileSelector::kMAX,
                    ] {
                        all &= prof
                            .set_shape_values_v2(star_artifact::stage::io::SCALE, sel, &v)
                            .is_ok();
                    }
                    if !all {
                        self.log.take();
                    }
                }
            }
            let idx = config
                .add_optimization_profile(&mut prof)
                .map_err(|x| trt_err(&format!("adding profile {}", p.index), x))?;
            if idx as usize != p.index {
                return Err(EngineError::Unsupported(format!(
                    "tensorrt: profile {} of {} got index {idx}",
                    p.index, e.stage
                )));
            }
        }
        let plan = builder
            .build_serialized_network(parser.network_mut(), &mut config)
            .map_err(|_| failed("building", self.log))?;
        std::fs::write(out, &plan[..]).map_err(crate::error::io_err(out))?;
        Ok(())
    }
}

/// One execution context per profile, with its device buffers for every tensor that is not the
/// KV cache.
struct Context {
    profile: PlannedProfile,
    ctx: trtx::ExecutionContext<'static>,
    buffers: HashMap<String, (cudarc::driver::CudaSlice<u8>, usize)>,
    /// Inputs TensorRT reads on the host (shape tensors such as `scale`), 256-byte aligned,
    /// holding the profile's value from creation on.
    host: HashMap<String, crate::gpu::AlignedHostBuffer>,
}

struct StageEngine {
    // Field order is drop order: contexts before their engine.
    contexts: Vec<Context>,
    _engine: trtx::CudaEngine<'static>,
}

pub struct TensorRt;

impl Backend for TensorRt {
    fn name(&self) -> &'static str {
        BACKEND
    }
    fn load(
        &self,
        dir: &Path,
        m: &Manifest,
        opts: &BackendOptions,
        _verified: &[(Stage, Arc<[u8]>)],
    ) -> Result<Box<dyn Engine>> {
        let (edir, em) =
            crate::engine_dir::checked_engine_dir(EngineBackend::TensorRt, opts, m, dir, || {
                target(None, opts.gpu.device)
            })?;
        let cu = cudarc::driver::CudaContext::new(opts.gpu.device)
            .map_err(|e| trt_err("creating the CUDA context", e))?;
        let stream = cu
            .new_stream()
            .map_err(|e| trt_err("creating a stream", e))?;
        let (logger, log) = logger()?;
        // Engines borrow the runtime for their whole life: it lives as long as the process
        // (one per loaded engine directory, normally one).
        let runtime: &'static mut trtx::Runtime<'static> = Box::leak(Box::new(
            trtx::Runtime::new(logger).map_err(|e| trt_err("creating the runtime", e))?,
        ));
        let s = stream.cu_stream() as *mut std::ffi::c_void;
        let mut stages = HashMap::new();
        let mut scratch_need = 0usize;
        for pe in &em.plan.engines {
            let path = edir.join(&pe.file);
            let bytes = std::fs::read(&path).map_err(crate::error::io_err(&path))?;
            let mut engine = runtime.deserialize_cuda_engine(&bytes).map_err(|_| {
                EngineError::Unsupported(format!(
                    "tensorrt: deserializing {} failed: {}",
                    path.display(),
                    log.take()
                ))
            })?;
            let mut contexts = vec![];
            for p in &pe.profiles {
                let mut rc = engine
                    .create_runtime_config()
                    .map_err(|e| trt_err("creating a runtime config", e))?;
                rc.set_execution_context_allocation_strategy(
                    trtx::ExecutionContextAllocationStrategy::kUSER_MANAGED,
                );
                let mut ctx = engine
                    .create_execution_context_with_config(std::rc::Rc::new(rc))
                    .map_err(|e| trt_err("creating an execution context", e))?;
                // SAFETY: a valid stream of this context's device.
                if !unsafe { ctx.set_optimization_profile_async(p.index as i32, s) } {
                    return Err(EngineError::Unsupported(format!(
                        "tensorrt: {} has no profile {}: {}",
                        path.display(),
                        p.index,
                        log.take()
                    )));
                }
                let mut buffers = HashMap::new();
                let mut host = HashMap::new();
                for t in p.inputs.iter().chain(&p.outputs) {
                    if p.inputs.iter().any(|i| i.name == t.name) {
                        ctx.set_input_shape(&t.name, &dims(t))
                            .map_err(|e| trt_err(&format!("input shape of {}", t.name), e))?;
                    }
                    // The cache's views: bound per run to the engine's one KV buffer.
                    if io::past_block(&t.name).is_some() || io::kv_new_block(&t.name).is_some() {
                        continue;
                    }
                    let bytes = t.elements().max(1) as usize * t.dtype.bytes();
                    if engine.tensor_location(&t.name).ok() == Some(trtx::TensorLocation::kHOST) {
                        let mut h = shape_value_buffer(p, t)?;
                        // SAFETY: the buffer lives in the context's record as long as the
                        // context, and is never reallocated.
                        unsafe {
                            ctx.set_tensor_address(&t.name, h.as_mut_ptr() as *mut std::ffi::c_void)
                        }
                        .map_err(|e| trt_err(&t.name, e))?;
                        host.insert(t.name.clone(), h);
                        continue;
                    }
                    let buf = stream
                        .alloc_zeros::<u8>(bytes)
                        .map_err(|e| device_memory(e, bytes))?;
                    buffers.insert(t.name.clone(), (buf, bytes));
                }
                // Every input shape is set (checked here) and every shape value bound (the host
                // buffers above, each holding the profile's value): the scratch size asked for
                // next is the one of this profile, not of unset values.
                if !ctx.all_input_dimensions_specified() {
                    return Err(EngineError::Unsupported(format!(
                        "tensorrt: profile {} of {} leaves input dimensions unset: {}",
                        p.index,
                        path.display(),
                        log.take()
                    )));
                }
                scratch_need = scratch_need.max(ctx.update_device_memory_size_for_shapes());
                contexts.push(Context {
                    profile: p.clone(),
                    ctx,
                    buffers,
                    host,
                });
            }
            stages.insert(
                pe.stage,
                StageEngine {
                    contexts,
                    _engine: engine,
                },
            );
        }
        // One scratch block shared by every context: they run one at a time on one stream.
        let scratch = stream
            .alloc_zeros::<u8>(scratch_need.max(1))
            .map_err(|e| device_memory(e, scratch_need))?;
        {
            let (sp, _g) = cudarc::driver::DevicePtr::device_ptr(&scratch, &stream);
            for st in stages.values_mut() {
                for c in &mut st.contexts {
                    // SAFETY: the block outlives the contexts (engine field order) and is at least
                    // as large as any context needs.
                    unsafe {
                        c.ctx
                            .set_device_memory_v2(sp as *mut std::ffi::c_void, scratch_need as i64)
                    };
                }
            }
        }
        if opts.verbose {
            eprintln!(
                "tensorrt: {} engines from {}, TensorRT {}, {} contexts, {:.1} MB shared scratch",
                stages.len(),
                edir.display(),
                em.target.tensorrt,
                stages.values().map(|s| s.contexts.len()).sum::<usize>(),
                scratch_need as f64 / 1e6
            );
        }
        Ok(Box::new(TrtEngine {
            device: opts.gpu.device,
            kv: KvCache::new(stream.clone()),
            stages,
            _scratch: scratch,
            stream,
            _cu: cu,
            log,
        }))
    }
}

/// The host buffer of a shape-value input (`scale`), holding the value the profile fixes.
fn shape_value_buffer(
    p: &PlannedProfile,
    t: &TensorShape,
) -> Result<crate::gpu::AlignedHostBuffer> {
    let v = match (t.name.as_str(), p.scale) {
        (io::SCALE, Some(sc)) if t.elements() == 1 => sc as i64,
        _ => {
            return Err(EngineError::Unsupported(format!(
                "tensorrt: profile {} reads {} on the host, and only the scale's value is known",
                p.index, t.name
            )))
        }
    };
    let bytes: Vec<u8> = match t.dtype {
        Dtype::Int64 => v.to_le_bytes().to_vec(),
        Dtype::Int32 => (v as i32).to_le_bytes().to_vec(),
        d @ (Dtype::Float32
        | Dtype::Float16
        | Dtype::Bfloat16
        | Dtype::Float64
        | Dtype::Int8
        | Dtype::Uint8
        | Dtype::Bool) => {
            return Err(EngineError::Unsupported(format!(
                "tensorrt: shape value {} of dtype {d}",
                t.name
            )))
        }
    };
    let mut h = crate::gpu::AlignedHostBuffer::zeroed(bytes.len());
    h.as_mut_slice().copy_from_slice(&bytes);
    Ok(h)
}

pub struct TrtEngine {
    device: usize,
    // Field order is drop order: buffers and contexts before the context and stream they use.
    kv: KvCache<CudaKv>,
    stages: HashMap<Stage, StageEngine>,
    _scratch: cudarc::driver::CudaSlice<u8>,
    stream: Arc<cudarc::driver::CudaStream>,
    _cu: Arc<cudarc::driver::CudaContext>,
    log: &'static Collect,
}

fn host_bytes<'a>(i: &'a Input<'a>) -> (&'a [usize], &'a [u8]) {
    // SAFETY: viewing initialised f32 / i64 slices as bytes.
    unsafe {
        match i {
            Input::F32(s, d) => (
                s,
                std::slice::from_raw_parts(d.as_ptr() as *const u8, std::mem::size_of_val(*d)),
            ),
            Input::F32Owned(s, d) => (
                s,
                std::slice::from_raw_parts(d.as_ptr() as *const u8, std::mem::size_of_val(*d)),
            ),
            Input::I64(s, d) => (
                s,
                std::slice::from_raw_parts(d.as_ptr() as *const u8, std::mem::size_of_val(*d)),
            ),
        }
    }
}

impl Engine for TrtEngine {
    fn run(
        &mut self,
        stage: Stage,
        inputs: &[(&str, Arg<'_>)],
        kv_at: Option<KvWrite>,
    ) -> Result<HashMap<String, Tensor>> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let st = self.stages.get_mut(&stage).ok_or_else(|| {
            EngineError::Unsupported(format!("this engine directory has no {stage} engine"))
        })?;
        // The profile is the one whose input shapes these are (each scale has its own). Every
        // block's `past_{i}` is the view `Arg::KvPast` stands for: (len, 2, rows, H, hd).
        let kv_layout = self.kv.layout();
        let shape_of = |name: &str| -> Option<Vec<i64>> {
            let past = io::past_block(name).is_some();
            inputs
                .iter()
                .find(|(n, a)| *n == name || (past && matches!(a, Arg::KvPast(_))))
                .map(|(_, a)| match a {
                    Arg::Host(i) => i.shape().iter().map(|&d| d as i64).collect(),
                    Arg::KvPast(len) => kv_layout
                        .and_then(|l| l.region(0, 0, *len).ok())
                        .map(|r| r.shape.iter().map(|&d| d as i64).collect())
                        .unwrap_or_default(),
                })
        };
        let ci = st
            .contexts
            .iter()
            .position(|c| c.profile.inputs.iter().all(|t| shape_of(&t.name).as_deref() == Some(&t.dims[..])))
            .ok_or_else(|| {
                EngineError::Unsupported(format!(
                    "tensorrt: no profile of the {stage} engine takes these shapes ({}); rebuild the engines for this model and batch",
                    inputs
                        .iter()
                        .map(|(n, _)| format!("{n}{:?}", shape_of(n).unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
            })?;
        let stream = self.stream.clone();
        let s = stream.cu_stream() as *mut std::ffi::c_void;
        let kv_base = self.kv.bound().map(|(p, l)| (p as u64, l));
        let c = &mut st.contexts[ci];
        for (name, a) in inputs {
            match a {
                Arg::Host(i) if c.host.contains_key(*name) => {
                    // A shape value is the profile's (bound at creation): it must not change.
                    let (_, bytes) = host_bytes(i);
                    let h = &c.host[*name];
                    if h.as_slice() != bytes {
                        return Err(EngineError::Unsupported(format!(
                            "tensorrt: {stage} input {name} is {bytes:?}, its profile fixes {:?}",
                            h.as_slice()
                        )));
                    }
                }
                Arg::Host(i) => {
                    let (_, bytes) = host_bytes(i);
                    let (buf, _) = c.buffers.get_mut(*name).ok_or_else(|| {
                        EngineError::Unsupported(format!("tensorrt: {stage} has no input {name}"))
                    })?;
                    stream
                        .memcpy_htod(bytes, &mut buf.slice_mut(0..bytes.len()))
                        .map_err(|e| trt_err("uploading an input", e))?;
                    let (p, _g) = buf.device_ptr(&stream);
                    // SAFETY: a live device buffer sized from the profile.
                    unsafe { c.ctx.set_tensor_address(name, p as *mut std::ffi::c_void) }
                        .map_err(|e| trt_err(name, e))?;
                }
                Arg::KvPast(len) => {
                    let (base, layout) = kv_base.ok_or_else(|| {
                        EngineError::Unsupported("KV cache used before kv_alloc".into())
                    })?;
                    // The past views must end where this run's K/V writes begin.
                    if kv_at.is_some_and(|w| *len > w.begin) {
                        return Err(EngineError::Unsupported(format!(
                            "tensorrt: a past of {len} tokens overlaps the K/V written this run"
                        )));
                    }
                    for i in 0..layout.depth() {
                        let r = layout
                            .region(i, 0, *len)
                            .map_err(EngineError::Unsupported)?;
                        let n = io::past(i);
                        // SAFETY: the cache outlives the run; the past is a prefix of the
                        // block's region (checked by `region`).
                        unsafe {
                            c.ctx.set_tensor_address(
                                &n,
                                (base + r.byte_offset as u64) as *mut std::ffi::c_void,
                            )
                        }
                        .map_err(|e| trt_err(&n, e))?;
                    }
                }
            }
        }
        for t in &c.profile.outputs {
            if let Some(block) = io::kv_new_block(&t.name) {
                let (base, layout) = kv_base.ok_or_else(|| {
                    EngineError::Unsupported("KV cache used before kv_alloc".into())
                })?;
                let w = kv_at.ok_or_else(|| {
                    EngineError::Unsupported(format!(
                        "tensorrt: {stage} writes K/V but no cache region was given"
                    ))
                })?;
                let r = layout
                    .region(block, w.begin, w.tokens)
                    .map_err(EngineError::Unsupported)?;
                // TensorRT writes the profile's shape: it must be the region's, or the write
                // would spill into the next block's past.
                if t.dims
                    .iter()
                    .map(|&d| d as usize)
                    .ne(r.shape.iter().copied())
                {
                    return Err(EngineError::Unsupported(format!(
                        "tensorrt: {stage} profile gives {} as {:?}, the cache region is {:?}",
                        t.name, t.dims, r.shape
                    )));
                }
                // TensorRT wants tensor addresses 256-byte aligned; a token of a block is
                // 2·B2·H·64 floats (any model with 64-wide heads: a multiple of 256 bytes).
                if !(base + r.byte_offset as u64).is_multiple_of(256) {
                    return Err(EngineError::Unsupported(format!(
                        "tensorrt: the K/V region of block {block}, tokens {}.., is not 256-byte aligned ({} bytes per token)",
                        w.begin,
                        layout.token_floats() * 4
                    )));
                }
                // SAFETY: the region is inside the cache (checked by `region`).
                unsafe {
                    c.ctx.set_tensor_address(
                        &t.name,
                        (base + r.byte_offset as u64) as *mut std::ffi::c_void,
                    )
                }
                .map_err(|e| trt_err(&t.name, e))?;
            } else {
                let (buf, _) = c.buffers.get_mut(&t.name).ok_or_else(|| {
                    EngineError::Unsupported(format!("tensorrt: {stage} has no output {}", t.name))
                })?;
                let (p, _g) = buf.device_ptr_mut(&stream);
                // SAFETY: as above.
                unsafe {
                    c.ctx
                        .set_tensor_address(&t.name, p as *mut std::ffi::c_void)
                }
                .map_err(|e| trt_err(&t.name, e))?;
            }
        }
        // SAFETY: every tensor is bound to live device memory of its profile's size.
        unsafe { c.ctx.enqueue_v3(s) }.map_err(|_| {
            EngineError::Unsupported(format!(
                "tensorrt: running {stage} failed: {}",
                self.log.take()
            ))
        })?;
        // Every output copied to the host on the stream, then one synchronisation before any
        // of them is read.
        let mut downloads = vec![];
        for t in &c.profile.outputs {
            if io::kv_new_block(&t.name).is_some() {
                continue;
            }
            let (buf, bytes) = &c.buffers[&t.name];
            let mut host = vec![0u8; *bytes];
            stream
                .memcpy_dtoh(&buf.slice(0..*bytes), &mut host)
                .map_err(|e| trt_err("downloading an output", e))?;
            downloads.push((t, host));
        }
        stream
            .synchronize()
            .map_err(|e| trt_err("synchronizing", e))?;
        let mut out = HashMap::new();
        for (t, host) in downloads {
            let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let tensor = match t.dtype {
                Dtype::Int64 => Tensor::i64(
                    shape,
                    host.chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                        .collect(),
                ),
                Dtype::Float32 => Tensor::f32(
                    shape,
                    host.chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
                        .collect(),
                ),
                // Every stage boundary is float32 or int64 (the contract, check.rs).
                d @ (Dtype::Float16
                | Dtype::Bfloat16
                | Dtype::Float64
                | Dtype::Int32
                | Dtype::Int8
                | Dtype::Uint8
                | Dtype::Bool) => {
                    return Err(EngineError::Unsupported(format!(
                        "tensorrt: {stage} output {} is {d}; stage outputs are float32 or int64",
                        t.name
                    )))
                }
            };
            out.insert(t.name.clone(), tensor);
        }
        Ok(out)
    }

    fn kv(&mut self) -> &mut dyn KvStore {
        &mut self.kv
    }

    fn kv_ref(&self) -> &dyn KvStore {
        &self.kv
    }

    fn takes_empty_past(&self) -> bool {
        false
    }
    fn device(&self) -> Option<String> {
        Some(crate::gpu::device_report(self.device))
    }
}
