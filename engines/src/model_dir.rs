//! A model directory opened for execution: manifest checked against itself and its graphs, file
//! sizes and hashes verified, then loaded onto the backend named in the options.

use crate::backend::{backend_for_name, Arg, BackendOptions, Engine};
use crate::error::{EngineError, Result};
use crate::manifest::{GraphEntry, Integrity, IoSpec, Manifest};
use crate::stage::{io, Stage};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ModelDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub opts: BackendOptions,
    /// What opening checked, and how long it took.
    pub verified: crate::manifest::Verified,
    engine: Box<dyn Engine>,
}

impl ModelDir {
    pub fn open(dir: &Path, opts: BackendOptions) -> Result<ModelDir> {
        Self::open_with(dir, opts, Integrity::Stamped)
    }

    pub fn open_with(dir: &Path, opts: BackendOptions, integrity: Integrity) -> Result<ModelDir> {
        let backend = backend_for_name(&opts.name)?;
        if !dir.is_dir() {
            return Err(EngineError::Manifest {
                path: dir.to_path_buf(),
                why: "no such model directory (make one with `star-export export`)".into(),
            });
        }
        let manifest = Manifest::load(dir)?;
        crate::check::check_manifest(&manifest, dir)?;
        if !backend.precisions().contains(&manifest.precision.as_str()) {
            return Err(EngineError::Unsupported(format!(
                "precision '{}' of {} is not supported by backend '{}' (supported: {:?})",
                manifest.precision,
                dir.display(),
                backend.name(),
                backend.precisions()
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

    /// Open every session now (so that timing runs do not include session creation).
    pub fn load_all(&mut self) -> Result<()> {
        self.engine.load_all()
    }

    /// (values, bytes) of the weight pool every session shares.
    pub fn shared_weights(&self) -> (usize, usize) {
        self.engine.shared_weights()
    }

    /// Start creating these stages' sessions in the background (see `Engine::prefetch`).
    pub fn prefetch(&mut self, stages: &[Stage]) {
        self.engine.prefetch(stages)
    }

    /// Whether the backend runs scale 0 on `step` (empty past) rather than `step_first`.
    /// GPU backends: the device and its memory in use (None on the CPU).
    pub fn device(&self) -> Option<String> {
        self.engine.device()
    }

    pub fn takes_empty_past(&self) -> bool {
        self.engine.takes_empty_past()
    }

    /// How long the last run waited for its session.
    pub fn last_session_wait_ms(&self) -> f64 {
        self.engine.last_session_wait_ms()
    }

    /// Runs of a large `step` on its unpacked session so far (see `Engine::unpacked_step_runs`).
    pub fn unpacked_step_runs(&self) -> usize {
        self.engine.unpacked_step_runs()
    }

    /// Sessions created since the last call and how long each took.
    pub fn take_created(&mut self) -> Vec<crate::backend::Created> {
        self.engine.take_created()
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
        crate::ort_bind::KvLayout::checked(shape).map_err(EngineError::Unsupported)?;
        self.engine.kv_alloc(shape)
    }

    /// Bytes the KV cache of `rows` guidance rows would take (`usize::MAX` for a size that
    /// overflows, which `kv_alloc` refuses).
    pub fn kv_bytes_for(&self, rows: usize) -> usize {
        crate::ort_bind::KvLayout::checked(self.kv_shape_for(rows))
            .map_or(usize::MAX, |l| l.bytes())
    }

    /// The KV cache's shape, while one is allocated.
    pub fn kv_shape(&self) -> Option<[usize; 6]> {
        self.engine.kv_shape()
    }

    /// Bytes of the KV cache (0 when none is allocated).
    pub fn kv_bytes(&self) -> usize {
        self.engine
            .kv_shape()
            .map_or(0, |shape| crate::ort_bind::KvLayout { shape }.bytes())
    }

    /// Give the KV cache's memory back if it is at least `min_bytes`; returns whether it did.
    pub fn kv_release_if_over(&mut self, min_bytes: usize) -> bool {
        let release = self.kv_shape().is_some() && self.kv_bytes() >= min_bytes;
        if release {
            self.engine.kv_release();
        }
        release
    }

    /// Give back `stage`'s session (see `Engine::release_stage`).
    pub fn release_stage(&mut self, stage: Stage) {
        self.engine.release_stage(stage)
    }

    /// Tokens begin..begin+n of the KV cache, (depth, n, 2, rows, H, hd), for observation.
    pub fn kv_read(&self, begin: usize, n: usize) -> Result<Tensor> {
        self.engine.kv_read(begin, n)
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
        let kv_shape = self.engine.kv_shape();
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
                        Some(crate::onnx::Dim::Fixed(n)) => usize::try_from(*n).ok(),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        bad(
                            g,
                            io::KV_NEW,
                            "(output) has no token count in this scale's profile".into(),
                        )
                    })?;
                Some(crate::backend::KvWrite { begin, tokens })
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
    use crate::onnx::Dim;
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
    use crate::onnx::Dim;
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
