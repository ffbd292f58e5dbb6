//! VQ stages: the per-scale transition (codebook lookup, bicubic up as a constant matrix pair, phi,
//! f_hat update, area down to the next side) and the decoder.

use super::builder::G;
use super::Src;
use crate::error::Result;
use crate::schedule::{area_matrix, bicubic_matrix};
use star_artifact::dtype::Dtype;
use star_artifact::manifest::{ModelConfig, Schedule};
use star_artifact::onnx::{dtype, Dim};
use star_artifact::stage::io;

fn sym(s: &str) -> Dim {
    Dim::Sym(s.into())
}
fn fx(v: usize) -> Dim {
    Dim::Fixed(v as i64)
}

/// Per-scale resampling matrices stacked side by side, (out, Σ inp), with each block's column
/// offset; and the transposed stack (Σ inp, out). Block k is `mats[k]` (out x inp_k).
fn stack_cols(mats: &[(Vec<f32>, usize)], out: usize) -> (Vec<f32>, Vec<f32>, Vec<i64>, usize) {
    let total: usize = mats.iter().map(|(_, i)| i).sum();
    let mut m = vec![0f32; out * total];
    let mut mt = vec![0f32; total * out];
    let mut offs = vec![];
    let mut off = 0;
    for (blk, inp) in mats {
        offs.push(off as i64);
        for o in 0..out {
            for i in 0..*inp {
                m[o * total + off + i] = blk[o * inp + i];
            }
        }
        let t = crate::graph::transpose2(blk, out, *inp);
        mt[off * out..(off + inp) * out].copy_from_slice(&t);
        off += inp;
    }
    (m, mt, offs, total)
}

/// A x Aᵀ per channel with the scale's block A of per-scale matrices: each block is P x k_s
/// (`len` = k_s at run time, named `side` in the graph's shapes); A is the block itself, or its
/// transpose with `transpose`.
#[allow(clippy::too_many_arguments)]
fn sandwich(
    g: &mut G,
    x: &str,
    blocks: &[(Vec<f32>, usize)],
    p: usize,
    scale: &str,
    len: &str,
    side: &str,
    transpose: bool,
) -> String {
    let (m, mt, offs, total) = stack_cols(blocks, p);
    let m = g.c_f32(&m, &[p as i64, total as i64]);
    let mt = g.c_f32(&mt, &[total as i64, p as i64]);
    let off = g.lookup(&offs, scale);
    let end = g.add(&off, len);
    let b = g.slice_dyn(&m, 1, &off, &end);
    let bt = g.slice_dyn(&mt, 0, &off, &end);
    // `len` rows or columns (see `G::annotate`).
    g.annotate(&b, dtype::FLOAT, &[fx(p), sym(side)]);
    g.annotate(&bt, dtype::FLOAT, &[sym(side), fx(p)]);
    let (a, at) = if transpose { (bt, b) } else { (b, bt) };
    let y = g.matmul(&a, x);
    g.matmul(&y, &at)
}

fn identity(n: usize) -> Vec<f32> {
    let mut m = vec![0f32; n * n];
    for i in 0..n {
        m[i * n + i] = 1.0;
    }
    m
}

