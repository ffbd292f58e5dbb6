//! Checkpoint readers, config inference and the CLI's bad-input contract (one clear line, exit
//! code 2, nothing written at --out).

use star_export::checkpoint::Checkpoint;
use star_export::config::{infer_transformer, Shapes};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    star_cli_test::fixtures()
}

/// A torch-style checkpoint of the given tensors, optionally with a foreign GLOBAL.
fn write_pth(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)], foreign: Option<&str>) {
    let mut w = star_export::pth_writer::PthWriter::create(path).unwrap();
    for (name, kind, shape, bytes) in tensors {
        w.tensor(name, kind, shape, |out| out.write_all(bytes))
            .unwrap();
    }
    w.finish(&[], foreign).unwrap();
}

#[test]
fn pth_and_safetensors_twins_hold_identical_tensors() {
    let f = fixtures().join("tiny-256");
    let a = Checkpoint::open(&f.join("star.pth"), &["trainer", "var_wo_ddp"]).unwrap();
    let b = Checkpoint::open(&f.join("star.safetensors"), &[]).unwrap();
    assert_eq!(a.tensors.len(), 47);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for k in a.keys() {
        assert_eq!(a.read_f32(k).unwrap(), b.read_f32(k).unwrap(), "{k}");
    }
}

#[test]
fn fp16_and_bf16_storages_are_converted() {
    let tmp = tempfile::tempdir().unwrap();
    let vals = [1.0f32, -2.5, 0.333, 65504.0, 1e-3, 7.0];
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let p = tmp.path().join("m.pth");
    write_pth(
        &p,
        &[
            ("h", "HalfStorage", vec![2, 3], f16),
            ("b", "BFloat16Storage", vec![3, 2], bf16),
        ],
        None,
    );
    let c = Checkpoint::open(&p, &[]).unwrap();
    assert_eq!(c.info("h").unwrap().shape, vec![2, 3]);
    let h = c.read_f32("h").unwrap();
    let b = c.read_f32("b").unwrap();
    for (i, v) in vals.iter().enumerate() {
        assert_eq!(h[i], half::f16::from_f32(*v).to_f32());
        assert_eq!(b[i], half::bf16::from_f32(*v).to_f32());
    }
}

/// Key/shape list of a full-size checkpoint built from the release's sizes (STAR-SPEC §2, §4, §5).
fn release_shapes(depth: usize, scales: usize, sampler: bool) -> Shapes {
    let c = 64 * depth;
    let mut s = Shapes::new();
    let mut put = |k: &str, v: &[usize]| {
        s.insert(k.to_string(), v.to_vec());
    };
    put("word_embed.weight", &[c, 32]);
    put("lvl_embed.weight", &[scales, c]);
    put("pos_start", &[1, 1, c]);
    put("encoder_proj.weight", &[c, 1024]);
    put("head_logits.weight", &[4096, c]);
    put("class_emb.weight", &[1001, c]);
    let block = |put: &mut dyn FnMut(&str, &[usize]), pre: &str, cross: bool| {
        put(&format!("{pre}.attn.mat_qkv.weight"), &[3 * c, c]);
        put(&format!("{pre}.attn.scale_mul_1H11"), &[1, depth, 1, 1]);
        put(&format!("{pre}.ffn.fc1.weight"), &[4 * c, c]);
        if cross {
            put(&format!("{pre}.cross_attn.mat_kv.weight"), &[2 * c, 1024]);
        }
    };
    for i in 0..depth {
        block(&mut put, &format!("blocks.{i}"), true);
    }
    if sampler {
        for j in 0..3 {
            block(&mut put, &format!("feat_extract_blocks.{j}"), false);
        }
        for (k, v) in [
            ("word_embed_head.weight", vec![c, 32]),
            ("lvl_embed_2.weight", vec![scales, c]),
            ("encoder_proj2.weight", vec![c, 1024]),
            ("pos_start_last", vec![1, 1, c]),
            ("head_proj.weight", vec![c, 2 * c]),
            ("head_logits2.weight", vec![4096, c]),
        ] {
            put(k, &v);
        }
    }
    s
}

#[test]
fn config_inference_on_release_key_lists() {
    let d30 = infer_transformer(&release_shapes(30, 14, true)).unwrap();
    assert_eq!(
        (
            d30.depth,
            d30.width,
            d30.heads,
            d30.head_dim,
            d30.vocab,
            d30.cvae,
            d30.text_width,
            d30.scales,
            d30.sampler_blocks
        ),
        (30, 1920, 30, 64, 4096, 32, 1024, 14, 3)
    );
    let d16 = infer_transformer(&release_shapes(16, 10, false)).unwrap();
    assert_eq!(
        (
            d16.depth,
            d16.width,
            d16.heads,
            d16.vocab,
            d16.scales,
            d16.sampler_blocks
        ),
        (16, 1024, 16, 4096, 10, 0)
    );
}

// ---- CLI bad input ---------------------------------------------------------------------------

