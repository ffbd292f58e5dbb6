//! The artifact contract between star-export and star-run: `manifest.json` of a model directory.
//! Every field a loader relies on lives here; bump SCHEMA_VERSION on any incompatible change.

use crate::error::{io_err, EngineError, Result};
use crate::onnx::Dim;
use crate::stage::Stage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// v2: one graph per stage kind with per-scale shape profiles; KV cache token-major.
/// v3: a precision per graph; the INT8 calibration record.
/// v4: the KV cache block-major: `step` takes `past_{i}` and gives `kv_new_{i}` per block.
pub const SCHEMA_VERSION: u32 = 4;
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp: usize,
    pub vocab: usize,
    pub max_positions: usize,
    /// "gelu" (erf) or "quick_gelu".
    pub act: String,
    pub eps: f32,
    pub eos_id: i64,
    pub bos_id: i64,
    pub pad_id: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqConfig {
    pub vocab: usize,
    pub cvae: usize,
    /// Decoder widths per level, lowest resolution first.
    pub decoder_widths: Vec<usize>,
    pub phi_count: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub depth: usize,
    pub width: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub cvae: usize,
    pub text_width: usize,
    /// Number of stable-sampler refiner blocks; 0 = no sampler modules.
    pub sampler_blocks: usize,
    pub text: TextConfig,
    pub vq: VqConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubStep {
    /// Tokens revealed by this sub-step.
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub patch_nums: Vec<usize>,
    pub image_size: usize,
    pub total_tokens: usize,
    /// Token range [begin, end) of each scale in the KV cache.
    pub begin_end: Vec<(usize, usize)>,
    /// Which phi (quant_resi conv) each scale uses.
    pub phi_index: Vec<usize>,
    /// Stable-sampler reveal counts per scale (empty for plain scales).
    pub substeps: Vec<Vec<usize>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<Dim>,
}

/// The exact shapes of one graph at one scale: batch dims (B, B2, N) stay symbolic, every other
/// dim is fixed. What TensorRT optimization profiles, ORT's TensorRT provider and CUDA graphs need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub scale: usize,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
}

/// The precisions a model directory's graphs can compute in.
pub const PRECISIONS: &[&str] = &["fp32", "fp16", "int8"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphEntry {
    pub stage: Stage,
    pub file: String,
    pub sha256: String,
    /// fp32, fp16 or int8: what the graph computes in (`Stage::graph_precision`).
    pub precision: String,
    /// Declared I/O: dynamic dims by name (B, B2, N batch rows; tokens, past, next_tokens).
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    /// The scales this graph serves (empty for the text stages and the decoder).
    pub scales: Vec<usize>,
    /// One shape profile per served scale, in the order of `scales`.
    pub profiles: Vec<Profile>,
    /// Calibration probes (`io::PROBE_PREFIX`): extra outputs of star-export's temporary
    /// calibration graphs only; empty (and absent from the file) in every model directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<IoSpec>,
}

impl GraphEntry {
    pub fn profile(&self, scale: usize) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.scale == scale)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub cfg: f64,
    pub top_k: usize,
    pub top_p: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub producer: String,
    pub precision: String,
    pub opset: i64,
    pub config: ModelConfig,
    pub schedule: Schedule,
    pub sampling_defaults: SamplingDefaults,
    pub graphs: Vec<GraphEntry>,
    /// Shared external-data weights file(s) and tokenizer files.
    pub files: Vec<FileEntry>,
    /// sha256 over the weights file hash and every graph hash: names the model in PNG metadata.
    pub model_hash: String,
    /// INT8 only: how the activation ranges were chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
}

