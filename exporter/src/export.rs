//! `star-export export`: checkpoints -> model directory (graphs, shared weights, tokenizer files,
//! manifest). Everything is written into a temporary directory beside `--out` and renamed into
//! place at the end, so an interrupted export never leaves a directory that looks valid.

use crate::checkpoint::{Checkpoint, Weights};
use crate::config::{self, Shapes};
use crate::error::{io_err, ExportError, Result};
use crate::graph::builder::{write_model, Amax, Precision, WeightStore, G};
use crate::graph::{text, transformer, vq, Src};
use crate::schedule;
use star_artifact::hash::{sha256_bytes, sha256_file};
use star_artifact::manifest::{
    FileEntry, GraphEntry, Manifest, ModelConfig, SamplingDefaults, Schedule, SCHEMA_VERSION,
};
use star_engines::Stage;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const WEIGHTS_FILE: &str = "weights.bin";
pub const TOKENIZER_FILES: &[&str] = &[
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

pub struct ExportArgs {
    pub transformer: PathBuf,
    pub vae: PathBuf,
    pub text_encoder: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub resolution: Option<usize>,
    pub patch_nums: Option<Vec<usize>>,
    pub out: PathBuf,
    pub precision: Precision,
    pub cfg: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub quiet: bool,
    /// Export checkpoints holding NaN/Inf weights instead of refusing them.
    pub allow_nonfinite: bool,
    /// INT8: how to calibrate the activation ranges (required for int8, refused otherwise).
    pub calibration: Option<crate::calibrate::CalibrationArgs>,
    /// Bytes of FP32 attention scores one group of heads may take at the largest scale (batch 1):
    /// above it, self-attention runs over groups of heads one after another. None = 1 GiB
    /// (`graph::DEFAULT_ATTENTION_BUDGET`).
    pub attention_budget: Option<u64>,
}

/// The three checkpoints opened and checked against each other.
pub struct Sources {
    pub star: Checkpoint,
    pub vq: Checkpoint,
    pub text: Checkpoint,
    pub text_config: serde_json::Value,
    pub tokenizer_dir: PathBuf,
    pub config: ModelConfig,
    pub schedule: Schedule,
}

pub fn shapes(c: &Checkpoint) -> Shapes {
    c.tensors
        .iter()
        .map(|(k, (i, _))| (k.clone(), i.shape.clone()))
        .collect()
}

pub fn text_dirs(root: &Path, tokenizer: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let te = if root.join("text_encoder").is_dir() {
        root.join("text_encoder")
    } else {
        root.to_path_buf()
    };
    let tok = match tokenizer {
        Some(t) => t.to_path_buf(),
        None if root.join("tokenizer").is_dir() => root.join("tokenizer"),
        None => te.clone(),
    };
    if !te.join("config.json").is_file() {
        return Err(ExportError::BadCheckpoint { path: te, why: "no config.json: expected a Hugging Face CLIPTextModel folder (or its Stable Diffusion parent)".into() });
    }
    for f in ["vocab.json", "merges.txt"] {
        if !tok.join(f).is_file() {
            return Err(ExportError::BadCheckpoint {
                path: tok.clone(),
                why: format!("no tokenizer {f} (give --tokenizer DIR)"),
            });
        }
    }
    Ok((te, tok))
}

pub fn open_sources(a: &ExportArgs) -> Result<Sources> {
    let mut star = Checkpoint::open(&a.transformer, &["trainer", "var_wo_ddp"])?;
    let mut vqc = Checkpoint::open(&a.vae, &[])?;
    let (te_dir, tok_dir) = text_dirs(&a.text_encoder, a.tokenizer.as_deref())?;
    let mut text = Checkpoint::open(&te_dir, &[])?;
    for c in [&mut star, &mut vqc, &mut text] {
        c.allow_nonfinite = a.allow_nonfinite;
    }
    let cfg_path = te_dir.join("config.json");
    let text_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?)
            .map_err(|e| ExportError::BadCheckpoint {
                path: cfg_path.clone(),
                why: format!("not JSON: {e}"),
            })?;

    let t = config::infer_transformer(&shapes(&star)).map_err(|e| at(&a.transformer, e))?;
    let v = config::infer_vq(&shapes(&vqc)).map_err(|e| at(&a.vae, e))?;
    let tc = config::infer_text(&shapes(&text), &text_config).map_err(|e| at(&te_dir, e))?;
    let patch_nums = match (&a.patch_nums, a.resolution) {
        (Some(p), _) => p.clone(),
        (None, Some(r)) => schedule::patch_nums_for(r)?,
        (None, None) => {
            return Err(ExportError::Schedule(
                "give --resolution 256|512|1024 or --patch-nums".into(),
            ))
        }
    };
    if let (Some(r), Some(p)) = (a.resolution, &a.patch_nums) {
        if 16 * p.last().copied().unwrap_or(0) != r {
            return Err(ExportError::Schedule(format!(
                "--patch-nums ends at {} (images {}px) but --resolution is {r}",
                p.last().unwrap(),
                16 * p.last().unwrap()
            )));
        }
    }
    let config = config::combine(&t, &v, &tc, patch_nums.len())?;
    let schedule = schedule::build(&patch_nums, v.phi_count, t.sampler_blocks > 0)?;
    Ok(Sources {
        star,
        vq: vqc,
        text,
        text_config,
        tokenizer_dir: tok_dir,
        config,
        schedule,
    })
}

