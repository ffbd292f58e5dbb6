//! The STAR transformer stages: text K/V (once per prompt); `step_first` (scale 0: the pooled
//! text as the only token, no past) and `step` (every later scale: token count and past length
//! are dynamic, the scale's RoPE rows and level embedding are selected by the past length); and
//! the stable-sampler step (every sampler scale, selected by its `scale` input). The KV cache is
//! block-major, token-major within a block: per block i, `past_{i}` (P, 2, B2, H, hd) in and
//! `kv_new_{i}` (n, 2, B2, H, hd) out.

use super::builder::{Lin, G};
use super::Src;
use crate::error::Result;
use crate::schedule::rope_table;
use star_artifact::dtype::Dtype;
use star_artifact::manifest::{ModelConfig, Schedule};
use star_artifact::onnx::{dtype, Dim};
use star_artifact::stage::io;
use star_artifact::stage::TEXT_LEN;

pub const LN_EPS: f32 = 1e-6;

fn sym(s: &str) -> Dim {
    Dim::Sym(s.into())
}
fn fx(v: usize) -> Dim {
    Dim::Fixed(v as i64)
}

/// exp(min(scale_mul, ln 100)) per head, shaped (H, 1, 1): the learned attention temperature.
fn head_scale(g: &mut G, src: &Src, heads: usize) -> Result<String> {
    let w = src.w.clone();
    let key = format!("{}^exp", src.key("scale_mul_1H11"));
    w.check("scale_mul_1H11", &[1, heads, 1, 1])?;
    g.weight(&key, &[heads, 1, 1], move || {
        let s = w.get("scale_mul_1H11", &[1, heads, 1, 1])?;
        let cap = 100f64.ln() as f32;
        Ok(s.iter().map(|&v| v.min(cap).exp()).collect())
    })
}

/// Apply the rotary table (cos/sin of shape (n, 32, 1)) to x of shape (R, H, n, 64).
fn apply_rope(g: &mut G, x: &str, cos: &str, sin: &str, hd: usize) -> String {
    // 0 copies a dim (its symbol survives shape inference), -1 would leave it unnamed.
    let x = g.reshape(x, &[0, 0, 0, (hd / 2) as i64, 2]);
    let parts = g.split(&x, -1, 2);
    let (a, b) = (&parts[0], &parts[1]);
    let ac = g.mul(a, cos);
    let bs = g.mul(b, sin);
    let re = g.sub(&ac, &bs);
    let as_ = g.mul(a, sin);
    let bc = g.mul(b, cos);
    let im = g.add(&as_, &bc);
    let y = g.concat(&[&re, &im], -1);
    g.reshape(&y, &[0, 0, 0, hd as i64])
}

struct Rope {
    cos: String,
    sin: String,
}

impl Rope {
    fn annotate(&self, g: &mut G, rows: &Dim) {
        for t in [&self.cos, &self.sin] {
            g.annotate(t, dtype::FLOAT, &[rows.clone(), fx(32), fx(1)]);
        }
    }
}

/// The rotary tables of every scale, stacked in token order: rows [begin, end) are scale k's.
fn rope_all(g: &mut G, sch: &Schedule) -> Rope {
    let tables: Vec<_> = sch.patch_nums.iter().map(|&pn| rope_table(pn)).collect();
    rope_consts(g, &tables)
}

/// Rows [begin, end) of a stacked table: `tokens` rows.
fn rope_rows(g: &mut G, all: &Rope, begin: &str, end: &str, tokens: &Dim) -> Rope {
    let r = Rope {
        cos: g.slice_dyn(&all.cos, 0, begin, end),
        sin: g.slice_dyn(&all.sin, 0, begin, end),
    };
    r.annotate(g, tokens);
    r
}

fn rope_consts(g: &mut G, tables: &[(Vec<f32>, Vec<f32>)]) -> Rope {
    let mut cos = vec![];
    let mut sin = vec![];
    for (c, s) in tables {
        cos.extend_from_slice(c);
        sin.extend_from_slice(s);
    }
    let n = (cos.len() / 32) as i64;
    Rope {
        cos: g.c_f32(&cos, &[n, 32, 1]),
        sin: g.c_f32(&sin, &[n, 32, 1]),
    }
}

/// (R, n, C) -> (R, H, n, hd)
fn heads_first(g: &mut G, x: &str, h: usize, hd: usize) -> String {
    let x = g.reshape(x, &[0, 0, h as i64, hd as i64]);
    g.transpose(&x, &[0, 2, 1, 3])
}

