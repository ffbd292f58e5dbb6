//! An interrupted export leaves nothing behind: SIGINT/SIGTERM remove the temporary directory
//! (exit 130); after a SIGKILL, which no handler sees, the next export to the same --out removes
//! the remains and says so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn args(out: &Path) -> Vec<String> {
    let f = fixtures();
    vec![
        "export".into(),
        "--transformer".into(),
        f.join("tiny-256/star.pth").display().to_string(),
        "--vae".into(),
        f.join("vqvae.pth").display().to_string(),
        "--text-encoder".into(),
        f.join("clip_tiny").display().to_string(),
        "--resolution".into(),
        "256".into(),
        "--out".into(),
        out.display().to_string(),
    ]
}

/// Start an export slowed down to 300 ms per graph and wait until it has written its first
/// graph (the weights file is open and growing then).
fn start_slow_export(out: &Path) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_star-export"))
        .args(args(out))
        .env("STAR_EXPORT_STAGE_DELAY_MS", "300")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "export ended before its first graph"
        );
        if line.starts_with("[  1/") {
            break;
        }
    }
    (child, err)
}

fn temp_dirs(parent: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".star-export-")
        })
        .collect()
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({sig}) failed");
}

#[test]
fn sigint_and_sigterm_leave_nothing_behind() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("model");
        let (mut child, mut err) = start_slow_export(&out);
        assert_eq!(
            temp_dirs(t.path()).len(),
            1,
            "no temporary directory while exporting"
        );
        signal(&child, sig);
        let status = child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
        assert_eq!(status.code(), Some(130), "{sig}: {rest}");
        assert!(
            rest.contains("interrupted: removed the unfinished export"),
            "{rest}"
        );
        assert!(!out.exists(), "{sig}: --out appeared");
        assert!(
            temp_dirs(t.path()).is_empty(),
            "{sig}: left behind {:?}",
            temp_dirs(t.path())
        );
    }
}

#[test]
fn the_next_export_removes_what_a_sigkill_left() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("model");
    let (mut child, _err) = start_slow_export(&out);
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    let left = temp_dirs(t.path());
    assert_eq!(
        left.len(),
        1,
        "SIGKILL should leave the temporary directory: {left:?}"
    );
    // Another export's remains (a different --out) are named, not removed.
    let other = t.path().join("other");
    let (mut child2, _err2) = start_slow_export(&other);
    signal(&child2, libc::SIGKILL);
    child2.wait().unwrap();
    assert_eq!(temp_dirs(t.path()).len(), 2);

    let o = Command::new(env!("CARGO_BIN_EXE_star-export"))
        .args(args(&out))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(out.join("manifest.json").is_file());
    assert!(!left[0].exists(), "stale directory still there: {stderr}");
    assert!(
        stderr.contains("removed") && stderr.contains("interrupted export"),
        "{stderr}"
    );
    let still = temp_dirs(t.path());
    assert_eq!(
        still.len(),
        1,
        "the other export's remains were touched: {still:?}"
    );
    assert!(
        stderr.contains("remove it if no export is running"),
        "{stderr}"
    );
    assert!(
        !out.join(".star-export-owner.json").exists(),
        "the owner record was left in the model directory"
    );
}
