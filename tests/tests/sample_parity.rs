//! The engine's sampler (the exported `sample` graph, run by ONNX Runtime) against the reference
//! (`star_pipeline::sampler`: guidance, the release's top-k / top-p filter, the RNG contract's
//! draw), on every fixture's recorded logits and on `sampling_filter`'s random and tie-laden
//! rows, at several top-k / top-p / guidance settings, with the RNG contract's uniforms.
//!
//! Token ids must be identical except where the uniform lies within 1e-5 of a cumulative
//! boundary of the reference's probabilities, or a cumulative sum of the top-p filter within
//! 1e-5 of its threshold: f32 sums on the engine, f64 in the reference. Those cases are counted
//! and printed (`cargo test --test sample_parity -- --nocapture`); every other draw must agree,
//! and so must the probability of every agreeing draw (1e-5 relative).

use star_artifact::dtype::Precision;
use star_artifact::golden::Record;
use star_artifact::stage::io;
use star_pipeline::rng::{uniform, Purpose};
use star_pipeline::sampler::{filter_row, guide, pick, softmax};
use star_tests::*;

/// Within this of a boundary, f32 and f64 sums may disagree.
const BOUNDARY: f64 = 1e-5;

#[derive(Default, Debug)]
struct Tally {
    draws: usize,
    same: usize,
    uniform_boundary: usize,
    top_p_boundary: usize,
    /// (case, row, ours, reference)
    wrong: Vec<String>,
}

struct Setting {
    top_k: usize,
    top_p: f64,
}

const SETTINGS: &[Setting] = &[
    Setting {
        top_k: 0,
        top_p: 0.0,
    },
    Setting {
        top_k: 5,
        top_p: 0.0,
    },
    Setting {
        top_k: 38,
        top_p: 0.8,
    },
    Setting {
        top_k: 0,
        top_p: 0.9,
    },
    Setting {
        top_k: 128,
        top_p: 0.95,
    },
    Setting {
        top_k: 600,
        top_p: 0.8,
    },
    Setting {
        top_k: 1,
        top_p: 0.5,
    },
    Setting {
        top_k: 0,
        top_p: 1.0,
    },
];

/// The sample graph of an exported fixture model, as a session of its own (any number of
/// tokens per row, unlike the model's per-scale profiles).
fn sample_session(dir: &std::path::Path) -> ort::session::Session {
    let env = star_engines::ort::ort_environment().expect("bash scripts/setup-ort.sh");
    ort::session::Session::builder(env)
        .unwrap()
        .commit_from_file(dir.join("sample.onnx"))
        .unwrap()
}

/// The graph's draws for guided rows: logits [g ; 0] with guidance [1, 0] (1·g − 0·0 = g).
fn engine_draws(
    s: &mut ort::session::Session,
    guided: &[f32],
    rows: usize,
    v: usize,
    set: &Setting,
    u: &[f32],
) -> (Vec<i64>, Vec<f32>) {
    let mut logits = guided.to_vec();
    logits.resize(2 * rows * v, 0.0);
    engine_draws_guided(s, &logits, rows, v, [1.0, 0.0], set, u)
}

fn engine_draws_guided(
    s: &mut ort::session::Session,
    logits: &[f32],
    rows: usize,
    v: usize,
    guidance: [f32; 2],
    set: &Setting,
    u: &[f32],
) -> (Vec<i64>, Vec<f32>) {
    use ort::value::Tensor as T;
    let k = if set.top_k > 0 && set.top_k < v {
        set.top_k
    } else {
        v
    } as i64;
    let thr = if set.top_p > 0.0 {
        (1.0 - set.top_p) as f32
    } else {
        -1.0
    };
    let out = s
        .run(ort::inputs![
            io::LOGITS => T::from_array(([2, rows, v], logits.to_vec())).unwrap(),
            io::GUIDANCE => T::from_array(([2usize], guidance.to_vec())).unwrap(),
            io::TOP_K => T::from_array(([1usize], vec![k])).unwrap(),
            io::TOP_P => T::from_array(([1usize], vec![thr])).unwrap(),
            io::UNIFORMS => T::from_array(([1, rows], u.to_vec())).unwrap(),
        ])
        .unwrap();
    let (_, idx) = out[io::IDX].try_extract_tensor::<i64>().unwrap();
    let (_, prob) = out[io::PROB].try_extract_tensor::<f32>().unwrap();
    (idx.to_vec(), prob.to_vec())
}

/// Whether `u` lies within BOUNDARY of a cumulative boundary of `probs` (the reference's f64
/// cumulative sums over the total).
fn near_uniform_boundary(probs: &[f32], u: f64) -> bool {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let mut acc = 0f64;
    probs.iter().any(|&p| {
        acc += p as f64;
        p > 0.0 && (acc / total - u).abs() < BOUNDARY
    })
}

/// Whether a cumulative sum of the reference's top-p filter (ascending, after top-k) lies
/// within BOUNDARY of its threshold.
fn near_top_p_boundary(row: &[f32], set: &Setting) -> bool {
    if set.top_p <= 0.0 {
        return false;
    }
    let mut r = row.to_vec();
    filter_row(&mut r, set.top_k, 0.0);
    let mut finite: Vec<f32> = r.into_iter().filter(|x| x.is_finite()).collect();
    finite.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let probs = softmax(&finite);
    let thr = 1.0 - set.top_p;
    let mut acc = 0f64;
    probs.iter().any(|&p| {
        acc += p as f64;
        (acc - thr).abs() < BOUNDARY
    })
}

