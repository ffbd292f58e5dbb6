//! `star-run serve` driven by the clients its users already have, pinned in the project's
//! Python environment (scripts/setup-ort.sh): the official `openai` SDK, `tritonclient[http]`
//! and schemathesis against the server's own OpenAPI document. The pixels each client gets are
//! compared here with the PNG `star-run --seed` writes.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var("STAR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| star_cli_test::root().join(".venv/bin/python"))
}

/// Run a Python client script; its failure fails the test with everything it printed.
fn client(args: &[&str]) {
    let py = python();
    let out = Command::new(&py).args(args).output().unwrap_or_else(|e| {
        panic!(
            "running {}: {e} (scripts/setup-ort.sh installs it)",
            py.display()
        )
    });
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("No module named"),
        "a client is not installed in {} (scripts/setup-ort.sh installs them): {text}",
        py.display()
    );
    assert!(out.status.success(), "{args:?} failed:\n{text}");
    println!("{text}");
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
        .display()
        .to_string()
}

/// The RGB pixels of the PNG `star-run --seed` writes.
fn cli_pixels(seed: u64, dir: &Path) -> Vec<u8> {
    let png = dir.join("cli.png");
    let ok = Command::new(bin())
        .args(["--prompt", "a red circle on a blue background", "--seed"])
        .arg(seed.to_string())
        .args(["--quiet", "--out"])
        .arg(&png)
        .status()
        .unwrap();
    assert!(ok.success());
    rgb_of(&std::fs::read(&png).unwrap())
}

fn rgb_of(png_bytes: &[u8]) -> Vec<u8> {
    let mut r = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    buf
}

#[test]
fn the_official_openai_sdk_generates_streams_previews_and_reads_every_error() {
    let s = start(&["--max-batch", "4", "--max-queue", "32"]);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().display().to_string();
    client(&[&script("openai_sdk.py"), &s.port.to_string(), &dir]);
    let plain = std::fs::read(t.path().join("plain.png")).unwrap();
    let cli = t.path().join("cli");
    std::fs::create_dir(&cli).unwrap();
    assert_eq!(rgb_of(&plain), cli_pixels(7, &cli));
}

#[test]
fn tritonclient_speaks_the_v2_protocol_and_infer_gives_the_cli_pixels() {
    let s = start(&[]);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().display().to_string();
    client(&[&script("triton.py"), &s.port.to_string(), &dir]);
    let rgb = std::fs::read(t.path().join("triton.rgb")).unwrap();
    assert_eq!(rgb, cli_pixels(7, t.path()));
}

/// schemathesis generates requests for every operation of `/openapi.json` (bounded in
/// examples) and checks that none is answered 5xx and every response conforms to the document:
/// its status documented, its content type, its schema, its headers.
#[test]
fn schemathesis_finds_no_5xx_and_no_response_outside_the_document() {
    let s = start(&["--max-queue", "64"]);
    let t = tempfile::tempdir().unwrap();
    let (_, _, models) = http(s.port, "GET", "/v1/models", "");
    let name = json(&models)["data"][0]["id"].as_str().unwrap().to_string();
    // Path parameters schemathesis cannot guess: the served model (other names are 404s).
    let config = t.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!("[parameters]\n\"path.name\" = \"{name}\"\n\"path.id\" = \"{name}\"\n"),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{}/openapi.json", s.port);
    let bin_dir = python();
    let st = bin_dir.parent().unwrap().join("schemathesis");
    let out = Command::new(&st)
        .arg("--config-file")
        .arg(&config)
        .args(["run", &url])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
            "--max-examples",
            "12",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "1",
            "--generation-deterministic",
            "--request-timeout",
            "60",
            "--workers",
            "1",
        ])
        .current_dir(t.path())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (scripts/setup-ort.sh installs it)", st.display()));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    println!("{text}");
}
