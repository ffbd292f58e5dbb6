//! A damaged or hand-edited manifest never panics: each of 150 single-field mutations of the
//! demo's manifest.json is either refused when the directory is opened (one line naming what is
//! wrong) or is an edit the graphs cannot contradict, and then generates normally.

use serde_json::Value;
use star_engines::options::BackendOptions;
use star_pipeline::pipeline::{GenParams, NoHooks, Pipeline};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// SplitMix64: a fixed sequence, so the same 150 mutations run everywhere.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// JSON-pointer paths of every value (objects and arrays included: they can lose members).
fn paths(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                paths(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                paths(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    if !at.is_empty() {
        out.push(at);
    }
}

/// One mutation of the value at `ptr`; None when it would leave the value unchanged.
fn mutate(root: &mut Value, ptr: &str, rng: &mut Rng) -> Option<String> {
    let v = root.pointer_mut(ptr)?;
    let before = v.clone();
    let what = match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let options = [x + 1.0, x - 1.0, 2.0 * x, 0.0, -x - 1.0, 1e12, x + 0.5];
            let y = options[rng.below(options.len())];
            *v = if y.fract() == 0.0 && y.abs() < 9e15 {
                Value::from(y as i64)
            } else {
                Value::from(y)
            };
            format!("{before} -> {v}")
        }
        Value::String(s) => {
            let options = [
                format!("{s}x"),
                String::new(),
                "float32x".into(),
                s.to_uppercase(),
            ];
            *v = Value::String(options[rng.below(options.len())].clone());
            format!("{before} -> {v}")
        }
        Value::Bool(b) => {
            *v = Value::Bool(!*b);
            format!("{before} -> {v}")
        }
        Value::Array(a) => match rng.below(3) {
            0 if !a.is_empty() => {
                a.pop();
                "last element removed".into()
            }
            1 if !a.is_empty() => {
                let last = a[a.len() - 1].clone();
                a.push(last);
                "last element repeated".into()
            }
            _ => {
                a.clear();
                "emptied".into()
            }
        },
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            if keys.is_empty() {
                return None;
            }
            let k = &keys[rng.below(keys.len())];
            m.remove(k);
            format!("key '{k}' removed")
        }
        Value::Null => return None,
    };
    (*v != before).then_some(what)
}

/// Edits the graphs cannot contradict: labels and sampling defaults within their ranges.
fn harmless(ptr: &str) -> bool {
    ptr == "/producer" || ptr.starts_with("/sampling_defaults/") || ptr == "/config/text/heads"
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn manifest_mutations_are_refused_or_harmless_and_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&star_tests::demo_model(), &dir);
    let mpath = dir.join("manifest.json");
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    let mut all = vec![];
    paths(&original, String::new(), &mut all);
    all.sort();

    let mut rng = Rng(0x005E_ED0F_57A2);
    let (mut refused, mut accepted, mut panics, mut contradictions) = (0, 0, vec![], vec![]);
    let mut done = 0;
    while done < 150 {
        let ptr = all[rng.below(all.len())].clone();
        let mut m = original.clone();
        let Some(what) = mutate(&mut m, &ptr, &mut rng) else {
            continue;
        };
        done += 1;
        std::fs::write(&mpath, serde_json::to_string_pretty(&m).unwrap()).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
            let mut p =
                Pipeline::open(&dir, BackendOptions::default()).map_err(|e| e.to_string())?;
            let gp = GenParams::defaults(&p, 1);
            let g = p
                .generate(
                    &["a red circle on a blue background".into()],
                    "",
                    &gp,
                    &mut NoHooks,
                )
                .map_err(|e| format!("generation: {e}"))?;
            assert_eq!(g.image.shape, vec![1, 3, 64, 64]);
            Ok(())
        }));
        match r {
            Err(_) => panics.push(format!("{ptr}: {what}")),
            Ok(Err(e)) => {
                assert!(!e.contains('\n'), "{ptr}: {what}: multi-line error: {e}");
                assert!(
                    !e.starts_with("generation:"),
                    "{ptr}: {what}: opened, then failed mid-generation: {e}"
                );
                println!("refused  {ptr}: {what}: {e}");
                refused += 1;
            }
            Ok(Ok(())) => {
                println!("accepted {ptr}: {what}");
                accepted += 1;
                if !harmless(&ptr) {
                    contradictions.push(format!("{ptr}: {what}"));
                }
            }
        }
    }
    std::fs::write(&mpath, serde_json::to_string_pretty(&original).unwrap()).unwrap();
    println!("150 mutations: {refused} refused, {accepted} accepted (harmless edits)");
    assert!(panics.is_empty(), "panicked on: {panics:#?}");
    assert!(
        contradictions.is_empty(),
        "accepted manifests that contradict their graphs: {contradictions:#?}"
    );
    assert!(refused > 100, "only {refused} of 150 refused");
    // The untouched manifest still opens: the mutations did not damage the copy.
    Pipeline::open(&dir, BackendOptions::default()).unwrap();
}

/// Sessions are created from the graph bytes that were verified when the directory was opened:
/// a graph file replaced afterwards is never read.
#[test]
fn sessions_use_the_verified_graph_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&star_tests::demo_model(), &dir);
    let mut p = Pipeline::open(&dir, BackendOptions::default()).unwrap();
    for g in ["step.onnx", "text_encoder.onnx", "decoder.onnx", "vq.onnx"] {
        std::fs::write(dir.join(g), b"not a graph any more").unwrap();
    }
    let gp = GenParams::defaults(&p, 3);
    let g = p
        .generate(
            &["a red circle on a blue background".into()],
            "",
            &gp,
            &mut NoHooks,
        )
        .expect("generation from the verified graphs");
    assert_eq!(g.image.shape, vec![1, 3, 64, 64]);
}
