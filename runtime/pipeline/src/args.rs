//! Command-line values checked before any model work: number ranges, and output locations that
//! must be writable before a generation spends seconds (or minutes) on an image nobody can keep.

use std::path::{Path, PathBuf};

/// Guidance scale: a finite number >= 0. 0 is plain conditional sampling; negative values would
/// push the image toward the negative prompt (and below -1 invert the conditional logits at the
/// last scales), which the release never does, so they are refused rather than given a meaning.
pub fn cfg(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if !v.is_finite() {
        return Err(format!("'{s}' is not finite: give a number >= 0"));
    }
    if v < 0.0 {
        return Err(format!(
            "{v} is negative: guidance must be >= 0 (0 = no guidance)"
        ));
    }
    Ok(v)
}

/// Nucleus threshold: a number in [0, 1] (0 = off).
pub fn top_p(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s} must be in [0, 1] (0 = off)"));
    }
    Ok(v)
}

/// The nearest existing ancestor of `p` (p itself included), or "." for a relative path whose
/// ancestors do not exist yet.
fn existing_ancestor(p: &Path) -> PathBuf {
    for a in p.ancestors() {
        let a = if a.as_os_str().is_empty() {
            Path::new(".")
        } else {
            a
        };
        if a.exists() {
            return a.to_path_buf();
        }
    }
    PathBuf::from(".")
}

/// A directory we can create files in (checked by creating, and removing, a temporary file).
fn writable_dir(dir: &Path, what: &str) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("{what}: {} is not a directory", dir.display()));
    }
    tempfile::Builder::new()
        .prefix(".star-run-probe-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| format!("{what}: cannot write in {}: {e}", dir.display()))
}

/// Check that a file can be written at `path` (atomically: in its directory) without creating it.
pub fn check_output_file(path: &Path, flag: &str) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err(format!("{flag}: empty path"));
    }
    if path.is_dir() {
        return Err(format!(
            "{flag} {} is a directory: give a file name (e.g. {}), or use --out-dir",
            path.display(),
            path.join("star.png").display()
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(format!(
            "{flag} {}: directory {} does not exist",
            path.display(),
            parent.display()
        ));
    }
    writable_dir(&parent, &format!("{flag} {}", path.display()))
}

/// Check that `dir` is, or can be made, a writable directory. Nothing is created: the directory
/// appears only when the first image is written.
pub fn check_output_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() && !dir.is_dir() {
        return Err(format!(
            "--out-dir {} exists and is not a directory",
            dir.display()
        ));
    }
    let base = existing_ancestor(dir);
    if !base.is_dir() {
        return Err(format!(
            "--out-dir {}: {} is not a directory",
            dir.display(),
            base.display()
        ));
    }
    writable_dir(&base, &format!("--out-dir {}", dir.display()))
}

/// An argument error as one line on stderr, exit 2; --help and --version print as clap renders
/// them (shared by star-run and star-export).
pub fn usage_error(e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return std::process::ExitCode::SUCCESS;
    }
    // clap's first paragraph, folded onto one line ("required arguments were not provided:"
    // lists them on the lines after it); the usage and tip paragraphs are dropped.
    let text = e.render().to_string();
    let para: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = if para.is_empty() {
        "bad arguments".to_string()
    } else {
        para.join(" ")
    };
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    eprintln!("error: {msg} (see --help)");
    std::process::ExitCode::from(2)
}

/// A prompts file: UTF-8, one prompt per line; blank lines and lines starting with `#` are
/// skipped. Returns the prompts and the file's bytes (for hashing).
pub fn read_prompts_file(path: &Path) -> Result<(Vec<String>, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| format!("{}: not UTF-8 text ({e})", path.display()))?;
    let list: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if list.is_empty() {
        return Err(format!(
            "{}: no prompts (one per line; # starts a comment)",
            path.display()
        ));
    }
    Ok((list, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cfg_accepts_finite_non_negative_only() {
        assert_eq!(cfg("3.5"), Ok(3.5));
        assert_eq!(cfg("0"), Ok(0.0));
        for bad in ["NaN", "nan", "inf", "-inf", "-5", "-0.1", "x", ""] {
            assert!(cfg(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn top_p_is_a_probability() {
        assert_eq!(top_p("0.9"), Ok(0.9));
        for bad in ["1.5", "-0.1", "NaN", "inf"] {
            assert!(top_p(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn output_locations() {
        let t = tempfile::tempdir().unwrap();
        assert!(check_output_file(&t.path().join("a.png"), "--out").is_ok());
        let e = check_output_file(t.path(), "--out").unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
        let e = check_output_file(&t.path().join("no/such/a.png"), "--out").unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        assert!(check_output_dir(&t.path().join("new/deeper")).is_ok());
        assert!(
            !t.path().join("new").exists(),
            "the check created a directory"
        );
        std::fs::write(t.path().join("file"), b"x").unwrap();
        let e = check_output_dir(&t.path().join("file")).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        // Nothing is left behind by the probes.
        let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
