//! `star-export build-engine`: a model directory's graphs as TensorRT engines (natively, or as
//! ONNX Runtime TensorRT-provider EP-context models), one per graph with one optimization
//! profile per scale, plus the engine manifest. `--dry-run` writes only the plan.

use crate::error::{ExportError, Result};
use crate::export::{abandon_out, check_out, commit_out, out_done, prepare_out};
use star_artifact::engine_manifest::{
    self, BuildOptions, BuiltEngine, EngineBackend, EngineManifest, Plan, PLAN_FILE,
};
use star_artifact::integrity::Integrity;
use star_artifact::manifest::Manifest;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct BuildEngineArgs {
    pub model: PathBuf,
    pub backend: String,
    pub out: PathBuf,
    pub options: BuildOptions,
    pub tensorrt_lib: Option<PathBuf>,
    pub device: usize,
    pub dry_run: bool,
    pub quiet: bool,
}

pub enum Outcome {
    /// The plan as written to plan.json.
    DryRun(String),
    Built(Box<EngineManifest>),
}

fn write_json(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(crate::error::io_err(path))
}

/// Everything derived from arguments and the model manifest, checked before any work.
pub fn plan_of(a: &BuildEngineArgs) -> Result<(Manifest, Plan)> {
    let backend = EngineBackend::parse(&a.backend).ok_or_else(|| {
        ExportError::Engine(star_engines::EngineError::UnknownBackend {
            name: a.backend.clone(),
            available: EngineBackend::ALL.map(|b| b.name()).join(", "),
        })
    })?;
    let m = Manifest::load(&a.model)?;
    star_artifact::check::check_manifest(&m, &a.model)?;
    let plan = engine_manifest::plan(&m, &a.model, backend, &a.options)?;
    Ok((m, plan))
}

pub fn build_engine(a: &BuildEngineArgs) -> Result<Outcome> {
    let (m, plan) = plan_of(a)?;
    check_out(&a.out)?;
    if a.dry_run {
        let text = serde_json::to_string_pretty(&plan).expect("a plan serializes") + "\n";
        let tmp = prepare_out(&a.out, a.quiet)?;
        let r = write_json(&tmp.join(PLAN_FILE), &text).and_then(|_| commit_out(&tmp, &a.out));
        if r.is_err() {
            abandon_out(&tmp);
        }
        out_done();
        return r.map(|_| Outcome::DryRun(text));
    }
    // The library and the GPU before the model files are hashed: a machine that cannot build
    // says so at once.
    let mut builder =
        star_engines::registry::engine_builder(plan.backend, a.tensorrt_lib.as_deref(), a.device)?;
    let started = Instant::now();
    m.verify_files(&a.model, Integrity::Stamped)?;
    let tmp = prepare_out(&a.out, a.quiet)?;
    let r = build_all(a, &plan, builder.as_mut(), &tmp, started).and_then(|em| {
        commit_out(&tmp, &a.out)?;
        Ok(em)
    });
    if r.is_err() {
        abandon_out(&tmp);
    }
    out_done();
    r.map(|em| Outcome::Built(Box::new(em)))
}

fn build_all(
    a: &BuildEngineArgs,
    plan: &Plan,
    builder: &mut dyn star_engines::build::EngineBuilder,
    tmp: &Path,
    started: Instant,
) -> Result<EngineManifest> {
    let n = plan.engines.len();
    let mut built = vec![];
    for (i, e) in plan.engines.iter().enumerate() {
        if !a.quiet {
            eprintln!(
                "[{}/{n}] {}: {} profile{}, {} ... ({:.1}s)",
                i + 1,
                e.stage,
                e.profiles.len(),
                if e.profiles.len() == 1 { "" } else { "s" },
                e.precision,
                started.elapsed().as_secs_f64()
            );
        }
        let t = Instant::now();
        let out = tmp.join(&e.file);
        builder.build(e, &a.model.join(&e.graph), &out, &plan.builder)?;
        let bytes = std::fs::metadata(&out)
            .map_err(crate::error::io_err(&out))?
            .len();
        let secs = t.elapsed().as_secs_f64();
        if !a.quiet {
            eprintln!(
                "[{}/{n}] {}: {:.1} MB in {secs:.1}s",
                i + 1,
                e.stage,
                bytes as f64 / 1e6
            );
        }
        built.push(BuiltEngine {
            stage: e.stage,
            file: e.file.clone(),
            bytes,
            sha256: star_artifact::hash::sha256_file(&out)?,
            build_seconds: (secs * 10.0).round() / 10.0,
        });
    }
    let em = EngineManifest {
        schema_version: engine_manifest::ENGINE_SCHEMA_VERSION,
        producer: format!("star-export {}", env!("CARGO_PKG_VERSION")),
        target: builder.target().clone(),
        plan: plan.clone(),
        built,
    };
    let text = serde_json::to_string_pretty(&em).expect("an engine manifest serializes") + "\n";
    write_json(&tmp.join(engine_manifest::ENGINE_MANIFEST_FILE), &text)?;
    Ok(em)
}
