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
use crate::engine::{Backend, BackendOptions, BindCache, Call, Engine};
use crate::error::{EngineError, Result};
use crate::gpu::{device_memory, CudaMem};
use crate::kv_cache::{KvCache, KvStore};
use crate::values::{ValueStore, Values};
use star_artifact::dtype::{Dtype, Precision};
use star_artifact::engine_manifest::{
    BuildOptions, EngineBackend, PlannedEngine, PlannedProfile, Target, TensorShape,
};
use star_artifact::manifest::Manifest;
use star_artifact::stage::{io, Stage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const BACKEND: &str = "tensorrt";

/// The largest k TensorRT's TopK takes.
pub const TOPK_MAX: usize = 3840;

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
            // The sample graph's `top_k` feeds TopK's k, a shape tensor: any k from 1 to
            // TensorRT's TopK limit, chosen per run (`TrtEngine::run` copies it to the host).
            if p.inputs
                .iter()
                .any(|t| t.name == star_artifact::stage::io::TOP_K)
            {
                let vocab = p
                    .inputs
                    .iter()
                    .find(|t| t.name == star_artifact::stage::io::LOGITS)
                    .and_then(|t| t.dims.last().copied())
                    .unwrap_or(TOPK_MAX as i64);
                let max = [vocab.min(TOPK_MAX as i64)];
                for (sel, v) in [
                    (trtx::OptProfileSelector::kMIN, [1i64]),
                    (trtx::OptProfileSelector::kOPT, max),
                    (trtx::OptProfileSelector::kMAX, max),
                ] {
                    prof.set_shape_values_v2(star_artifact::stage::io::TOP_K, sel, &v)
                        .map_err(|x| trt_err("the top_k shape values", x))?;
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

/// One execution context per profile. Its tensors are bound by address to the engine's values
/// and KV cache (`bind`), again only when another call runs on it.
struct Context {
    profile: PlannedProfile,
    ctx: trtx::ExecutionContext<'static>,
    /// Inputs TensorRT reads on the host (shape tensors such as `scale`), 256-byte aligned,
    /// holding the profile's value from creation on.
    host: HashMap<String, crate::gpu::AlignedHostBuffer>,
    /// The call whose addresses are set, and the epochs of the memory they point into.
    bound: Option<(Call, (u64, u64))>,
}

/// What a call runs on: its context, and under --cuda-graphs the graph captured for it.
struct TrtBinding {
    context: usize,
    graph: Option<cudarc::driver::CudaGraph>,
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
                let mut host = HashMap::new();
                for t in p.inputs.iter() {
                    ctx.set_input_shape(&t.name, &dims(t))
                        .map_err(|e| trt_err(&format!("input shape of {}", t.name), e))?;
                    if engine.tensor_location(&t.name).ok() == Some(trtx::TensorLocation::kHOST) {
                        let mut h = shape_value_buffer(p, t)?;
                        // SAFETY: the buffer lives in the context's record as long as the
                        // context, and is never reallocated.
                        unsafe {
                            ctx.set_tensor_address(&t.name, h.as_mut_ptr() as *mut std::ffi::c_void)
                        }
                        .map_err(|e| trt_err(&t.name, e))?;
                        host.insert(t.name.clone(), h);
                    }
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
                    host,
                    bound: None,
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
            bindings: BindCache::default(),
            stages,
            kv: KvCache::new(stream.clone()),
            values: Values::new(stream.clone()),
            kv_scratch: None,
            _scratch: scratch,
            cuda_graphs: opts.gpu.cuda_graphs,
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
        // Set from the run's value before each run of the sample graph.
        (io::TOP_K, _) if t.elements() == 1 => 1,
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
    // Field order is drop order: graphs and contexts before the memory they point into, and
    // all of it before the context and stream it lives on.
    bindings: BindCache<TrtBinding>,
    stages: HashMap<Stage, StageEngine>,
    kv: KvCache<CudaMem>,
    values: Values<CudaMem>,
    /// Where a capture's warm-up run writes its K/V instead of the cache (--cuda-graphs).
    kv_scratch: Option<cudarc::driver::CudaSlice<u8>>,
    _scratch: cudarc::driver::CudaSlice<u8>,
    cuda_graphs: bool,
    stream: Arc<cudarc::driver::CudaStream>,
    _cu: Arc<cudarc::driver::CudaContext>,
    log: &'static Collect,
}

/// The context whose profile takes the call's shapes (each scale and batch has its own):
/// every input's dims, every block's past (len, 2, rows, H, hd) included.
fn find_context(
    st: &StageEngine,
    call: &Call,
    kv: Option<star_artifact::kv::KvLayout>,
) -> Result<usize> {
    let past = call.kv.and_then(|k| k.past).and_then(|len| {
        kv.and_then(|l| l.region(0, 0, len).ok())
            .map(|r| r.shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
    });
    let shape_of = |name: &str| -> Option<Vec<i64>> {
        if io::past_block(name).is_some() {
            return past.clone();
        }
        call.inputs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.shape.iter().map(|&d| d as i64).collect())
    };
    st.contexts
        .iter()
        .position(|c| {
            c.profile.scale == call.scale
                && c.profile
                    .inputs
                    .iter()
                    .all(|t| shape_of(&t.name).as_deref() == Some(&t.dims[..]))
        })
        .ok_or_else(|| {
            EngineError::Unsupported(format!(
                "tensorrt: no profile of the {} engine takes these shapes ({}); rebuild the engines for this model and batch",
                call.stage,
                call.inputs
                    .iter()
                    .map(|p| format!("{}{:?}", p.name, p.shape))
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
        })
}

impl TrtEngine {
    /// Set every tensor address of context `ci` for `call`: ports to their values, the past
    /// to the prefix of each block's cache region, the new K/V to the scale's range of it (or,
    /// with `kv_to`, to a scratch buffer: a capture's warm-up run).
    fn bind(&mut self, stage: Stage, ci: usize, call: &Call, kv_to: Option<u64>) -> Result<()> {
        let kv = self.kv.bound().map(|(p, l)| (p as u64, l));
        let st = self
            .stages
            .get_mut(&stage)
            .ok_or_else(|| EngineError::Unsupported(format!("no {stage} engine")))?;
        let c = &mut st.contexts[ci];
        let set = |ctx: &mut trtx::ExecutionContext<'static>, name: &str, at: u64| {
            if !at.is_multiple_of(256) {
                return Err(EngineError::Unsupported(format!(
                    "tensorrt: {stage} tensor {name} at {at:#x} is not 256-byte aligned"
                )));
            }
            // SAFETY: live device memory of at least the profile's size (reserved by
            // `ModelDir::run`, or a region of the cache checked by `region`), not freed while
            // bound: a reallocation changes the epochs and every context is bound again.
            unsafe { ctx.set_tensor_address(name, at as *mut std::ffi::c_void) }
                .map_err(|e| trt_err(name, e))
        };
        for p in call.inputs.iter().chain(&call.outputs) {
            if c.host.contains_key(&p.name) {
                continue;
            }
            let at = self.values.address(p.slot).ok_or_else(|| {
                EngineError::Unsupported(format!("engine value {:?} is not allocated", p.slot))
            })?;
            set(&mut c.ctx, &p.name, at as u64)?;
        }
        if let Some(k) = call.kv {
            let (base, layout) =
                kv.ok_or_else(|| EngineError::Unsupported("KV cache used before kv_alloc".into()))?;
            if k.past.is_some_and(|len| len > k.write.begin) {
                return Err(EngineError::Unsupported(format!(
                    "tensorrt: a past of {:?} tokens overlaps the K/V written at {}",
                    k.past, k.write.begin
                )));
            }
            for i in 0..layout.depth() {
                if let Some(len) = k.past {
                    let r = layout.region(i, 0, len).map_err(EngineError::Unsupported)?;
                    set(&mut c.ctx, &io::past(i), base + r.byte_offset as u64)?;
                }
                let r = layout
                    .region(i, k.write.begin, k.write.tokens)
                    .map_err(EngineError::Unsupported)?;
                set(
                    &mut c.ctx,
                    &io::kv_new(i),
                    kv_to.unwrap_or(base + r.byte_offset as u64),
                )?;
            }
        }
        Ok(())
    }

    /// Shape tensors TensorRT reads on the host whose value changes per run (the sample graph's
    /// `top_k`): copied from the engine value the pipeline wrote, before the run (8 bytes and a
    /// synchronisation per sample run). `scale` is the profile's own and never changes.
    fn host_values(&mut self, stage: Stage, ci: usize, call: &Call) -> Result<()> {
        for p in &call.inputs {
            if p.name == io::SCALE {
                continue;
            }
            let c = &self.stages[&stage].contexts[ci];
            if !c.host.contains_key(&p.name) {
                continue;
            }
            let t = self.values.read(p.slot)?;
            let v = t.as_i64().and_then(|v| v.first().copied()).unwrap_or(0);
            if p.name == io::TOP_K && !(1..=TOPK_MAX as i64).contains(&v) {
                return Err(EngineError::Unsupported(format!(
                    "tensorrt: TopK takes k from 1 to {TOPK_MAX}, this run asks for {v} (--top-k 0 keeps the whole vocabulary): pass --top-k {TOPK_MAX} or less"
                )));
            }
            if let Some(h) = self
                .stages
                .get_mut(&stage)
                .and_then(|s| s.contexts[ci].host.get_mut(&p.name))
            {
                let n = h.len().min(8);
                h.as_mut_slice()[..n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
        }
        Ok(())
    }

    /// One block's K/V of `call`'s write, where a capture's warm-up run puts it: every block
    /// writes the same scratch (its contents are never read).
    fn kv_scratch(&mut self, call: &Call) -> Result<Option<u64>> {
        use cudarc::driver::DevicePtr;
        let (Some(k), Some(l)) = (call.kv, self.kv.layout()) else {
            return Ok(None);
        };
        let bytes = l
            .region(0, 0, k.write.tokens)
            .map_err(EngineError::Unsupported)?
            .bytes;
        if self.kv_scratch.as_ref().is_none_or(|s| s.len() < bytes) {
            self.kv_scratch = None;
            self.kv_scratch = Some(
                self.stream
                    .alloc_zeros::<u8>(bytes.max(1))
                    .map_err(|e| device_memory(e, bytes))?,
            );
        }
        Ok(self.kv_scratch.as_ref().map(|s| {
            let (p, _g) = s.device_ptr(&self.stream);
            p
        }))
    }

    fn enqueue(&mut self, stage: Stage, ci: usize) -> Result<()> {
        let s = self.stream.cu_stream() as *mut std::ffi::c_void;
        let c = &mut self
            .stages
            .get_mut(&stage)
            .ok_or_else(|| EngineError::Unsupported(format!("no {stage} engine")))?
            .contexts[ci];
        // SAFETY: every tensor is bound to live device memory of its profile's size.
        unsafe { c.ctx.enqueue_v3(s) }.map_err(|_| {
            EngineError::Unsupported(format!(
                "tensorrt: running {stage} failed: {}",
                self.log.take()
            ))
        })
    }

    /// Capture `call` as a CUDA graph: a warm-up run first (TensorRT's lazy set-up happens
    /// outside the capture) with the K/V going to a scratch buffer, so that the cache is
    /// written only by the graph's own launches; then the capture over the real addresses.
    fn capture(&mut self, ci: usize, call: &Call) -> Result<cudarc::driver::CudaGraph> {
        let stage = call.stage;
        let fail = |e: cudarc::driver::DriverError| trt_err("capturing a CUDA graph", e);
        let scratch = self.kv_scratch(call)?;
        self.bind(stage, ci, call, scratch)?;
        self.enqueue(stage, ci)?;
        self.stream.synchronize().map_err(fail)?;
        self.bind(stage, ci, call, None)?;
        self.stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(fail)?;
        let enq = self.enqueue(stage, ci);
        // cudarc's flags have no "none": node priorities are the stream's without any set.
        let graph = self.stream.end_capture(
            cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY,
        );
        enq?;
        graph.map_err(fail)?.ok_or_else(|| {
            EngineError::Unsupported(format!("tensorrt: capturing {stage} gave no graph"))
        })
    }
}

impl Engine for TrtEngine {
    fn run(&mut self, call: &Call) -> Result<HashMap<String, star_artifact::tensor::Tensor>> {
        let stage = call.stage;
        if !call.to_host.is_empty() {
            // Only star-export's calibration graphs (run on ort-cpu) have such outputs.
            return Err(EngineError::Unsupported(format!(
                "tensorrt: {stage} has outputs of a shape only the run knows ({})",
                call.to_host.join(", ")
            )));
        }
        let epochs = (self.values.epoch(), self.kv.epoch());
        let st = self.stages.get(&stage).ok_or_else(|| {
            EngineError::Unsupported(format!("this engine directory has no {stage} engine"))
        })?;
        let ci = find_context(st, call, self.kv.layout())?;
        let fresh = st.contexts[ci].bound.as_ref() != Some(&(call.clone(), epochs));
        self.host_values(stage, ci, call)?;
        if fresh {
            self.bind(stage, ci, call, None)?;
            if let Some(c) = self.stages.get_mut(&stage).map(|s| &mut s.contexts[ci]) {
                c.bound = Some((call.clone(), epochs));
            }
        }
        let (b, _) = self.bindings.get_or_make(call, epochs, || {
            Ok(TrtBinding {
                context: ci,
                graph: None,
            })
        })?;
        let context = b.context;
        if !self.cuda_graphs {
            self.enqueue(stage, context)?;
            return Ok(HashMap::new());
        }
        if b.graph.is_none() {
            let g = self.capture(context, call)?;
            if let Ok((b, _)) = self.bindings.get_or_make(call, epochs, || {
                Err(EngineError::Unsupported("binding lost".into()))
            }) {
                b.graph = Some(g);
            }
        }
        let (b, _) = self.bindings.get_or_make(call, epochs, || {
            Err(EngineError::Unsupported("binding lost".into()))
        })?;
        match &b.graph {
            Some(g) => g
                .launch()
                .map_err(|e| trt_err(&format!("launching the graph of {stage}"), e))?,
            None => {
                return Err(EngineError::Unsupported(format!(
                    "tensorrt: no graph for {stage}"
                )))
            }
        }
        Ok(HashMap::new())
    }

    fn values(&mut self) -> &mut dyn ValueStore {
        &mut self.values
    }

    fn values_ref(&self) -> &dyn ValueStore {
        &self.values
    }

    fn bindings(&self) -> usize {
        self.bindings.len()
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
