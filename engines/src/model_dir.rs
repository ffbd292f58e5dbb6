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
        self.session(stage, scale)?.run(inputs)
    }
}