/// (R, H, n, hd) -> (R, n, C)
fn heads_last(g: &mut G, x: &str, c: usize) -> String {
    let x = g.transpose(x, &[0, 2, 1, 3]);
    g.reshape(&x, &[0, 0, c as i64])
}

/// The number of head groups self-attention runs in, one after another: the fewest (a divisor
/// of `heads`, so every group has the same heads) whose FP32 scores for the two guidance rows of
/// `queries` x `keys` fit `budget` bytes. Small models stay at one group (one MatMul over every
/// head); the split changes nothing in the result, each head's attention is independent.
pub fn head_groups(heads: usize, queries: usize, keys: usize, budget: u64) -> usize {
    (1..=heads)
        .filter(|g| heads.is_multiple_of(*g))
        .find(|g| 2 * (heads / g) as u64 * queries as u64 * keys as u64 * 4 <= budget)
        .unwrap_or(heads)
}

/// What a self-attention block does with the KV cache.
#[derive(Clone, Copy)]
enum Kv<'a> {
    /// No cache (the stable sampler's refiner blocks).
    None,
    /// Give this scale's K/V (scale 0 on `step_first`: there is no past).
    Give,
    /// Attend over the block's past (P, 2, B2, H, hd) and this scale's tokens, and give this
    /// scale's K/V.
    Past(&'a str),
}

/// Self-attention of one block. Returns the output before the residual and, unless `Kv::None`,
/// the block's new K/V token-major (n, 2, B2, H, hd): k after RoPE and L2 normalisation (what the
/// cache stores), v raw.
///
/// The past is concatenated with the new K/V before anything else is done with it, so every op
/// on it depends on this block's computation: ONNX Runtime's execution order runs a node as soon
/// as its inputs exist, and a transpose of `past_{i}` alone would run for every block at the
/// start of the step, keeping a transposed copy of the whole past alive (4.9 GB at d30/1024,
/// scale 13; the early transposes are what the demo's profile shows).
fn self_attention(
    g: &mut G,
    a: &Src,
    cfg: &ModelConfig,
    x: &str,
    rope: &Rope,
    kv: Kv<'_>,
    groups: usize,
) -> Result<(String, Option<String>)> {
    let (c, h, hd) = (cfg.width, cfg.heads, cfg.head_dim);
    let qkv = a.linear_as(g, x, "mat_qkv", c, 3 * c, false, Lin::Block)?;
    let bias_key = format!("{}^qkv_bias", a.key("q_bias"));
    let w = a.w.clone();
    w.check("q_bias", &[c])?;
    w.check("v_bias", &[c])?;
    let bias = g.weight(&bias_key, &[3 * c], move || {
        let mut b = w.get("q_bias", &[c])?;
        b.extend(std::iter::repeat_n(0.0, c));
        b.extend(w.get("v_bias", &[c])?);
        Ok(b)
    })?;
    let qkv = g.add(&qkv, &bias);
    let parts = g.split(&qkv, -1, 3);
    let q = heads_first(g, &parts[0], h, hd);
    let k = heads_first(g, &parts[1], h, hd);
    let v = heads_first(g, &parts[2], h, hd);
    let q = apply_rope(g, &q, &rope.cos, &rope.sin, hd);
    let k = apply_rope(g, &k, &rope.cos, &rope.sin, hd);
    let q = g.l2_normalize(&q);
    let k = g.l2_normalize(&k);
    let s = head_scale(g, a, h)?;
    let q = g.mul(&q, &s);
    // (2, B2, H, n, hd) -> (n, 2, B2, H, hd): the block's range of the cache, in the cache's
    // element type (float16 at FP16 and INT8: written as computed, no cast per step later).
    let kv_t = g.kv_dtype();
    let new_kv = match kv {
        Kv::None => None,
        Kv::Give | Kv::Past(_) => {
            let k1 = g.unsqueeze(&k, &[0]);
            let v1 = g.unsqueeze(&v, &[0]);
            let both = g.concat(&[&k1, &v1], 0);
            let both = g.transpose(&both, &[3, 0, 1, 2, 4]);
            Some(match kv_t {
                Dtype::Float32 => both,
                _ => g.cast(&both, kv_t.onnx()),
            })
        }
    };
    // The attention's K/V: the cache's (past and this scale's) or, without a past, this scale's
    // own in FP32.
    let (k_all, v_all, kv_f16) = match (kv, &new_kv) {
        (Kv::Past(past), Some(new)) => {
            // (past + tokens, 2, B2, H, hd) -> (2, B2, H, keys, hd); "keys" = past + tokens,
            // one symbol for every block.
            let all = g.concat(&[past, new], 0);
            g.annotate(
                &all,
                kv_t.onnx(),
                &[sym("keys"), fx(2), sym("B2"), fx(h), fx(hd)],
            );
            let all = g.transpose(&all, &[1, 2, 3, 0, 4]);
            let kv = g.split(&all, 0, 2);
            let ka = g.squeeze(&kv[0], &[0]);
            let va = g.squeeze(&kv[1], &[0]);
            for t in [&ka, &va] {
                g.annotate(t, kv_t.onnx(), &[sym("B2"), fx(h), sym("keys"), fx(hd)]);
            }
            (ka, va, kv_t == Dtype::Float16)
        }
        _ => (k.clone(), v.clone(), false),
    };
    let kt = g.transpose(&k_all, &[0, 1, 3, 2]);
    let o = if groups <= 1 {
        let att = g.matmul_kv(&q, &kt, kv_f16);
        let att = g.softmax(&att, -1);
        g.matmul_kv(&att, &v_all, kv_f16)
    } else {
        // One group of heads at a time: only one group's scores are alive at once (ONNX
        // Runtime runs each group's chain through before the next; its profile shows it).
        let qs = g.split(&q, 1, groups);
        let ks = g.split(&kt, 1, groups);
        let vs = g.split(&v_all, 1, groups);
        let mut outs = vec![];
        for i in 0..groups {
            let att = g.matmul_kv(&qs[i], &ks[i], kv_f16);
            let att = g.softmax(&att, -1);
            outs.push(g.matmul_kv(&att, &vs[i], kv_f16));
        }
        let refs: Vec<&str> = outs.iter().map(|s| s.as_str()).collect();
        g.concat(&refs, 1)
    };
    let o = heads_last(g, &o, c);
    let o = a.linear_as(g, &o, "proj", c, c, true, Lin::Block)?;
    Ok((o, new_kv))
}

