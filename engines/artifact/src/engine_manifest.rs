//! Engine directories: what `star-export build-engine` builds from a model directory (the
//! `plan.json` of `--dry-run`), and the engine manifest (`engine.json`) that records what was
//! built, for which GPU and library, so that `star-run --engine` refuses a directory built for
//! another machine before it loads anything.
//!
//! Both TensorRT backends (ONNX Runtime's TensorRT provider and native TensorRT 11) build one
//! engine per graph (stage kind) with one optimization profile per scale the graph serves,
//! MIN = OPT = MAX = that scale's shapes from the model manifest. Scale 0 runs on `step_first`
//! (TensorRT profiles handle the zero-length past of `step` at scale 0 badly), so `step` gets a
//! profile per scale from 1.

use crate::dtype::{Dtype, Precision};
use crate::error::{io_err, ArtifactError, Result};
use crate::manifest::{GraphEntry, IoSpec, Manifest};
use crate::onnx::Dim;
use crate::stage::Stage;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const PLAN_FILE: &str = "plan.json";
pub const ENGINE_MANIFEST_FILE: &str = "engine.json";
/// v1: first engine manifest.
pub const ENGINE_SCHEMA_VERSION: u32 = 1;

/// A backend that builds engines ahead of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EngineBackend {
    /// ONNX Runtime's TensorRT execution provider (TensorRT 10): EP-context models with the
    /// engines embedded.
    #[serde(rename = "ort-trt")]
    OrtTrt,
    /// Native TensorRT 11 (the `tensorrt` cargo feature): serialized plans.
    #[serde(rename = "tensorrt")]
    TensorRt,
}

impl EngineBackend {
    pub const ALL: [EngineBackend; 2] = [EngineBackend::OrtTrt, EngineBackend::TensorRt];

    pub fn name(self) -> &'static str {
        match self {
            EngineBackend::OrtTrt => "ort-trt",
            EngineBackend::TensorRt => "tensorrt",
        }
    }

    pub fn parse(s: &str) -> Option<EngineBackend> {
        Self::ALL.into_iter().find(|b| b.name() == s)
    }

    /// The engine file of a stage in an engine directory.
    pub fn engine_file(self, stage: Stage) -> String {
        match self {
            EngineBackend::OrtTrt => format!("{}_ctx.onnx", stage.name()),
            EngineBackend::TensorRt => format!("{}.engine", stage.name()),
        }
    }

    /// The TensorRT major version the backend loads.
    pub fn tensorrt_major(self) -> u32 {
        match self {
            EngineBackend::OrtTrt => 10,
            EngineBackend::TensorRt => 11,
        }
    }
}

/// Builder options, recorded in the plan and the engine manifest (and in the rebuild command a
/// mismatch prints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildOptions {
    /// Images per generation the engines are built for (guidance rows are 2 per image).
    pub batch: usize,
    /// Builder workspace memory pool limit in GiB; None = TensorRT's default (the device's
    /// memory).
    pub workspace_gb: Option<f64>,
    /// TensorRT builder optimization level, 0..=5 (TensorRT's default is 3).
    pub opt_level: u32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            batch: 1,
            workspace_gb: None,
            opt_level: 3,
        }
    }
}

impl BuildOptions {
    /// Checked before any work: a bad option is a one-line error.
    pub fn check(&self) -> Result<()> {
        if self.batch == 0 || self.batch > 64 {
            return Err(ArtifactError::BadOptions(format!(
                "--batch {} is out of range: 1 to 64 images per generation",
                self.batch
            )));
        }
        if let Some(w) = self.workspace_gb {
            if !(w.is_finite() && w > 0.0 && w <= 1024.0) {
                return Err(ArtifactError::BadOptions(format!(
                    "--workspace-gb {w} is out of range: a number of GiB above 0 and at most 1024"
                )));
            }
        }
        if self.opt_level > 5 {
            return Err(ArtifactError::BadOptions(format!(
                "--opt-level {} is out of range: TensorRT's builder optimization levels are 0 to 5",
                self.opt_level
            )));
        }
        Ok(())
    }

    /// The same options as `build-engine` flags (for the rebuild command of a mismatch).
    pub fn flags(&self) -> String {
        let mut s = String::new();
        if self.batch != 1 {
            s += &format!(" --batch {}", self.batch);
        }
        if let Some(w) = self.workspace_gb {
            s += &format!(" --workspace-gb {w}");
        }
        if self.opt_level != 3 {
            s += &format!(" --opt-level {}", self.opt_level);
        }
        s
    }
}

/// One tensor of one profile: every dim fixed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorShape {
    pub name: String,
    pub dtype: Dtype,
    pub dims: Vec<i64>,
}

