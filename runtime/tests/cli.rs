//! star-run's command-line contract: each bad input gives one clear line on stderr, exit code 2,
//! and no PNG; `--help` texts are snapshotted.

use std::path::{Path, PathBuf};

fn demo() -> PathBuf {
    PathBuf::from(star_pipeline::EMBEDDED_MODEL)
}

use star_cli_test::Out;

fn star_run(args: &[&str], env: &[(&str, &str)]) -> Out {
    star_cli_test::run(env!("CARGO_BIN_EXE_star-run"), args, env)
}

/// A private copy of the demo model directory to damage.
fn copy_demo(to: &Path) -> PathBuf {
    let dst = to.join("model");
    std::fs::create_dir_all(dst.join("tokenizer")).unwrap();
    for e in std::fs::read_dir(demo()).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    for e in std::fs::read_dir(demo().join("tokenizer"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), dst.join("tokenizer").join(e.file_name())).unwrap();
    }
    dst
}

/// Replace the first occurrence of `from` in a model directory's manifest.json.
fn edit_manifest(model: &Path, from: &str, to: &str) {
    let p = model.join("manifest.json");
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "{from} not in {}", p.display());
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
}

fn expect_error(model: &Path, extra: &[&str], env: &[(&str, &str)], needle: &str) {
    let t = tempfile::tempdir().unwrap();
    let png = t.path().join("out.png");
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle on a blue background",
        "--out",
        png.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = star_run(&args, env);
    o.assert_refused(needle);
    assert!(!png.exists(), "a PNG was written despite the error");
    let stray: Vec<_> = std::fs::read_dir(t.path()).unwrap().flatten().collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

#[test]
fn missing_model_directory() {
    expect_error(
        Path::new("/nonexistent/model"),
        &[],
        &[],
        "no such model directory",
    );
}

#[test]
fn partial_model_directory() {
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    std::fs::remove_file(m.join("step.onnx")).unwrap();
    expect_error(&m, &[], &[], "step.onnx is listed but missing");
}

#[test]
fn manifest_schema_mismatch() {
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    edit_manifest(&m, "\"schema_version\": 5", "\"schema_version\": 99");
    expect_error(&m, &[], &[], "schema version 99");
}

/// A directory exported before the per-stage-kind graphs (schema v1: one graph per scale) is
/// refused with a re-export hint, before anything else is read.
#[test]
fn schema_v1_directory_is_refused_with_a_re_export_hint() {
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    edit_manifest(&m, "\"schema_version\": 5", "\"schema_version\": 1");
    expect_error(
        &m,
        &[],
        &[],
        "schema version 1, this build reads version 5; re-export the model",
    );
}

/// Schema v2 (before per-graph precisions), v3 (before the block-major KV cache) and v4 (before
/// the sample graph and the KV cache in the compute precision) likewise.
#[test]
fn schema_v2_to_v4_directories_are_refused_with_a_re_export_hint() {
    for v in [2, 3, 4] {
        let t = tempfile::tempdir().unwrap();
        let m = copy_demo(t.path());
        edit_manifest(
            &m,
            "\"schema_version\": 5",
            &format!("\"schema_version\": {v}"),
        );
        expect_error(
            &m,
            &[],
            &[],
            &format!("schema version {v}, this build reads version 5; re-export the model"),
        );
    }
}

#[test]
fn weights_hash_mismatch() {
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    let p = m.join("weights.bin");
    let mut b = std::fs::read(&p).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    std::fs::write(&p, b).unwrap();
    expect_error(&m, &[], &[], "does not match the manifest");
}

/// A manifest whose precision disagrees with its graphs' is refused, never run as if it
/// were right.
#[test]
fn precision_disagreeing_with_the_graphs_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    edit_manifest(&m, "\"precision\": \"fp32\"", "\"precision\": \"fp16\"");
    expect_error(
        &m,
        &[],
        &[],
        "is 'fp32', but a fp16 model's step_first graph is 'fp16'",
    );
    // The KV cache's element type is the precision's.
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    edit_manifest(
        &m,
        "\"kv_cache_dtype\": \"float32\"",
        "\"kv_cache_dtype\": \"float16\"",
    );
    expect_error(
        &m,
        &[],
        &[],
        "kv_cache_dtype = 'float16', but a fp32 model's KV cache is float32",
    );
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    edit_manifest(&m, "\"precision\": \"fp32\"", "\"precision\": \"bf16\"");
    expect_error(
        &m,
        &[],
        &[],
        "unknown variant `bf16`, expected one of `fp32`, `fp16`, `int8`",
    );
}