/// Cross-attention of one block for the conditional rows only (the release adds row 0's
/// cross-attention to both guidance rows; per image that is its conditional row).
#[allow(clippy::too_many_arguments)]
fn cross_attention(
    g: &mut G,
    a: &Src,
    cfg: &ModelConfig,
    x_cond: &str,
    tk: &str,
    tv: &str,
    bias: &str,
) -> Result<String> {
    let (c, h, hd) = (cfg.width, cfg.heads, cfg.head_dim);
    let q = a.linear_as(g, x_cond, "mat_q", c, c, false, Lin::Block)?;
    let qb = a.raw(g, "q_bias", &[c])?;
    let q = g.add(&q, &qb);
    let q = heads_first(g, &q, h, hd);
    let q = g.l2_normalize(&q);
    let s = head_scale(g, a, h)?;
    let q = g.mul(&q, &s);
    let kt = g.transpose(tk, &[0, 1, 3, 2]);
    let att = g.matmul_act(&q, &kt);
    // The mask bias (-1e9) is added in FP32 in every precision: it would be -inf in FP16.
    let att = g.add(&att, bias);
    let att = g.softmax(&att, -1);
    let o = g.matmul_act(&att, tv);
    let o = heads_last(g, &o, c);
    a.linear_as(g, &o, "proj", c, c, true, Lin::Block)
}

fn ffn(g: &mut G, f: &Src, c: usize, x: &str) -> Result<String> {
    let hdn = f.linear_as(g, x, "fc1", c, 4 * c, true, Lin::Block)?;
    let hdn = g.gelu_tanh(&hdn);
    f.linear_as(g, &hdn, "fc2", 4 * c, c, true, Lin::Block)
}