/// The VQ transition of any scale (its `scale` input, shape (1,)): codebook lookup, bicubic up
/// to the full side P (constant matrix pair M h Mᵀ; identity at the last scale, where the release
/// does not interpolate), phi, the f_hat update, and area down to the next scale's side. Every
/// phi conv is computed as one stacked conv and the scale's phi picked from it: tiny next to the
/// transformer, and constant weights for TensorRT. At the last scale `next_in` is the full map
/// (identity down), which the runtime ignores.
pub fn vq_step(g: &mut G, vq: &Src, t: &Src, cfg: &ModelConfig, sch: &Schedule) -> Result<()> {
    let (v, cv) = (cfg.vocab, cfg.cvae);
    let sn = sch.patch_nums.len();
    let p = sch.patch_nums[sn - 1];
    let k = cfg.vq.phi_count;
    let idx = g.input(io::IDX, Dtype::Int64, &[sym("B"), sym("tokens")]);
    let f_hat = g.input(io::F_HAT, Dtype::Float32, &[sym("B"), fx(cv), fx(p), fx(p)]);
    let scale = g.input(io::SCALE, Dtype::Int64, &[fx(1)]);
    let pns: Vec<i64> = sch.patch_nums.iter().map(|&x| x as i64).collect();
    let pn = g.lookup(&pns, &scale);

    let codebook = vq.raw(g, "quantize.embedding.weight", &[v, cv])?;
    let h = g.op("Gather", &[&codebook, &idx], vec![]);
    let h = g.transpose(&h, &[0, 2, 1]);
    let head = g.c_i64(&[0, cv as i64], &[2]);
    let h = g.reshape_dyn(&h, &[&head, &pn, &pn]);
    g.annotate(
        &h,
        dtype::FLOAT,
        &[sym("B"), fx(cv), sym("side"), sym("side")],
    );

    let ups: Vec<(Vec<f32>, usize)> = sch
        .patch_nums
        .iter()
        .enumerate()
        .map(|(si, &q)| {
            if si == sn - 1 {
                (identity(p), p)
            } else {
                (bicubic_matrix(q, p), q)
            }
        })
        .collect();
    let h = sandwich(g, &h, &ups, p, &scale, &pn, "side", false);

    // Every phi as one conv (K*Cvae outputs), then the scale's block.
    let key = "vq/quantize.quant_resi.qresi_ls.stacked";
    let mut ws = vec![];
    let mut bs = vec![];
    for j in 0..k {
        let phi = vq.w.pp(&format!("quantize.quant_resi.qresi_ls.{j}"));
        phi.check("weight", &[cv, cv, 3, 3])?;
        phi.check("bias", &[cv])?;
        ws.push(phi.clone());
        bs.push(phi);
    }
    let w = g.weight(&format!("{key}.weight"), &[k * cv, cv, 3, 3], || {
        let mut all = vec![];
        for phi in &ws {
            all.extend(phi.get("weight", &[cv, cv, 3, 3])?);
        }
        Ok(all)
    })?;
    let b = g.weight(&format!("{key}.bias"), &[k * cv], || {
        let mut all = vec![];
        for phi in &bs {
            all.extend(phi.get("bias", &[cv])?);
        }
        Ok(all)
    })?;
    let conv = g.conv(&h, &w, &b, 3);
    let conv = g.reshape(&conv, &[0, k as i64, cv as i64, p as i64, p as i64]);
    let phis: Vec<i64> = sch.phi_index.iter().map(|&x| x as i64).collect();
    let which = g.lookup(&phis, &scale);
    let conv = g.op(
        "Gather",
        &[&conv, &which],
        vec![star_artifact::onnx::AttributeProto::int("axis", 1)],
    );
    let conv = g.reshape(&conv, &[0, cv as i64, p as i64, p as i64]);
    let half = g.scalar(0.5);
    let a = g.mul(&h, &half);
    let c = g.mul(&conv, &half);
    let phi_out = g.add(&a, &c);
    let f = g.add(&f_hat, &phi_out);
    g.output(
        &f,
        io::F_HAT_OUT,
        Dtype::Float32,
        &[sym("B"), fx(cv), fx(p), fx(p)],
    );

    // Area down to the next side: (next, P) blocks stacked as rows, with the transposed stack.
    let downs: Vec<(Vec<f32>, usize)> = (0..sn)
        .map(|si| {
            if si + 1 < sn {
                let q = sch.patch_nums[si + 1];
                (crate::graph::transpose2(&area_matrix(p, q), q, p), q)
            } else {
                (identity(p), p)
            }
        })
        .collect();
    let nexts: Vec<i64> = (0..sn)
        .map(|si| sch.patch_nums.get(si + 1).copied().unwrap_or(p) as i64)
        .collect();
    let pn2 = g.lookup(&nexts, &scale);
    // The blocks are the transposed area matrices (P x next): A = blockᵀ.
    let y = sandwich(g, &f, &downs, p, &scale, &pn2, "next_side", true);
    let n2 = g.mul(&pn2, &pn2);
    let y = g.reshape_dyn(&y, &[&head, &n2]);
    g.annotate(&y, dtype::FLOAT, &[sym("B"), fx(cv), sym("next_tokens")]);
    let y = g.transpose(&y, &[0, 2, 1]);
    g.output(
        &y,
        io::NEXT_IN,
        Dtype::Float32,
        &[sym("B"), sym("next_tokens"), fx(cv)],
    );
    // The next scale's embedded tokens for the step: word_embed(next_in) + its level embedding,
    // for both guidance rows (at the last scale: level sn-1, unused).
    let c = cfg.width;
    let nexts: Vec<i64> = (0..sn).map(|si| (si + 1).min(sn - 1) as i64).collect();
    let lvl_i = g.lookup(&nexts, &scale);
    let lvl_all = t.raw(g, "lvl_embed.weight", &[sn, c])?;
    let lvl = g.op("Gather", &[&lvl_all, &lvl_i], vec![]);
    let e = t.linear(g, &y, "word_embed", cv, c, true)?;
    let e = g.add(&e, &lvl);
    let x = g.concat(&[&e, &e], 0);
    g.annotate(&x, dtype::FLOAT, &[sym("B2"), sym("next_tokens"), fx(c)]);
    g.output(
        &x,
        io::X,
        Dtype::Float32,
        &[sym("B2"), sym("next_tokens"), fx(c)],
    );
    Ok(())
}