#[test]
fn unknown_backend() {
    expect_error(
        &demo(),
        &["--backend", "cuda-magic"],
        &[],
        "backend 'cuda-magic' is not available in this build (available: ort-cpu, ort-cuda, ort-trt",
    );
}

#[test]
fn gpu_backends_without_their_libraries_are_refused() {
    // No GPU build of ONNX Runtime where it is looked for.
    expect_error(
        &demo(),
        &["--backend", "ort-cuda"],
        &[("ORT_GPU_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
        "the GPU build of ONNX Runtime not found (ORT_GPU_DYLIB_PATH=/nonexistent/libonnxruntime.so does not exist); install it with `bash scripts/setup-ort.sh --gpu`",
    );
    // The CPU build is not mistaken for it.
    let cpu = cpu_library();
    let cpu = cpu.to_str().unwrap();
    expect_error(
        &demo(),
        &["--backend", "ort-cuda"],
        &[("ORT_GPU_DYLIB_PATH", cpu)],
        "has no libonnxruntime_providers_cuda.so beside it: it is the CPU build",
    );
    expect_error(
        &demo(),
        &["--backend", "tensorrt"],
        &[],
        if cfg!(feature = "tensorrt") {
            "backend tensorrt runs engine directories: build one with `star-export build-engine"
        } else {
            "backend tensorrt: this build has no TensorRT support; rebuild with"
        },
    );
    expect_error(
        &demo(),
        &["--backend", "ort-trt"],
        &[],
        "backend ort-trt runs engine directories: build one with `star-export build-engine",
    );
}

/// The CPU build of ONNX Runtime the tests run with (ORT_DYLIB_PATH, or ./.venv).
fn cpu_library() -> PathBuf {
    std::env::var("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            star_engines::ort::ort_library_in_venv(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"),
            )
            .expect("the CPU build of ONNX Runtime (bash scripts/setup-ort.sh)")
        })
}

/// A GPU build of ONNX Runtime (its provider library present) on a machine without an NVIDIA
/// driver: refused before any model work, naming the missing driver.
#[test]
fn gpu_backend_without_a_gpu_is_refused() {
    if Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let cpu = cpu_library();
    let lib = t.path().join("libonnxruntime.so.1.31.1");
    std::fs::copy(&cpu, &lib).unwrap();
    std::fs::write(t.path().join("libonnxruntime_providers_cuda.so"), b"").unwrap();
    expect_error(
        &demo(),
        &["--backend", "ort-cuda", "--device", "1"],
        &[("ORT_GPU_DYLIB_PATH", lib.to_str().unwrap())],
        "backend ort-cuda: no usable NVIDIA GPU: libcuda.so.1 not found",
    );
    // compare takes the same backend and device options (what the GPU check runs).
    let prompts = t.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\n").unwrap();
    let d = demo();
    let o = star_run(
        &[
            "compare",
            "--backend",
            "ort-cuda",
            "--allow-cpu-fallback",
            "--verbose",
            "--device",
            "0",
            "--reference",
            d.to_str().unwrap(),
            "--candidate",
            d.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
        ],
        &[("ORT_GPU_DYLIB_PATH", lib.to_str().unwrap())],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("no usable NVIDIA GPU: libcuda.so.1 not found"),
        "{}",
        o.stderr
    );
}

