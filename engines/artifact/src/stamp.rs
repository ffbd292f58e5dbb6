//! Integrity without re-hashing gigabytes at every start. A full verification (sha256 of every
//! file against the manifest: at export, with `star-run verify`, or whenever a stamp does not
//! match) records a stamp per file: size, inode, modification and status-change times. Opening
//! a directory then compares stamps instead of hashing. Any write to a file, a replacement or a
//! rename changes its ctime or inode, and ctime cannot be set back from user space, so a modified
//! file never matches its stamp: it is hashed again and refused if its hash differs.
//!
//! Stamps live outside the model directory (which may be read-only): in $STAR_CACHE_DIR, else
//! $XDG_CACHE_HOME/star-deploy, else ~/.cache/star-deploy, one file per (directory, model hash).

use crate::hash::sha256_bytes;
use crate::manifest::Manifest;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(dir: &Path, file: &str, sha256: &str) -> Option<FileStamp> {
        let m = std::fs::metadata(dir.join(file)).ok()?;
        Some(Self::from_meta(file, sha256, &m))
    }

    /// The stamp of an open file's metadata (fstat): what was actually hashed.
    pub fn from_meta(file: &str, sha256: &str, m: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            file: file.to_string(),
            sha256: sha256.to_string(),
            bytes: m.len(),
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }
}

fn cache_root() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("STAR_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("star-deploy"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/star-deploy"))
}

/// Where the stamps of this model directory are kept.
pub fn stamp_path(dir: &Path, m: &Manifest) -> Option<PathBuf> {
    let canon = std::fs::canonicalize(dir).ok()?;
    let key = sha256_bytes(canon.to_string_lossy().as_bytes());
    Some(
        cache_root()?
            .join("verified")
            .join(format!("{}-{}.json", &key[..16], m.model_hash)),
    )
}

/// The stamps recorded by the last full verification, if any.
pub fn load(dir: &Path, m: &Manifest) -> Option<Vec<FileStamp>> {
    let text = std::fs::read_to_string(stamp_path(dir, m)?).ok()?;
    serde_json::from_str(&text).ok()
}

/// Record stamps after a full verification (best effort: a cache that cannot be written only
/// means the next start hashes again). Written atomically.
pub fn save(dir: &Path, m: &Manifest, stamps: &[FileStamp]) {
    let Some(path) = stamp_path(dir, m) else {
        return;
    };
    let Some(parent) = path.parent() else {
        return;
    };
    if std::fs::create_dir_all(parent).is_err() {
        return;
    }
    let Ok(text) = serde_json::to_string(stamps) else {
        return;
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}
