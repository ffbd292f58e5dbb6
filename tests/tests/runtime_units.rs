//! Tokenizer and sampling filter against the golden records.

use star_artifact::golden::{compare, Record};
use star_engines::Tensor;
use star_pipeline::sampler::{filter_row, softmax};
use star_pipeline::tokenizer::Tokenizer;
use star_tests::fixtures;

#[test]
fn tokenizer_matches_reference_ids_for_every_prompt() {
    let f = fixtures();
    let tok = Tokenizer::from_dir(&f.join("clip_tiny/tokenizer")).unwrap();
    let rec = Record::open(&f.join("text")).unwrap();
    let prompts: Vec<String> = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(f.join("text.json")).unwrap(),
    )
    .unwrap()["info"]["prompts"]
        .as_array()
        .expect("text.json info.prompts")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let ids = rec.get("input_ids").unwrap();
    let mask = rec.get("attention_mask").unwrap();
    assert_eq!(prompts.len(), ids.shape[0]);
    for (i, p) in prompts.iter().enumerate() {
        let e = tok.encode(p);
        assert_eq!(
            &e.ids[..],
            &ids.as_i64().unwrap()[i * 77..(i + 1) * 77],
            "ids of prompt {i}: {p:?}"
        );
        assert_eq!(
            &e.mask[..],
            &mask.as_i64().unwrap()[i * 77..(i + 1) * 77],
            "mask of prompt {i}"
        );
    }
    // The long prompt is truncated keeping EOS last.
    assert!(prompts.iter().any(|p| tok.encode(p).truncated));
}

#[test]
fn sampling_filter_matches_reference_including_ties() {
    let f = fixtures();
    let rec = Record::open(&f.join("sampling_filter")).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("sampling_filter.json")).unwrap())
            .unwrap();
    let cases = info["info"]["cases"].as_array().expect("cases");
    let mut n = 0;
    for (k, case) in cases.iter().enumerate() {
        let top_k = case["top_k"].as_u64().unwrap() as usize;
        let top_p = case["top_p"].as_f64().unwrap();
        for kind in ["rand", "ties"] {
            let logits = rec.get(&format!("{kind}.logits")).unwrap();
            let v = *logits.shape.last().unwrap();
            let mut filt = logits.as_f32().unwrap().to_vec();
            let mut probs = vec![];
            for row in filt.chunks_mut(v) {
                filter_row(row, top_k, top_p);
                probs.extend(softmax(row));
            }
            let name = format!("case{k}.{kind}.filtered");
            let gold = rec.get(&name).unwrap();
            if kind == "rand" {
                let c = compare(
                    "filter",
                    &name,
                    &Tensor::f32(logits.shape.clone(), filt),
                    &gold,
                    1e-6,
                );
                assert!(c.pass, "{name}: {c:?}");
                let name = format!("case{k}.{kind}.probs");
                let c = compare(
                    "filter",
                    &name,
                    &Tensor::f32(logits.shape.clone(), probs),
                    &rec.get(&name).unwrap(),
                    1e-5,
                );
                assert!(c.pass, "{name}: {c:?}");
            } else {
                // Ties at the top-p boundary: the release keeps whichever tied entries its
                // (unstable) sort puts last; we keep the highest indices of the tie group (stable
                // ascending sort). Same number kept, same decision for every non-tied entry.
                let (ours, gold) = (filt, gold.as_f32().unwrap().to_vec());
                for (r, (a, g)) in ours.chunks(v).zip(gold.chunks(v)).enumerate() {
                    let kept = |x: &[f32]| x.iter().filter(|y| y.is_finite()).count();
                    assert_eq!(kept(a), kept(g), "{name} row {r}: kept count");
                    let boundary = g
                        .iter()
                        .zip(&logits.as_f32().unwrap()[r * v..(r + 1) * v])
                        .filter(|(x, _)| x.is_finite())
                        .map(|(_, l)| *l)
                        .fold(f32::INFINITY, f32::min);
                    for (j, l) in logits.as_f32().unwrap()[r * v..(r + 1) * v]
                        .iter()
                        .enumerate()
                    {
                        if *l != boundary {
                            assert_eq!(
                                a[j].is_finite(),
                                g[j].is_finite(),
                                "{name} row {r} id {j} (not a boundary tie)"
                            );
                        }
                    }
                }
            }
            n += 1;
        }
    }
    assert_eq!(n, 6);
}