#[test]
fn engine_directories_are_checked_before_loading() {
    let t = tempfile::tempdir().unwrap();
    // Not an engine directory (a dry run's plan only).
    std::fs::write(t.path().join("plan.json"), "{}").unwrap();
    let e = t.path().to_str().unwrap();
    expect_error(
        &demo(),
        &["--engine", e],
        &[],
        "engine.json: manifest: missing: not an engine directory",
    );
    // An engine directory for a backend this build lacks, or whose library is missing here.
    let hash = star_artifact::manifest::Manifest::load(&demo())
        .unwrap()
        .model_hash;
    let em = |backend: &str| {
        format!(
            r#"{{"schema_version": 1, "producer": "t", "target": {{"gpu": {{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_bytes": 85899345920}}, "tensorrt": "11.4.0"}},
               "plan": {{"schema_version": 1, "backend": "{backend}", "model": {{"path": "{}", "model_hash": "{hash}", "precision": "fp32", "schema_version": 4, "depth": 4, "image_size": 64, "scales": 4, "sampler": false}},
               "builder": {{"batch": 1, "workspace_gb": null, "opt_level": 3}}, "engines": []}}, "built": []}}"#,
            demo().display()
        )
    };
    std::fs::write(t.path().join("engine.json"), em("tensorrt")).unwrap();
    expect_error(
        &demo(),
        &["--engine", e],
        &[("STAR_TENSORRT_LIB", "/nonexistent/libnvinfer.so.11")],
        if cfg!(feature = "tensorrt") {
            "backend tensorrt: the TensorRT 11 library not found (/nonexistent/libnvinfer.so.11:"
        } else {
            "no TensorRT support"
        },
    );
    std::fs::write(t.path().join("engine.json"), em("ort-trt")).unwrap();
    expect_error(
        &demo(),
        &["--engine", e],
        &[("ORT_GPU_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
        "GPU build of ONNX Runtime not found",
    );
    // A model directory given as --engine (once an alias of --model) says what to use instead.
    let d = demo();
    expect_error(
        &demo(),
        &["--engine", d.to_str().unwrap()],
        &[],
        "is a model directory, not an engine directory: run it with --model",
    );
    // --engine takes its backend from the engine directory.
    let o = star_run(
        &["--engine", e, "--backend", "ort-cpu", "--prompt", "x"],
        &[],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("cannot be used with"), "{}", o.stderr);
}

#[test]
fn onnx_runtime_library_not_found_says_how_to_install() {
    expect_error(
        &demo(),
        &[],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
        "pip install onnxruntime",
    );
}

#[test]
fn bad_sampling_arguments() {
    expect_error(
        &demo(),
        &["--top-k", "100000"],
        &[],
        "exceeds the model's vocabulary",
    );
    expect_error(&demo(), &["--top-p", "1.5"], &[], "must be in [0, 1]");
    expect_error(
        &demo(),
        &["--batch", "0"],
        &[],
        "--batch must be at least 1",
    );
}

#[test]
fn unwritable_output() {
    let o = star_run(
        &[
            "--prompt",
            "a red circle on a blue background",
            "--out",
            "/nonexistent/dir/x.png",
        ],
        &[],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("does not exist"), "{}", o.stderr);
}

#[test]
fn over_long_prompt_warns_and_still_generates() {
    let t = tempfile::tempdir().unwrap();
    let png = t.path().join("long.png");
    let long = "a red circle on a blue background ".repeat(20);
    let o = star_run(&["--prompt", &long, "--out", png.to_str().unwrap()], &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("longer than 75 CLIP tokens and was truncated"),
        "{}",
        o.stderr
    );
    assert!(png.is_file());
}

#[test]
fn png_carries_metadata_and_same_seed_gives_same_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a.png"), t.path().join("b.png"));
    for p in [&a, &b] {
        let o = star_run(
            &[
                "--prompt",
                "a white circle on a red background",
                "--seed",
                "3",
                "--out",
                p.to_str().unwrap(),
                "--quiet",
            ],
            &[],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(
            o.stderr.is_empty() && o.stdout.is_empty(),
            "--quiet printed something"
        );
    }
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes, std::fs::read(&b).unwrap());
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let r = dec.read_info().unwrap();
    let info = r.info();
    assert_eq!(
        (info.width, info.height, info.color_type, info.bit_depth),
        (64, 64, png::ColorType::Rgb, png::BitDepth::Eight)
    );
    let mut text: std::collections::HashMap<_, _> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        text.insert(t.keyword.clone(), t.get_text().unwrap());
    }
    assert_eq!(text["prompt"], "a white circle on a red background");
    assert_eq!(text["seed"], "3");
    assert_eq!(text["cfg"], "3");
    assert_eq!(text["top_k"], "64");
    assert_eq!(text["backend"], "ort-cpu");
    assert_eq!(text["precision"], "fp32");
    for k in ["negative_prompt", "top_p", "model_hash", "software"] {
        assert!(text.contains_key(k), "no {k}");
    }
}