/// Text K/V for every block's cross-attention, from the conditional rows' hidden states; K is L2
/// normalised here once per prompt. Also the additive mask bias.
pub fn text_kv(g: &mut G, t: &Src, cfg: &ModelConfig, sch: &Schedule) -> Result<()> {
    let (c, h, hd, dt) = (cfg.width, cfg.heads, cfg.head_dim, cfg.text_width);
    let hidden = g.input(
        io::HIDDEN,
        Dtype::Float32,
        &[sym("B"), fx(TEXT_LEN), fx(dt)],
    );
    let mask = g.input(io::ATTENTION_MASK, Dtype::Int64, &[sym("B"), fx(TEXT_LEN)]);
    let pooled = g.input(io::POOLED, Dtype::Float32, &[sym("B2"), fx(dt)]);
    // Scale 0's only token: the pooled text projected, plus pos_start and level 0.
    let sn = sch.patch_nums.len();
    let lvl_all = t.raw(g, "lvl_embed.weight", &[sn, c])?;
    let zero = g.c_i64(&[0], &[1]);
    let lvl = g.op("Gather", &[&lvl_all, &zero], vec![]);
    let sos = t.linear(g, &pooled, "encoder_proj", dt, c, true)?;
    let sos = g.unsqueeze(&sos, &[1]);
    let ps = t.raw(g, "pos_start", &[1, 1, c])?;
    let x0 = g.add(&sos, &ps);
    let x0 = g.add(&x0, &lvl);
    g.output(&x0, io::X, Dtype::Float32, &[sym("B2"), fx(1), fx(c)]);
    let mut per_block = vec![];
    for i in 0..cfg.depth {
        let a = t.pp(&format!("blocks.{i}.cross_attn"));
        let kv = a.linear(g, &hidden, "mat_kv", dt, 2 * c, false)?;
        let w = a.w.clone();
        w.check("v_bias", &[c])?;
        let bias = g.weight(
            &format!("{}^kv_bias", a.key("v_bias")),
            &[2 * c],
            move || {
                let mut b = vec![0.0; c];
                b.extend(w.get("v_bias", &[c])?);
                Ok(b)
            },
        )?;
        let kv = g.add(&kv, &bias);
        let kv = g.reshape(&kv, &[0, TEXT_LEN as i64, 2, h as i64, hd as i64]);
        let kv = g.transpose(&kv, &[2, 0, 3, 1, 4]);
        let parts = g.split(&kv, 0, 2);
        let k = g.l2_normalize(&parts[0]);
        let both = g.concat(&[&k, &parts[1]], 0);
        per_block.push(g.unsqueeze(&both, &[0]));
    }
    let refs: Vec<&str> = per_block.iter().map(|s| s.as_str()).collect();
    let all = g.concat(&refs, 0);
    g.output(
        &all,
        "text_kv",
        Dtype::Float32,
        &[fx(cfg.depth), fx(2), sym("B"), fx(h), fx(TEXT_LEN), fx(hd)],
    );
    let m = g.cast(&mask, dtype::FLOAT);
    let one = g.scalar(1.0);
    let inv = g.sub(&one, &m);
    let big = g.scalar(-1e9);
    let b = g.mul(&inv, &big);
    let b = g.unsqueeze(&b, &[1, 2]);
    g.output(
        &b,
        "text_bias",
        Dtype::Float32,
        &[sym("B"), fx(1), fx(1), fx(TEXT_LEN)],
    );
    Ok(())
}

