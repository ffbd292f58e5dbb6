//! Range (amax) selection for symmetric INT8 quantisation of one tensor.

use crate::stats::{ActivationStats, BINS};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// The largest |x| seen.
    Max,
    /// The |x| below which this percentage of values lie (e.g. 99.99).
    Percentile(f64),
    /// The threshold minimising the KL divergence between the clipped histogram and its 128-level
    /// quantisation (TensorRT's entropy calibration).
    Entropy,
}

/// The symmetric INT8 scale of a range: amax / 127, with a floor so that a tensor that was zero
/// throughout calibration still gets a positive scale (graphs and TensorRT caches alike).
pub fn int8_scale(amax: f32) -> f32 {
    amax.max(1e-8) / 127.0
}

impl Method {
    pub fn amax(self, s: &ActivationStats) -> f32 {
        match self {
            Method::Max => s.absmax(),
            Method::Percentile(p) => percentile(s, p),
            Method::Entropy => entropy(s),
        }
    }
}

fn percentile(s: &ActivationStats, p: f64) -> f32 {
    let target = (s.count as f64 * p / 100.0).ceil() as u64;
    let mut acc = 0u64;
    for (i, &h) in s.hist.iter().enumerate() {
        acc += h;
        if acc >= target {
            return ((i + 1) as f32 * s.bin_width()).min(s.absmax());
        }
    }
    s.absmax()
}

fn kl(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    let mut d = 0.0;
    for (a, b) in p.iter().zip(q) {
        if *a > 0.0 {
            let (a, b) = (a / sp, b / sq);
            d += if b > 0.0 {
                a * (a / b).ln()
            } else {
                f64::INFINITY
            };
        }
    }
    d
}

fn entropy(s: &ActivationStats) -> f32 {
    const LEVELS: usize = 128;
    let used = s
        .hist
        .iter()
        .rposition(|&h| h > 0)
        .map(|i| i + 1)
        .unwrap_or(0);
    if used <= LEVELS {
        return s.absmax();
    }
    let mut best = (f64::INFINITY, used);
    for i in LEVELS..=used.min(BINS) {
        // Reference: the first i bins, with everything beyond clipped into the last one.
        let mut p: Vec<f64> = s.hist[..i].iter().map(|&h| h as f64).collect();
        p[i - 1] += s.hist[i..].iter().sum::<u64>() as f64;
        // Candidate: the first i bins merged into LEVELS groups, spread back over non-empty bins.
        let mut q = vec![0f64; i];
        for l in 0..LEVELS {
            let (a, b) = (
                l * i / LEVELS,
                ((l + 1) * i / LEVELS).max(l * i / LEVELS + 1),
            );
            let total: f64 = s.hist[a..b].iter().map(|&h| h as f64).sum();
            let nonzero = s.hist[a..b].iter().filter(|&&h| h > 0).count();
            if nonzero > 0 {
                for (qj, &h) in q[a..b].iter_mut().zip(&s.hist[a..b]) {
                    if h > 0 {
                        *qj = total / nonzero as f64;
                    }
                }
            }
        }
        let d = kl(&p, &q);
        if d < best.0 {
            best = (d, i);
        }
    }
    ((best.1 as f32 + 0.5) * s.bin_width()).min(s.absmax())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic standard normal samples (Box-Muller over a xorshift stream).
    fn normal(n: usize) -> Vec<f32> {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut u = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| ((-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos()) as f32)
            .collect()
    }

    #[test]
    fn max_is_the_largest_magnitude() {
        let mut s = ActivationStats::default();
        s.observe(&[0.5, -3.25, 2.0]).unwrap();
        s.observe(&[1.0, 7.5]).unwrap();
        assert_eq!(Method::Max.amax(&s), 7.5);
        assert_eq!((s.min, s.max, s.count), (-3.25, 7.5, 5));
    }

    #[test]
    fn percentile_of_a_normal_matches_its_quantile() {
        let mut s = ActivationStats::default();
        for chunk in normal(400_000).chunks(10_000) {
            s.observe(chunk).unwrap();
        }
        // P(|x| < 2.5758) = 99% for a standard normal.
        let a = Method::Percentile(99.0).amax(&s);
        assert!((a - 2.5758).abs() < 0.02, "{a}");
    }

    #[test]
    fn entropy_clips_a_heavy_tail_below_max() {
        let mut s = ActivationStats::default();
        let mut v = normal(200_000);
        v.extend([60.0, -55.0, 48.0]);
        s.observe(&v).unwrap();
        let e = Method::Entropy.amax(&s);
        assert!(e < 20.0 && e > 2.0, "entropy amax {e}");
        assert_eq!(Method::Max.amax(&s), 60.0);
    }

    #[test]
    fn non_finite_activations_are_refused_and_leave_the_stats_unchanged() {
        let mut s = ActivationStats::default();
        s.observe(&[1.0, -2.0]).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = s.observe(&[0.5, bad]).unwrap_err();
            assert_eq!(
                e,
                crate::CalibrationError::NonFinite {
                    index: 1,
                    value: bad.to_string()
                }
            );
        }
        assert_eq!((s.count, s.min, s.max), (2, -2.0, 1.0));
    }
}
