//! Stage graph builders. One code path per stage kind, parametrised by the scale index.

pub mod builder;
pub mod text;
pub mod transformer;
pub mod vq;

use crate::checkpoint::Weights;
use crate::error::Result;
use builder::G;

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
    /// x · Wᵀ + b for a torch Linear(din -> dout); the weight is stored transposed once.
    pub fn linear(
        &self,
        g: &mut G,
        x: &str,
        name: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<String> {
        let w = self.w.pp(name);
        w.check("weight", &[dout, din])?;
        let wt = g.weight(
            &format!("{}^T", self.pp(name).key("weight")),
            &[din, dout],
            || {
                let m = w.get("weight", &[dout, din])?;
                Ok(transpose2(&m, dout, din))
            },
        )?;
        let y = g.matmul(x, &wt);
        if bias {
            let b = self.pp(name).raw(g, "bias", &[dout])?;
            Ok(g.add(&y, &b))
        } else {
            Ok(y)
        }
    }
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
