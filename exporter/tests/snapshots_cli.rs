//! Snapshots of star-export's `--help` texts and of the tiny-256 model's manifest (a change to the
//! artifact contract or to any exported byte shows up here).

use std::path::Path;

fn run(args: &[&str]) -> (i32, String) {
    let o = star_cli_test::run(env!("CARGO_BIN_EXE_star-export"), args, &[]);
    (o.code, o.stdout)
}

#[test]
fn help_texts() {
    for (name, args) in [
        ("help", vec!["--help"]),
        ("export_help", vec!["export", "--help"]),
        ("validate_help", vec!["validate", "--help"]),
        ("inspect_help", vec!["inspect", "--help"]),
        ("build_engine_help", vec!["build-engine", "--help"]),
    ] {
        let (code, out) = run(&args);
        assert_eq!(code, 0);
        insta::assert_snapshot!(name, out);
    }
}

#[test]
fn tiny_256_manifest() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    let (code, _) = run(&[
        "export",
        "--quiet",
        "--transformer",
        f.join("tiny-256/star.pth").to_str().unwrap(),
        "--vae",
        f.join("vqvae.pth").to_str().unwrap(),
        "--text-encoder",
        f.join("clip_tiny").to_str().unwrap(),
        "--resolution",
        "256",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    insta::assert_snapshot!("tiny_256_manifest", manifest);
}

#[test]
fn inspect_names_the_model() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let (code, out) = run(&["inspect", f.join("tiny-1024s/star.pth").to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("STAR transformer d3 (width 128, 2 heads x 64, vocab 256, Cvae 8, text width 64, 14 scales), stable sampler with 3 refiner blocks"), "{out}");
    let (_, out) = run(&["inspect", f.join("vqvae.pth").to_str().unwrap()]);
    assert!(
        out.contains("VAR multi-scale VQVAE (vocab 256, Cvae 8"),
        "{out}"
    );
    let (_, out) = run(&["inspect", f.join("clip_tiny").to_str().unwrap()]);
    assert!(
        out.contains("CLIP text encoder (width 64, 2 layers"),
        "{out}"
    );
}
