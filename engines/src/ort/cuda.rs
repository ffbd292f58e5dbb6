//! `ort-cuda`: ONNX Runtime's CUDA provider, with the KV cache on the device.
//!
//! Not run on a GPU in this repository's CI: everything up to ONNX Runtime's provider
//! registration is tested here (library location, refusal of the CPU build, no device); the
//! binding code is shared with `ort-cpu`, which runs every golden test through it (`bind.rs`).

use super::{ort_err, Place};
use crate::engine::{Backend, BackendOptions, BindCache, Call, Engine};
use crate::error::{EngineError, Result};
use crate::gpu::CudaMem;
use crate::kv_cache::{KvCache, KvStore};
use crate::values::{ValueStore, Values};
use star_artifact::dtype::Precision;
use star_artifact::manifest::Manifest;
use star_artifact::stage::Stage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why the CUDA provider did not register, with what to install when the message names a
/// library (ONNX Runtime reports a failed dlopen of the provider or of a CUDA library).
pub(super) fn provider_error(backend: &str, stage: Stage, e: ort::Error) -> EngineError {
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
pub(super) fn gpu_environment(
    backend: &str,
    device: usize,
) -> Result<(
    &'static ort::environment::Environment,
    star_artifact::engine_manifest::GpuIdentity,
)> {
    let lib = crate::ort::find_ort_gpu_library(backend)?;
    let gpu = crate::gpu::gpu_identity(backend, device)?;
    preload_cuda_libraries(&lib).map_err(|why| EngineError::Missing {
        backend: backend.into(),
        what: "the CUDA libraries of the onnxruntime-gpu wheel".into(),
        tried: why,
        how: "reinstall with `bash scripts/setup-ort.sh --gpu`".into(),
    })?;
    let env = crate::ort::ort_environment_at(backend, &lib)?;
    Ok((env, gpu))
}

/// What ONNX Runtime's CUDA provider (1.31, CUDA 13) needs from the CUDA libraries, by soname.
/// `Links`: its own ELF dependencies (readelf -d libonnxruntime_providers_cuda.so); without them
/// it cannot load. `Loads`: cuDNN, which it opens by name the first time it runs a convolution
/// (every model has a decoder of convolutions), so it is required as well. `Beside`: libraries
/// that cuDNN itself opens by name at run time (NVRTC, cuDNN's parts); loaded when they are
/// found so that no LD_LIBRARY_PATH is needed, and otherwise left to cuDNN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaNeed {
    Links,
    Loads,
    Beside,
}

/// The provider's own links, in dependency order. NCCL, NVSHMEM, cuFile, cuFFT and the rest of
/// the `nvidia-*` wheels are not among them: the provider never opens them, and some need the
/// driver or other libraries to load at all.
pub const CUDA_PROVIDER_LINKS: [&str; 4] = [
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
];
pub const NVRTC: &str = "libnvrtc.so.13";
pub const CUDNN: &str = "libcudnn.so.9";

