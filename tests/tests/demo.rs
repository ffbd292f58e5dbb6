//! The embedded demo model: prompt adherence by the demo README's colour rule, batch invariance,
//! determinism.

use star_artifact::dtype::Precision;
use star_engines::options::BackendOptions;
use star_pipeline::image::to_rgb8;
use star_pipeline::pipeline::{GenParams, NoHooks, Pipeline};
use star_tests::demo_model;

const PALETTE: [(&str, [f64; 3]); 8] = [
    ("red", [220.0, 30.0, 30.0]),
    ("green", [30.0, 170.0, 50.0]),
    ("blue", [30.0, 70.0, 220.0]),
    ("yellow", [245.0, 220.0, 30.0]),
    ("white", [245.0, 245.0, 245.0]),
    ("black", [15.0, 15.0, 15.0]),
    ("orange", [245.0, 140.0, 20.0]),
    ("purple", [140.0, 40.0, 180.0]),
];

const PROMPTS: [&str; 12] = [
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a white triangle on a black background",
    "a orange cross on a purple background",
    "a yellow circle on a green background",
    "a blue square on a white background",
    "a purple triangle on a orange background",
    "a black cross on a white background",
    "a white circle on a red background",
    "a red square on a black background",
    "a green triangle on a blue background",
    "a purple circle on a yellow background",
];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn nearest(c: [f64; 3]) -> &'static str {
    PALETTE
        .iter()
        .min_by(|a, b| dist(a.1, c).partial_cmp(&dist(b.1, c)).unwrap())
        .unwrap()
        .0
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// The demo README's rule: background = per-channel median of the ring 3-7 px inside the edge;
/// foreground = central 48x48 pixels farther than 80 from it (at least 20, else wrong); shape
/// colour = their per-channel median; colours named by the nearest palette entry.
fn judge(rgb: &[u8], w: usize, h: usize) -> (Option<&'static str>, &'static str) {
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        [rgb[i] as f64, rgb[i + 1] as f64, rgb[i + 2] as f64]
    };
    let mut ring: [Vec<f64>; 3] = Default::default();
    for y in 0..h {
        for x in 0..w {
            let d = x.min(y).min(w - 1 - x).min(h - 1 - y);
            if (3..=7).contains(&d) {
                let p = px(x, y);
                for c in 0..3 {
                    ring[c].push(p[c]);
                }
            }
        }
    }
    let bg = [
        median(&mut ring[0]),
        median(&mut ring[1]),
        median(&mut ring[2]),
    ];
    let (x0, y0) = ((w - 48) / 2, (h - 48) / 2);
    let mut fg: [Vec<f64>; 3] = Default::default();
    for y in y0..y0 + 48 {
        for x in x0..x0 + 48 {
            let p = px(x, y);
            if dist(p, bg) > 80.0 {
                for c in 0..3 {
                    fg[c].push(p[c]);
                }
            }
        }
    }
    let shape = if fg[0].len() >= 20 {
        Some(nearest([
            median(&mut fg[0]),
            median(&mut fg[1]),
            median(&mut fg[2]),
        ]))
    } else {
        None
    };
    (shape, nearest(bg))
}

fn params(p: &Pipeline, seed: u64) -> GenParams {
    GenParams::defaults(p, seed)
}

#[test]
fn demo_defaults_are_the_documented_ones() {
    let p = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    let d = &p.md.manifest.sampling_defaults;
    assert_eq!((d.cfg, d.top_k, d.top_p), (3.0, 64, 0.9));
}

/// A KV cache given back before the decoder (as a large one is, at d30/1024) changes nothing:
/// the next generation allocates it anew and both images are the ones of a pipeline that keeps
/// its cache, bit for bit. The demo's cache is small, so by default it is kept.
#[test]
fn released_kv_cache_is_allocated_anew_by_the_next_generation() {
    let prompts = ["a red circle on a blue background".to_string()];
    let mut keep = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    let mut release = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    release.kv_release_bytes = 0;
    for seed in [1, 2] {
        let a = keep
            .generate(&prompts, "", &params(&keep, seed), &mut NoHooks)
            .unwrap();
        assert!(
            keep.md.kv_shape().is_some(),
            "the demo's small cache is kept"
        );
        let b = release
            .generate(&prompts, "", &params(&release, seed), &mut NoHooks)
            .unwrap();
        assert!(
            release.md.kv_shape().is_none(),
            "seed {seed}: the cache was not given back"
        );
        assert_eq!(a.image.shape, b.image.shape);
        assert!(
            a.image.as_f32().unwrap() == b.image.as_f32().unwrap(),
            "seed {seed}: the image differs after the cache was released"
        );
    }
}