/// The blocks and heads shared by `step_first` and `step`: x (B2, n, C) through every block
/// (self-attention over [past ; this scale], cross-attention, FFN), then the outputs: each
/// block's K/V `kv_new_{i}` (n, 2, B2, H, hd), the last block's hidden states (the stable
/// sampler's prior) and the main head's logits.
///
/// The cache is block-major and token-major within a block, so block i's past is one prefix of
/// its region (`past_{i}`, bound as a view) and its new K/V one contiguous range (`kv_new_{i}`,
/// written in place). Each block's K/V leaves the graph as soon as it is made: no concatenation
/// keeps every block's K/V of the scale alive at once (3.8 GB at d30/1024, scale 13), and no
/// transposed copy of the whole past is made.
#[allow(clippy::too_many_arguments)]
fn blocks_and_heads(
    g: &mut G,
    t: &Src,
    cfg: &ModelConfig,
    mut x: String,
    rope: &Rope,
    past: Option<&[String]>,
    tokens: Dim,
    groups: usize,
) -> Result<()> {
    let (c, h, hd, v) = (cfg.width, cfg.heads, cfg.head_dim, cfg.vocab);
    let text_kv = g.input(
        io::TEXT_KV,
        Dtype::Float32,
        &[fx(cfg.depth), fx(2), sym("B"), fx(h), fx(TEXT_LEN), fx(hd)],
    );
    let text_bias = g.input(
        io::TEXT_BIAS,
        Dtype::Float32,
        &[sym("B"), fx(1), fx(1), fx(TEXT_LEN)],
    );
    for i in 0..cfg.depth {
        let b = t.pp(&format!("blocks.{i}"));
        let xn = g.layer_norm_plain(&x, c, LN_EPS);
        let mode = match past {
            Some(p) => Kv::Past(&p[i]),
            None => Kv::Give,
        };
        let (o, kv) = self_attention(g, &b.pp("attn"), cfg, &xn, rope, mode, groups)?;
        let kv = kv.expect("a step block gives its K/V");
        x = g.add(&x, &o);
        let kv_t = g.kv_dtype();
        g.output_in_place(
            &kv,
            &io::kv_new(i),
            kv_t,
            &[tokens.clone(), fx(2), sym("B2"), fx(h), fx(hd)],
        );

        let xn = g.layer_norm_plain(&x, c, LN_EPS);
        let rows = g.split(&xn, 0, 2);
        for r in &rows {
            g.annotate(r, dtype::FLOAT, &[sym("B"), tokens.clone(), fx(c)]);
        }
        let tkv = g.pick(&text_kv, 0, i as i64);
        let tk = g.pick(&tkv, 0, 0);
        let tv = g.pick(&tkv, 0, 1);
        let xa = cross_attention(g, &b.pp("cross_attn"), cfg, &rows[0], &tk, &tv, &text_bias)?;
        let xa = g.concat(&[&xa, &xa], 0);
        g.annotate(&xa, dtype::FLOAT, &[sym("B2"), tokens.clone(), fx(c)]);
        x = g.add(&x, &xa);

        let xn = g.layer_norm_plain(&x, c, LN_EPS);
        let f = ffn(g, &b.pp("ffn"), c, &xn)?;
        x = g.add(&x, &f);
    }
    g.output(
        &x,
        io::HIDDEN,
        Dtype::Float32,
        &[sym("B2"), tokens.clone(), fx(c)],
    );
    let xn = g.layer_norm_plain(&x, c, LN_EPS);
    let logits = t.linear_as(g, &xn, "head_logits", c, v, true, Lin::Head)?;
    g.output(
        &logits,
        io::LOGITS,
        Dtype::Float32,
        &[sym("B2"), tokens, fx(v)],
    );
    Ok(())
}

/// Scale 0 without a past: x (B2, 1, C) from text_kv. For backends that cannot take an empty
/// past (TensorRT profiles); the others run scale 0 through `step` with past length 0.
pub fn step_first(g: &mut G, t: &Src, cfg: &ModelConfig, sch: &Schedule) -> Result<()> {
    let x = g.input(io::X, Dtype::Float32, &[sym("B2"), fx(1), fx(cfg.width)]);
    let rope = rope_consts(g, &[rope_table(sch.patch_nums[0])]);
    blocks_and_heads(g, t, cfg, x, &rope, None, fx(1), 1)
}

/// Any scale: x (B2, n, C), the embedded tokens (text_kv makes scale 0's, vq every later
/// one's), and each block's past `past_{i}` (P, 2, B2, H, hd), P = the scale's first token (0 at
/// scale 0).
/// The scale's RoPE rows are rows [P, P+n) of the stacked tables.
pub fn step(g: &mut G, t: &Src, cfg: &ModelConfig, sch: &Schedule) -> Result<()> {
    let (h, hd) = (cfg.heads, cfg.head_dim);
    let x = g.input(
        io::X,
        Dtype::Float32,
        &[sym("B2"), sym("tokens"), fx(cfg.width)],
    );
    let past: Vec<String> = (0..cfg.depth)
        .map(|i| {
            g.input(
                &io::past(i),
                g.kv_dtype(),
                &[sym("past"), fx(2), sym("B2"), fx(h), fx(hd)],
            )
        })
        .collect();
    let begin = g.dim(&past[0], 0);
    let n = g.dim(&x, 1);
    let end = g.add(&begin, &n);
    let all = rope_all(g, sch);
    let rope = rope_rows(g, &all, &begin, &end, &sym("tokens"));
    // The largest scale attends with its own tokens over every token of the generation.
    let last = sch.patch_nums[sch.patch_nums.len() - 1];
    let groups = head_groups(h, last * last, sch.total_tokens, g.attention_budget);
    blocks_and_heads(g, t, cfg, x, &rope, Some(&past), sym("tokens"), groups)
}