fn export(args: &[&str]) -> star_cli_test::Out {
    let all: Vec<&str> = ["export", "--quiet"].iter().chain(args).copied().collect();
    star_cli_test::run(env!("CARGO_BIN_EXE_star-export"), &all, &[])
}

fn args_with(
    tmp: &Path,
    transformer: &Path,
    vae: &Path,
    text: &Path,
    res: &str,
) -> (Vec<String>, PathBuf) {
    let out = tmp.join("out");
    let v = vec![
        "--transformer".into(),
        transformer.display().to_string(),
        "--vae".into(),
        vae.display().to_string(),
        "--text-encoder".into(),
        text.display().to_string(),
        "--resolution".into(),
        res.into(),
        "--out".into(),
        out.display().to_string(),
    ];
    (v, out)
}

fn expect_fail(tmp: &Path, transformer: &Path, vae: &Path, text: &Path, res: &str, needle: &str) {
    let (a, out) = args_with(tmp, transformer, vae, text, res);
    let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let r = export(&refs);
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
    assert_eq!(
        r.stderr.trim().lines().count(),
        1,
        "one line expected: {}",
        r.stderr
    );
    assert!(r.stderr.contains(needle), "'{needle}' not in: {}", r.stderr);
    assert!(!out.exists(), "--out was created");
    let leftovers: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".star-export"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directory left behind");
}

/// Rewrite the tiny-256 transformer with one change.
fn mutated(tmp: &Path, f: impl Fn(&str, &mut Vec<usize>, &mut Vec<f32>) -> bool) -> PathBuf {
    let c = Checkpoint::open(
        &fixtures().join("tiny-256/star.pth"),
        &["trainer", "var_wo_ddp"],
    )
    .unwrap();
    let mut owned = vec![];
    for k in c.keys() {
        let mut shape = c.info(k).unwrap().shape.clone();
        let mut data = c.read_f32(k).unwrap();
        if f(k, &mut shape, &mut data) {
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            owned.push((k.clone(), shape, bytes));
        }
    }
    // Nested like the release: {"trainer": {"var_wo_ddp": state_dict}}.
    let p = tmp.join("mutated.pth");
    let mut w = star_export::pth_writer::PthWriter::create(&p).unwrap();
    for (k, shape, bytes) in &owned {
        w.tensor(k, "FloatStorage", shape, |out| out.write_all(bytes))
            .unwrap();
    }
    w.finish(&["trainer", "var_wo_ddp"], None).unwrap();
    p
}

#[test]
fn rewritten_nested_checkpoint_reads_back_identically() {
    let t = tempfile::tempdir().unwrap();
    let p = mutated(t.path(), |_, _, _| true);
    let a = Checkpoint::open(
        &fixtures().join("tiny-256/star.pth"),
        &["trainer", "var_wo_ddp"],
    )
    .unwrap();
    let b = Checkpoint::open(&p, &["trainer", "var_wo_ddp"]).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for k in a.keys() {
        assert_eq!(a.read_f32(k).unwrap(), b.read_f32(k).unwrap(), "{k}");
    }
}

#[test]
fn bad_inputs_fail_cleanly_with_exit_2_and_write_nothing() {
    let f = fixtures();
    let (star, vae, clip) = (
        f.join("tiny-256/star.pth"),
        f.join("vqvae.pth"),
        f.join("clip_tiny"),
    );
    let t = tempfile::tempdir().unwrap();
    let tmp = t.path();

    let trunc = tmp.join("trunc.pth");
    let bytes = std::fs::read(&star).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    expect_fail(
        tmp,
        &trunc,
        &vae,
        &clip,
        "256",
        "not a PyTorch zip checkpoint",
    );

    let notzip = tmp.join("notzip.pth");
    std::fs::write(&notzip, b"hello, not a checkpoint").unwrap();
    expect_fail(
        tmp,
        &notzip,
        &vae,
        &clip,
        "256",
        "not a PyTorch zip checkpoint",
    );

    let evil = tmp.join("evil.pth");
    write_pth(
        &evil,
        &[("w", "FloatStorage", vec![1], 1f32.to_le_bytes().to_vec())],
        Some("os.system"),
    );
    expect_fail(
        tmp,
        &evil,
        &vae,
        &clip,
        "256",
        "refusing to unpickle global 'os.system'",
    );

    let missing = mutated(tmp, |k, _, _| k != "blocks.1.ffn.fc2.weight");
    expect_fail(
        tmp,
        &missing,
        &vae,
        &clip,
        "256",
        "missing tensor 'blocks.1.ffn.fc2.weight'",
    );

    let misshaped = mutated(tmp, |k, s, d| {
        if k == "blocks.0.attn.proj.weight" {
            *s = vec![128, 127];
            d.truncate(128 * 127);
        }
        true
    });
    expect_fail(
        tmp,
        &misshaped,
        &vae,
        &clip,
        "256",
        "blocks.0.attn.proj.weight",
    );

    let vocab = mutated(tmp, |k, s, d| {
        if k == "head_logits.weight" {
            *s = vec![255, 128];
            d.truncate(255 * 128);
        }
        true
    });
    expect_fail(tmp, &vocab, &vae, &clip, "256", "VQ codebook size");

    let width = mutated(tmp, |k, s, d| {
        if k == "encoder_proj.weight" {
            *s = vec![128, 32];
            d.truncate(128 * 32);
        }
        true
    });
    expect_fail(
        tmp,
        &width,
        &vae,
        &clip,
        "256",
        "text encoder width 64 != transformer encoder_proj input 32",
    );

    expect_fail(tmp, &star, &vae, &clip, "300", "unsupported resolution 300");

    for (bad, shown) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let nonfinite = mutated(tmp, |k, _, d| {
            if k == "blocks.1.attn.proj.weight" {
                d[5] = bad;
            }
            true
        });
        expect_fail(
            tmp,
            &nonfinite,
            &vae,
            &clip,
            "256",
            &format!("tensor 'blocks.1.attn.proj.weight' holds a non-finite value ({shown} at flat index 5)"),
        );
    }
}