#[test]
fn out_dir_names_one_file_per_image() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("imgs");
    let o = star_run(
        &[
            "--prompt",
            "a red circle on a blue background",
            "--prompt",
            "a green square on a yellow background",
            "--batch",
            "2",
            "--out-dir",
            d.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mut names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["img_000.png", "img_001.png", "img_002.png", "img_003.png"]
    );
}

#[test]
fn help_texts() {
    for (name, args) in [
        ("help", vec!["--help"]),
        ("replay_help", vec!["replay", "--help"]),
        ("bench_help", vec!["bench", "--help"]),
    ] {
        let o = star_run(&args, &[]);
        assert_eq!(o.code, 0);
        insta::assert_snapshot!(name, o.stdout);
    }
}

/// Every tEXt and iTXt field of a PNG file.
fn png_text(path: &Path) -> std::collections::HashMap<String, (String, &'static str)> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let r = dec.read_info().unwrap();
    let info = r.info();
    let mut m = std::collections::HashMap::new();
    for t in &info.uncompressed_latin1_text {
        m.insert(t.keyword.clone(), (t.text.clone(), "tEXt"));
    }
    for t in &info.utf8_text {
        m.insert(t.keyword.clone(), (t.get_text().unwrap(), "iTXt"));
    }
    m
}

#[test]
fn non_latin1_prompts_round_trip_through_utf8_metadata() {
    let t = tempfile::tempdir().unwrap();
    let png = t.path().join("cat.png");
    let prompt = "一只红色的猫 “quoted” ☕ 🐱 — ‘single’";
    let negative = "ぼやけた 😶‍🌫️";
    let o = star_run(
        &[
            "--prompt",
            prompt,
            "--negative-prompt",
            negative,
            "--out",
            png.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let text = png_text(&png);
    assert_eq!(text["prompt"], (prompt.to_string(), "iTXt"));
    assert_eq!(text["negative_prompt"], (negative.to_string(), "iTXt"));
    assert_eq!(text["prompt"].0.as_bytes(), prompt.as_bytes());
    assert_eq!(text["seed"], ("42".to_string(), "tEXt"));
}

#[test]
fn manifest_that_disagrees_with_its_graphs_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    let p = m.join("manifest.json");
    let orig = std::fs::read_to_string(&p).unwrap();
    for (from, to, needle) in [
        ("\"depth\": 4", "\"depth\": 5", "config.depth"),
        (
            "\"patch_nums\": [\n      1,\n      2,\n      3,\n      4\n    ]",
            "\"patch_nums\": [\n      1,\n      2,\n      3,\n      5\n    ]",
            "schedule",
        ),
        (
            "\"total_tokens\": 30",
            "\"total_tokens\": 29",
            "schedule.total_tokens",
        ),
        (
            "\"dtype\": \"float32\"",
            "\"dtype\": \"float32x\"",
            "float32x",
        ),
        ("\"layers\": 2", "\"layers\": 3", "config.text.layers"),
    ] {
        assert!(orig.contains(from), "{from} not in the demo manifest");
        std::fs::write(&p, orig.replacen(from, to, 1)).unwrap();
        expect_error(&m, &[], &[], needle);
    }
}

/// An argument error comes before the model is even looked at: with a model directory that does
/// not exist, the error is still about the argument.
fn expect_arg_error(args: &[&str], needle: &str) {
    let t = tempfile::tempdir().unwrap();
    let model = ["--model", "/nonexistent/model"];
    let all: Vec<&str> = match args.first() {
        Some(&sub) if sub == "bench" || sub == "replay" => std::iter::once(sub)
            .chain(model)
            .chain(args[1..].iter().copied())
            .collect(),
        _ => model.iter().chain(args).copied().collect(),
    };
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_star-run"))
        .args(&all)
        .current_dir(t.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: '{needle}' not in {stderr}"
    );
    assert!(
        !stderr.contains("no such model directory"),
        "{args:?}: the model was opened before the argument was checked: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "{args:?}: left behind {left:?}");
}

#[test]
fn bad_arguments_are_refused_before_any_model_work() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_str().unwrap().to_string();
    let file = t.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let file = file.to_str().unwrap().to_string();
    let p = ["--prompt", "a red circle"];
    let with =
        |extra: &[&str]| -> Vec<String> { p.iter().chain(extra).map(|s| s.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&["--cfg", "NaN"]), "not finite"),
        (with(&["--cfg", "inf"]), "not finite"),
        (with(&["--cfg", "-5"]), "negative"),
        (with(&["--cfg", "abc"]), "not a number"),
        (with(&["--seed", "-1"]), "--seed"),
        (with(&["--top-p", "1.5"]), "[0, 1]"),
        (with(&["--top-p", "NaN"]), "[0, 1]"),
        (with(&["--top-k", "-3"]), "--top-k"),
        (with(&["--batch", "0"]), "--batch must be at least 1"),
        (with(&["--out", &dir]), "is a directory"),
        (with(&["--out", "/nonexistent/dir/x.png"]), "does not exist"),
        (with(&["--out-dir", &file]), "not a directory"),
        (with(&["--out", "a.png", "--out-dir", "d"]), "not both"),
        (vec![], "--prompt"),
        (with(&["--no-such-flag"]), "--no-such-flag"),
    ];
    for (args, needle) in cases {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        expect_arg_error(&a, needle);
    }
    // Subcommands too.
    expect_arg_error(&["bench", "--runs", "0"], "--runs");
    expect_arg_error(&["bench", "--json", &dir], "is a directory");
    expect_arg_error(&["bench", "--cfg", "-1"], "negative");
    expect_arg_error(
        &["replay", "--golden", "/nonexistent/fixture"],
        "no such fixture folder",
    );
}

