//! Opening a model directory safely: every listed file present with its size and sha256 (large
//! files vouched for by their stamps from the last full verification, `stamp.rs`), and every
//! graph declaring the I/O its manifest entry lists (`check.rs`).

use crate::error::{io_err, ArtifactError, Result};
use crate::hash::{sha256_bytes, sha256_reader};
use crate::manifest::{Manifest, MANIFEST_FILE};
use crate::stage::Stage;
use std::path::Path;

/// How much of a model directory is hashed when it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Integrity {
    /// Hash what the stamps of the last full verification do not vouch for (the default).
    #[default]
    Stamped,
    /// Hash everything (`star-run verify`).
    Full,
}

/// What a verification did.
#[derive(Clone, Debug, Default)]
pub struct Verified {
    /// Bytes hashed (0 when every stamp matched).
    pub hashed_bytes: u64,
    pub ms: f64,
    /// Every graph file's bytes as hashed and checked: sessions are created from these, not
    /// from a second read of the file.
    pub graphs: Vec<(Stage, std::sync::Arc<[u8]>)>,
}

impl Manifest {
    /// Check that every file the manifest lists exists with its recorded size and hash, and that
    /// every graph file declares the I/O the manifest lists for it. With `Integrity::Stamped`
    /// the large files are not hashed when their stamps from the last full verification still
    /// match (see `stamp.rs`); graph files are always hashed and decoded (they are small).
    pub fn verify_files(&self, dir: &Path, mode: Integrity) -> Result<Verified> {
        let t = std::time::Instant::now();
        let missing = |file: &str| {
            ArtifactError::Manifest {
            path: dir.join(MANIFEST_FILE),
            why: format!("{file} is listed but missing: incomplete model directory; re-export it with star-export"),
        }
        };
        // Sizes first: a truncated or replaced file is refused before anything is hashed.
        for f in &self.files {
            let p = dir.join(&f.file);
            let meta = std::fs::metadata(&p).map_err(|_| missing(&f.file))?;
            if !meta.is_file() {
                return Err(missing(&f.file));
            }
            if meta.len() != f.bytes {
                return Err(ArtifactError::Manifest {
                    path: p,
                    why: format!(
                        "{} bytes, the manifest lists {}: the file was modified or truncated; re-export the model",
                        meta.len(),
                        f.bytes
                    ),
                });
            }
        }
        for g in &self.graphs {
            if !dir.join(&g.file).is_file() {
                return Err(missing(&g.file));
            }
        }
        let stamps = match mode {
            Integrity::Stamped => crate::stamp::load(dir, self).unwrap_or_default(),
            Integrity::Full => vec![],
        };
        let mut fresh = vec![];
        let mut hashed = 0u64;
        let mut graphs = vec![];
        for f in &self.files {
            let now = crate::stamp::FileStamp::of(dir, &f.file, &f.sha256);
            if now.is_some() && stamps.iter().any(|s| Some(s) == now.as_ref()) {
                fresh.extend(now);
                continue;
            }
            let p = dir.join(&f.file);
            // Stamp what was hashed: the open file's metadata before and after hashing must
            // agree (a write during hashing changes its ctime), and the path must still name it.
            let file = std::fs::File::open(&p).map_err(io_err(&p))?;
            let before = file.metadata().map_err(io_err(&p))?;
            let got = sha256_reader(&file, &p)?;
            hashed += f.bytes;
            if got != f.sha256 {
                return Err(ArtifactError::HashMismatch {
                    path: p,
                    expected: f.sha256.clone(),
                    found: got,
                });
            }
            let after = file.metadata().map_err(io_err(&p))?;
            let s0 = crate::stamp::FileStamp::from_meta(&f.file, &f.sha256, &before);
            let s1 = crate::stamp::FileStamp::from_meta(&f.file, &f.sha256, &after);
            if s0 == s1 && crate::stamp::FileStamp::of(dir, &f.file, &f.sha256) == Some(s1.clone())
            {
                fresh.push(s1);
            }
        }
        for g in &self.graphs {
            let p = dir.join(&g.file);
            let bytes = std::fs::read(&p).map_err(io_err(&p))?;
            let got = sha256_bytes(&bytes);
            if got != g.sha256 {
                return Err(ArtifactError::HashMismatch {
                    path: p,
                    expected: g.sha256.clone(),
                    found: got,
                });
            }
            crate::check::check_graph_file(g, &p, &bytes, self)?;
            graphs.push((g.stage, std::sync::Arc::from(bytes)));
        }
        if hashed > 0 {
            crate::stamp::save(dir, self, &fresh);
        }
        Ok(Verified {
            hashed_bytes: hashed,
            ms: t.elapsed().as_secs_f64() * 1e3,
            graphs,
        })
    }
}
