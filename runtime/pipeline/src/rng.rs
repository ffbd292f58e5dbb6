//! The RNG contract: every random number is a pure function of
//! (seed + image index, scale, sub-step, position, purpose), so results do not depend on batch
//! composition, thread count or backend. See the README ("RNG contract") for the rule.

/// SplitMix64's finaliser: a bijective 64-bit mixer.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a uniform is used for; separate streams never share numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// Choosing a token from the filtered distribution.
    Token = 0,
    /// The random reveal order of the stable sampler's first sub-steps.
    Reveal = 1,
}

/// A uniform in [0, 1) with 53 random bits.
pub fn uniform(
    image_seed: u64,
    scale: usize,
    substep: usize,
    position: usize,
    purpose: Purpose,
) -> f64 {
    let mut h = mix(image_seed);
    h = mix(h ^ (scale as u64 + 1));
    h = mix(h ^ ((substep as u64 + 1) | ((purpose as u64) << 32)));
    h = mix(h ^ (position as u64 + 1));
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The seed of image `i` of a call made with `--seed seed`: image i comes out exactly as a single
/// generation with `--seed seed+i` would.
pub fn image_seed(seed: u64, image_index: usize) -> u64 {
    seed.wrapping_add(image_index as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniforms_are_in_range_distinct_and_stable() {
        let a = uniform(42, 3, 0, 7, Purpose::Token);
        assert_eq!(a, uniform(42, 3, 0, 7, Purpose::Token));
        assert_ne!(a, uniform(42, 3, 0, 7, Purpose::Reveal));
        assert_ne!(a, uniform(43, 3, 0, 7, Purpose::Token));
        assert_ne!(a, uniform(42, 3, 0, 8, Purpose::Token));
        let n = 20000;
        let mean: f64 = (0..n)
            .map(|i| uniform(1, 0, 0, i, Purpose::Token))
            .sum::<f64>()
            / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!((0..n).all(|i| (0.0..1.0).contains(&uniform(9, 1, 2, i, Purpose::Reveal))));
    }
}
