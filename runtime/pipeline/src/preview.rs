//! Progressive previews: after which scales a generation decodes its f̂ so far.
//!
//! STAR draws coarse to fine, and f̂ after scale k is a complete (blurry) image at the output
//! size: one decoder run shows it. Previews are spaced evenly in elapsed compute, not in scale
//! index: the last scales cost most (tokens grow with the square of the side), so evenly spaced
//! indices would show three blurs early and nothing for most of the wait. The last scale is
//! never a preview: its image is the result.

/// The scales (ascending, distinct, never the last) after which to decode a preview, `k` of
/// them at most: preview j goes after the scale whose cumulative time is nearest to
/// j/(k+1) of the whole. `scale_ms` is the measured wall time of each scale (a previous
/// generation's); fewer than `k` come back when the schedule has too few scales.
pub fn preview_scales(scale_ms: &[f64], k: usize) -> Vec<usize> {
    let last = scale_ms.len().saturating_sub(1);
    let total: f64 = scale_ms.iter().map(|m| m.max(0.0)).sum();
    if k == 0 || last == 0 || total <= 0.0 {
        return vec![];
    }
    let cumulative: Vec<f64> = scale_ms
        .iter()
        .scan(0.0, |c, m| {
            *c += m.max(0.0) / total;
            Some(*c)
        })
        .collect();
    let mut chosen: Vec<usize> = vec![];
    for j in 1..=k {
        let from = chosen.last().map_or(0, |c| c + 1);
        if from >= last {
            break;
        }
        // Leave a scale for each preview still to place, where there are enough.
        let to = (last - 1).saturating_sub(k - j).max(from);
        let target = j as f64 / (k + 1) as f64;
        let distance = |s: &usize| (cumulative[*s] - target).abs();
        if let Some(s) = (from..=to).min_by(|a, b| distance(a).total_cmp(&distance(b))) {
            chosen.push(s);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::preview_scales;

    #[test]
    fn previews_follow_compute_never_the_last_scale() {
        // Equal scales: evenly in index too.
        assert_eq!(preview_scales(&[1.0; 8], 1), vec![3]);
        assert_eq!(preview_scales(&[1.0; 8], 3), vec![1, 3, 5]);
        // Cost growing with tokens (d16/256's sides): the previews crowd the late scales.
        let ms: Vec<f64> = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
            .iter()
            .map(|s| (s * s) as f64)
            .collect();
        assert_eq!(preview_scales(&ms, 1), vec![8]);
        assert_eq!(preview_scales(&ms, 2), vec![7, 8]);
        let three = preview_scales(&ms, 3);
        assert_eq!(three.len(), 3);
        assert!(three.windows(2).all(|w| w[0] < w[1]) && *three.last().unwrap() < 9);
        // Too few scales: as many as there are before the last.
        assert_eq!(preview_scales(&[1.0, 4.0, 9.0, 16.0], 3), vec![0, 1, 2]);
        assert_eq!(preview_scales(&[1.0, 4.0], 3), vec![0]);
        assert!(preview_scales(&[5.0], 2).is_empty());
        assert!(preview_scales(&[1.0, 2.0], 0).is_empty());
        assert!(preview_scales(&[], 2).is_empty());
    }
}
