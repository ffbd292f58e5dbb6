//! Execution backends behind one trait. `ort-cpu` (ONNX Runtime's CPU provider) is the one this
//! build ships; GPU backends (TensorRT, CUDA) plug in behind the same `StageSession` trait.

use crate::error::{EngineError, Result};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// An input handed to a stage without copying it.
pub enum Input<'a> {
    F32(&'a [usize], &'a [f32]),
    I64(&'a [usize], &'a [i64]),
}

impl<'a> From<&'a Tensor> for Input<'a> {
    fn from(t: &'a Tensor) -> Self {
        match &t.data {
            crate::tensor::Data::F32(v) => Input::F32(&t.shape, v),
            crate::tensor::Data::I64(v) => Input::I64(&t.shape, v),
        }
    }
}

pub trait StageSession {
    fn name(&self) -> &str;
    fn run(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<HashMap<String, Tensor>>;
}

#[derive(Clone, Debug)]
pub struct BackendOptions {
    pub name: String,
    /// Intra-op threads; 0 = ONNX Runtime's default (one per core).
    pub threads: usize,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            name: "ort-cpu".into(),
            threads: 0,
        }
    }
}

pub const BACKENDS: &[&str] = &["ort-cpu"];

/// Graph precisions a backend executes. Nothing is converted silently: a model directory in any
/// other precision is refused.
pub fn precisions(backend: &str) -> &'static [&'static str] {
    match backend {
        "ort-cpu" => &["fp32"],
        _ => &[],
    }
}

pub fn open_session(
    opts: &BackendOptions,
    graph: &Path,
    label: &str,
) -> Result<Box<dyn StageSession>> {
    match opts.name.as_str() {
        "ort-cpu" => Ok(Box::new(OrtSession::load(graph, label, opts.threads)?)),
        other => Err(EngineError::UnknownBackend(other.to_string())),
    }
}

fn ort_err(context: impl Into<String>) -> impl FnOnce(ort::Error) -> EngineError {
    let context = context.into();
    move |e| EngineError::Ort {
        context,
        message: e.to_string(),
    }
}

static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

/// Where to look for libonnxruntime when ORT_DYLIB_PATH is not set: a `.venv` (the layout
/// .ci/run creates) next to the working directory or next to the executable's workspace.
fn find_ort_library() -> std::result::Result<PathBuf, String> {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("ORT_DYLIB_PATH={} does not exist", p.display()))
        };
    }
    let mut roots: Vec<PathBuf> = vec![];
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(|a| a.join(".venv")));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(|a| a.join(".venv")));
    }
    for venv in roots {
        let lib = venv.join("lib");
        let Ok(rd) = std::fs::read_dir(&lib) else {
            continue;
        };
        for py in rd.flatten() {
            let capi = py.path().join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else {
                continue;
            };
            let mut libs: Vec<PathBuf> = files
                .flatten()
                .map(|f| f.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            libs.sort();
            if let Some(l) = libs.pop() {
                return Ok(l);
            }
        }
    }
    Err("ORT_DYLIB_PATH is not set and no .venv with the onnxruntime wheel was found".into())
}

/// The one ONNX Runtime environment of this process (ORT allows one; tests share it).
pub fn ort_environment() -> Result<&'static ort::environment::Environment> {
    let r = ENV.get_or_init(|| {
        let lib = find_ort_library()?;
        let builder =
            ort::init_from(&lib).map_err(|e| format!("loading {}: {e}", lib.display()))?;
        builder
            .with_name("star")
            .build()
            .map_err(|e| format!("creating the environment from {}: {e}", lib.display()))
    });
    r.as_ref()
        .map_err(|why| EngineError::OrtLibrary { why: why.clone() })
}

pub struct OrtSession {
    label: String,
    session: ort::session::Session,
}

impl OrtSession {
    pub fn load(graph: &Path, label: &str, threads: usize) -> Result<Self> {
        let env = ort_environment()?;
        let ctx = format!("loading {}", graph.display());
        let mut b = ort::session::Session::builder(env).map_err(ort_err(ctx.clone()))?;
        // Weights are shared between the per-scale graphs through one mmapped external-data file;
        // pre-packing would give every session its own private copy of every matrix.
        b = b
            .with_config_entry("session.disable_prepacking", "1")
            .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        if threads > 0 {
            b = b
                .with_intra_threads(threads)
                .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        }
        let session = b.commit_from_file(graph).map_err(ort_err(ctx))?;
        Ok(OrtSession {
            label: label.to_string(),
            session,
        })
    }
}

impl StageSession for OrtSession {
    fn name(&self) -> &str {
        &self.label
    }

    fn run(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<HashMap<String, Tensor>> {
        use ort::value::TensorRef;
        let ctx = format!("running stage {}", self.label);
        let mut vals: Vec<(
            std::borrow::Cow<'_, str>,
            ort::session::SessionInputValue<'_>,
        )> = Vec::with_capacity(inputs.len());
        for (name, inp) in inputs {
            let v: ort::session::SessionInputValue<'_> = match inp {
                Input::F32(shape, data) => {
                    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                    TensorRef::from_array_view((shape, *data))
                        .map_err(ort_err(ctx.clone()))?
                        .into()
                }
                Input::I64(shape, data) => {
                    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                    TensorRef::from_array_view((shape, *data))
                        .map_err(ort_err(ctx.clone()))?
                        .into()
                }
            };
            vals.push((std::borrow::Cow::Owned(name.to_string()), v));
        }
        let outputs = self.session.run(vals).map_err(ort_err(ctx.clone()))?;
        let mut out = HashMap::new();
        for (name, value) in outputs.iter() {
            let t = if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
                Tensor::f32(shape.iter().map(|&d| d as usize).collect(), data.to_vec())
            } else {
                let (shape, data) = value
                    .try_extract_tensor::<i64>()
                    .map_err(ort_err(format!("{ctx}: output {name}")))?;
                Tensor::i64(shape.iter().map(|&d| d as usize).collect(), data.to_vec())
            };
            out.insert(name.to_string(), t);
        }
        Ok(out)
    }
}