fn at(path: &Path, e: ExportError) -> ExportError {
    match e {
        ExportError::Mismatch(m) => ExportError::BadCheckpoint {
            path: path.to_path_buf(),
            why: m,
        },
        other => other,
    }
}

/// Temporary directories of exports: `.star-export-XXXXXX` beside `--out`, with this record inside
/// so that a later export can tell whose it is after a SIGKILL (which no handler sees).
const TMP_PREFIX: &str = ".star-export-";
const OWNER_FILE: &str = ".star-export-owner.json";

/// The temporary directory of the export in progress: removed by the SIGINT/SIGTERM handler.
static IN_PROGRESS: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

fn set_in_progress(p: Option<PathBuf>) {
    *IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// Remove the temporary directory of an interrupted export, then exit 130 (SIGINT/SIGTERM).
/// Installed by the star-export binary; a library caller handles its own signals.
pub fn install_interrupt_cleanup() -> Result<()> {
    ctrlc::set_handler(|| {
        let tmp = IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = tmp {
            // The export thread may still be adding a file: retry until the directory is gone.
            for _ in 0..20 {
                if std::fs::remove_dir_all(&t).is_ok() || !t.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            eprintln!("interrupted: removed the unfinished export {}", t.display());
        } else {
            eprintln!("interrupted");
        }
        std::process::exit(130);
    })
    .map_err(|e| ExportError::Output {
        path: PathBuf::from("."),
        why: format!("cannot install the interrupt handler: {e}"),
    })
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `--out` as an absolute path, the identity recorded in a temporary directory's owner record.
fn out_identity(out: &Path) -> String {
    let abs = if out.is_absolute() {
        out.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(out))
            .unwrap_or_else(|_| out.to_path_buf())
    };
    abs.display().to_string()
}

/// Temporary directories beside `--out` left by exports that died without cleaning up (SIGKILL,
/// power loss): ours (same --out, owner gone) are removed; others are named, not touched.
fn clean_stale(parent: &Path, out: &Path, quiet: bool) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    let me = out_identity(out);
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(TMP_PREFIX) || !e.path().is_dir() {
            continue;
        }
        let owner: Option<serde_json::Value> = std::fs::read_to_string(e.path().join(OWNER_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let pid = owner
            .as_ref()
            .and_then(|o| o["pid"].as_u64())
            .map(|p| p as u32);
        let target = owner
            .as_ref()
            .and_then(|o| o["out"].as_str().map(str::to_string));
        if pid.is_some_and(process_alive) {
            continue;
        }
        if target.as_deref() == Some(me.as_str()) {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => eprintln!(
                    "notice: removed {}, left by an interrupted export to {}",
                    e.path().display(),
                    out.display()
                ),
                Err(err) => eprintln!(
                    "warning: cannot remove {}, left by an interrupted export: {err}",
                    e.path().display()
                ),
            }
        } else if !quiet {
            eprintln!(
                "notice: {} looks like the remains of an interrupted export{}; remove it if no export is running",
                e.path().display(),
                target.map(|t| format!(" to {t}")).unwrap_or_default()
            );
        }
    }
}

/// Check the output location before any work: a writable parent, nothing in the way.
pub(crate) fn check_out(out: &Path) -> Result<PathBuf> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !empty {
            return Err(ExportError::Output {
                path: out.to_path_buf(),
                why: "already exists; remove it or choose another --out".into(),
            });
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(ExportError::Output {
            path: out.to_path_buf(),
            why: format!("parent directory {} does not exist", parent.display()),
        });
    }
    Ok(parent)
}