impl TensorShape {
    /// `name:d0xd1x...`, the shape syntax of ONNX Runtime's TensorRT provider options.
    pub fn ort_trt_syntax(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        format!("{}:{}", self.name, dims.join("x"))
    }

    pub fn elements(&self) -> i64 {
        self.dims.iter().product()
    }
}

/// One optimization profile: MIN = OPT = MAX = these shapes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedProfile {
    /// The profile's index in its engine (what `setOptimizationProfileAsync` takes).
    pub index: usize,
    /// The scale it serves; None for the once-per-prompt stages and the decoder.
    pub scale: Option<usize>,
    pub inputs: Vec<TensorShape>,
    pub outputs: Vec<TensorShape>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedEngine {
    pub stage: Stage,
    /// The source graph in the model directory, and its sha256 from the model manifest.
    pub graph: String,
    pub graph_sha256: String,
    /// The engine file in the engine directory.
    pub file: String,
    /// Strongly typed from the graph: the builder is given no precision flags.
    pub precision: Precision,
    /// I/O names in the graph's order (what `setTensorAddress` binds).
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub profiles: Vec<PlannedProfile>,
    /// ort-trt only: the provider's `trt_profile_{min,opt,max}_shapes` value (one profile per
    /// scale, the same string for all three).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ort_trt_profile_shapes: Option<String>,
}

impl PlannedEngine {
    pub fn profile_for_scale(&self, scale: Option<usize>) -> Option<&PlannedProfile> {
        self.profiles.iter().find(|p| p.scale == scale)
    }
}

/// What a build produces, derived from the model manifest alone (no GPU, no library).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub schema_version: u32,
    pub backend: EngineBackend,
    pub model: ModelRef,
    pub builder: BuildOptions,
    pub engines: Vec<PlannedEngine>,
}

impl Plan {
    /// One line per engine and per profile: stage, precision, scale, every input and output
    /// shape (the review form of plan.json; snapshot-tested).
    pub fn summary(&self) -> String {
        let dims = |ts: &[TensorShape]| {
            ts.iter()
                .map(|t| {
                    let d: Vec<String> = t.dims.iter().map(|x| x.to_string()).collect();
                    format!("{}[{}]", t.name, d.join(","))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let m = &self.model;
        let mut s = format!(
            "{} engines for d{} {}px {} scales{} {} (batch {}, opt level {}, workspace {})\n",
            self.backend.name(),
            m.depth,
            m.image_size,
            m.scales,
            if m.sampler { " +sampler" } else { "" },
            m.precision,
            self.builder.batch,
            self.builder.opt_level,
            self.builder
                .workspace_gb
                .map(|w| format!("{w} GiB"))
                .unwrap_or_else(|| "default".into())
        );
        for e in &self.engines {
            s += &format!(
                "{} -> {} ({}, {} profile{})\n",
                e.graph,
                e.file,
                e.precision,
                e.profiles.len(),
                if e.profiles.len() == 1 { "" } else { "s" }
            );
            for p in &e.profiles {
                s += &format!(
                    "  #{} {}: {} -> {}\n",
                    p.index,
                    p.scale
                        .map(|x| format!("scale {x}"))
                        .unwrap_or_else(|| "once".into()),
                    dims(&p.inputs),
                    dims(&p.outputs)
                );
            }
        }
        s
    }
}

/// The model directory an engine directory was built from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// As given to build-engine, made absolute: where `star-run --engine` finds the tokenizer,
    /// the schedule and the sampling defaults (`--model` overrides it).
    pub path: String,
    pub model_hash: String,
    pub precision: Precision,
    pub schema_version: u32,
    pub depth: usize,
    pub image_size: usize,
    pub scales: usize,
    pub sampler: bool,
}

fn bind(g: &GraphEntry, spec: &IoSpec, batch: usize) -> Result<TensorShape> {
    let dims = spec
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => Ok(*v),
            Dim::Sym(s) => match s.as_str() {
                "B" => Ok(batch as i64),
                // Guidance rows: a conditional and an unconditional row per image; the text
                // encoder's N rows are the prompts and the negatives.
                "B2" | "N" => Ok(2 * batch as i64),
                other => Err(ArtifactError::Manifest {
                    path: g.file.clone().into(),
                    why: format!(
                        "{}: dimension '{other}' of '{}' is not fixed in this profile; re-export the model",
                        g.stage, spec.name
                    ),
                }),
            },
        })
        .collect::<Result<Vec<i64>>>()?;
    Ok(TensorShape {
        name: spec.name.clone(),
        dtype: spec.dtype,
        dims,
    })
}