/// The stable sampler of any sampler scale (its `scale` input, shape (1,)): refiner blocks over
/// [prefix ; revealed tokens] fused with the main transformer's hidden states. `idx` and `mask`
/// pick the revealed codebook vectors.
pub fn sampler_step(g: &mut G, t: &Src, vq: &Src, cfg: &ModelConfig, sch: &Schedule) -> Result<()> {
    let (c, v, cv) = (cfg.width, cfg.vocab, cfg.cvae);
    let sn = sch.patch_nums.len();
    let tok = || sym("tokens");
    let hidden = g.input(io::HIDDEN, Dtype::Float32, &[sym("B2"), tok(), fx(c)]);
    let pooled = g.input(io::POOLED, Dtype::Float32, &[sym("B2"), fx(cfg.text_width)]);
    let idx = g.input(io::IDX, Dtype::Int64, &[sym("B"), tok()]);
    let mask = g.input(io::MASK, Dtype::Float32, &[sym("B"), tok()]);
    let scale = g.input(io::SCALE, Dtype::Int64, &[fx(1)]);

    let p = t.linear(g, &pooled, "encoder_proj2", cfg.text_width, c, true)?;
    let p = g.unsqueeze(&p, &[1]);
    let psl = t.raw(g, "pos_start_last", &[1, 1, c])?;
    let p = g.add(&p, &psl);

    let codebook = vq.raw(g, "quantize.embedding.weight", &[v, cv])?;
    let h = g.op("Gather", &[&codebook, &idx], vec![]);
    let m = g.unsqueeze(&mask, &[-1]);
    let h = g.mul(&h, &m);
    let e = t.linear(g, &h, "word_embed_head", cv, c, true)?;
    let lvl_all = t.raw(g, "lvl_embed_2.weight", &[sn, c])?;
    let lvl = g.op("Gather", &[&lvl_all, &scale], vec![]);
    let e = g.add(&e, &lvl);
    let e = g.concat(&[&e, &e], 0);
    g.annotate(&e, dtype::FLOAT, &[sym("B2"), tok(), fx(c)]);
    // The prefix token and the scale's: "seq" = 1 + tokens.
    let seq = sym("seq");
    let feature = g.concat(&[&p, &e], 1);
    let prior = g.concat(&[&p, &hidden], 1);
    for t in [&feature, &prior] {
        g.annotate(t, dtype::FLOAT, &[sym("B2"), seq.clone(), fx(c)]);
    }
    let cat = g.concat(&[&feature, &prior], -1);
    let mut x = t.linear(g, &cat, "head_proj", 2 * c, c, true)?;

    // The prefix token has angle 0 (cos 1, sin 0), then this scale's rows of the stacked tables.
    let begins: Vec<i64> = sch.begin_end.iter().map(|(b, _)| *b as i64).collect();
    let begin = g.lookup(&begins, &scale);
    let n = g.dim(&idx, 1);
    let end = g.add(&begin, &n);
    let all = rope_all(g, sch);
    let rows = rope_rows(g, &all, &begin, &end, &tok());
    let one = g.c_f32(&[1.0f32; 32], &[1, 32, 1]);
    let zero = g.c_f32(&[0.0f32; 32], &[1, 32, 1]);
    let rope = Rope {
        cos: g.concat(&[&one, &rows.cos], 0),
        sin: g.concat(&[&zero, &rows.sin], 0),
    };
    rope.annotate(g, &seq);
    // The refiner attends over the prefix token and the scale's tokens.
    let most = (0..sn)
        .filter(|&i| sch.substeps.get(i).is_some_and(|v| !v.is_empty()))
        .map(|i| sch.patch_nums[i] * sch.patch_nums[i] + 1)
        .max()
        .unwrap_or(1);
    let groups = head_groups(cfg.heads, most, most, g.attention_budget);
    for j in 0..cfg.sampler_blocks {
        let b = t.pp(&format!("feat_extract_blocks.{j}"));
        let xn = g.layer_norm_plain(&x, c, LN_EPS);
        let (o, _) = self_attention(g, &b.pp("attn"), cfg, &xn, &rope, Kv::None, groups)?;
        x = g.add(&x, &o);
        let xn = g.layer_norm_plain(&x, c, LN_EPS);
        let f = ffn(g, &b.pp("ffn"), c, &xn)?;
        x = g.add(&x, &f);
    }
    let xn = g.layer_norm_plain(&x, c, LN_EPS);
    let logits = t.linear_as(g, &xn, "head_logits2", c, v, true, Lin::Head)?;
    let logits = g.slice(&logits, 1, 1, i64::MAX);
    g.annotate(&logits, dtype::FLOAT, &[sym("B2"), tok(), fx(v)]);
    g.output(
        &logits,
        io::LOGITS,
        Dtype::Float32,
        &[sym("B2"), tok(), fx(v)],
    );
    Ok(())
}