/// Folders that may hold the CUDA libraries: the `nvidia/*/lib` folders of the site-packages the
/// onnxruntime-gpu wheel is installed in (when `ort_lib` is inside one; CUDA 13 wheels put most
/// libraries in `nvidia/cu13/lib`, cuDNN in `nvidia/cudnn/lib`), then the LD_LIBRARY_PATH
/// entries (what scripts/gpu-check.sh builds from PyTorch's wheels on a GPU machine).
pub fn cuda_library_dirs(ort_lib: &Path, ld_library_path: Option<&str>) -> Vec<PathBuf> {
    let mut dirs = vec![];
    // .../site-packages/onnxruntime/capi/libonnxruntime.so.X -> .../site-packages/nvidia
    if let Some(nvidia) = ort_lib.ancestors().nth(3).map(|sp| sp.join("nvidia")) {
        if let Ok(rd) = std::fs::read_dir(&nvidia) {
            let mut found: Vec<PathBuf> = rd
                .flatten()
                .map(|pkg| pkg.path().join("lib"))
                .filter(|l| l.is_dir())
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    for d in ld_library_path.unwrap_or_default().split(':') {
        let d = PathBuf::from(d);
        if !d.as_os_str().is_empty() && !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// What to load, in order, and from where: a file of exactly that name in the first of `dirs`
/// that has one, else the bare soname (the dynamic loader's own search: ld.so.cache). cuDNN's
/// parts are whatever `libcudnn_*.so.9` sit beside libcudnn.so.9 (the set changes between cuDNN
/// releases), the graph library first since the others link it.
pub fn plan_cuda_preload(dirs: &[PathBuf]) -> Vec<(PathBuf, CudaNeed)> {
    let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    let by_name = |name: &str| find(name).unwrap_or_else(|| PathBuf::from(name));
    let mut plan: Vec<(PathBuf, CudaNeed)> = CUDA_PROVIDER_LINKS
        .iter()
        .map(|n| (by_name(n), CudaNeed::Links))
        .collect();
    plan.push((by_name(NVRTC), CudaNeed::Beside));
    let cudnn = find(CUDNN);
    if let Some(dir) = cudnn.as_ref().and_then(|p| p.parent()) {
        let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libcudnn_") && n.ends_with(".so.9"))
            })
            .collect();
        parts.sort_by_key(|p| (!p.ends_with("libcudnn_graph.so.9"), p.clone()));
        plan.extend(parts.into_iter().map(|p| (p, CudaNeed::Beside)));
    }
    plan.push((
        cudnn.unwrap_or_else(|| PathBuf::from(CUDNN)),
        CudaNeed::Loads,
    ));
    plan
}

/// Loads the CUDA libraries the CUDA provider needs (by name, from the wheel's folders or the
/// library path), so that the provider finds them as a Python process that imports onnxruntime
/// would. Returns what was loaded; an error names the first required library that did not load.
pub fn preload_cuda_libraries(ort_lib: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let ld = std::env::var("LD_LIBRARY_PATH").ok();
    let dirs = cuda_library_dirs(ort_lib, ld.as_deref());
    let mut loaded = vec![];
    for (path, need) in plan_cuda_preload(&dirs) {
        match ort::util::preload_dylib(&path) {
            Ok(()) => loaded.push(path),
            // cuDNN opens it itself when it needs it, through the loader's search.
            Err(_) if need == CudaNeed::Beside => {}
            Err(e) => {
                let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                return Err(format!(
                    "{}: {} (searched {} and the system library path)",
                    path.display(),
                    crate::gpu::error_chain(&e),
                    if searched.is_empty() {
                        "no folder".to_string()
                    } else {
                        searched.join(", ")
                    }
                ));
            }
        }
    }
    Ok(loaded)
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
        let (env, gpu) = gpu_environment(self.name(), opts.gpu.device)?;
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
            let bytes = crate::engine::verified_graph(verified, g)?;
            let s = cuda_session(env, dir, g, &bytes, opts)?;
            sessions.insert(g.stage, s);
        }
        OrtCudaEngine::boxed(opts, sessions, true)
    }
}

