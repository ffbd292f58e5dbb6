//! Model configuration inferred from tensor shapes, with the cross-checks between the three
//! checkpoints. Works on a plain key -> shape table so that it can be tested on the key list of a
//! full-size checkpoint without the multi-GB file.

use crate::error::{ExportError, Result};
use star_artifact::manifest::{ModelConfig, TextConfig, VqConfig};
use std::collections::BTreeMap;

pub type Shapes = BTreeMap<String, Vec<usize>>;

fn need<'a>(s: &'a Shapes, what: &str, key: &str) -> Result<&'a Vec<usize>> {
    s.get(key)
        .ok_or_else(|| ExportError::Mismatch(format!("{what}: missing tensor '{key}'")))
}

fn count_indexed(s: &Shapes, prefix: &str, suffix: &str) -> usize {
    let mut n = 0;
    while s.contains_key(&format!("{prefix}{n}{suffix}")) {
        n += 1;
    }
    n
}

/// What a transformer checkpoint says of the model: its part of the config (`text` and `vq`
/// come from the other two checkpoints, in `combine`) and its number of scales.
#[derive(Clone, Debug, PartialEq)]
pub struct TransformerShape {
    pub config: ModelConfig,
    pub scales: usize,
}

impl std::ops::Deref for TransformerShape {
    type Target = ModelConfig;
    fn deref(&self) -> &ModelConfig {
        &self.config
    }
}

pub fn infer_transformer(s: &Shapes) -> Result<TransformerShape> {
    let what = "transformer";
    let we = need(s, what, "word_embed.weight")?;
    if we.len() != 2 {
        return Err(ExportError::Mismatch(format!(
            "transformer: word_embed.weight has shape {we:?}, expected (C, Cvae)"
        )));
    }
    let (width, cvae) = (we[0], we[1]);
    let depth = count_indexed(s, "blocks.", ".attn.mat_qkv.weight");
    if depth == 0 {
        return Err(ExportError::Mismatch("transformer: no blocks.N.attn.mat_qkv.weight: is this a STAR/VAR transformer state_dict?".into()));
    }
    let sm = need(s, what, "blocks.0.attn.scale_mul_1H11")?;
    let heads = sm.get(1).copied().unwrap_or(0);
    if heads == 0 || width % heads != 0 {
        return Err(ExportError::Mismatch(format!(
            "transformer: {heads} heads do not divide width {width}"
        )));
    }
    let vocab = need(s, what, "head_logits.weight")?[0];
    let ep = need(s, what, "encoder_proj.weight")?;
    let text_width = ep[1];
    if ep[0] != width {
        return Err(ExportError::Mismatch(format!(
            "transformer: encoder_proj.weight {ep:?} does not map to width {width}"
        )));
    }
    let scales = need(s, what, "lvl_embed.weight")?[0];
    let sampler_blocks = count_indexed(s, "feat_extract_blocks.", ".attn.mat_qkv.weight");
    if sampler_blocks > 0 {
        for k in [
            "word_embed_head.weight",
            "lvl_embed_2.weight",
            "encoder_proj2.weight",
            "pos_start_last",
            "head_proj.weight",
            "head_logits2.weight",
        ] {
            need(s, "transformer (stable sampler)", k)?;
        }
    }
    Ok(TransformerShape {
        config: ModelConfig {
            depth,
            width,
            heads,
            head_dim: width / heads,
            vocab,
            cvae,
            text_width,
            sampler_blocks,
            text: TextConfig::default(),
            vq: VqConfig::default(),
        },
        scales,
    })
}

pub fn infer_vq(s: &Shapes) -> Result<VqConfig> {
    let what = "VQ tokenizer";
    let emb = need(s, what, "quantize.embedding.weight")?;
    let phi_count = count_indexed(s, "quantize.quant_resi.qresi_ls.", ".weight");
    if phi_count == 0 {
        return Err(ExportError::Mismatch(
            "VQ tokenizer: no quantize.quant_resi.qresi_ls.N.weight".into(),
        ));
    }
    let levels = count_indexed(s, "decoder.up.", ".block.0.conv1.weight");
    if levels == 0 {
        return Err(ExportError::Mismatch(
            "VQ tokenizer: no decoder.up.N.block.0 (is this VAR's VQVAE?)".into(),
        ));
    }
    let decoder_widths = (0..levels)
        .rev()
        .map(|l| s[&format!("decoder.up.{l}.block.0.conv1.weight")][0])
        .collect();
    Ok(VqConfig {
        vocab: emb[0],
        cvae: emb[1],
        decoder_widths,
        phi_count,
    })
}

/// The HF CLIPTextModel: shapes from the weights, heads/act/eps from config.json.
pub fn infer_text(s: &Shapes, config: &serde_json::Value) -> Result<TextConfig> {
    let what = "text encoder";
    let tok = need(s, what, "text_model.embeddings.token_embedding.weight")?;
    let pos = need(s, what, "text_model.embeddings.position_embedding.weight")?;
    let layers = count_indexed(s, "text_model.encoder.layers.", ".self_attn.q_proj.weight");
    let mlp = need(s, what, "text_model.encoder.layers.0.mlp.fc1.weight")?[0];
    let heads = config["num_attention_heads"].as_u64().ok_or_else(|| {
        ExportError::Mismatch("text encoder config.json: no num_attention_heads".into())
    })? as usize;
    if heads == 0 || tok[1] % heads != 0 {
        return Err(ExportError::Mismatch(format!(
            "text encoder: {heads} heads do not divide width {}",
            tok[1]
        )));
    }
    let act = config["hidden_act"]
        .as_str()
        .unwrap_or("quick_gelu")
        .to_string();
    if act != "gelu" && act != "quick_gelu" {
        return Err(ExportError::Mismatch(format!(
            "text encoder: unsupported hidden_act '{act}' (gelu, quick_gelu)"
        )));
    }
    Ok(TextConfig {
        width: tok[1],
        layers,
        heads,
        mlp,
        vocab: tok[0],
        max_positions: pos[0],
        act,
        eps: config["layer_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        // The pooled vector is taken at the first EOS; SD 2.1's legacy config says eos 2 and then
        // transformers uses argmax(ids), which is the same position (49407 is the largest id).
        eos_id: 49407,
        bos_id: 49406,
        pad_id: 0,
    })
}

/// Cross-check the three checkpoints and the schedule; produce the model config.
pub fn combine(
    t: &TransformerShape,
    vq: &VqConfig,
    text: &TextConfig,
    scales: usize,
) -> Result<ModelConfig> {
    if t.vocab != vq.vocab {
        return Err(ExportError::Mismatch(format!(
            "transformer vocabulary {} != VQ codebook size {}: this transformer was trained with another VQ tokenizer",
            t.vocab, vq.vocab
        )));
    }
    if t.cvae != vq.cvae {
        return Err(ExportError::Mismatch(format!(
            "transformer latent channels (word_embed input) {} != VQ codebook width {}",
            t.cvae, vq.cvae
        )));
    }
    if t.text_width != text.width {
        return Err(ExportError::Mismatch(format!(
            "text encoder width {} != transformer encoder_proj input {}: wrong text encoder for this transformer",
            text.width, t.text_width
        )));
    }
    if t.scales != scales {
        return Err(ExportError::Mismatch(format!(
            "the schedule has {scales} scales but the transformer's lvl_embed has {} rows: wrong --resolution or --patch-nums",
            t.scales
        )));
    }
    Ok(ModelConfig {
        text: text.clone(),
        vq: vq.clone(),
        ..t.config.clone()
    })
}
