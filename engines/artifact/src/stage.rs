//! The stages of a model directory as one typed identity: graph file names, manifest names,
//! timing labels, bench rows and JSON keys all come from here, and tensor names from `io`.

use crate::dtype::Precision;
use serde::{Deserialize, Serialize};

/// Text positions of every text stage: CLIP's 77 tokens (start, up to 75 of the prompt, end,
/// padding).
pub const TEXT_LEN: usize = 77;

/// One graph per stage kind (manifest schema v2): per-scale variation is carried by inputs and
/// by shape, never by a separate graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// CLIP text encoder: ids -> hidden states and pooled vector, once per prompt.
    TextEncoder,
    /// Cross-attention K/V of every block from the conditional rows, and scale 0's embedded
    /// start token, once per prompt.
    TextKv,
    /// Scale 0 without a past, for backends that cannot take an empty one (TensorRT profiles
    /// handle zero-length dimensions badly).
    StepFirst,
    /// Any scale: dynamic token count and past length (0 at scale 0).
    Step,
    /// The stable sampler's refiner, every sampler scale.
    Sampler,
    /// Guidance, top-k / top-p and the draw of any scale or sub-step: FP32 at every precision.
    Sample,
    /// VQ transition of any scale (selected by the `scale` input).
    Vq,
    /// VQ decoder: f_hat -> image.
    Decoder,
}

impl Stage {
    pub const ALL: [Stage; 8] = [
        Stage::TextEncoder,
        Stage::TextKv,
        Stage::StepFirst,
        Stage::Step,
        Stage::Sampler,
        Stage::Sample,
        Stage::Vq,
        Stage::Decoder,
    ];

    /// The manifest's and the JSON's name of the stage.
    pub fn name(self) -> &'static str {
        match self {
            Stage::TextEncoder => "text_encoder",
            Stage::TextKv => "text_kv",
            Stage::StepFirst => "step_first",
            Stage::Step => "step",
            Stage::Sampler => "sampler",
            Stage::Sample => "sample",
            Stage::Vq => "vq",
            Stage::Decoder => "decoder",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.name() == s)
    }

    /// The graph file of the stage in a model directory.
    pub fn file(self) -> String {
        format!("{}.onnx", self.name())
    }

    /// The precision this stage's graph is built at in a model directory of precision `dir`:
    /// the scale stages (step_first, step, sampler), where the time goes, carry it; the text
    /// encoder and text K/V (once per prompt), the VQ transitions and the decoder stay FP32.
    pub fn graph_precision(self, dir: Precision) -> Precision {
        match self {
            Stage::StepFirst | Stage::Step | Stage::Sampler => dir,
            Stage::TextEncoder | Stage::TextKv | Stage::Sample | Stage::Vq | Stage::Decoder => {
                Precision::Fp32
            }
        }
    }

    /// Whether the stage runs once per scale (its timings are kept per scale).
    pub fn per_scale(self) -> bool {
        matches!(
            self,
            Stage::StepFirst | Stage::Step | Stage::Sampler | Stage::Sample | Stage::Vq
        )
    }

    /// Timing label and bench row: `step[03]` for a per-scale stage, else the name. Scale 0 and
    /// later scales of the transformer share the `step[..]` rows (one row per scale).
    pub fn label(self, scale: Option<usize>) -> String {
        let base = match self {
            Stage::StepFirst => "step",
            s => s.name(),
        };
        match scale {
            Some(s) if self.per_scale() => format!("{base}[{s:02}]"),
            _ => base.to_string(),
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Graph input and output names (the I/O contract of `check.rs`).
pub mod io {
    pub const INPUT_IDS: &str = "input_ids";
    pub const ATTENTION_MASK: &str = "attention_mask";
    pub const HIDDEN: &str = "hidden";
    pub const POOLED: &str = "pooled";
    pub const TEXT_KV: &str = "text_kv";
    pub const TEXT_BIAS: &str = "text_bias";
    pub const NEXT_IN: &str = "next_in";
    /// Embedded tokens of a scale (B2, n, C): the step's input.
    pub const X: &str = "x";
    /// Prefix of the per-block past inputs of `step`: `past_{block}`, (P, 2, B2, H, hd), a view
    /// of the first P tokens of that block's region of the cache.
    pub const PAST: &str = "past";
    /// Prefix of the per-block K/V outputs of `step` and `step_first`: `kv_new_{block}`,
    /// (n, 2, B2, H, hd), written in place into that block's region at the scale's begin.
    pub const KV_NEW: &str = "kv_new";
    pub const LOGITS: &str = "logits";
    pub const IDX: &str = "idx";
    pub const MASK: &str = "mask";
    pub const SCALE: &str = "scale";
    pub const F_HAT: &str = "f_hat";
    /// The sample graph's inputs: the guidance pair [1 + t, t], the k to keep, the nucleus
    /// threshold 1 - p (-1: off) and the RNG contract's uniforms; and its output's probability
    /// of each drawn token (the token ids are `IDX`).
    pub const GUIDANCE: &str = "guidance";
    pub const TOP_K: &str = "top_k";
    pub const TOP_P: &str = "top_p";
    pub const UNIFORMS: &str = "uniforms";
    pub const PROB: &str = "prob";
    pub const F_HAT_OUT: &str = "f_hat_out";
    pub const IMAGE_RAW: &str = "image_raw";
    pub const IMAGE: &str = "image";
    /// Prefix of the calibration probes: extra FP32 outputs, one per quantizable linear layer's
    /// input, that only the FP32 graphs star-export builds for INT8 calibration declare (listed
    /// as `probes` in their manifest entry; never in a model directory it writes).
    pub const PROBE_PREFIX: &str = "calib:";

    /// Block `i`'s past input.
    pub fn past(i: usize) -> String {
        format!("{PAST}_{i}")
    }

    /// Block `i`'s K/V output.
    pub fn kv_new(i: usize) -> String {
        format!("{KV_NEW}_{i}")
    }

    fn block_of(name: &str, prefix: &str) -> Option<usize> {
        let n = name.strip_prefix(prefix)?.strip_prefix('_')?;
        // One spelling per block: `past_3`, never `past_03` or `past_+3`.
        (n == "0" || (!n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit())))
            .then(|| n.parse().ok())
            .flatten()
    }

    /// The block of a past input name (`past_7` -> 7).
    pub fn past_block(name: &str) -> Option<usize> {
        block_of(name, PAST)
    }

    /// The block of a K/V output name (`kv_new_7` -> 7).
    pub fn kv_new_block(name: &str) -> Option<usize> {
        block_of(name, KV_NEW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_labels() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.name()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
        }
        assert_eq!(Stage::Step.label(Some(3)), "step[03]");
        assert_eq!(Stage::StepFirst.label(Some(0)), "step[00]");
        assert_eq!(Stage::Vq.label(Some(12)), "vq[12]");
        assert_eq!(Stage::Decoder.label(None), "decoder");
        assert_eq!(Stage::TextKv.file(), "text_kv.onnx");
    }

    #[test]
    fn block_io_names_round_trip() {
        for i in [0, 7, 29] {
            assert_eq!(io::past_block(&io::past(i)), Some(i));
            assert_eq!(io::kv_new_block(&io::kv_new(i)), Some(i));
        }
        for n in [
            "past", "past_", "past_03", "past_+3", "past_x", "kv_new_1", "pastx_1",
        ] {
            assert_eq!(io::past_block(n), None, "{n}");
        }
        assert_eq!(io::kv_new_block("past_1"), None);
    }
}
