//! A model directory opened for execution: manifest checked, file hashes verified, one session per
//! (stage, scale) opened on first use and kept.

use crate::backend::{open_session, BackendOptions, Input, StageSession, WeightPool};
use crate::error::{EngineError, Result};
use crate::manifest::Manifest;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ModelDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub opts: BackendOptions,
    sessions: HashMap<(String, Option<usize>), Box<dyn StageSession>>,
    /// One copy of the weights, shared by every session.
    pool: WeightPool,
}

impl ModelDir {
    pub fn open(dir: &Path, opts: BackendOptions) -> Result<ModelDir> {
        if !crate::backend::BACKENDS.contains(&opts.name.as_str()) {
            return Err(EngineError::UnknownBackend(opts.name.clone()));
        }
        if !dir.is_dir() {
            return Err(EngineError::Manifest {
                path: dir.to_path_buf(),
                why: "no such model directory (make one with `star-export export`)".into(),
            });
        }
        let manifest = Manifest::load(dir)?;
        crate::check::check_manifest(&manifest, dir)?;
        if !crate::backend::precisions(&opts.name).contains(&manifest.precision.as_str()) {
            return Err(EngineError::Unsupported(format!(
                "precision '{}' of {} is not supported by backend '{}' (supported: {:?})",
                manifest.precision,
                dir.display(),
                opts.name,
                crate::backend::precisions(&opts.name)
            )));
        }
        manifest.verify_files(dir)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            manifest,
            opts,
            sessions: HashMap::new(),
            pool: WeightPool::default(),
        })
    }

    fn session(&mut self, stage: &str, scale: Option<usize>) -> Result<&mut Box<dyn StageSession>> {
        let key = (stage.to_string(), scale);
        if !self.sessions.contains_key(&key) {
            let g = self
                .manifest
                .graph(stage, scale)
                .ok_or_else(|| EngineError::Manifest {
                    path: self.dir.join(crate::manifest::MANIFEST_FILE),
                    why: format!(
                        "no graph for stage '{stage}'{}",
                        scale.map(|s| format!(" scale {s}")).unwrap_or_default()
                    ),
                })?;
            let label = match scale {
                Some(s) => format!("{stage}[{s}]"),
                None => stage.to_string(),
            };
            let s = open_session(&self.opts, &self.dir.join(&g.file), &label, &mut self.pool)?;
            self.sessions.insert(key.clone(), s);
        }
        Ok(self.sessions.get_mut(&key).unwrap())
    }

    /// (values, bytes) of the weight pool every session shares.
    pub fn shared_weights(&self) -> (usize, usize) {
        self.pool.stats()
    }

    pub fn has(&self, stage: &str, scale: Option<usize>) -> bool {
        self.manifest.graph(stage, scale).is_some()
    }

    /// Open every session now (so that timing runs do not include session creation).
    pub fn load_all(&mut self) -> Result<()> {
        let keys: Vec<(String, Option<usize>)> = self
            .manifest
            .graphs
            .iter()
            .map(|g| (g.stage.clone(), g.scale))
            .collect();
        for (s, k) in keys {
            self.session(&s, k)?;
        }
        Ok(())
    }

    pub fn run(
        &mut self,
        stage: &str,
        scale: Option<usize>,
        inputs: &[(&str, Input<'_>)],
    ) -> Result<HashMap<String, Tensor>> {
        let out = self.session(stage, scale)?.run(inputs)?;
        let g = self
            .manifest
            .graph(stage, scale)
            .expect("session() found the graph");
        conform(g, inputs, &out)?;
        Ok(out)
    }
}

/// The outputs of a run are exactly what the graph declares: every output present with its
/// dtype and rank, fixed dims equal, and each symbolic dim (batch rows) equal to its size in the
/// inputs. The pipeline indexes outputs by these shapes, so a graph that broke its own
/// declaration is an error here instead of an out-of-bounds panic later.
fn conform(
    g: &crate::manifest::GraphEntry,
    inputs: &[(&str, Input<'_>)],
    out: &HashMap<String, Tensor>,
) -> Result<()> {
    use crate::onnx::Dim;
    let bad = |name: &str, why: String| EngineError::BadInput {
        stage: g.file.clone(),
        input: name.to_string(),
        why,
    };
    let mut bound: HashMap<&str, usize> = HashMap::new();
    for spec in &g.inputs {
        let Some((_, inp)) = inputs.iter().find(|(n, _)| *n == spec.name) else {
            continue;
        };
        let shape = match inp {
            Input::F32(s, _) | Input::I64(s, _) => *s,
        };
        for (d, s) in shape.iter().zip(&spec.shape) {
            if let Dim::Sym(name) = s {
                if let Some(prev) = bound.insert(name.as_str(), *d) {
                    if prev != *d {
                        return Err(bad(
                            &spec.name,
                            format!("dimension {name} is {d} here and {prev} in another input"),
                        ));
                    }
                }
            }
        }
    }
    for spec in &g.outputs {
        let t = out.get(&spec.name).ok_or_else(|| {
            bad(
                &spec.name,
                "(output) missing from the graph's results".into(),
            )
        })?;
        let dtype = match &t.data {
            crate::Data::F32(_) => "float32",
            crate::Data::I64(_) => "int64",
        };
        let want: Vec<Option<usize>> = spec
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => usize::try_from(*v).ok(),
                Dim::Sym(s) => bound.get(s.as_str()).copied(),
            })
            .collect();
        let fits = dtype == spec.dtype
            && t.shape.len() == want.len()
            && t.shape
                .iter()
                .zip(&want)
                .all(|(d, w)| !matches!(w, Some(w) if w != d));
        if !fits {
            return Err(bad(
                &spec.name,
                format!(
                    "(output) is {dtype} {:?}, the graph declares {} {:?}",
                    t.shape, spec.dtype, spec.shape
                ),
            ));
        }
    }
    Ok(())
}