const GN_GROUPS: usize = 32;
const GN_EPS: f32 = 1e-6;

struct Dec<'a, 'g, 's> {
    g: &'g mut G<'s>,
    w: &'a Src<'a>,
}

impl Dec<'_, '_, '_> {
    fn norm(&mut self, x: &str, name: &str, c: usize, side: usize) -> Result<String> {
        let gamma = self.w.pp(name).raw(self.g, "weight", &[c])?;
        let beta = self.w.pp(name).raw(self.g, "bias", &[c])?;
        // (C,) -> (C,1,1) for broadcasting over (B,C,H,W)
        let gamma = self.g.reshape(&gamma, &[c as i64, 1, 1]);
        let beta = self.g.reshape(&beta, &[c as i64, 1, 1]);
        Ok(self
            .g
            .group_norm(x, c, side * side, GN_GROUPS, &gamma, &beta, GN_EPS))
    }
    fn conv(&mut self, x: &str, name: &str, cin: usize, cout: usize, k: usize) -> Result<String> {
        let w = self.w.pp(name).raw(self.g, "weight", &[cout, cin, k, k])?;
        let b = self.w.pp(name).raw(self.g, "bias", &[cout])?;
        Ok(self.g.conv(x, &w, &b, k))
    }
    fn silu(&mut self, x: &str) -> String {
        let s = self.g.op("Sigmoid", &[x], vec![]);
        self.g.mul(x, &s)
    }
    fn resnet(
        &mut self,
        x: &str,
        name: &str,
        cin: usize,
        cout: usize,
        side: usize,
    ) -> Result<String> {
        let h = self.norm(x, &format!("{name}.norm1"), cin, side)?;
        let h = self.silu(&h);
        let h = self.conv(&h, &format!("{name}.conv1"), cin, cout, 3)?;
        let h = self.norm(&h, &format!("{name}.norm2"), cout, side)?;
        let h = self.silu(&h);
        let h = self.conv(&h, &format!("{name}.conv2"), cout, cout, 3)?;
        let skip = if cin != cout {
            self.conv(x, &format!("{name}.nin_shortcut"), cin, cout, 1)?
        } else {
            x.to_string()
        };
        Ok(self.g.add(&skip, &h))
    }
    fn attn(&mut self, x: &str, name: &str, c: usize, side: usize) -> Result<String> {
        let hw = (side * side) as i64;
        let h = self.norm(x, &format!("{name}.norm"), c, side)?;
        let qkv = self.conv(&h, &format!("{name}.qkv"), c, 3 * c, 1)?;
        let qkv = self.g.reshape(&qkv, &[0, 3, c as i64, hw]);
        let q = self.g.pick(&qkv, 1, 0);
        let k = self.g.pick(&qkv, 1, 1);
        let v = self.g.pick(&qkv, 1, 2);
        let qt = self.g.transpose(&q, &[0, 2, 1]);
        let wgt = self.g.matmul(&qt, &k);
        let r = self.g.scalar((c as f64).powf(-0.5) as f32);
        let wgt = self.g.mul(&wgt, &r);
        let wgt = self.g.softmax(&wgt, 2);
        let wt = self.g.transpose(&wgt, &[0, 2, 1]);
        let o = self.g.matmul(&v, &wt);
        let o = self.g.reshape(&o, &[0, c as i64, side as i64, side as i64]);
        let o = self.conv(&o, &format!("{name}.proj_out"), c, c, 1)?;
        Ok(self.g.add(x, &o))
    }
}