/// Both samplers on `rows` guided rows of `v` logits with uniforms of (seed, scale 0, sub-step
/// 0, position); mismatches classified.
#[allow(clippy::too_many_arguments)]
fn compare_rows(
    s: &mut ort::session::Session,
    case: &str,
    guided: &[f32],
    rows: usize,
    v: usize,
    set: &Setting,
    seed: u64,
    tally: &mut Tally,
) {
    let u64s: Vec<f64> = (0..rows)
        .map(|t| uniform(seed, 0, 0, t, Purpose::Token))
        .collect();
    let u32s: Vec<f32> = u64s.iter().map(|&u| u as f32).collect();
    let (ids, probs) = engine_draws(s, guided, rows, v, set, &u32s);
    for r in 0..rows {
        let row = &guided[r * v..(r + 1) * v];
        let mut f = row.to_vec();
        filter_row(&mut f, set.top_k, set.top_p);
        let p = softmax(&f);
        let (id, pr) = pick(&p, u64s[r]);
        tally.draws += 1;
        if ids[r] == id as i64 {
            tally.same += 1;
            let rel = ((probs[r] - pr) / pr.max(1e-30)).abs();
            assert!(
                rel < 1e-5,
                "{case} k={} p={} row {r}: token {id} has probability {} on the engine, {pr} in the reference",
                set.top_k,
                set.top_p,
                probs[r]
            );
        } else if near_uniform_boundary(&p, u64s[r]) {
            tally.uniform_boundary += 1;
        } else if near_top_p_boundary(row, set) {
            tally.top_p_boundary += 1;
        } else {
            tally.wrong.push(format!(
                "{case} k={} p={} row {r}: engine {} reference {id} (u = {})",
                set.top_k, set.top_p, ids[r], u64s[r]
            ));
        }
    }
}

fn report(what: &str, t: &Tally) {
    println!(
        "{what}: {} draws, {} identical, {} within 1e-5 of a cumulative boundary, {} within 1e-5 of the top-p threshold, {} other",
        t.draws,
        t.same,
        t.uniform_boundary,
        t.top_p_boundary,
        t.wrong.len()
    );
    assert!(
        t.wrong.is_empty(),
        "{what}: {:#?}",
        &t.wrong[..t.wrong.len().min(10)]
    );
    assert!(t.draws > 0);
}

#[test]
fn sample_graph_draws_what_the_reference_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let m = export_fixture_at("tiny-256", 256, Precision::Fp32, &out);
    let v = m.config.vocab;
    let mut s = sample_session(&out);

    // sampling_filter: random rows and rows full of ties, as guided logits.
    let rec = Record::open(&fixtures().join("sampling_filter")).unwrap();
    let mut tally = Tally::default();
    for name in ["rand.logits", "ties.logits"] {
        let t = rec.get(name).unwrap();
        assert_eq!(*t.shape.last().unwrap(), v, "{name}");
        let rows = t.numel() / v;
        for (i, set) in SETTINGS.iter().enumerate() {
            for seed in [0u64, 7, 1234] {
                let g = t.as_f32().unwrap();
                compare_rows(&mut s, name, g, rows, v, set, seed + i as u64, &mut tally);
            }
        }
    }
    report("sampling_filter", &tally);

    // Every fixture's recorded logits (2, n, V): the guidance mix on the engine too, at the
    // recorded scale's ramped t and at the full cfg.
    let mut tally = Tally::default();
    for variant in ["tiny-256", "tiny-1024s"] {
        let rec = Record::open(&fixtures().join(variant).join("gen_b1")).unwrap();
        let names: Vec<String> = rec
            .names()
            .into_iter()
            .filter(|n| n.ends_with(".logits") || n.ends_with(".sampler_logits"))
            .collect();
        assert!(!names.is_empty(), "{variant}");
        for name in names {
            let t = rec.get(&name).unwrap();
            if t.shape.len() != 3 || t.shape[0] != 2 || t.shape[2] != v {
                continue;
            }
            let n = t.shape[1];
            let logits = t.as_f32().unwrap();
            for (i, set) in SETTINGS.iter().enumerate() {
                for cfg in [1.5f64, 4.0] {
                    let seed = 99 + i as u64;
                    let u64s: Vec<f64> = (0..n)
                        .map(|p| uniform(seed, 0, 0, p, Purpose::Token))
                        .collect();
                    let u32s: Vec<f32> = u64s.iter().map(|&u| u as f32).collect();
                    let guided = guide(logits, 1, n, v, cfg);
                    let pair = [(1.0 + cfg) as f32, cfg as f32];
                    let (ids, _) = engine_draws_guided(&mut s, logits, n, v, pair, set, &u32s);
                    // The engine's guidance mix must be the reference's bit for bit: drawing
                    // from the host-guided rows gives the same ids.
                    let (ids_pre, _) = engine_draws(&mut s, &guided, n, v, set, &u32s);
                    assert_eq!(
                        ids, ids_pre,
                        "{variant} {name}: guidance on the engine differs"
                    );
                    compare_rows(&mut s, &name, &guided, n, v, set, seed, &mut tally);
                }
            }
        }
    }
    report("recorded logits", &tally);
}
