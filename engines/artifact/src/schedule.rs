//! The scale schedule as the release defines it from the scale sides alone: token ranges, phi
//! choice and stable-sampler reveal counts. star-export writes it into the manifest; star-run
//! derives it again when it opens a model directory and refuses a manifest that disagrees.

use crate::manifest::Schedule;

/// The stable sampler runs from scale 9 on (the release's `sample_from_idx`).
pub const SAMPLER_FROM_SCALE: usize = 9;

/// Sub-step count of a sampler scale: 15 at side 64, 8 elsewhere (the release's schedule).
pub fn substep_count(pn: usize) -> usize {
    if pn == 64 {
        15
    } else {
        8
    }
}

/// Reveal counts: r = linspace(1, 0, S), v = arccos(r)/(pi/2), count = round(v/sum(v)*n), zeros
/// become 1, the last entry absorbs the rounding so the counts sum to n.
pub fn reveal_counts(n: usize, s: usize) -> Vec<usize> {
    let v: Vec<f64> = (0..s)
        .map(|i| {
            let r = if s == 1 {
                1.0
            } else {
                1.0 - i as f64 / (s - 1) as f64
            };
            r.acos() / std::f64::consts::FRAC_PI_2
        })
        .collect();
    let total: f64 = v.iter().sum();
    let mut c: Vec<i64> = v
        .iter()
        .map(|x| round_half_even(x / total * n as f64) as i64)
        .collect();
    for x in c.iter_mut() {
        if *x == 0 {
            *x = 1;
        }
    }
    let head: i64 = c[..s - 1].iter().sum();
    c[s - 1] = n as i64 - head;
    c.into_iter().map(|x| x.max(0) as usize).collect()
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Phi used at scale si: the one whose tick in linspace(1/(3K), 1-1/(3K), K) is nearest si/(SN-1).
pub fn phi_index(si: usize, sn: usize, k: usize) -> usize {
    let at = if sn > 1 {
        si as f64 / (sn - 1) as f64
    } else {
        0.0
    };
    // numpy.linspace's own arithmetic (start + i * step): some scales sit exactly between two
    // ticks, and the release's choice there depends on these roundings.
    let start = 1.0 / 3.0 / k as f64;
    let stop = 1.0 - start;
    let step = if k > 1 {
        (stop - start) / (k - 1) as f64
    } else {
        0.0
    };
    let ticks: Vec<f64> = (0..k).map(|i| i as f64 * step + start).collect();
    let mut best = 0;
    for i in 1..k {
        if (ticks[i] - at).abs() < (ticks[best] - at).abs() {
            best = i;
        }
    }
    best
}

/// Pixels per token side of the VQ tokenizer (VAR's VQVAE downsamples by 16).
pub const PATCH: usize = 16;

/// The full schedule of `patch_nums`: must start at 1 and increase strictly.
pub fn derive(
    patch_nums: &[usize],
    phi_count: usize,
    with_sampler: bool,
) -> Result<Schedule, String> {
    if patch_nums.is_empty() {
        return Err("empty patch_nums".into());
    }
    if patch_nums[0] != 1 {
        return Err(format!(
            "patch_nums must start at 1 (scale 0 is the pooled text token), got {}",
            patch_nums[0]
        ));
    }
    if patch_nums.windows(2).any(|w| w[1] <= w[0]) {
        return Err(format!("patch_nums must increase strictly: {patch_nums:?}"));
    }
    if phi_count == 0 {
        return Err("phi_count must be at least 1".into());
    }
    // Beyond this the token counts stop fitting any real model (and the products below overflow).
    if patch_nums[patch_nums.len() - 1] > 1024 {
        return Err(format!(
            "patch_nums ends at {}: at most 1024 tokens per side",
            patch_nums[patch_nums.len() - 1]
        ));
    }
    let sn = patch_nums.len();
    let mut begin_end = vec![];
    let mut cur = 0;
    for &pn in patch_nums {
        begin_end.push((cur, cur + pn * pn));
        cur += pn * pn;
    }
    let substeps = patch_nums
        .iter()
        .enumerate()
        .map(|(si, &pn)| {
            if with_sampler && si >= SAMPLER_FROM_SCALE {
                reveal_counts(pn * pn, substep_count(pn))
            } else {
                vec![]
            }
        })
        .collect();
    Ok(Schedule {
        patch_nums: patch_nums.to_vec(),
        image_size: PATCH * patch_nums[sn - 1],
        total_tokens: cur,
        begin_end,
        phi_index: (0..sn).map(|si| phi_index(si, sn, phi_count)).collect(),
        substeps,
    })
}