/// A one-shot pipeline (`star-run`) gives its sessions back while it does not need them (the
/// text stages after encoding; with the release threshold at 0, the sampler's and decoder's
/// during the last step): its images are those of a pipeline that keeps every session, bit for
/// bit, and a given-back stage is created again when it is next run, with the same result.
#[test]
fn one_shot_pipeline_gives_sessions_back_and_creates_them_again() {
    use star_artifact::stage::{io, Stage};
    use star_artifact::tensor::Tensor;
    let prompts = ["a green square on a white background".to_string()];
    let mut keep = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    let mut once = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    once.one_shot = true;
    once.kv_release_bytes = 0;
    let ids = Tensor::i64(vec![1, 77], (0..77).map(|i| i % 50).collect());
    let mask = Tensor::i64(vec![1, 77], vec![1; 77]);
    let inputs = [(io::INPUT_IDS, &ids), (io::ATTENTION_MASK, &mask)];
    for seed in [3, 4] {
        let a = keep
            .generate(&prompts, "", &params(&keep, seed), &mut NoHooks)
            .unwrap();
        let decoder_ms = once.timings.get("session_create[decoder]");
        let b = once
            .generate(&prompts, "", &params(&once, seed), &mut NoHooks)
            .unwrap();
        assert!(
            once.timings.get("session_create[decoder]") > decoder_ms,
            "seed {seed}: the decoder was not given back during the last step and created again"
        );
        assert_eq!(a.image.shape, b.image.shape);
        assert!(
            a.image.as_f32().unwrap() == b.image.as_f32().unwrap(),
            "seed {seed}: the one-shot image differs"
        );
    }
    once.md.memory_policy().expect("ort-cpu").take_created();
    let kept = keep.md.run_host(Stage::TextEncoder, None, &inputs).unwrap();
    let again = once.md.run_host(Stage::TextEncoder, None, &inputs).unwrap();
    assert!(
        once.md
            .memory_policy()
            .expect("ort-cpu")
            .take_created()
            .iter()
            .any(|c| c.stage == Stage::TextEncoder),
        "the text encoder was not given back after encoding"
    );
    for name in [io::HIDDEN, io::POOLED] {
        assert!(
            kept[name].as_f32().unwrap() == again[name].as_f32().unwrap(),
            "{name} differs from the session created again"
        );
    }
}

/// (both right, shape right, background right, images) over the 12 prompts x seeds 1..4.
fn adherence(p: &mut Pipeline) -> (usize, usize, usize, usize) {
    let (mut both, mut shape_ok, mut bg_ok, mut total) = (0, 0, 0, 0);
    for prompt in PROMPTS {
        let words: Vec<&str> = prompt.split(' ').collect();
        let (want_shape, want_bg) = (words[1], words[5]);
        // Seeds 1..4: one call with four images (image i uses seed 1 + i).
        let prompts = vec![prompt.to_string(); 4];
        let g = p
            .generate(&prompts, "", &params(p, 1), &mut NoHooks)
            .unwrap();
        let (h, w) = (g.image.shape[2], g.image.shape[3]);
        for i in 0..4 {
            let rgb = to_rgb8(g.image.as_f32().unwrap(), i, h, w);
            let (s, b) = judge(&rgb, w, h);
            let (so, bo) = (s == Some(want_shape), b == want_bg);
            shape_ok += so as usize;
            bg_ok += bo as usize;
            both += (so && bo) as usize;
            total += 1;
        }
    }
    (both, shape_ok, bg_ok, total)
}

fn show(label: &str, (both, shape, bg, total): (usize, usize, usize, usize)) -> f64 {
    let pct = |n: usize| 100.0 * n as f64 / total as f64;
    println!(
        "demo adherence {label} over {total} images: both colours right {:.1}% (shape {:.1}%, background {:.1}%); official implementation: 68.8%",
        pct(both),
        pct(shape),
        pct(bg)
    );
    pct(both)
}

#[test]
fn demo_follows_prompt_colours() {
    let mut p = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    let r = adherence(&mut p);
    assert_eq!(r.3, 48);
    let rate = show("fp32", r);
    assert!(rate >= 55.0, "both-right rate {rate:.1}% is below 55%");
}

/// The demo exported at FP16 and INT8 (INT8 calibrated on calibration/prompts/shapes.txt, whose
/// prompts are not the test's) keeps its adherence: within 5 points of FP32 at FP16 and 10 at
/// INT8. Needs the official demo files, like the provenance test below.
#[test]
fn demo_adherence_holds_at_fp16_and_int8() {
    let Some(src) = official_demo() else {
        return;
    };
    let mut p = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    let fp32 = show("fp32", adherence(&mut p));
    for (precision, max_drop) in [(Precision::Fp16, 5.0), (Precision::Int8, 10.0)] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("demo");
        let mut a = demo_export_args(&src, &out);
        a.precision = precision;
        if precision == Precision::Int8 {
            let mut c =
                star_tests::calibration(&star_tests::root().join("calibration/prompts/shapes.txt"));
            c.samples = None;
            a.calibration = Some(c);
        }
        star_export::export::export(&a).expect("export");
        let mut q = Pipeline::open(&out, BackendOptions::default()).unwrap();
        let rate = show(precision.name(), adherence(&mut q));
        assert!(
            rate >= fp32 - max_drop,
            "{precision}: adherence {rate:.1}% is more than {max_drop} points below FP32's {fp32:.1}%"
        );
    }
}

