//! `star-export inspect`: what a checkpoint file or folder holds and which model it is.

use crate::checkpoint::Checkpoint;
use crate::config;
use crate::error::Result;
use crate::export::shapes;
use std::collections::BTreeMap;
use std::path::Path;

pub fn inspect(path: &Path, list_keys: bool) -> Result<String> {
    let ckpt = if path.is_dir() && path.join("text_encoder").is_dir() {
        Checkpoint::open(&path.join("text_encoder"), &[])?
    } else {
        Checkpoint::open(path, &["trainer", "var_wo_ddp"])?
    };
    let s = shapes(&ckpt);
    let mut out = String::new();
    let params: usize = ckpt
        .tensors
        .values()
        .map(|(i, _)| i.shape.iter().product::<usize>())
        .sum();
    let mut dtypes: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, _) in ckpt.tensors.values() {
        *dtypes.entry(i.dtype.name()).or_default() += 1;
    }
    out.push_str(&format!(
        "file:     {}\nformat:   {}\ntensors:  {}\nelements: {} ({:.2} M)\ndtypes:   {:?}\n",
        ckpt.path.display(),
        ckpt.format,
        ckpt.tensors.len(),
        params,
        params as f64 / 1e6,
        dtypes
    ));
    if let Ok(t) = config::infer_transformer(&s) {
        out.push_str(&format!(
            "model:    STAR transformer d{} (width {}, {} heads x {}, vocab {}, Cvae {}, text width {}, {} scales){}\n",
            t.depth,
            t.width,
            t.heads,
            t.head_dim,
            t.vocab,
            t.cvae,
            t.text_width,
            t.scales,
            if t.sampler_blocks > 0 { format!(", stable sampler with {} refiner blocks", t.sampler_blocks) } else { String::new() }
        ));
    } else if let Ok(v) = config::infer_vq(&s) {
        out.push_str(&format!("model:    VAR multi-scale VQVAE (vocab {}, Cvae {}, decoder widths {:?}, {} phi convs)\n", v.vocab, v.cvae, v.decoder_widths, v.phi_count));
    } else if s.contains_key("text_model.embeddings.token_embedding.weight") {
        let d = &s["text_model.embeddings.token_embedding.weight"];
        let layers = (0..)
            .take_while(|i| {
                s.contains_key(&format!(
                    "text_model.encoder.layers.{i}.self_attn.q_proj.weight"
                ))
            })
            .count();
        out.push_str(&format!(
            "model:    CLIP text encoder (width {}, {} layers, vocab {})\n",
            d[1], layers, d[0]
        ));
    } else {
        out.push_str("model:    not recognised (no STAR, VQVAE or CLIP text-encoder keys)\n");
    }
    if list_keys {
        for (k, (i, _)) in &ckpt.tensors {
            out.push_str(&format!("  {k:<60} {:<9} {:?}\n", i.dtype.name(), i.shape));
        }
    }
    Ok(out)
}
