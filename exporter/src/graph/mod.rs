//! Stage graph builders. One code path per stage kind, parametrised by the scale index.

pub mod builder;
pub mod sample;
pub mod text;
pub mod transformer;
pub mod vq;

use crate::checkpoint::Weights;
use crate::error::ExportError;
use crate::error::Result;
use builder::{Lin, Precision, G};
use star_artifact::onnx::{dtype, AttributeProto};

/// Namespaced handle on one checkpoint: store keys are `<ns>/<tensor>` so the transformer, the VQ
/// tokenizer and the text encoder never collide in the shared weights file.
#[derive(Clone)]
pub struct Src<'a> {
    pub ns: &'static str,
    pub w: Weights<'a>,
}

impl<'a> Src<'a> {
    pub fn pp(&self, sub: &str) -> Src<'a> {
        Src {
            ns: self.ns,
            w: self.w.pp(sub),
        }
    }
    pub fn key(&self, name: &str) -> String {
        format!("{}/{}", self.ns, self.w.key(name))
    }
    /// A checkpoint tensor as stored.
    pub fn raw(&self, g: &mut G, name: &str, shape: &[usize]) -> Result<String> {
        let w = self.w.clone();
        let n = name.to_string();
        let s = shape.to_vec();
        w.check(name, shape)?;
        g.weight(&self.key(name), shape, move || w.get(&n, &s))
    }
    /// x · Wᵀ + b for a torch Linear(din -> dout) of any other kind than a block's or a head's.
    pub fn linear(
        &self,
        g: &mut G,
        x: &str,
        name: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<String> {
        self.linear_as(g, x, name, din, dout, bias, Lin::Plain)
    }

    /// x · Wᵀ + b lowered by kind and the graph's precision; the weight is stored transposed,
    /// once per dtype (`^T` FP32, `^T^f16`, `^T^s8` with its per-channel scales `^T^s8scale`).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_as(
        &self,
        g: &mut G,
        x: &str,
        name: &str,
        din: usize,
        dout: usize,
        bias: bool,
        kind: Lin,
    ) -> Result<String> {
        let w = self.w.pp(name);
        w.check("weight", &[dout, din])?;
        let layer = self.pp(name);
        let wkey = format!("{}^T", layer.key("weight"));
        let transposed = move || -> Result<Vec<f32>> {
            let m = w.get("weight", &[dout, din])?;
            Ok(transpose2(&m, dout, din))
        };
        // The input of every block linear has a stable name in every precision: calibration
        // tables (and TensorRT calibration caches) refer to it.
        let x = if kind == Lin::Block {
            let input = format!("{}.input", layer.key("").trim_end_matches('.'));
            let named = g.named(x, &input);
            if g.probing {
                g.probe(&named, &input);
            }
            named
        } else {
            x.to_string()
        };
        match (g.precision, kind) {
            (Precision::Fp16, Lin::Block | Lin::Plain) => {
                let wt =
                    g.weight_bytes(&format!("{wkey}^f16"), &[din, dout], dtype::FLOAT16, || {
                        Ok(to_f16_bytes(&transposed()?))
                    })?;
                let x16 = g.cast(&x, dtype::FLOAT16);
                let mut y = g.matmul(&x16, &wt);
                if bias {
                    let bw = self.w.pp(name);
                    bw.check("bias", &[dout])?;
                    let b = g.weight_bytes(
                        &format!("{}^f16", layer.key("bias")),
                        &[dout],
                        dtype::FLOAT16,
                        move || Ok(to_f16_bytes(&bw.get("bias", &[dout])?)),
                    )?;
                    y = g.add(&y, &b);
                }
                Ok(g.cast(&y, dtype::FLOAT))
            }
            (Precision::Int8, Lin::Block) => {
                let input = x.clone();
                let amax = g.amax.and_then(|t| t.get(&input).copied()).ok_or_else(|| {
                    ExportError::Calibration(format!(
                        "the calibration table has no range for {input}"
                    ))
                })?;
                let sa = g.c_f32(&[star_calibration::int8_scale(amax)], &[]);
                let za = g.c_i8(&[0], &[]);
                let q = g.op("QuantizeLinear", &[&x, &sa, &za], vec![]);
                let xd = g.op("DequantizeLinear", &[&q, &sa, &za], vec![]);
                let (qkey, skey) = (format!("{wkey}^s8"), format!("{wkey}^s8scale"));
                // Quantized once: a second graph (step_first after step) references the stored pair.
                let (q8, scales) = if g.has_weight(&qkey) && g.has_weight(&skey) {
                    (vec![], vec![])
                } else {
                    quantize_per_column(&transposed()?, din, dout)
                };
                let wq = g.weight_bytes(&qkey, &[din, dout], dtype::INT8, || {
                    Ok(q8.iter().map(|&v| v as u8).collect())
                })?;
                let sw = g.weight(&skey, &[dout], || Ok(scales))?;
                let zw = g.c_i8(&vec![0; dout], &[dout as i64]);
                let wd = g.op(
                    "DequantizeLinear",
                    &[&wq, &sw, &zw],
                    vec![AttributeProto::int("axis", 1)],
                );
                let y = g.matmul(&xd, &wd);
                if bias {
                    let b = self.pp(name).raw(g, "bias", &[dout])?;
                    Ok(g.add(&y, &b))
                } else {
                    Ok(y)
                }
            }
            _ => {
                let wt = g.weight(&wkey, &[din, dout], transposed)?;
                let y = g.matmul(&x, &wt);
                if bias {
                    let b = self.pp(name).raw(g, "bias", &[dout])?;
                    Ok(g.add(&y, &b))
                } else {
                    Ok(y)
                }
            }
        }
    }
}

fn to_f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

/// Symmetric per-output-channel INT8 of a (din, dout) matrix in `INT8_WEIGHT_BITS` bits:
/// scale_j = max_i |w_ij| / 63, values rounded to nearest and clamped to [-63, 63] (zero-point
/// 0, as TensorRT requires; 7 bits so that no CPU's INT8 product saturates, see
/// `star_artifact::manifest::INT8_WEIGHT_BITS`).
pub fn quantize_per_column(w: &[f32], din: usize, dout: usize) -> (Vec<i8>, Vec<f32>) {
    let qmax = ((1u32 << (star_artifact::manifest::INT8_WEIGHT_BITS - 1)) - 1) as f32;
    let mut amax = vec![0f32; dout];
    for r in 0..din {
        for (c, a) in amax.iter_mut().enumerate() {
            *a = a.max(w[r * dout + c].abs());
        }
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| if a > 0.0 { a / qmax } else { 1.0 })
        .collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / scales[i % dout]).round().clamp(-qmax, qmax) as i8)
        .collect();
    (q, scales)
}

pub fn transpose2(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// Attention scores of one group of heads at the largest scale, batch 1, FP32: 800 MiB. At d30 /
/// 1024 px all 30 heads at once would be (2, 30, 4096, 9451) floats, 9.3 GB per block — more
/// than a 24 GB machine has beside the weights — so self-attention runs over groups of heads:
/// 2 heads (620 MB) in the step, 6 (806 MB) in the stable sampler. With 1 GiB the step's groups
/// of 3 (929 MB) left a one-shot run's last step 0.24 GB above the memory target of issue 7;
/// one head per group made session creation slower (benches/RESULTS.md).
pub const DEFAULT_ATTENTION_BUDGET: u64 = 800 << 20;
