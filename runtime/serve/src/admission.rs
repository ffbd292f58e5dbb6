//! Memory admission: what a run of b images adds to the process, measured at warm-up, and
//! whether a batch may run now.

use star_pipeline::pipeline::{GenParams, Pipeline, RunError};

/// Host memory: what a run of b images adds to the process, estimated as b × `per_image`, and
/// the limit it must stay under. `per_image` is measured at warm-up by a calibration
/// generation of `images` images (2, or 1 when the server never runs more) after the 1-image
/// warm-up, and raised whenever a run grows the process by more (`learn`).
///
/// The estimate holds because every run starts without what earlier runs used: the engine gives
/// its activations back when it ends (`BackendOptions::release_activations`), the KV cache is
/// given back after the last step (`Pipeline::kv_release_bytes` 0) and the heap's free pages
/// after each run (`memory::trim_heap`). Without them ONNX Runtime's arena and glibc kept what
/// earlier runs had used, and 7-image batches of the demo peaked at 184 MB after a first one at
/// 146 MB (benches/RESULTS.md). It is an estimate: with the kernel's overcommit an allocation
/// rarely fails, the kill comes when pages are touched, so what protects the process is the
/// estimate's margin (it errs high) and the 5% kept back.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemoryModel {
    pub(crate) images: usize,
    /// Resident size at rest, before the calibration.
    pub(crate) base: u64,
    /// Peak resident size during the calibration.
    pub(crate) peak: u64,
    /// What a run adds to the resident size per image, at most.
    pub(crate) per_image: u64,
    /// The highest resident size any run reached since warm-up (the calibration's included).
    pub(crate) highest: u64,
    /// The most the process may reach: `--max-memory`, else 90% of the machine's or container's.
    pub(crate) limit: u64,
}

impl MemoryModel {
    /// The limit less 5% for what is not a run's: HTTP buffers, queued requests and results,
    /// the allocator's fragmentation over many runs.
    pub(crate) fn usable(&self) -> u64 {
        self.limit - self.limit / 20
    }

    /// Estimated peak of a run of `images` starting from `resident` bytes.
    pub(crate) fn peak_of(&self, resident: u64, images: usize) -> u64 {
        resident.saturating_add((images as u64).saturating_mul(self.per_image))
    }

    /// Most images one run may hold under the limit from the resident size at rest (0: not
    /// even one): the largest `n` and batch the server accepts.
    pub(crate) fn fit(&self) -> usize {
        let room = self.usable().saturating_sub(self.base);
        (room / self.per_image.max(1)).min(1 << 20) as usize
    }

    /// Whether a run of `images` may start now from `resident` bytes: `soft` is the limit
    /// (a batch gives back requests until it holds), `hard` is what the system (the machine or
    /// the container) has available: a request that alone does not fit in that fails.
    pub(crate) fn admits(
        &self,
        resident: u64,
        images: usize,
        available: Option<u64>,
    ) -> (bool, Result<(), String>) {
        let soft = self.peak_of(resident, images) <= self.usable();
        let more = (images as u64).saturating_mul(self.per_image);
        let hard = match available {
            Some(avail) if more > avail => Err(format!(
                "out of memory: {images} images need about {} MB more, and the system has {} MB available now",
                more >> 20,
                avail >> 20
            )),
            _ => Ok(()),
        };
        (soft, hard)
    }

    /// Whether a batch of `images` may run now: under the limit and within what the system has.
    pub(crate) fn fits_now(&self, resident: u64, images: usize, available: Option<u64>) -> bool {
        let (soft, hard) = self.admits(resident, images, available);
        soft && hard.is_ok()
    }

    /// A run of `images` grew the process from `before` to a peak of `peak`: where that is
    /// more than 5% over the estimate, raise `per_image` to cover it. Returns the old estimate
    /// when raised. Runs smaller than the calibration teach nothing: what a run costs besides
    /// its images (tokenizing, a PNG, a page here and there) weighs more per image in them,
    /// and the estimate would only ratchet up.
    pub(crate) fn learn(&mut self, images: usize, before: u64, peak: u64) -> Option<u64> {
        self.highest = self.highest.max(peak);
        if images < self.images {
            return None;
        }
        let grown = peak.saturating_sub(before);
        let per = grown.div_ceil(images.max(1) as u64);
        if per <= self.per_image + self.per_image / 20 {
            return None;
        }
        let old = self.per_image;
        self.per_image = per;
        Some(old)
    }
}

/// Measure what a generation of `images` images adds to the resident memory (see `MemoryModel`).
/// None where /proc does not say.
pub(crate) fn calibrate(
    p: &mut Pipeline,
    images: usize,
    max_memory: Option<u64>,
) -> Result<Option<MemoryModel>, RunError> {
    let Some(limit) = max_memory.or_else(|| star_pipeline::memory::limit().map(|l| l / 10 * 9))
    else {
        return Ok(None);
    };
    star_pipeline::memory::trim_heap();
    let Some(before) = star_pipeline::memory::resident() else {
        return Ok(None);
    };
    // Without a reset the peak would be the warm-up's, session creation included.
    if !star_pipeline::memory::reset_peak() {
        return Ok(None);
    }
    let prompts = vec!["calibration".to_string(); images];
    let gp = GenParams::defaults(p, 0);
    p.generate(&prompts, "", &gp, &mut star_pipeline::pipeline::NoHooks)?;
    let Some(after) = star_pipeline::memory::resident() else {
        return Ok(None);
    };
    star_pipeline::memory::trim_heap();
    let rest = star_pipeline::memory::resident().map_or(after.now, |r| r.now);
    let peak = after.peak.max(before.now);
    Ok(Some(MemoryModel {
        images,
        base: rest.max(before.now),
        peak,
        per_image: ((peak - before.now) / images as u64).max(1),
        highest: peak,
        limit,
    }))
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::MemoryModel;

    #[test]
    pub(crate) fn memory_model_admits_under_the_limit_and_learns() {
        let m = MemoryModel {
            images: 2,
            base: 100,
            peak: 120,
            per_image: 10,
            highest: 120,
            limit: 200,
        };
        assert_eq!(m.usable(), 190);
        assert_eq!(m.peak_of(100, 8), 180);
        assert_eq!(m.fit(), 9);
        assert_eq!(MemoryModel { limit: 105, ..m }.fit(), 0);
        assert_eq!(MemoryModel { limit: 116, ..m }.fit(), 1);
        // Over the limit from a higher resident size: the batch must shrink; the system still
        // has room, so one request alone would run.
        let (soft, hard) = m.admits(150, 5, Some(1000));
        assert!(!soft && hard.is_ok());
        assert!(m.admits(100, 9, None).0);
        // What the system has left is the hard line.
        assert!(m.admits(100, 2, Some(15)).1.is_err());
        assert!(m.admits(100, 1, Some(15)).1.is_ok());
        assert!(m.fits_now(100, 1, Some(15)) && !m.fits_now(100, 2, Some(15)));
        assert!(!m.fits_now(150, 5, None) && m.fits_now(150, 4, None));
        // A run that grew more than 5% over the estimate raises it; one within that, or smaller
        // than the calibration, changes nothing (but its peak is kept).
        let mut l = m;
        assert_eq!(l.learn(8, 100, 170), None);
        assert_eq!(l.learn(8, 100, 180), None);
        assert_eq!(l.learn(8, 100, 196), Some(10));
        assert_eq!((l.per_image, l.fit()), (12, 7));
        assert_eq!(l.learn(1, 100, 160), None);
        assert_eq!((l.per_image, l.highest), (12, 196));
    }
}