/// The official demo files (../shared/demo or STAR_DEMO_DIR), or None with a notice on a clone
/// without them (not under CI, which must have them).
fn official_demo() -> Option<std::path::PathBuf> {
    let default = star_tests::root().join("../shared/demo");
    match star_tests::official_demo_dir(
        std::env::var("STAR_DEMO_DIR").ok().as_deref(),
        std::env::var("CI").ok().as_deref(),
        &default,
    ) {
        Ok(Some(d)) => Some(d),
        Ok(None) => {
            // Straight to stderr: libtest captures only the print macros, and this notice must show.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "notice: the official demo files are not at {} (set STAR_DEMO_DIR): provenance and per-precision demo checks skipped",
                default.display()
            );
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn demo_export_args(
    src: &std::path::Path,
    out: &std::path::Path,
) -> star_export::export::ExportArgs {
    star_export::export::ExportArgs {
        transformer: src.join("star_demo_transformer.pth"),
        vae: src.join("vqvae.pth"),
        text_encoder: src.to_path_buf(),
        tokenizer: None,
        resolution: None,
        patch_nums: Some(vec![1, 2, 3, 4]),
        out: out.to_path_buf(),
        precision: Precision::Fp32,
        cfg: Some(3.0),
        top_k: Some(64),
        top_p: Some(0.9),
        quiet: true,
        allow_nonfinite: false,
        calibration: None,
        attention_budget: None,
    }
}

#[test]
fn batch_of_different_prompts_equals_each_alone() {
    let mut p = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    let prompts: Vec<String> = PROMPTS[..3].iter().map(|s| s.to_string()).collect();
    let batch = p
        .generate(&prompts, "", &params(&p, 7), &mut NoHooks)
        .unwrap();
    let (h, w) = (batch.image.shape[2], batch.image.shape[3]);
    for (i, pr) in prompts.iter().enumerate() {
        let alone = p
            .generate(
                std::slice::from_ref(pr),
                "",
                &params(&p, 7 + i as u64),
                &mut NoHooks,
            )
            .unwrap();
        let a = to_rgb8(alone.image.as_f32().unwrap(), 0, h, w);
        let b = to_rgb8(batch.image.as_f32().unwrap(), i, h, w);
        assert_eq!(
            a,
            b,
            "image {i} of the batch differs from its single generation with seed {}",
            7 + i
        );
    }
}

#[test]
fn same_seed_same_image_other_seed_other_image() {
    let mut p = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    let pr = vec![PROMPTS[0].to_string()];
    let a = p.generate(&pr, "", &params(&p, 5), &mut NoHooks).unwrap();
    let b = p.generate(&pr, "", &params(&p, 5), &mut NoHooks).unwrap();
    let c = p.generate(&pr, "", &params(&p, 6), &mut NoHooks).unwrap();
    assert_eq!(a.image.as_f32().unwrap(), b.image.as_f32().unwrap());
    assert_ne!(a.image.as_f32().unwrap(), c.image.as_f32().unwrap());
}

#[test]
fn recomputing_earlier_scales_gives_the_same_image_as_the_kv_cache() {
    let mut p = Pipeline::open(&demo_model(), BackendOptions::default()).unwrap();
    let pr = vec![PROMPTS[4].to_string()];
    let cached = p.generate(&pr, "", &params(&p, 11), &mut NoHooks).unwrap();
    let mut gp = params(&p, 11);
    gp.recompute_past = true;
    p.timings.clear();
    let recomputed = p.generate(&pr, "", &gp, &mut NoHooks).unwrap();
    assert!(
        p.timings.get("recompute_past") > 0.0,
        "the variant did not re-run earlier scales"
    );
    assert_eq!(
        cached.image.as_f32().unwrap(),
        recomputed.image.as_f32().unwrap()
    );
}

#[test]
fn embedded_demo_graphs_pass_the_onnx_checker() {
    let out = star_tests::onnx_check(&demo_model()).unwrap_or_else(|e| panic!("onnx.checker: {e}"));
    println!("{out}");
}

/// The embedded model is exactly what star-export makes of the official demo files (../shared/demo,
/// or STAR_DEMO_DIR), so it can never drift from the exporter. A clone with nothing beside it
/// (and not under CI) skips the check with a notice; CI must have the files.
#[test]
fn embedded_demo_is_the_export_of_the_official_files() {
    let Some(src) = official_demo() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let m = star_export::export::export(&demo_export_args(&src, &out))
        .expect("export of the official demo");
    assert_eq!(m.config.text_width, 128);
    assert_eq!(m.schedule.image_size, 64);
    let embedded = star_artifact::manifest::Manifest::load(&demo_model()).unwrap();
    assert_eq!(
        m.model_hash, embedded.model_hash,
        "assets/demo-model is stale: regenerate it with scripts/export-demo.sh"
    );
}