/// The temporary directory beside `--out` that the output is written into (`commit_out` renames
/// it into place; the interrupt handler removes it).
pub(crate) fn prepare_out(out: &Path, quiet: bool) -> Result<PathBuf> {
    let parent = check_out(out)?;
    clean_stale(&parent, out, quiet);
    let tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempdir_in(&parent)
        .map_err(|e| ExportError::Output {
            path: out.to_path_buf(),
            why: format!("cannot write in {}: {e}", parent.display()),
        })?;
    let tmp = tmp.keep();
    set_in_progress(Some(tmp.clone()));
    let owner = serde_json::json!({ "pid": std::process::id(), "out": out_identity(out) });
    let op = tmp.join(OWNER_FILE);
    if let Err(e) = std::fs::write(&op, owner.to_string()) {
        let _ = std::fs::remove_dir_all(&tmp);
        set_in_progress(None);
        return Err(ExportError::Io {
            path: op,
            source: e,
        });
    }
    Ok(tmp)
}

/// Move a finished temporary directory to `--out` (one rename).
pub(crate) fn commit_out(tmp: &Path, out: &Path) -> Result<()> {
    let op = tmp.join(OWNER_FILE);
    std::fs::remove_file(&op).map_err(io_err(&op))?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(io_err(out))?;
    }
    std::fs::rename(tmp, out).map_err(|e| ExportError::Output {
        path: out.to_path_buf(),
        why: format!("final rename failed: {e}"),
    })
}

/// Remove an unfinished temporary directory (after an error).
pub(crate) fn abandon_out(tmp: &Path) {
    let _ = std::fs::remove_dir_all(tmp);
    set_in_progress(None);
}

/// The output is in place: the interrupt handler has nothing left to remove.
pub(crate) fn out_done() {
    set_in_progress(None);
}

pub fn export(a: &ExportArgs) -> Result<Manifest> {
    let precision = a.precision;
    // Everything about the calibration request is checked before any work.
    let prompts = match (precision, &a.calibration) {
        (Precision::Int8, Some(c)) => Some(crate::calibrate::read_prompts(c)?),
        (Precision::Int8, None) => {
            return Err(ExportError::Calibration(
                "--precision int8 needs --calibration PROMPTS.txt (one prompt per line; calibration/prompts/ has two sets)".into(),
            ))
        }
        (_, Some(_)) => {
            return Err(ExportError::Calibration(format!(
                "--calibration applies to --precision int8, not {}",
                precision.name()
            )))
        }
        (_, None) => None,
    };
    let started = Instant::now();
    let src = open_sources(a)?;
    let tmp = prepare_out(&a.out, a.quiet)?;
    let result = match (&a.calibration, prompts) {
        (Some(c), Some(prompts)) => calibrated(a, &src, c, &prompts, &tmp, started),
        _ => write_all(a, &src, &Build::plain(precision), &tmp, started),
    };
    let result = result.and_then(|m| {
        commit_out(&tmp, &a.out)?;
        // Every file was just hashed for the manifest: record the stamps, so that the first
        // star-run does not hash gigabytes again.
        let stamps: Vec<_> = m
            .files
            .iter()
            .filter_map(|f| star_artifact::stamp::FileStamp::of(&a.out, &f.file, &f.sha256))
            .collect();
        star_artifact::stamp::save(&a.out, &m, &stamps);
        Ok(m)
    });
    if result.is_err() {
        abandon_out(&tmp);
    }
    out_done();
    result
}