#[test]
fn out_dir_is_created_only_when_images_are_written() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("new/imgs");
    // Refused after the directory check (top-k exceeds the vocabulary): nothing is created.
    let o = star_run(
        &[
            "--prompt",
            "x",
            "--top-k",
            "100000",
            "--out-dir",
            d.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        !t.path().join("new").exists(),
        "--out-dir was created for a refused run"
    );
}

/// Opening a directory trusts the stamps of the last full verification instead of re-hashing;
/// a file modified in place, even with its size and mtime restored, no longer matches its stamp
/// (its ctime changed) and is hashed again and refused. `verify` always hashes.
#[test]
fn integrity_stamps_skip_rehashing_but_never_a_modified_file() {
    let t = tempfile::tempdir().unwrap();
    let m = copy_demo(t.path());
    let cache = t.path().join("cache");
    let env = [("STAR_CACHE_DIR", cache.to_str().unwrap())];
    let png = t.path().join("x.png");
    let run = || {
        star_run(
            &[
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "a red circle on a blue background",
                "--out",
                png.to_str().unwrap(),
            ],
            &env,
        )
    };
    let first = run();
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(first.stderr.contains("GB hashed"), "{}", first.stderr);
    let second = run();
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second
            .stderr
            .contains("integrity stamps matched, nothing re-hashed"),
        "{}",
        second.stderr
    );
    let v = star_run(&["verify", "--model", m.to_str().unwrap()], &env);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(v.stdout.contains("match manifest.json"), "{}", v.stdout);

    // Flip one byte in place, then put the modification time back.
    let w = m.join("weights.bin");
    let mtime = std::fs::metadata(&w).unwrap().modified().unwrap();
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&w)
            .unwrap();
        f.seek(SeekFrom::Start(1000)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(1000)).unwrap();
        f.write_all(&[b[0] ^ 0x55]).unwrap();
        f.set_modified(mtime).unwrap();
    }
    assert_eq!(std::fs::metadata(&w).unwrap().modified().unwrap(), mtime);
    std::fs::remove_file(&png).unwrap();
    let third = run();
    assert_eq!(third.code, 2, "{}", third.stderr);
    assert!(
        third.stderr.contains("does not match the manifest"),
        "{}",
        third.stderr
    );
    assert!(!png.exists());
    let v = star_run(&["verify", "--model", m.to_str().unwrap()], &env);
    assert_eq!(v.code, 2, "{}", v.stderr);
}