#[test]
fn allow_nonfinite_exports_what_is_refused_by_default() {
    let f = fixtures();
    let t = tempfile::tempdir().unwrap();
    let nan = mutated(t.path(), |k, _, d| {
        if k == "head_logits.weight" {
            d[0] = f32::NAN;
        }
        true
    });
    let (mut a, out) = args_with(
        t.path(),
        &nan,
        &f.join("vqvae.pth"),
        &f.join("clip_tiny"),
        "256",
    );
    a.push("--allow-nonfinite".into());
    let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let r = export(&refs);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(out.join("manifest.json").is_file());
}

#[test]
fn nonfinite_fp16_weights_are_refused_too() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("m.pth");
    let bits: Vec<u8> = [1.0f32, f32::INFINITY, 2.0]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    write_pth(&p, &[("h", "HalfStorage", vec![3], bits)], None);
    let c = Checkpoint::open(&p, &[]).unwrap();
    let e = c.read_f32("h").unwrap_err().to_string();
    assert!(
        e.contains("'h' holds a non-finite value (inf at flat index 1)"),
        "{e}"
    );
    let e = c.read_f16_bits("h").unwrap_err().to_string();
    assert!(e.contains("non-finite"), "{e}");
    let mut c = c;
    c.allow_nonfinite = true;
    assert!(c.read_f32("h").unwrap()[1].is_infinite());
}

#[test]
fn unwritable_out_fails_cleanly() {
    let f = fixtures();
    let t = tempfile::tempdir().unwrap();
    let ro = t.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let target = ro.join("nested/missing/out");
    let r = export(&[
        "--transformer",
        f.join("tiny-256/star.pth").to_str().unwrap(),
        "--vae",
        f.join("vqvae.pth").to_str().unwrap(),
        "--text-encoder",
        f.join("clip_tiny").to_str().unwrap(),
        "--resolution",
        "256",
        "--out",
        target.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);
    assert!(!target.exists());
}

#[test]
fn hf_folder_with_pytorch_model_bin_reads_like_its_safetensors() {
    let st = Checkpoint::open(&fixtures().join("clip_tiny/text_encoder"), &[]).unwrap();
    assert_eq!(st.format, "safetensors");
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("text_encoder");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixtures().join("clip_tiny/text_encoder/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let mut w = star_export::pth_writer::PthWriter::create(&dir.join("pytorch_model.bin")).unwrap();
    for k in st.keys() {
        let data = st.read_f32(k).unwrap();
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.tensor(k, "FloatStorage", &st.info(k).unwrap().shape, |o| {
            o.write_all(&bytes)
        })
        .unwrap();
    }
    w.finish(&[], None).unwrap();
    let bin = Checkpoint::open(&dir, &[]).unwrap();
    assert_eq!(bin.format, "pytorch-zip");
    assert_eq!(
        st.keys().collect::<Vec<_>>(),
        bin.keys().collect::<Vec<_>>()
    );
    for k in st.keys() {
        assert_eq!(st.read_f32(k).unwrap(), bin.read_f32(k).unwrap(), "{k}");
    }
}

#[test]
fn argument_errors_are_one_line_before_any_work() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let o = out.to_str().unwrap();
    let export = |extra: &[&'static str]| -> Vec<String> {
        [
            "export",
            "--transformer",
            "x",
            "--vae",
            "y",
            "--text-encoder",
            "z",
            "--out",
            o,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (export(&["--default-cfg", "-1"]), "negative"),
        (export(&["--default-cfg", "NaN"]), "not finite"),
        (export(&["--default-top-p", "2"]), "[0, 1]"),
        (
            vec!["export".into(), "--no-such-flag".into()],
            "--no-such-flag",
        ),
        (vec!["validate".into()], "--model"),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        star_cli_test::run(env!("CARGO_BIN_EXE_star-export"), &args, &[]).assert_refused(needle);
        assert!(!out.exists());
    }
}