fn cuda_session(
    env: &ort::environment::Environment,
    dir: &Path,
    g: &star_artifact::manifest::GraphEntry,
    bytes: &[u8],
    opts: &BackendOptions,
) -> Result<ort::session::Session> {
    let stage = g.stage;
    let ctx = format!("creating the {stage} session on ort-cuda");
    // Every session allocates from the environment's one CUDA arena (registered once per
    // device), so the device holds one arena whose peak is the process's, not one per stage.
    share_device_allocator(env, opts.gpu.device)?;
    let ep = ort::ep::CUDA::default()
        .with_device_id(opts.gpu.device as i32)
        .with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested)
        // FP32 graphs compute in FP32: TF32 matrix products would miss the FP32 tolerance.
        // FP16 and INT8 graphs are judged at their own tolerance, and the FP32 parts of them
        // (norms, softmax, the logits heads) may use TF32 as the official release does.
        .with_tf32(g.precision != Precision::Fp32)
        // --cuda-graphs: one graph captured per binding (`gpu_graph_id`), replayed after.
        .with_cuda_graph(opts.gpu.cuda_graphs)
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
        .with_config_entry(crate::ort::bind::PLACEMENT_CONFIG, "1")
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
pub(super) fn check_placement(
    backend: &str,
    stage: Stage,
    s: &ort::session::Session,
    opts: &BackendOptions,
) -> Result<()> {
    let placed = crate::ort::bind::placement(s).map_err(|m| EngineError::SessionCreate {
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
    let cpu = crate::ort::bind::cpu_compute_nodes(&placed);
    if cpu.is_empty() {
        return Ok(());
    }
    let listed = crate::ort::bind::describe_cpu_nodes(&cpu);
    if !opts.gpu.allow_cpu_fallback {
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
    crate::ort::bind::register_env_allocator(env, Place::Cuda(device as i32)).map_err(|m| {
        EngineError::SessionCreate {
            stage: "(all)".into(),
            why: format!("ort-cuda: registering the shared CUDA allocator of device {device}: {m}"),
        }
    })?;
    done.push(device);
    Ok(())
}

/// The device's default stream, on which the KV cache is allocated and read.
pub(super) fn cuda_stream(device: usize) -> Result<std::sync::Arc<cudarc::driver::CudaStream>> {
    let cu = cudarc::driver::CudaContext::new(device).map_err(|e| EngineError::NoGpu {
        backend: String::new(),
        why: format!("creating the CUDA context of device {device}: {e}"),
    })?;
    Ok(cu.default_stream())
}

pub struct OrtCudaEngine {
    pub(super) device: usize,
    // Field order is drop order: the sessions (and the bindings over the values and the cache)
    // before the device memory they point into.
    pub(super) sessions: HashMap<Stage, CudaSession>,
    /// In device memory of its own (cudarc, the primary context ONNX Runtime uses too), bound
    /// by address like every other value.
    pub(super) kv: KvCache<CudaMem>,
    pub(super) values: Values<CudaMem>,
    /// ort-cuda runs scale 0 on `step` (an empty past); TensorRT engines need `step_first`.
    pub(super) empty_past: bool,
    /// --cuda-graphs: every binding runs under a graph id of its own, which ONNX Runtime
    /// captures and then replays.
    cuda_graphs: bool,
    graph_ids: i64,
}

/// A session with the bindings made for it, and under --cuda-graphs the run options that name
/// each binding's graph.
pub(super) struct CudaSession {
    session: ort::session::Session,
    bindings: BindCache<(ort::session::IoBinding, Option<ort::session::RunOptions>)>,
}

impl OrtCudaEngine {
    /// The engine over `sessions`, with its cache and values on the device's stream.
    pub(super) fn boxed(
        opts: &BackendOptions,
        sessions: HashMap<Stage, ort::session::Session>,
        empty_past: bool,
    ) -> Result<Box<dyn Engine>> {
        let stream = cuda_stream(opts.gpu.device)?;
        Ok(Box::new(OrtCudaEngine {
            device: opts.gpu.device,
            sessions: sessions
                .into_iter()
                .map(|(st, session)| {
                    let bindings = BindCache::default();
                    (st, CudaSession { session, bindings })
                })
                .collect(),
            kv: KvCache::new(stream.clone()),
            values: Values::new(stream),
            empty_past,
            cuda_graphs: opts.gpu.cuda_graphs,
            graph_ids: 0,
        }))
    }
}

/// Run options naming graph `id` for ONNX Runtime's CUDA graphs. ONNX Runtime captures a graph
/// after a few ordinary runs of the same id (onnxruntime#32243): those are the generation's own
/// runs of this call, on its real inputs, and a step run again on the same inputs writes the
/// same K/V into the same range of the cache, so they leave the cache as the run would.
fn graph_options(id: i64) -> std::result::Result<ort::session::RunOptions, ort::Error> {
    let mut o = ort::session::RunOptions::new()?;
    o.set("gpu_graph_id", id.to_string())?;
    Ok(o)
}

impl Engine for OrtCudaEngine {
    fn run(&mut self, call: &Call) -> Result<HashMap<String, star_artifact::tensor::Tensor>> {
        let stage = call.stage;
        let place = Place::Cuda(self.device as i32);
        let epochs = (self.values.epoch(), self.kv.epoch());
        let cache = self.kv.bound();
        let s = self
            .sessions
            .get_mut(&stage)
            .ok_or_else(|| EngineError::Unsupported(format!("this model has no {stage} graph")))?;
        let (values, session) = (&mut self.values, &s.session);
        let graphs = self.cuda_graphs.then_some(&mut self.graph_ids);
        let ((binding, options), _) = s.bindings.get_or_make(call, epochs, || {
            let b = crate::ort::bind::make_binding(session, call, values, cache, place)?;
            let o = match graphs {
                Some(ids) => {
                    // Graph id 0 is ONNX Runtime's default (-1 disables capture).
                    *ids += 1;
                    Some(graph_options(*ids).map_err(ort_err(format!("running stage {stage}")))?)
                }
                None => None,
            };
            Ok((b, o))
        })?;
        crate::ort::bind::run_binding(
            &mut s.session,
            binding,
            stage.name(),
            options.as_ref(),
            &call.to_host,
        )
    }

    fn values(&mut self) -> &mut dyn ValueStore {
        &mut self.values
    }

    fn values_ref(&self) -> &dyn ValueStore {
        &self.values
    }

    fn bindings(&self) -> usize {
        self.sessions.values().map(|s| s.bindings.len()).sum()
    }

    fn kv(&mut self) -> &mut dyn KvStore {
        &mut self.kv
    }

    fn kv_ref(&self) -> &dyn KvStore {
        &self.kv
    }

    fn takes_empty_past(&self) -> bool {
        self.empty_past
    }
    fn device(&self) -> Option<String> {
        Some(crate::gpu::device_report(self.device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wheel layout of CUDA 13 (most libraries in nvidia/cu13/lib, cuDNN in
    /// nvidia/cudnn/lib) beside libraries the provider never opens.
    #[test]
    fn only_the_libraries_the_provider_needs_are_loaded() {
        let t = tempfile::tempdir().unwrap();
        let sp = t.path().join("lib/python3.12/site-packages");
        let capi = sp.join("onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        let files = [
            ("cu13", "libcudart.so.13"),
            ("cu13", "libcublasLt.so.13"),
            ("cu13", "libcublas.so.13"),
            ("cu13", "libcurand.so.10"),
            ("cu13", "libcufft.so.12"),
            ("cu13", "libnvrtc.so.13"),
            ("cudnn", "libcudnn.so.9"),
            ("cudnn", "libcudnn_ops.so.9"),
            ("cudnn", "libcudnn_graph.so.9"),
            ("cudnn", "libcudnn_engines_tensor_ir.so.9"),
            ("cudnn", "libcudnn_ext.so.9"),
            ("nccl", "libnccl.so.2"),
            ("nvshmem", "libnvshmem_host.so.3"),
            ("cufile", "libcufile.so.0"),
        ];
        for (pkg, f) in files {
            let d = sp.join("nvidia").join(pkg).join("lib");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(f), b"").unwrap();
        }
        let ort = capi.join("libonnxruntime.so.1.31.1");
        let extra = t.path().join("extra");
        std::fs::create_dir_all(&extra).unwrap();
        let dirs = cuda_library_dirs(&ort, Some(&format!("{}::", extra.display())));
        assert_eq!(dirs.last(), Some(&extra));
        let plan = plan_cuda_preload(&dirs);
        let names: Vec<String> = plan
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for never in ["libnccl", "libnvshmem", "libcufile", "libcufft"] {
            assert!(
                !names.iter().any(|n| n.starts_with(never)),
                "{never} in {names:?}"
            );
        }
        // Found ones by their path in the wheel, the rest by soname (the loader's search).
        let at = |n: &str| plan.iter().find(|(p, _)| p.ends_with(n)).unwrap().0.clone();
        assert_eq!(
            at("libcublas.so.13"),
            sp.join("nvidia/cu13/lib/libcublas.so.13")
        );
        assert_eq!(
            at("libcudnn.so.9"),
            sp.join("nvidia/cudnn/lib/libcudnn.so.9")
        );
        // The provider's own links come first, cuDNN's parts (whatever this release has; the
        // graph library, which the others link, first) then cuDNN itself last.
        let cudnn = sp.join("nvidia/cudnn/lib");
        let order: Vec<(String, CudaNeed)> = plan
            .iter()
            .map(|(p, n)| (p.file_name().unwrap().to_string_lossy().into_owned(), *n))
            .collect();
        let want: Vec<(&str, CudaNeed)> = vec![
            ("libcudart.so.13", CudaNeed::Links),
            ("libcublasLt.so.13", CudaNeed::Links),
            ("libcublas.so.13", CudaNeed::Links),
            ("libcurand.so.10", CudaNeed::Links),
            ("libnvrtc.so.13", CudaNeed::Beside),
            ("libcudnn_graph.so.9", CudaNeed::Beside),
            ("libcudnn_engines_tensor_ir.so.9", CudaNeed::Beside),
            ("libcudnn_ext.so.9", CudaNeed::Beside),
            ("libcudnn_ops.so.9", CudaNeed::Beside),
            ("libcudnn.so.9", CudaNeed::Loads),
        ];
        let want: Vec<(String, CudaNeed)> = want.iter().map(|(n, k)| (n.to_string(), *k)).collect();
        assert_eq!(order, want);
        assert_eq!(at("libcudnn_ops.so.9"), cudnn.join("libcudnn_ops.so.9"));
        assert_eq!(plan[0].0, sp.join("nvidia/cu13/lib/libcudart.so.13"));
        // Without the wheels: every library by soname, cuDNN without parts to list.
        let bare = plan_cuda_preload(&[]);
        assert!(bare.iter().all(|(p, _)| p.parent() == Some(Path::new(""))));
        assert_eq!(bare.last().unwrap().0, PathBuf::from("libcudnn.so.9"));
        assert_eq!(bare.len(), 6);
    }
}
