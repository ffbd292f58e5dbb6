//! The CLIP text tower (Hugging Face CLIPTextModel layout): causal self-attention with padded keys
//! masked, final LayerNorm; pooled = hidden state at the first EOS.

use super::builder::G;
use super::Src;
use crate::error::Result;
use star_artifact::dtype::Dtype;
use star_artifact::manifest::TextConfig;
use star_artifact::onnx::{dtype, AttributeProto, Dim};

pub fn text_encoder(g: &mut G, t: &Src, tc: &TextConfig) -> Result<()> {
    let (d, h, l) = (tc.width, tc.heads, tc.max_positions);
    let hd = d / h;
    let n = Dim::Sym("N".into());
    let ids = g.input(
        "input_ids",
        Dtype::Int64,
        &[n.clone(), Dim::Fixed(l as i64)],
    );
    let mask = g.input(
        "attention_mask",
        Dtype::Int64,
        &[n.clone(), Dim::Fixed(l as i64)],
    );
    let pos = t.raw(g, "embeddings.position_embedding.weight", &[l, d])?;
    // The token table is only gathered from: an fp16 source stays fp16 (half the bytes) and the
    // gathered rows are cast to f32, which is exact.
    let tok_name = "embeddings.token_embedding.weight";
    t.w.check(tok_name, &[tc.vocab, d])?;
    let x = match t.w.ckpt.read_f16_bits(&t.w.key(tok_name))? {
        Some(bits) => {
            let tok = g.weight_f16(&t.key(tok_name), &[tc.vocab, d], || Ok(bits))?;
            let x = g.op("Gather", &[&tok, &ids], vec![]);
            g.cast(&x, dtype::FLOAT)
        }
        None => {
            let tok = t.raw(g, tok_name, &[tc.vocab, d])?;
            g.op("Gather", &[&tok, &ids], vec![])
        }
    };
    let mut x = g.add(&x, &pos);

    // Additive bias: causal (constant) + padded keys (from the mask). Large finite negatives give
    // exactly zero weights after softmax, like the reference's finfo.min.
    let mut causal = vec![0f32; l * l];
    for i in 0..l {
        for j in i + 1..l {
            causal[i * l + j] = -1e9;
        }
    }
    let causal = g.c_f32(&causal, &[1, 1, l as i64, l as i64]);
    let m = g.cast(&mask, dtype::FLOAT);
    let one = g.scalar(1.0);
    let inv = g.sub(&one, &m);
    let big = g.scalar(-1e9);
    let pad = g.mul(&inv, &big);
    let pad = g.unsqueeze(&pad, &[1, 2]);
    let bias = g.add(&causal, &pad);
    let scale = g.scalar((hd as f32).powf(-0.5));

    for i in 0..tc.layers {
        let lyr = t.pp(&format!("encoder.layers.{i}"));
        let ln1w = lyr.raw(g, "layer_norm1.weight", &[d])?;
        let ln1b = lyr.raw(g, "layer_norm1.bias", &[d])?;
        let hs = g.layer_norm(&x, &ln1w, &ln1b, tc.eps);
        let a = lyr.pp("self_attn");
        let mut qkv = vec![];
        for nm in ["q_proj", "k_proj", "v_proj"] {
            let y = a.linear(g, &hs, nm, d, d, true)?;
            let y = g.reshape(&y, &[0, l as i64, h as i64, hd as i64]);
            qkv.push(g.transpose(&y, &[0, 2, 1, 3]));
        }
        let kt = g.transpose(&qkv[1], &[0, 1, 3, 2]);
        let s = g.matmul(&qkv[0], &kt);
        let s = g.mul(&s, &scale);
        let s = g.add(&s, &bias);
        let p = g.softmax(&s, -1);
        let o = g.matmul(&p, &qkv[2]);
        let o = g.transpose(&o, &[0, 2, 1, 3]);
        let o = g.reshape(&o, &[0, l as i64, d as i64]);
        let o = a.linear(g, &o, "out_proj", d, d, true)?;
        x = g.add(&x, &o);

        let ln2w = lyr.raw(g, "layer_norm2.weight", &[d])?;
        let ln2b = lyr.raw(g, "layer_norm2.bias", &[d])?;
        let hs = g.layer_norm(&x, &ln2w, &ln2b, tc.eps);
        let f = lyr.linear(g, &hs, "mlp.fc1", d, tc.mlp, true)?;
        let f = if tc.act == "quick_gelu" {
            g.quick_gelu(&f)
        } else {
            g.gelu_erf(&f)
        };
        let f = lyr.linear(g, &f, "mlp.fc2", tc.mlp, d, true)?;
        x = g.add(&x, &f);
    }
    let fw = t.raw(g, "final_layer_norm.weight", &[d])?;
    let fb = t.raw(g, "final_layer_norm.bias", &[d])?;
    let hidden = g.layer_norm(&x, &fw, &fb, tc.eps);
    g.output(
        &hidden,
        "hidden",
        Dtype::Float32,
        &[n.clone(), Dim::Fixed(l as i64), Dim::Fixed(d as i64)],
    );

    // One-hot of the first EOS (cumsum of the EOS indicator equals 1 there), then a matmul: exact.
    let eos = g.c_i64(&[tc.eos_id], &[]);
    let is_eos = g.op("Equal", &[&ids, &eos], vec![]);
    let is_eos = g.cast(&is_eos, dtype::FLOAT);
    let ax = g.c_i64(&[1], &[]);
    let cs = g.op("CumSum", &[&is_eos, &ax], vec![]);
    let first = g.op("Equal", &[&cs, &one], vec![]);
    let first = g.cast(&first, dtype::FLOAT);
    let sel = g.mul(&first, &is_eos);
    let sel = g.unsqueeze(&sel, &[1]);
    let pooled = g.matmul(&sel, &hidden);
    let pooled = g.squeeze(&pooled, &[1]);
    let _ = AttributeProto::default();
    g.output(
        &pooled,
        "pooled",
        Dtype::Float32,
        &[n, Dim::Fixed(d as i64)],
    );
    Ok(())
}
