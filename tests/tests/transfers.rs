//! The engine-resident data path on ort-cpu, through the code ort-cuda runs: what crosses
//! between the host and the engine per generation (`ModelDir::transfers`), and the bookkeeping
//! of the engine's values (one address per value across scales and generations, bindings made
//! once, a batch change re-allocating).
//!
//! tiny-256 has the schedule of d16/256 (ten scales to 16×16, 256 px); the transfer volumes
//! depend on the schedule, the batch and the image only (ids, uniforms, the image: not the
//! width, depth or vocabulary), so its bounds are d16/256's (RESULTS.md has d16's own numbers
//! from `star-run bench --json`).

use star_artifact::dtype::Precision;
use star_engines::options::BackendOptions;
use star_engines::values::Slot;
use star_pipeline::pipeline::{GenParams, NoHooks, Pipeline};
use star_tests::*;

const SLACK: u64 = 64 << 10;

fn open(variant: &str, resolution: usize, tmp: &std::path::Path) -> Pipeline {
    let out = tmp.join("model");
    export_fixture_at(variant, resolution, Precision::Fp32, &out);
    Pipeline::open(&out, BackendOptions::default()).unwrap()
}

#[test]
fn a_generation_copies_only_tokens_uniforms_and_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = open("tiny-256", 256, tmp.path());
    let params = GenParams::defaults(&p, 7);
    assert!(params.cfg > 0.0, "with guidance");
    let prompts = ["a red circle".to_string()];
    p.generate(&prompts, "", &params, &mut NoHooks).unwrap();
    p.md.take_transfers();
    let g = p.generate(&prompts, "", &params, &mut NoHooks).unwrap();
    let t = p.md.take_transfers();
    let sch = &p.md.manifest.schedule;
    let positions = sch.total_tokens as u64;
    let ids = 2 * 77 * 8; // the prompt's and the negative's token ids
    let masks = 2 * 77 * 8; // their attention masks
    let uniforms = positions * 4;
    let image = (g.image.numel() * 4) as u64;
    let drawn = positions * (8 + 4); // token ids and probabilities, were they read
    println!("{t:#?}");
    assert!(
        t.total.engine_to_host_bytes <= drawn + image + SLACK,
        "engine -> host {} B > ids + probabilities + image + 64 KiB",
        t.total.engine_to_host_bytes
    );
    assert!(
        t.total.host_to_engine_bytes <= uniforms + masks + ids + SLACK,
        "host -> engine {} B > uniforms + masks + prompt ids + 64 KiB",
        t.total.host_to_engine_bytes
    );
    // What is copied exactly: the image out; in, the prompts, the uniforms, and per scale the
    // guidance pair and the scale index, with top-k (int64) and top-p (float32) once.
    let sn = sch.patch_nums.len() as u64;
    assert_eq!(t.total.engine_to_host_bytes, image);
    assert_eq!(
        t.total.host_to_engine_bytes,
        ids + masks + uniforms + sn * (8 + 8) + 8 + 4
    );
    assert_eq!(t.stages["decoder"].engine_to_host_bytes, image);
    assert_eq!(
        t.stages["sample"].host_to_engine_bytes,
        uniforms + sn * 8 + 8 + 4
    );
    assert!(
        !t.stages.contains_key("step"),
        "nothing of the step crosses"
    );
}

#[test]
fn values_keep_their_addresses_and_bindings_are_made_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = open("tiny-256", 256, tmp.path());
    let params = GenParams::defaults(&p, 3);
    let one = ["a red circle".to_string()];
    let slots = [
        Slot::X,
        Slot::Hidden,
        Slot::Logits,
        Slot::Idx,
        Slot::FHat(0),
        Slot::FHat(1),
        Slot::TextKv,
    ];
    let addresses = |p: &mut Pipeline| -> Vec<usize> {
        slots
            .iter()
            .map(|s| p.md.value_address(*s).expect("allocated"))
            .collect()
    };
    let a = p.generate(&one, "", &params, &mut NoHooks).unwrap();
    let (s1, a1) = (p.md.engine_state(), addresses(&mut p));
    // A value smaller than its buffer is a view of it: the last scale's x is (2, 256, C), the
    // buffer holds the largest any stage writes there.
    let x = p.md.held(Slot::X).unwrap();
    assert_eq!(x.shape[0], 2);
    // The next generation of the same batch allocates nothing and binds nothing anew, and
    // gives the same image (in-place writes into the same buffers).
    let b = p.generate(&one, "", &params, &mut NoHooks).unwrap();
    let (s2, a2) = (p.md.engine_state(), addresses(&mut p));
    assert_eq!(a1, a2, "addresses moved between generations");
    assert_eq!(s1.values_epoch, s2.values_epoch, "values re-allocated");
    assert_eq!(
        s1.bindings, s2.bindings,
        "bindings made again: {s1:?} {s2:?}"
    );
    assert_eq!(a.image, b.image);
    // One binding per stage run of a generation: text (2), step (one per scale), sample and
    // vq (one per scale), decoder.
    let sn = p.md.manifest.schedule.patch_nums.len();
    assert_eq!(s1.bindings, 2 + 3 * sn + 1, "{s1:?}");
    // A batch of two needs larger values: re-allocated, bound again.
    let two = ["a red circle".to_string(), "a blue square".to_string()];
    let c = p.generate(&two, "", &params, &mut NoHooks).unwrap();
    let s3 = p.md.engine_state();
    assert!(s3.values_epoch > s2.values_epoch, "{s3:?}");
    assert!(s3.value_bytes > s2.value_bytes);
    assert_eq!(
        s3.bindings,
        2 + 3 * sn + 1,
        "stale bindings dropped: {s3:?}"
    );
    // Batch invariance: the first image of the pair is the single one.
    let per = a.image.numel();
    assert_eq!(&c.image.as_f32().unwrap()[..per], a.image.as_f32().unwrap());
    // Back to one image: the larger buffers serve it as views, without re-allocating.
    let a3 = addresses(&mut p);
    let d = p.generate(&one, "", &params, &mut NoHooks).unwrap();
    assert_eq!(addresses(&mut p), a3);
    assert_eq!(p.md.engine_state().values_epoch, s3.values_epoch);
    assert_eq!(d.image, a.image);
}