/// The INT8 calibration of a model directory. The table files are also in `files` (sizes and
/// hashes checked like every other file); `table_sha256` is the table's own content hash
/// (`CalibrationTable::hash`), the identity an engine built from it records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// entropy, percentile(99.99) or max.
    pub method: String,
    /// Generations the statistics were gathered over.
    pub samples: usize,
    pub seed: u64,
    /// sha256 of the prompts file.
    pub prompts_sha256: String,
    /// The table as JSON (tensor name -> amax) and as TensorRT's calibration-cache text.
    pub table_file: String,
    pub trt_cache_file: String,
    pub table_sha256: String,
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::Manifest {
                path: path.clone(),
                why: format!("not JSON: {e}"),
            })?;
        let found = v
            .get("schema_version")
            .and_then(|x| x.as_u64())
            .unwrap_or(0) as u32;
        if found != SCHEMA_VERSION {
            return Err(EngineError::SchemaVersion {
                path,
                found,
                expected: SCHEMA_VERSION,
            });
        }
        serde_json::from_value(v).map_err(|e| EngineError::Manifest {
            path,
            why: e.to_string(),
        })
    }

    pub fn graph(&self, stage: Stage) -> Option<&GraphEntry> {
        self.graphs.iter().find(|g| g.stage == stage)
    }

    /// Check that every file the manifest lists exists with its recorded size and hash, and that
    /// every graph file declares the I/O the manifest lists for it. With `Integrity::Stamped`
    /// the large files are not hashed when their stamps from the last full verification still
    /// match (see `stamp.rs`); graph files are always hashed and decoded (they are small).
    pub fn verify_files(&self, dir: &Path, mode: Integrity) -> Result<Verified> {
        let t = std::time::Instant::now();
        let missing = |file: &str| {
            EngineError::Manifest {
            path: dir.join(MANIFEST_FILE),
            why: format!("{file} is listed but missing: incomplete model directory; re-export it with star-export"),
        }
        };
        // Sizes first: a truncated or replaced file is refused before anything is hashed.
        for f in &self.files {
            let p = dir.join(&f.file);
            let meta = std::fs::metadata(&p).map_err(|_| missing(&f.file))?;
            if !meta.is_file() {
                return Err(missing(&f.file));
            }
            if meta.len() != f.bytes {
                return Err(EngineError::Manifest {
                    path: p,
                    why: format!(
                        "{} bytes, the manifest lists {}: the file was modified or truncated; re-export the model",
                        meta.len(),
                        f.bytes
                    ),
                });
            }
        }
        for g in &self.graphs {
            if !dir.join(&g.file).is_file() {
                return Err(missing(&g.file));
            }
        }
        let stamps = match mode {
            Integrity::Stamped => crate::stamp::load(dir, self).unwrap_or_default(),
            Integrity::Full => vec![],
        };
        let mut fresh = vec![];
        let mut hashed = 0u64;
        let mut graphs = vec![];
        for f in &self.files {
            let now = crate::stamp::FileStamp::of(dir, &f.file, &f.sha256);
            if now.is_some() && stamps.iter().any(|s| Some(s) == now.as_ref()) {
                fresh.extend(now);
                continue;
            }
            let p = dir.join(&f.file);
            // Stamp what was hashed: the open file's metadata before and after hashing must
            // agree (a write during hashing changes its ctime), and the path must still name it.
            let file = std::fs::File::open(&p).map_err(io_err(&p))?;
            let before = file.metadata().map_err(io_err(&p))?;
            let got = sha256_reader(&file, &p)?;
            hashed += f.bytes;
            if got != f.sha256 {
                return Err(EngineError::HashMismatch {
                    path: p,
                    expected: f.sha256.clone(),
                    found: got,
                });
            }
            let after = file.metadata().map_err(io_err(&p))?;
            let s0 = crate::stamp::FileStamp::from_meta(&f.file, &f.sha256, &before);
            let s1 = crate::stamp::FileStamp::from_meta(&f.file, &f.sha256, &after);
            if s0 == s1 && crate::stamp::FileStamp::of(dir, &f.file, &f.sha256) == Some(s1.clone())
            {
                fresh.push(s1);
            }
        }
        for g in &self.graphs {
            let p = dir.join(&g.file);
            let bytes = std::fs::read(&p).map_err(io_err(&p))?;
            let got = sha256_bytes(&bytes);
            if got != g.sha256 {
                return Err(EngineError::HashMismatch {
                    path: p,
                    expected: g.sha256.clone(),
                    found: got,
                });
            }
            crate::check::check_graph_file(g, &p, &bytes, self)?;
            graphs.push((g.stage, std::sync::Arc::from(bytes)));
        }
        if hashed > 0 {
            crate::stamp::save(dir, self, &fresh);
        }
        Ok(Verified {
            hashed_bytes: hashed,
            ms: t.elapsed().as_secs_f64() * 1e3,
            graphs,
        })
    }
}

/// How much of a model directory is hashed when it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Integrity {
    /// Hash what the stamps of the last full verification do not vouch for (the default).
    #[default]
    Stamped,
    /// Hash everything (`star-run verify`).
    Full,
}

/// What a verification did.
#[derive(Clone, Debug, Default)]
pub struct Verified {
    /// Bytes hashed (0 when every stamp matched).
    pub hashed_bytes: u64,
    pub ms: f64,
    /// Every graph file's bytes as hashed and checked: sessions are created from these, not
    /// from a second read of the file.
    pub graphs: Vec<(Stage, std::sync::Arc<[u8]>)>,
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    sha256_reader(&f, path)
}

fn sha256_reader(mut f: &std::fs::File, path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}