/// Test aid: STAR_EXPORT_STAGE_DELAY_MS=N sleeps N ms after each graph, so that the interrupt
/// tests can signal an export that is reliably mid-way.
fn stage_delay() {
    if let Some(ms) = std::env::var("STAR_EXPORT_STAGE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// How the graphs of one directory are built.
pub(crate) struct Build<'t> {
    pub precision: Precision,
    /// FP32 calibration graphs: block linear inputs as extra outputs.
    pub probing: bool,
    /// INT8: the calibration table.
    pub amax: Option<&'t Amax>,
}

impl Build<'_> {
    fn plain(precision: Precision) -> Build<'static> {
        Build {
            precision,
            probing: false,
            amax: None,
        }
    }
}

/// INT8: export FP32 calibration graphs into a scratch directory inside the export's temporary
/// directory, generate over the prompts with them, choose the ranges, then write the INT8
/// graphs with them, and the table beside them.
fn calibrated(
    a: &ExportArgs,
    src: &Sources,
    c: &crate::calibrate::CalibrationArgs,
    prompts: &crate::calibrate::Prompts,
    tmp: &Path,
    started: Instant,
) -> Result<Manifest> {
    let scratch = tmp.join(".calibration-fp32");
    std::fs::create_dir(&scratch).map_err(io_err(&scratch))?;
    let probe = Build {
        precision: Precision::Fp32,
        probing: true,
        amax: None,
    };
    if !a.quiet {
        eprintln!("calibration: FP32 graphs with probes");
    }
    write_all(a, src, &probe, &scratch, started)?;
    let table = crate::calibrate::calibrate(&scratch, c, prompts, a.quiet, started)?;
    std::fs::remove_dir_all(&scratch).map_err(io_err(&scratch))?;
    if !a.quiet {
        eprintln!("INT8 graphs");
    }
    let build = Build {
        precision: Precision::Int8,
        probing: false,
        amax: Some(&table.amax),
    };
    let m = write_all(a, src, &build, tmp, started)
        .and_then(|m| crate::calibrate::record(m, tmp, &table, c, prompts))?;
    write_manifest(&m, tmp)?;
    Ok(m)
}

