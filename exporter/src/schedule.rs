//! Everything fixed by the scale schedule: token ranges, phi choice, stable-sampler reveal counts,
//! the normalized 2D RoPE table, and the constant resampling matrices of the VQ transitions.

use crate::error::{ExportError, Result};
use star_artifact::manifest::Schedule;

pub fn patch_nums_for(resolution: usize) -> Result<Vec<usize>> {
    Ok(match resolution {
        256 => vec![1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
        512 => vec![1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
        1024 => vec![1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64],
        r => return Err(ExportError::Resolution(r)),
    })
}

pub use star_artifact::schedule::{phi_index, reveal_counts, substep_count, SAMPLER_FROM_SCALE};

/// The schedule of `patch_nums` (star_artifact::schedule::derive), as an export error.
pub fn build(patch_nums: &[usize], phi_count: usize, with_sampler: bool) -> Result<Schedule> {
    star_artifact::schedule::derive(patch_nums, phi_count, with_sampler)
        .map_err(ExportError::Schedule)
}

/// RoPE table of one scale as (cos, sin), each (pn*pn, 32), computed in f32 as the release does:
/// positions c/(pn-1)*64 and r/(pn-1)*64, frequencies 10000^(-4j/64); pairs 0-15 use x, 16-31 y.
pub fn rope_table(pn: usize) -> (Vec<f32>, Vec<f32>) {
    let freqs: Vec<f32> = (0..16)
        .map(|j| 1.0f32 / 10000f32.powf((4 * j) as f32 / 64.0))
        .collect();
    let n = pn * pn;
    let mut cos = Vec::with_capacity(n * 32);
    let mut sin = Vec::with_capacity(n * 32);
    let norm = |i: usize| -> f32 {
        if pn == 1 {
            0.0
        } else {
            i as f32 / (pn - 1) as f32 * 64.0
        }
    };
    for t in 0..n {
        let (x, y) = (norm(t % pn), norm(t / pn));
        for j in 0..32 {
            let a = if j < 16 {
                x * freqs[j]
            } else {
                y * freqs[j - 16]
            };
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// 1-D bicubic resampling matrix (out x inp) of PyTorch's interpolate(mode='bicubic',
/// align_corners=False, A=-0.75), computed in f32 like its CPU kernel (clamped borders).
pub fn bicubic_matrix(inp: usize, out: usize) -> Vec<f32> {
    const A: f32 = -0.75;
    let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = inp as f32 / out as f32;
    let mut m = vec![0f32; out * inp];
    for o in 0..out {
        let real = scale * (o as f32 + 0.5) - 0.5;
        let ix = real.floor();
        let t = real - ix;
        let w = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
        for (i, wi) in w.iter().enumerate() {
            let idx = (ix as i64 - 1 + i as i64).clamp(0, inp as i64 - 1) as usize;
            m[o * inp + idx] += wi;
        }
    }
    m
}

/// 1-D area (adaptive average pooling) matrix (out x inp).
pub fn area_matrix(inp: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    for o in 0..out {
        let start = (o * inp) / out;
        let end = ((o + 1) * inp).div_ceil(out);
        let w = 1.0 / (end - start) as f32;
        for i in start..end {
            m[o * inp + i] = w;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reveal_counts_match_the_release_table() {
        assert_eq!(reveal_counts(441, 8), vec![1, 31, 44, 55, 65, 74, 82, 89]);
        assert_eq!(
            reveal_counts(729, 8),
            vec![1, 51, 74, 91, 107, 122, 135, 148]
        );
        assert_eq!(
            reveal_counts(1296, 8),
            vec![1, 91, 131, 162, 190, 216, 241, 264]
        );
        assert_eq!(
            reveal_counts(2304, 8),
            vec![1, 162, 232, 289, 338, 384, 428, 470]
        );
        assert_eq!(
            reveal_counts(4096, 15),
            vec![1, 106, 151, 186, 216, 243, 268, 292, 314, 336, 357, 377, 397, 417, 435]
        );
    }

    #[test]
    fn phi_indices_match_the_release() {
        let ten: Vec<usize> = (0..10).map(|s| phi_index(s, 10, 4)).collect();
        assert_eq!(ten, vec![0, 0, 1, 1, 1, 2, 2, 3, 3, 3]);
        let fourteen: Vec<usize> = (0..14).map(|s| phi_index(s, 14, 4)).collect();
        assert_eq!(fourteen, vec![0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]);
    }
}
