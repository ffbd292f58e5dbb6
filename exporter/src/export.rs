//! `star-export export`: checkpoints -> model directory (graphs, shared weights, tokenizer files,
//! manifest). Everything is written into a temporary directory beside `--out` and renamed into
//! place at the end, so an interrupted export never leaves a directory that looks valid.

use crate::checkpoint::{Checkpoint, Weights};
use crate::config::{self, Shapes};
use crate::error::{io_err, ExportError, Result};
use crate::graph::builder::{write_model, Precision, WeightStore, G};
use crate::graph::{text, transformer, vq, Src};
use crate::schedule;
use star_engines::manifest::{
    sha256_bytes, sha256_file, FileEntry, GraphEntry, Manifest, ModelConfig, SamplingDefaults,
    Schedule, SCHEMA_VERSION,
};
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
    pub precision: String,
    pub cfg: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub quiet: bool,
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
    let star = Checkpoint::open(&a.transformer, &["trainer", "var_wo_ddp"])?;
    let vqc = Checkpoint::open(&a.vae, &[])?;
    let (te_dir, tok_dir) = text_dirs(&a.text_encoder, a.tokenizer.as_deref())?;
    let text = Checkpoint::open(&te_dir, &[])?;
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

/// Check the output location before any work: a writable parent, nothing in the way.
fn prepare_out(out: &Path) -> Result<PathBuf> {
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
    let tmp = tempfile::Builder::new()
        .prefix(".star-export-")
        .tempdir_in(&parent)
        .map_err(|e| ExportError::Output {
            path: out.to_path_buf(),
            why: format!("cannot write in {}: {e}", parent.display()),
        })?;
    Ok(tmp.keep())
}

pub fn export(a: &ExportArgs) -> Result<Manifest> {
    let precision = Precision::parse(&a.precision)?;
    let started = Instant::now();
    let src = open_sources(a)?;
    let tmp = prepare_out(&a.out)?;
    let result = write_all(a, &src, precision, &tmp, started);
    match result {
        Ok(m) => {
            if a.out.exists() {
                std::fs::remove_dir(&a.out).map_err(io_err(&a.out))?;
            }
            std::fs::rename(&tmp, &a.out).map_err(|e| {
                let _ = std::fs::remove_dir_all(&tmp);
                ExportError::Output {
                    path: a.out.clone(),
                    why: format!("final rename failed: {e}"),
                }
            })?;
            Ok(m)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_all(
    a: &ExportArgs,
    src: &Sources,
    precision: Precision,
    dir: &Path,
    started: Instant,
) -> Result<Manifest> {
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
    let sn = sch.patch_nums.len();
    let mut plan: Vec<(&str, Option<usize>)> = vec![("text_encoder", None), ("text_kv", None)];
    for si in 0..sn {
        plan.push(("step", Some(si)));
        if !sch.substeps[si].is_empty() {
            plan.push(("sampler", Some(si)));
        }
        plan.push(("vq", Some(si)));
    }
    plan.push(("decoder", None));
    let total = plan.len();
    for (i, (stage, scale)) in plan.into_iter().enumerate() {
        let name = match scale {
            Some(s) => format!("{stage}_s{s:02}"),
            None => stage.to_string(),
        };
        let mut g = G::new(&name, precision, &mut store);
        match stage {
            "text_encoder" => text::text_encoder(&mut g, &clip, &cfg.text)?,
            "text_kv" => transformer::text_kv(&mut g, &star, cfg)?,
            "step" => transformer::scale_step(&mut g, &star, cfg, sch, scale.unwrap())?,
            "sampler" => transformer::sampler_step(&mut g, &star, &vqs, cfg, sch, scale.unwrap())?,
            "vq" => vq::vq_step(&mut g, &vqs, cfg, sch, scale.unwrap())?,
            _ => vq::decoder(&mut g, &vqs, cfg, sch)?,
        }
        let (model, inputs, outputs) = g.finish(&format!("STAR stage {name}"));
        let file = format!("{name}.onnx");
        let path = dir.join(&file);
        write_model(&path, &model)?;
        let bytes = star_engines::onnx::encode_model(&model);
        graphs.push(GraphEntry {
            stage: stage.into(),
            scale,
            file,
            sha256: sha256_bytes(&bytes),
            inputs,
            outputs,
        });
        if !a.quiet {
            eprintln!(
                "[{:>3}/{total}] {name:<18} {:>7.2}s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
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
    let mut h = String::new();
    for f in &files {
        h.push_str(&f.sha256);
    }
    for g in &graphs {
        h.push_str(&g.sha256);
    }
    let default_top_k = ((600.0 * cfg.vocab as f64 / 4096.0).round() as usize).clamp(1, cfg.vocab);
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        producer: format!("star-export {}", env!("CARGO_PKG_VERSION")),
        precision: precision.name().into(),
        opset: star_engines::onnx::OPSET,
        config: cfg.clone(),
        schedule: sch.clone(),
        sampling_defaults: SamplingDefaults {
            cfg: a.cfg.unwrap_or(4.0),
            top_k: a.top_k.unwrap_or(default_top_k),
            top_p: a.top_p.unwrap_or(0.8),
        },
        graphs,
        files,
        model_hash: sha256_bytes(h.as_bytes())[..16].to_string(),
    };
    if manifest.sampling_defaults.top_k > cfg.vocab {
        return Err(ExportError::Schedule(format!(
            "--default-top-k {} exceeds the vocabulary ({})",
            manifest.sampling_defaults.top_k, cfg.vocab
        )));
    }
    let mp = dir.join(star_engines::manifest::MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    std::fs::write(&mp, text).map_err(io_err(&mp))?;
    Ok(manifest)
}