fn write_all(
    a: &ExportArgs,
    src: &Sources,
    build: &Build<'_>,
    dir: &Path,
    started: Instant,
) -> Result<Manifest> {
    let precision = build.precision;
    let cfg = &src.config;
    let sch = &src.schedule;
    let star = Src {
        ns: "star",
        w: Weights::new(&src.star, ""),
    };
    let vqs = Src {
        ns: "vq",
        w: Weights::new(&src.vq, ""),
    };
    let clip = Src {
        ns: "clip",
        w: Weights::new(&src.text, "text_model"),
    };
    let mut store = WeightStore::create(dir, WEIGHTS_FILE)?;
    let mut graphs = vec![];
    let plan = star_artifact::check::required_stages(cfg, sch);
    let total = plan.len();
    for (i, stage) in plan.into_iter().enumerate() {
        let name = stage.name();
        let graph_precision = stage.graph_precision(precision);
        let mut g = G::new(name, graph_precision, &mut store);
        g.probing = build.probing;
        g.amax = build.amax;
        if let Some(b) = a.attention_budget {
            g.attention_budget = b;
        }
        match stage {
            Stage::TextEncoder => text::text_encoder(&mut g, &clip, &cfg.text)?,
            Stage::TextKv => transformer::text_kv(&mut g, &star, cfg, sch)?,
            Stage::StepFirst => transformer::step_first(&mut g, &star, cfg, sch)?,
            Stage::Step => transformer::step(&mut g, &star, cfg, sch)?,
            Stage::Sampler => transformer::sampler_step(&mut g, &star, &vqs, cfg, sch)?,
            Stage::Sample => crate::graph::sample::sample(&mut g, cfg.vocab),
            Stage::Vq => vq::vq_step(&mut g, &vqs, &star, cfg, sch)?,
            Stage::Decoder => vq::decoder(&mut g, &vqs, cfg, sch)?,
        }
        let probes = std::mem::take(&mut g.probe_specs);
        let (model, inputs, outputs) = g.finish(&format!("STAR stage {name}"));
        let file = stage.file();
        let path = dir.join(&file);
        write_model(&path, &model)?;
        let bytes = star_artifact::onnx::encode_model(&model);
        let kv_dtype = star_artifact::manifest::kv_cache_dtype(precision);
        let (_, _, scales, profiles) = star_artifact::check::expected_io(stage, cfg, sch, kv_dtype);
        graphs.push(GraphEntry {
            stage,
            file,
            sha256: sha256_bytes(&bytes),
            precision: graph_precision,
            inputs,
            outputs,
            scales,
            profiles,
            probes,
        });
        if !a.quiet {
            eprintln!(
                "[{:>3}/{total}] {name:<18} {:>7.2}s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
        stage_delay();
    }
    let wpath = store.finish()?;
    let mut files = vec![FileEntry {
        file: WEIGHTS_FILE.into(),
        bytes: std::fs::metadata(&wpath).map_err(io_err(&wpath))?.len(),
        sha256: sha256_file(&wpath)?,
    }];
    std::fs::create_dir_all(dir.join("tokenizer")).map_err(io_err(dir))?;
    for f in TOKENIZER_FILES {
        let from = src.tokenizer_dir.join(f);
        if from.is_file() {
            let to = dir.join("tokenizer").join(f);
            std::fs::copy(&from, &to).map_err(io_err(&to))?;
            files.push(FileEntry {
                file: format!("tokenizer/{f}"),
                bytes: std::fs::metadata(&to).map_err(io_err(&to))?.len(),
                sha256: sha256_file(&to)?,
            });
        }
    }
    let default_top_k = ((600.0 * cfg.vocab as f64 / 4096.0).round() as usize).clamp(1, cfg.vocab);
    let mut manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        producer: format!("star-export {}", env!("CARGO_PKG_VERSION")),
        precision,
        kv_cache_dtype: star_artifact::manifest::kv_cache_dtype(precision),
        opset: star_artifact::onnx::OPSET,
        config: cfg.clone(),
        schedule: sch.clone(),
        sampling_defaults: SamplingDefaults {
            cfg: a.cfg.unwrap_or(4.0),
            top_k: a.top_k.unwrap_or(default_top_k),
            top_p: a.top_p.unwrap_or(0.8),
        },
        graphs,
        files,
        model_hash: String::new(),
        calibration: None,
    };
    manifest.model_hash = star_artifact::check::model_hash(&manifest);
    if manifest.sampling_defaults.top_k > cfg.vocab {
        return Err(ExportError::Schedule(format!(
            "--default-top-k {} exceeds the vocabulary ({})",
            manifest.sampling_defaults.top_k, cfg.vocab
        )));
    }
    if precision == Precision::Int8 {
        // Completed (files, calibration record, hash) and written by calibrate::record.
        return Ok(manifest);
    }
    write_manifest(&manifest, dir)?;
    Ok(manifest)
}

/// Check (never write a directory star-run would refuse), then write manifest.json.
pub(crate) fn write_manifest(m: &Manifest, dir: &Path) -> Result<()> {
    star_artifact::check::check_manifest(m, dir)?;
    let mp = dir.join(star_artifact::manifest::MANIFEST_FILE);
    let text = serde_json::to_string_pretty(m).expect("manifest serialises");
    std::fs::write(&mp, text).map_err(io_err(&mp))
}