/// The engines of a model directory for `backend`: one per graph, one profile per scale it
/// serves there.
pub fn plan(
    m: &Manifest,
    model_dir: &Path,
    backend: EngineBackend,
    opts: &BuildOptions,
) -> Result<Plan> {
    opts.check()?;
    let has_first = m.graph(Stage::StepFirst).is_some();
    let mut engines = vec![];
    for g in &m.graphs {
        // (scale, inputs, outputs) of each profile.
        let mut shapes: Vec<(Option<usize>, &[IoSpec], &[IoSpec])> = vec![];
        if g.scales.is_empty() {
            shapes.push((None, &g.inputs, &g.outputs));
        } else {
            for p in &g.profiles {
                if g.stage == Stage::Step && p.scale == 0 && has_first {
                    continue;
                }
                shapes.push((Some(p.scale), &p.inputs, &p.outputs));
            }
        }
        let mut profiles = vec![];
        for (index, (scale, ins, outs)) in shapes.into_iter().enumerate() {
            profiles.push(PlannedProfile {
                index,
                scale,
                inputs: ins
                    .iter()
                    .map(|s| bind(g, s, opts.batch))
                    .collect::<Result<_>>()?,
                outputs: outs
                    .iter()
                    .map(|s| bind(g, s, opts.batch))
                    .collect::<Result<_>>()?,
            });
        }
        if let Some(p) = profiles
            .iter()
            .find(|p| p.inputs.iter().any(|t| t.dims.contains(&0)))
        {
            return Err(ArtifactError::Manifest {
                path: model_dir.join(&g.file),
                why: format!(
                    "{} profile {} has a zero-length input, which TensorRT profiles do not take; re-export the model (step_first serves scale 0)",
                    g.stage, p.index
                ),
            });
        }
        let ort_trt_profile_shapes = (backend == EngineBackend::OrtTrt).then(|| {
            profiles
                .iter()
                .flat_map(|p| p.inputs.iter().map(TensorShape::ort_trt_syntax))
                .collect::<Vec<_>>()
                .join(",")
        });
        engines.push(PlannedEngine {
            stage: g.stage,
            graph: g.file.clone(),
            graph_sha256: g.sha256.clone(),
            file: backend.engine_file(g.stage),
            precision: g.precision,
            inputs: g.inputs.iter().map(|s| s.name.clone()).collect(),
            outputs: g.outputs.iter().map(|s| s.name.clone()).collect(),
            profiles,
            ort_trt_profile_shapes,
        });
    }
    let abs = std::path::absolute(model_dir).unwrap_or_else(|_| model_dir.to_path_buf());
    Ok(Plan {
        schema_version: ENGINE_SCHEMA_VERSION,
        backend,
        model: ModelRef {
            path: abs.display().to_string(),
            model_hash: m.model_hash.clone(),
            precision: m.precision,
            schema_version: m.schema_version,
            depth: m.config.depth,
            image_size: m.schedule.image_size,
            scales: m.schedule.patch_nums.len(),
            sampler: m.config.sampler_blocks > 0,
        },
        builder: opts.clone(),
        engines,
    })
}

/// The GPU and libraries an engine directory was built with, or that this machine has.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub gpu: GpuIdentity,
    /// TensorRT version as the library reports it, "major.minor.patch".
    pub tensorrt: String,
    /// ONNX Runtime version (ort-trt only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnxruntime: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuIdentity {
    pub name: String,
    /// "major.minor", e.g. "9.0" for Hopper.
    pub compute_capability: String,
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltEngine {
    pub stage: Stage,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub build_seconds: f64,
}

/// `engine.json`: the plan it was built from, the machine it was built on, and each file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineManifest {
    pub schema_version: u32,
    pub producer: String,
    pub target: Target,
    pub plan: Plan,
    pub built: Vec<BuiltEngine>,
}

/// Where an engine directory and this machine differ.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetMismatch {
    pub what: &'static str,
    pub built: String,
    pub here: String,
}

fn major(v: &str) -> Option<u32> {
    v.split('.').next()?.trim().parse().ok()
}

fn major_minor(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    Some((
        it.next()?.trim().parse().ok()?,
        it.next()?.trim().parse().ok()?,
    ))
}

