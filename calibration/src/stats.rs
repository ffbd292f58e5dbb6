//! Streaming per-tensor statistics: min, max and a histogram of |x| over [0, range) whose range
//! doubles (merging bins pairwise) when a larger value arrives, so no second pass is needed.

pub const BINS: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CalibrationError {
    #[error("calibration input holds a non-finite value ({value} at flat index {index}): check the model and the calibration prompts")]
    NonFinite { index: usize, value: String },
}

#[derive(Clone, Debug)]
pub struct ActivationStats {
    pub min: f32,
    pub max: f32,
    pub count: u64,
    /// Upper edge of the histogram; bin i covers [i, i+1) * range / BINS.
    pub range: f32,
    pub hist: Vec<u64>,
}

impl Default for ActivationStats {
    fn default() -> Self {
        ActivationStats {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            range: 0.0,
            hist: vec![0; BINS],
        }
    }
}

impl ActivationStats {
    pub fn absmax(&self) -> f32 {
        self.min.abs().max(self.max.abs())
    }

    pub fn bin_width(&self) -> f32 {
        self.range / BINS as f32
    }

    fn grow_to(&mut self, a: f32) {
        if self.range == 0.0 {
            self.range = a.max(f32::MIN_POSITIVE);
            return;
        }
        while a >= self.range {
            for i in 0..BINS / 2 {
                self.hist[i] = self.hist[2 * i] + self.hist[2 * i + 1];
            }
            for h in &mut self.hist[BINS / 2..] {
                *h = 0;
            }
            self.range *= 2.0;
        }
    }

    /// Add a batch of activations. A non-finite value is an error, and the statistics stay as
    /// they were: a NaN/Inf activation means a broken model or input, and dropping it would
    /// calibrate a range on what is left as if nothing had happened.
    pub fn observe(&mut self, xs: &[f32]) -> Result<(), CalibrationError> {
        if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
            return Err(CalibrationError::NonFinite {
                index: i,
                value: xs[i].to_string(),
            });
        }
        let finite = xs.iter().copied();
        let m = finite.clone().fold(0f32, |a, x| a.max(x.abs()));
        if m >= self.range || self.range == 0.0 {
            self.grow_to(m * (1.0 + 1e-6) + f32::MIN_POSITIVE);
        }
        let scale = BINS as f32 / self.range;
        for x in finite {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
            let b = ((x.abs() * scale) as usize).min(BINS - 1);
            self.hist[b] += 1;
            self.count += 1;
        }
        Ok(())
    }
}
