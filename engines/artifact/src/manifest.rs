//! The artifact contract between star-export and star-run: `manifest.json` of a model directory.
//! Every field a loader relies on lives here; bump SCHEMA_VERSION on any incompatible change.

use crate::dtype::{Dtype, Precision};
use crate::error::{io_err, ArtifactError, Result};
use crate::onnx::Dim;
use crate::stage::Stage;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// v2: one graph per stage kind with per-scale shape profiles; KV cache token-major.
/// v3: a precision per graph; the INT8 calibration record.
/// v4: the KV cache block-major: `step` takes `past_{i}` and gives `kv_new_{i}` per block.
/// v5: the `sample` graph (guidance, filter and draw on the engine); the KV cache in the graphs'
/// compute precision (`kv_cache_dtype`: FP16 at FP16 and INT8).
pub const SCHEMA_VERSION: u32 = 5;
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
    pub dtype: Dtype,
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphEntry {
    pub stage: Stage,
    pub file: String,
    pub sha256: String,
    /// What the graph computes in (`Stage::graph_precision`).
    pub precision: Precision,
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
    pub precision: Precision,
    /// The KV cache's element type: what `step` reads as its past and writes as its new K/V
    /// (`kv_cache_dtype`).
    pub kv_cache_dtype: Dtype,
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
    /// Bits of the INT8 weights' range: 7 (values in [-63, 63], `INT8_WEIGHT_BITS`) or 8
    /// ([-127, 127], directories made before the 7-bit rule, which have no such field).
    #[serde(default = "eight_bits")]
    pub weight_bits: u32,
}

/// The KV cache's element type for a model of `precision`: the graphs' compute precision, so that
/// the step writes it as it computes it, with no cast per step. FP16 at FP16 and INT8 (half the
/// memory: 4.4 GB instead of 8.7 GB at d30/1024), FP32 at FP32.
pub fn kv_cache_dtype(p: Precision) -> Dtype {
    match p {
        Precision::Fp32 => Dtype::Float32,
        Precision::Fp16 | Precision::Int8 => Dtype::Float16,
    }
}

/// The range of INT8 weights star-export writes: 7 bits, [-63, 63]. ONNX Runtime's x86 INT8
/// matrix product on CPUs without VNNI (AVX2 only) multiplies activation bytes (as u8, 0..255)
/// by weight bytes in pairs and adds each pair into a saturating 16-bit sum: with 8-bit weights
/// 255·127·2 passes 32767 and the products are wrong (measured on an AVX2 AMD EPYC: tiny-256's
/// INT8 replay at 1.2e-1 to 2.5e-1 relative error instead of under 1e-1). With 7-bit weights
/// every pair sum fits (255·63·2 = 32130), on every CPU.
pub const INT8_WEIGHT_BITS: u32 = 7;

fn eight_bits() -> u32 {
    8
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ArtifactError::Manifest {
                path: path.clone(),
                why: format!("not JSON: {e}"),
            })?;
        let found = v
            .get("schema_version")
            .and_then(|x| x.as_u64())
            .unwrap_or(0) as u32;
        if found != SCHEMA_VERSION {
            return Err(ArtifactError::SchemaVersion {
                path,
                found,
                expected: SCHEMA_VERSION,
            });
        }
        serde_json::from_value(v).map_err(|e| ArtifactError::Manifest {
            path,
            why: e.to_string(),
        })
    }

    pub fn graph(&self, stage: Stage) -> Option<&GraphEntry> {
        self.graphs.iter().find(|g| g.stage == stage)
    }
}
