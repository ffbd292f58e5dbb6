//! VQ stages: the per-scale transition (codebook lookup, bicubic up as a constant matrix pair, phi,
//! f_hat update, area down to the next side) and the decoder.

use super::builder::G;
use super::Src;
use crate::error::Result;
use crate::schedule::{area_matrix, bicubic_matrix};
use star_engines::manifest::{ModelConfig, Schedule};
use star_engines::onnx::{dtype, Dim};

fn sym(s: &str) -> Dim {
    Dim::Sym(s.into())
}
fn fx(v: usize) -> Dim {
    Dim::Fixed(v as i64)
}

/// up = M h Mᵀ per channel, with M (out x inp).
fn resample(g: &mut G, x: &str, m: &[f32], out: usize, inp: usize) -> String {
    let mm = g.c_f32(m, &[out as i64, inp as i64]);
    let mut mt = vec![0f32; m.len()];
    for o in 0..out {
        for i in 0..inp {
            mt[i * out + o] = m[o * inp + i];
        }
    }
    let mtt = g.c_f32(&mt, &[inp as i64, out as i64]);
    let y = g.matmul(&mm, x);
    g.matmul(&y, &mtt)
}

pub fn vq_step(g: &mut G, vq: &Src, cfg: &ModelConfig, sch: &Schedule, si: usize) -> Result<()> {
    let (v, cv) = (cfg.vocab, cfg.cvae);
    let sn = sch.patch_nums.len();
    let pn = sch.patch_nums[si];
    let p = sch.patch_nums[sn - 1];
    let idx = g.input("idx", dtype::INT64, &[sym("B"), fx(pn * pn)]);
    let f_hat = g.input("f_hat", dtype::FLOAT, &[sym("B"), fx(cv), fx(p), fx(p)]);
    let codebook = vq.raw(g, "quantize.embedding.weight", &[v, cv])?;
    let h = g.op("Gather", &[&codebook, &idx], vec![]);
    let h = g.transpose(&h, &[0, 2, 1]);
    let h = g.reshape(&h, &[0, cv as i64, pn as i64, pn as i64]);
    let last = si == sn - 1;
    let h = if last {
        h
    } else {
        resample(g, &h, &bicubic_matrix(pn, p), p, pn)
    };
    let phi = vq.pp(&format!(
        "quantize.quant_resi.qresi_ls.{}",
        sch.phi_index[si]
    ));
    let w = phi.raw(g, "weight", &[cv, cv, 3, 3])?;
    let b = phi.raw(g, "bias", &[cv])?;
    let conv = g.conv(&h, &w, &b, 3);
    let half = g.scalar(0.5);
    let a = g.mul(&h, &half);
    let c = g.mul(&conv, &half);
    let phi_out = g.add(&a, &c);
    let f = g.add(&f_hat, &phi_out);
    g.output(
        &f,
        "f_hat_out",
        dtype::FLOAT,
        &[sym("B"), fx(cv), fx(p), fx(p)],
    );
    if !last {
        let pn2 = sch.patch_nums[si + 1];
        let d = resample(g, &f, &area_matrix(p, pn2), pn2, p);
        let d = g.reshape(&d, &[0, cv as i64, (pn2 * pn2) as i64]);
        let d = g.transpose(&d, &[0, 2, 1]);
        g.output(
            &d,
            "next_in",
            dtype::FLOAT,
            &[sym("B"), fx(pn2 * pn2), fx(cv)],
        );
    }
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
    let f_hat = g.input("f_hat", dtype::FLOAT, &[sym("B"), fx(cv), fx(p), fx(p)]);
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
                    star_engines::onnx::AttributeProto::string("mode", "nearest"),
                    star_engines::onnx::AttributeProto::string(
                        "coordinate_transformation_mode",
                        "asymmetric",
                    ),
                    star_engines::onnx::AttributeProto::string("nearest_mode", "floor"),
                ],
            );
            side *= 2;
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
        dtype::FLOAT,
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
        dtype::FLOAT,
        &[sym("B"), fx(3), fx(side), fx(side)],
    );
    Ok(())
}