impl EngineManifest {
    pub fn load(dir: &Path) -> Result<EngineManifest> {
        let path = dir.join(ENGINE_MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ArtifactError::Manifest {
                    path: path.clone(),
                    why: "missing: not an engine directory (build one with `star-export build-engine --model DIR --backend tensorrt --out ENGINE_DIR`)".into(),
                }
            } else {
                io_err(&path)(e)
            }
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ArtifactError::Manifest {
                path: path.clone(),
                why: format!("not JSON: {e}"),
            })?;
        let found = v
            .get("schema_version")
            .and_then(|x| x.as_u64())
            .unwrap_or(0) as u32;
        if found != ENGINE_SCHEMA_VERSION {
            return Err(ArtifactError::Manifest {
                path,
                why: format!(
                    "engine manifest version {found}, this build reads version {ENGINE_SCHEMA_VERSION}; rebuild it with this version of star-export build-engine"
                ),
            });
        }
        serde_json::from_value(v).map_err(|e| ArtifactError::Manifest {
            path,
            why: e.to_string(),
        })
    }

    /// Every difference that makes the engines unusable here, most fundamental first.
    /// TensorRT plans are specific to the GPU model (and its compute capability) and to the
    /// exact TensorRT version that built them; the EP-context models of ort-trt also embed
    /// ONNX Runtime's own format, kept per minor version.
    pub fn mismatches(&self, here: &Target) -> Vec<TargetMismatch> {
        let b = &self.target;
        let mut out = vec![];
        let mut differ = |what, built: &str, now: &str| {
            out.push(TargetMismatch {
                what,
                built: built.to_string(),
                here: now.to_string(),
            })
        };
        if b.gpu.compute_capability != here.gpu.compute_capability {
            differ(
                "GPU compute capability",
                &b.gpu.compute_capability,
                &here.gpu.compute_capability,
            );
        }
        if b.gpu.name != here.gpu.name {
            differ("GPU", &b.gpu.name, &here.gpu.name);
        }
        if major(&b.tensorrt) != major(&here.tensorrt) {
            differ("TensorRT major version", &b.tensorrt, &here.tensorrt);
        } else if b.tensorrt != here.tensorrt {
            differ("TensorRT version", &b.tensorrt, &here.tensorrt);
        }
        if self.plan.backend == EngineBackend::OrtTrt {
            let bo = b.onnxruntime.as_deref().unwrap_or("?");
            let ho = here.onnxruntime.as_deref().unwrap_or("?");
            if major_minor(bo).is_none() || major_minor(bo) != major_minor(ho) {
                differ("ONNX Runtime version", bo, ho);
            }
        }
        out
    }

    /// The command that rebuilds this engine directory, from `model_dir` (the model being run,
    /// which `--model` may have moved from where it was built), for the machine it is run on.
    pub fn rebuild_command(&self, engine_dir: &Path, model_dir: &Path) -> String {
        format!(
            "star-export build-engine --model {} --backend {} --out {}{}",
            model_dir.display(),
            self.plan.backend.name(),
            engine_dir.display(),
            self.plan.builder.flags()
        )
    }

    /// Refuse an engine directory built for another machine, before anything is loaded.
    pub fn check_target(&self, engine_dir: &Path, model_dir: &Path, here: &Target) -> Result<()> {
        let m = self.mismatches(here);
        let Some(first) = m.first() else {
            return Ok(());
        };
        let also: Vec<&str> = m[1..].iter().map(|x| x.what).collect();
        Err(ArtifactError::EngineMismatch(Box::new(
            crate::error::Mismatch {
                dir: engine_dir.to_path_buf(),
                what: first.what.to_string(),
                built: first.built.clone(),
                here: first.here.clone(),
                also: if also.is_empty() {
                    String::new()
                } else {
                    format!(" (also: {})", also.join(", "))
                },
                rebuild: self.rebuild_command(engine_dir, model_dir),
            },
        )))
    }

    /// The engine directory belongs to this model directory (by model hash).
    pub fn check_model(&self, engine_dir: &Path, m: &Manifest, model_dir: &Path) -> Result<()> {
        if m.model_hash != self.plan.model.model_hash {
            return Err(ArtifactError::EngineMismatch(Box::new(
                crate::error::Mismatch {
                    dir: engine_dir.to_path_buf(),
                    what: "source model".into(),
                    built: self.plan.model.model_hash.clone(),
                    here: format!("{} in {}", m.model_hash, model_dir.display()),
                    also: String::new(),
                    rebuild: self.rebuild_command(engine_dir, model_dir),
                },
            )));
        }
        Ok(())
    }

    /// Every engine file present with its recorded size and hash.
    pub fn verify_files(&self, dir: &Path) -> Result<()> {
        for e in &self.built {
            let p = dir.join(&e.file);
            let meta = std::fs::metadata(&p).map_err(|_| ArtifactError::Manifest {
                path: dir.join(ENGINE_MANIFEST_FILE),
                why: format!(
                    "{} is listed but missing: incomplete engine directory; rebuild it",
                    e.file
                ),
            })?;
            if meta.len() != e.bytes {
                return Err(ArtifactError::Manifest {
                    path: p,
                    why: format!(
                        "{} bytes, the engine manifest lists {}: modified or truncated; rebuild it",
                        meta.len(),
                        e.bytes
                    ),
                });
            }
            let got = crate::hash::sha256_file(&p)?;
            if got != e.sha256 {
                return Err(ArtifactError::Manifest {
                    path: p,
                    why: format!(
                        "sha256 {got} does not match the engine manifest's {}: modified; rebuild it",
                        e.sha256
                    ),
                });
            }
        }
        Ok(())
    }
}
