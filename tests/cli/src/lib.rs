//! What the command-line tests of star-export and star-run share (their tests call their own
//! binaries, which only those packages' tests can name: `env!("CARGO_BIN_EXE_…")`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A finished run of a binary.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run `bin` with `args` and extra environment variables.
pub fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut c = Command::new(bin);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap_or_else(|e| panic!("running {bin}: {e}"));
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

impl Out {
    /// The contract of every refusal: exit code 2 and one line on stderr, `error: …`, that
    /// contains `needle`.
    pub fn assert_refused(&self, needle: &str) {
        assert_eq!(
            self.code, 2,
            "stdout: {} stderr: {}",
            self.stdout, self.stderr
        );
        assert_eq!(
            self.stderr.trim().lines().count(),
            1,
            "one line expected, got: {}",
            self.stderr
        );
        assert!(self.stderr.starts_with("error: "), "{}", self.stderr);
        assert!(
            self.stderr.contains(needle),
            "'{needle}' not in: {}",
            self.stderr
        );
    }
}

/// The workspace root (this crate is tests/cli).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The embedded demo model directory.
pub fn demo_model() -> PathBuf {
    root().join("assets/demo-model")
}

/// The golden fixtures (tests/fixtures).
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}