/// VAR's VQVAE decoder: post_quant_conv, conv_in, mid (Res, Attn, Res), levels from the lowest
/// resolution (Res blocks, Attn at the lowest, nearest x2 + conv between), GN, SiLU, conv_out;
/// outputs the raw decoder output and the image (clamp to [-1, 1], then (x + 1) / 2).
pub fn decoder(g: &mut G, vq: &Src, cfg: &ModelConfig, sch: &Schedule) -> Result<()> {
    let cv = cfg.cvae;
    let p = *sch.patch_nums.last().unwrap();
    let f_hat = g.input("f_hat", Dtype::Float32, &[sym("B"), fx(cv), fx(p), fx(p)]);
    let w = vq.clone();
    let levels = cfg.vq.decoder_widths.len();
    let mut d = Dec { g, w: &w };
    let x = d.conv(&f_hat, "post_quant_conv", cv, cv, 3)?;
    let top = cfg.vq.decoder_widths[0];
    let dw = vq.pp("decoder");
    let mut d = Dec { g: d.g, w: &dw };
    let mut h = d.conv(&x, "conv_in", cv, top, 3)?;
    let mut side = p;
    h = d.resnet(&h, "mid.block_1", top, top, side)?;
    if dw.w.contains("mid.attn_1.qkv.weight") {
        h = d.attn(&h, "mid.attn_1", top, side)?;
    }
    h = d.resnet(&h, "mid.block_2", top, top, side)?;
    let mut cin = top;
    for (li, &cout) in cfg.vq.decoder_widths.iter().enumerate() {
        let level = levels - 1 - li;
        let mut j = 0;
        while dw.w.contains(&format!("up.{level}.block.{j}.conv1.weight")) {
            h = d.resnet(&h, &format!("up.{level}.block.{j}"), cin, cout, side)?;
            cin = cout;
            if dw.w.contains(&format!("up.{level}.attn.{j}.qkv.weight")) {
                h = d.attn(&h, &format!("up.{level}.attn.{j}"), cout, side)?;
            }
            j += 1;
        }
        if dw.w.contains(&format!("up.{level}.upsample.conv.weight")) {
            let scales = d.g.c_f32(&[1.0, 1.0, 2.0, 2.0], &[4]);
            h = d.g.op(
                "Resize",
                &[&h, "", &scales],
                vec![
                    star_artifact::onnx::AttributeProto::string("mode", "nearest"),
                    star_artifact::onnx::AttributeProto::string(
                        "coordinate_transformation_mode",
                        "asymmetric",
                    ),
                    star_artifact::onnx::AttributeProto::string("nearest_mode", "floor"),
                ],
            );
            side *= 2;
            // Resize's inference drops the batch symbol (see `G::annotate`).
            d.g.annotate(&h, dtype::FLOAT, &[sym("B"), fx(cout), fx(side), fx(side)]);
            h = d.conv(&h, &format!("up.{level}.upsample.conv"), cout, cout, 3)?;
        }
    }
    h = d.norm(&h, "norm_out", cin, side)?;
    h = d.silu(&h);
    let raw = d.conv(&h, "conv_out", cin, 3, 3)?;
    let g = d.g;
    g.output(
        &raw,
        "image_raw",
        Dtype::Float32,
        &[sym("B"), fx(3), fx(side), fx(side)],
    );
    let lo = g.scalar(-1.0);
    let hi = g.scalar(1.0);
    let c = g.op("Clip", &[&raw, &lo, &hi], vec![]);
    let c = g.add(&c, &hi);
    let half = g.scalar(0.5);
    let img = g.mul(&c, &half);
    g.output(
        &img,
        "image",
        Dtype::Float32,
        &[sym("B"), fx(3), fx(side), fx(side)],
    );
    Ok(())
}
