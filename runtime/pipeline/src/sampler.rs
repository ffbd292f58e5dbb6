//! Guidance, the top-k/top-p filter (the release's semantics, ties included) and the token choice
//! of the RNG contract.

/// Guided logits of one scale: (1 + t) * cond - t * uncond, with t rounded to f32 as PyTorch does
/// for a Python scalar times a float32 tensor. `logits` is (2B, n, V); returns (B, n, V).
pub fn guide(logits: &[f32], b: usize, n: usize, v: usize, t: f64) -> Vec<f32> {
    let a = (1.0 + t) as f32;
    let tt = t as f32;
    let half = b * n * v;
    let (cond, uncond) = logits.split_at(half);
    cond.iter()
        .zip(&uncond[..half])
        .map(|(&c, &u)| a * c - tt * u)
        .collect()
}

/// The release's `sample_with_top_k_top_p_` filter on one row, in place (removed = -inf):
/// top-k keeps every logit >= the k-th largest (boundary ties kept); top-p sorts ascending
/// (stable: equal values keep index order), takes the cumulative softmax (accumulated in f64 and
/// stored as f32, as PyTorch's CPU cumsum does) and removes entries whose cumulative sum is
/// <= 1 - top_p, always keeping the largest. top_k = 0 / top_p = 0 disable a step.
pub fn filter_row(row: &mut [f32], top_k: usize, top_p: f64) {
    let v = row.len();
    let desc = |a: &f32, b: &f32| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal);
    if top_k > 0 && top_k < v {
        // The k-th largest value in linear time (which of several equal values lands there does
        // not matter: only the value is used).
        let mut scratch: Vec<f32> = row.to_vec();
        let kth = *scratch.select_nth_unstable_by(top_k - 1, desc).1;
        for x in row.iter_mut() {
            if *x < kth {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    if top_p > 0.0 {
        // Only finite entries take part: removed (-inf) ones would sort first, add exactly 0 to
        // the softmax sum and to the cumulative sum, and are removed already.
        let mut order: Vec<usize> = (0..v).filter(|&i| row[i].is_finite()).collect();
        if order.is_empty() {
            return;
        }
        order.sort_by(|&a, &b| {
            row[a]
                .partial_cmp(&row[b])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let sorted: Vec<f32> = order.iter().map(|&i| row[i]).collect();
        let probs = softmax(&sorted);
        let thr = (1.0 - top_p) as f32;
        let mut acc = 0f64;
        // The largest (last) entry always survives.
        for (j, p) in probs.iter().enumerate().take(order.len() - 1) {
            acc += *p as f64;
            if (acc as f32) <= thr {
                row[order[j]] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Softmax in f32 (max-subtracted).
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|&v| v / s).collect()
}

/// The RNG contract's choice: token ids in ascending order, the first id whose cumulative
/// probability (f64) exceeds `u` times the total. Returns (id, its probability).
pub fn pick(probs: &[f32], u: f64) -> (usize, f32) {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = u * total;
    let mut acc = 0f64;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p as f64;
            last = i;
            if acc > target {
                return (i, p);
            }
        }
    }
    (last, probs[last])
}

/// Indices of the `k` largest keys (ties: lower index first).
pub fn top_positions(keys: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by(|&a, &b| {
        keys[b]
            .partial_cmp(&keys[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k.min(keys.len()));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_follows_the_cumulative_rule() {
        let p = [0.0, 0.25, 0.0, 0.75];
        assert_eq!(pick(&p, 0.0).0, 1);
        assert_eq!(pick(&p, 0.2499).0, 1);
        assert_eq!(pick(&p, 0.25).0, 3);
        assert_eq!(pick(&p, 0.999999).0, 3);
    }

    #[test]
    fn top_positions_breaks_ties_by_index() {
        assert_eq!(top_positions(&[0.5, 0.9, 0.5, 0.9], 3), vec![1, 3, 0]);
    }

    #[test]
    fn guidance_rounds_t_to_f32() {
        let l = [1.0f32, 2.0, 0.5, 1.0];
        let g = guide(&l, 1, 1, 2, 0.5);
        assert_eq!(g, vec![1.5 * 1.0 - 0.5 * 0.5, 1.5 * 2.0 - 0.5 * 1.0]);
    }
}
