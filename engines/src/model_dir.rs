//! A model directory opened for execution: manifest checked against itself and its graphs, file
//! sizes and hashes verified, then loaded onto the backend named in the options.

use crate::engine::{Arg, BackendOptions, Engine, MemoryPolicy};
use crate::error::{EngineError, Result};
use crate::registry::backend_for_name;
use star_artifact::dtype::Dtype;
use star_artifact::integrity::{Integrity, Verified};
use star_artifact::manifest::{GraphEntry, IoSpec, Manifest};
use star_artifact::stage::{io, Stage};
use star_artifact::tensor::Tensor;
use star_artifact::ArtifactError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ModelDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub opts: BackendOptions,
    /// What opening checked, and how long it took.
    pub verified: Verified,
    engine: Box<dyn Engine>,
}

impl ModelDir {
    pub fn open(dir: &Path, opts: BackendOptions) -> Result<ModelDir> {
        Self::open_with(dir, opts, Integrity::Stamped)
    }

    pub fn open_with(dir: &Path, opts: BackendOptions, integrity: Integrity) -> Result<ModelDir> {
        let backend = backend_for_name(&opts.name)?;
        if !dir.is_dir() {
            return Err(ArtifactError::Manifest {
                path: dir.to_path_buf(),
                why: "no such model directory (make one with `star-export export`)".into(),
            }
            .into());
        }
        let manifest = Manifest::load(dir)?;
        star_artifact::check::check_manifest(&manifest, dir)?;
        if !backend.precisions().contains(&manifest.precision) {
            return Err(EngineError::Unsupported(format!(
                "precision '{}' of {} is not supported by backend '{}' (supported: {})",
                manifest.precision,
                dir.display(),
                backend.name(),
                backend
                    .precisions()
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let verified = manifest.verify_files(dir, integrity)?;
        let engine = backend.load(dir, &manifest, &opts, &verified.graphs)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            manifest,
            opts,
            verified,
            engine,
        })
    }

    pub fn has(&self, stage: Stage) -> bool {
        self.manifest.graph(stage).is_some()
    }

    /// The engine's host-memory policy, where it has one (`Engine::memory_policy`).
    pub fn memory_policy(&mut self) -> Option<&mut dyn MemoryPolicy> {
        self.engine.memory_policy()
    }

    /// GPU backends: the device and its memory in use (None on the CPU).
    pub fn device(&self) -> Option<String> {
        self.engine.device()
    }

    /// Whether the backend runs scale 0 on `step` (empty past) rather than `step_first`.
    pub fn takes_empty_past(&self) -> bool {
        self.engine.takes_empty_past()
    }

    /// The KV cache's shape for `rows` (2B) guidance rows.
    fn kv_shape_for(&self, rows: usize) -> [usize; 6] {
        let c = &self.manifest.config;
        [
            c.depth,
            self.manifest.schedule.total_tokens,
            2,
            rows,
            c.heads,
            c.head_dim,
        ]
    }

    /// Allocate the KV cache of one generation with `rows` (2B) guidance rows.
    pub fn kv_alloc(&mut self, rows: usize) -> Result<()> {
        let shape = self.kv_shape_for(rows);
        // Checked once here, for every backend: the shape comes from the manifest.
        star_artifact::kv::KvLayout::checked(shape).map_err(EngineError::Unsupported)?;
        self.engine.kv().alloc(shape)
    }

    /// Bytes the KV cache of `rows` guidance rows would take (`usize::MAX` for a size that
    /// overflows, which `kv_alloc` refuses).
    pub fn kv_bytes_for(&self, rows: usize) -> usize {
        star_artifact::kv::KvLayout::checked(self.kv_shape_for(rows))
            .map_or(usize::MAX, |l| l.bytes())
    }

    /// The KV cache's shape, while one is allocated.
    pub fn kv_shape(&self) -> Option<[usize; 6]> {
        self.engine.kv_ref().shape()
    }

    /// Bytes of the KV cache (0 when none is allocated).
    pub fn kv_bytes(&self) -> usize {
        self.engine
            .kv_ref()
            .shape()
            .map_or(0, |shape| star_artifact::kv::KvLayout { shape }.bytes())
    }

    /// Give the KV cache's memory back if it is at least `min_bytes`; returns whether it did.
    pub fn kv_release_if_over(&mut self, min_bytes: usize) -> bool {
        let release = self.kv_shape().is_some() && self.kv_bytes() >= min_bytes;
        if release {
            self.engine.kv().release();
        }
        release
    }

    /// Tokens begin..begin+n of the KV cache, (depth, n, 2, rows, H, hd), for observation.
    pub fn kv_read(&self, begin: usize, n: usize) -> Result<Tensor> {
        self.engine.kv_ref().read(begin, n)
    }

    /// Run a stage with host inputs.
    pub fn run(
        &mut self,
        stage: Stage,
        scale: Option<usize>,
        inputs: &[(&str, Arg<'_>)],
    ) -> Result<HashMap<String, Tensor>> {
        self.run_kv(stage, scale, inputs, None)
    }

    /// Run a stage; with `kv_at = Some(begin)` its `kv_new_{i}` go into the KV cache at `begin`
    /// of each block's region (as many tokens as the scale's profile says).
    pub fn run_kv(
        &mut self,
        stage: Stage,
        scale: Option<usize>,
        inputs: &[(&str, Arg<'_>)],
        kv_at: Option<usize>,
    ) -> Result<HashMap<String, Tensor>> {
        let g = self.manifest.graph(stage).ok_or_else(|| {
            EngineError::Unsupported(format!(
                "{}: this model has no {stage} graph",
                self.dir.display()
            ))
        })?;
        let (ins, outs) = match (scale, stage.per_scale()) {
            (Some(s), true) => {
                let p = g.profile(s).ok_or_else(|| {
                    EngineError::Unsupported(format!("the {stage} graph does not serve scale {s}"))
                })?;
                (&p.inputs, &p.outputs)
            }
            (None, false) => (&g.inputs, &g.outputs),
            _ => {
                return Err(EngineError::Unsupported(format!(
                    "stage {stage} {} a scale",
                    if stage.per_scale() {
                        "needs"
                    } else {
                        "takes no"
                    }
                )))
            }
        };
        // `Arg::KvPast` stands for every block's past view, (len, 2, rows, H, hd) each.
        let kv_shape = self.engine.kv_ref().shape();
        let past_names: Vec<String> = kv_shape
            .map(|s| (0..s[0]).map(io::past).collect())
            .unwrap_or_default();
        let mut shapes: Vec<(&str, Vec<usize>)> = vec![];
        for (n, a) in inputs {
            match a {
                Arg::Host(i) => shapes.push((*n, i.shape().to_vec())),
                Arg::KvPast(len) => {
                    let Some(s) = kv_shape else {
                        return Err(EngineError::Unsupported(
                            "KV cache used before kv_alloc".into(),
                        ));
                    };
                    let block = [*len, s[2], s[3], s[4], s[5]].to_vec();
                    shapes.extend(past_names.iter().map(|p| (p.as_str(), block.clone())));
                }
            }
        }
        let bound = check_inputs(g, ins, &shapes)?;
        let kv_at = match kv_at {
            None => None,
            Some(begin) => {
                let tokens = outs
                    .iter()
                    .find(|o| io::kv_new_block(&o.name).is_some())
                    .and_then(|o| match o.shape.first() {
                        Some(star_artifact::onnx::Dim::Fixed(n)) => usize::try_from(*n).ok(),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        bad(
                            g,
                            io::KV_NEW,
                            "(output) has no token count in this scale's profile".into(),
                        )
                    })?;
                Some(crate::engine::KvWrite { begin, tokens })
            }
        };
        let out = self.engine.run(stage, inputs, kv_at)?;
        conform(g, outs, &bound, &out, kv_at.is_some())?;
        Ok(out)
    }
}

fn bad(g: &GraphEntry, name: &str, why: String) -> EngineError {
    EngineError::BadInput {
        stage: g.file.clone(),
        input: name.to_string(),
        why,
    }
}

/// Bind the symbolic dims (batch rows) from the inputs' shapes, checking fixed dims and that
/// every declared input is given.
fn check_inputs<'a>(
    g: &GraphEntry,
    ins: &'a [IoSpec],
    shapes: &[(&str, Vec<usize>)],
) -> Result<HashMap<&'a str, usize>> {
    use star_artifact::onnx::Dim;
    let mut bound: HashMap<&str, usize> = HashMap::new();
    for spec in ins {
        let Some((_, shape)) = shapes.iter().find(|(n, _)| *n == spec.name) else {
            return Err(bad(g, &spec.name, "not given".into()));
        };
        if shape.len() != spec.shape.len() {
            return Err(bad(
                g,
                &spec.name,
                format!("has shape {shape:?}, the graph takes {:?}", spec.shape),
            ));
        }
        for (d, s) in shape.iter().zip(&spec.shape) {
            match s {
                Dim::Fixed(v) if *v as usize != *d => {
                    return Err(bad(
                        g,
                        &spec.name,
                        format!("has shape {shape:?}, the graph takes {:?}", spec.shape),
                    ))
                }
                Dim::Sym(name) => {
                    if let Some(prev) = bound.insert(name.as_str(), *d) {
                        if prev != *d {
                            return Err(bad(
                                g,
                                &spec.name,
                                format!("dimension {name} is {d} here and {prev} in another input"),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    // The contract's guidance rows: B2 = 2B wherever only one of them is given.
    match (bound.get("B").copied(), bound.get("B2").copied()) {
        (Some(b), None) => {
            bound.insert("B2", 2 * b);
        }
        (None, Some(b2)) if b2 % 2 == 0 => {
            bound.insert("B", b2 / 2);
        }
        (Some(b), Some(b2)) if b2 != 2 * b => {
            return Err(bad(
                g,
                "B2",
                format!("is {b2} rows for {b} images; guidance needs 2 per image"),
            ))
        }
        _ => {}
    }
    Ok(bound)
}

/// The outputs of a run are exactly what the graph declares: every output present with its
/// dtype and rank, fixed dims equal, and each symbolic dim (batch rows) equal to its size in the
/// inputs. The pipeline indexes outputs by these shapes, so a graph that broke its own
/// declaration is an error here instead of an out-of-bounds panic later.
fn conform(
    g: &GraphEntry,
    outs: &[IoSpec],
    bound: &HashMap<&str, usize>,
    out: &HashMap<String, Tensor>,
    kv_written: bool,
) -> Result<()> {
    use star_artifact::onnx::Dim;
    for spec in outs {
        if kv_written && io::kv_new_block(&spec.name).is_some() {
            continue;
        }
        let t = out.get(&spec.name).ok_or_else(|| {
            bad(
                g,
                &spec.name,
                "(output) missing from the graph's results".into(),
            )
        })?;
        let dtype = match &t.data {
            star_artifact::Data::F32(_) => Dtype::Float32,
            star_artifact::Data::I64(_) => Dtype::Int64,
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
                g,
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
