//! A model directory opened for execution: manifest checked against itself and its graphs, file
//! sizes and hashes verified, then loaded onto the backend named in the options.

use crate::engine::{BackendOptions, Call, Engine, KvUse, KvWrite, MemoryPolicy, PortBind};
use crate::error::{EngineError, Result};
use crate::registry::backend_for_name;
use crate::values::{Held, Slot, Transfers};
use star_artifact::dtype::Dtype;
use star_artifact::integrity::{Integrity, Verified};
use star_artifact::kv::KvLayout;
use star_artifact::manifest::{GraphEntry, IoSpec, Manifest};
use star_artifact::stage::{io, Stage};
use star_artifact::tensor::Tensor;
use star_artifact::ArtifactError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What an engine holds: bytes of values allocated, how often values and the KV cache were
/// (re)allocated, and the bindings made (one per distinct call since the last reallocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineState {
    pub value_bytes: usize,
    pub values_epoch: u64,
    pub kv_epoch: u64,
    pub bindings: usize,
}

pub struct ModelDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub opts: BackendOptions,
    /// What opening checked, and how long it took.
    pub verified: Verified,
    engine: Box<dyn Engine>,
    /// Every copy between the host and the engine (`put`, `get`, `kv_read`).
    transfers: Transfers,
    /// Calibration probes returned by the runs since the last `take_probes`.
    probes: Vec<(String, Tensor)>,
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
            transfers: Transfers::default(),
            probes: vec![],
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

    /// The KV cache's element type (the manifest's `kv_cache_dtype`).
    fn kv_dtype(&self) -> Dtype {
        self.manifest.kv_cache_dtype
    }

    /// Allocate the KV cache of one generation with `rows` (2B) guidance rows.
    pub fn kv_alloc(&mut self, rows: usize) -> Result<()> {
        let shape = self.kv_shape_for(rows);
        // Checked once here, for every backend: the shape comes from the manifest.
        KvLayout::checked(shape, self.kv_dtype()).map_err(EngineError::Unsupported)?;
        let dtype = self.kv_dtype();
        self.engine.kv().alloc(shape, dtype)
    }

    /// Bytes the KV cache of `rows` guidance rows would take (`usize::MAX` for a size that
    /// overflows, which `kv_alloc` refuses).
    pub fn kv_bytes_for(&self, rows: usize) -> usize {
        KvLayout::checked(self.kv_shape_for(rows), self.kv_dtype())
            .map_or(usize::MAX, |l| l.bytes())
    }

    /// The KV cache's shape, while one is allocated.
    pub fn kv_shape(&self) -> Option<[usize; 6]> {
        self.engine.kv_ref().shape()
    }

    /// Bytes of the KV cache (0 when none is allocated).
    pub fn kv_bytes(&self) -> usize {
        self.engine.kv_ref().layout().map_or(0, |l| l.bytes())
    }

    /// Give the KV cache's memory back if it is at least `min_bytes`; returns whether it did.
    pub fn kv_release_if_over(&mut self, min_bytes: usize) -> bool {
        let release = self.kv_shape().is_some() && self.kv_bytes() >= min_bytes;
        if release {
            self.engine.kv().release();
        }
        release
    }

    /// Tokens begin..begin+n of the KV cache, (depth, n, 2, rows, H, hd) as float32, for
    /// observation: counted as a copy to the host (the step's).
    pub fn kv_read(&mut self, begin: usize, n: usize) -> Result<Tensor> {
        let t = self.engine.kv_ref().read(begin, n)?;
        let elem = self.kv_dtype().bytes();
        self.transfers.record(Stage::Step, false, t.numel() * elem);
        Ok(t)
    }

    /// Every copy between the host and the engine so far.
    pub fn transfers(&self) -> &Transfers {
        &self.transfers
    }

    /// The copies so far, counting from zero again.
    pub fn take_transfers(&mut self) -> Transfers {
        std::mem::take(&mut self.transfers)
    }

    /// Upload `t` into `slot` as `stage`'s input (counted).
    pub fn put(&mut self, stage: Stage, slot: Slot, t: &Tensor) -> Result<()> {
        let held = Held {
            shape: t.shape.clone(),
            dtype: t.dtype(),
        };
        self.engine.values().write(slot, held, t.bytes())?;
        self.transfers.record(stage, true, t.bytes().len());
        Ok(())
    }

    /// `slot`'s value, `stage`'s output, on the host (counted).
    pub fn get(&mut self, stage: Stage, slot: Slot) -> Result<Tensor> {
        let t = self.engine.values_ref().read(slot)?;
        self.transfers.record(stage, false, t.bytes().len());
        Ok(t)
    }

    /// A float32 value of `shape` zero-filled on the engine (no copy).
    pub fn zero(&mut self, slot: Slot, shape: &[usize]) -> Result<()> {
        let held = Held {
            shape: shape.to_vec(),
            dtype: Dtype::Float32,
        };
        self.engine.values().zero(slot, held)
    }

    /// What `slot` holds now, if anything.
    pub fn held(&self, slot: Slot) -> Option<Held> {
        self.engine.values_ref().held(slot).cloned()
    }

    /// The address `slot`'s buffer is bound at (host or device), for the bookkeeping tests.
    pub fn value_address(&mut self, slot: Slot) -> Option<usize> {
        self.engine.values().address(slot).map(|p| p as usize)
    }

    /// The engine's values and bindings, for the bookkeeping tests and reports.
    pub fn engine_state(&self) -> EngineState {
        EngineState {
            value_bytes: self.engine.values_ref().allocated(),
            values_epoch: self.engine.values_ref().epoch(),
            kv_epoch: self.engine.kv_ref().epoch(),
            bindings: self.engine.bindings(),
        }
    }

    /// Give back every engine value (the next generation allocates them again).
    pub fn release_values(&mut self) {
        self.engine.values().clear();
    }

    /// The graph of `stage` and its ports at `scale` (a per-scale stage's profile).
    fn ports(
        &self,
        stage: Stage,
        scale: Option<usize>,
    ) -> Result<(&GraphEntry, &[IoSpec], &[IoSpec])> {
        let g = self.manifest.graph(stage).ok_or_else(|| {
            EngineError::Unsupported(format!(
                "{}: this model has no {stage} graph",
                self.dir.display()
            ))
        })?;
        match (scale, stage.per_scale()) {
            (Some(s), true) => {
                let p = g.profile(s).ok_or_else(|| {
                    EngineError::Unsupported(format!("the {stage} graph does not serve scale {s}"))
                })?;
                Ok((g, &p.inputs, &p.outputs))
            }
            (None, false) => Ok((g, &g.inputs, &g.outputs)),
            _ => Err(EngineError::Unsupported(format!(
                "stage {stage} {} a scale",
                if stage.per_scale() {
                    "needs"
                } else {
                    "takes no"
                }
            ))),
        }
    }

    /// The calibration probes the last runs returned (FP32 calibration graphs only), taken.
    pub fn take_probes(&mut self) -> Vec<(String, Tensor)> {
        std::mem::take(&mut self.probes)
    }

    /// Reserve, before a generation of `b` images, every value `uses` binds at the largest
    /// size any scale needs, so that each keeps one address for the whole generation (and the
    /// next ones of the same batch). Stages the model does not have are skipped.
    pub fn reserve(&mut self, b: usize, uses: &[(Stage, &str, Slot)]) -> Result<()> {
        let dims = batch_dims(b);
        let mut need: HashMap<Slot, usize> = HashMap::new();
        for (stage, name, slot) in uses {
            let Some(g) = self.manifest.graph(*stage) else {
                continue;
            };
            let specs = g
                .profiles
                .iter()
                .flat_map(|p| p.inputs.iter().chain(&p.outputs))
                .chain(
                    g.inputs
                        .iter()
                        .chain(&g.outputs)
                        .filter(|_| !stage.per_scale()),
                );
            for spec in specs.filter(|s| s.name == *name) {
                let bytes =
                    concrete(g, spec, &dims)?.iter().product::<usize>() * spec.dtype.bytes();
                let e = need.entry(*slot).or_default();
                *e = (*e).max(bytes);
            }
        }
        for (slot, bytes) in need {
            self.engine.values().reserve(slot, bytes)?;
        }
        Ok(())
    }

    /// Run `stage` at `scale` for `b` images, each port bound to the value `binds` names
    /// (outputs not named go to a value of their own, `Slot::Port`); a step's K/V go into the
    /// cache at its scale's range. Inputs must hold what the graph takes (or a larger value
    /// whose first elements are that: a view); outputs are written where they are.
    pub fn run(
        &mut self,
        stage: Stage,
        scale: Option<usize>,
        b: usize,
        binds: &[(&str, Slot)],
    ) -> Result<()> {
        self.run_with(stage, scale, &batch_dims(b), binds)
    }

    fn run_with(
        &mut self,
        stage: Stage,
        scale: Option<usize>,
        dims: &HashMap<&str, usize>,
        binds: &[(&str, Slot)],
    ) -> Result<()> {
        let call = self.call(stage, scale, dims, binds)?;
        for o in &call.outputs {
            self.engine.values().reserve(o.slot, o.bytes())?;
        }
        let probes = self.engine.run(&call)?;
        for (name, t) in probes {
            self.transfers.record(stage, false, t.bytes().len());
            self.probes.push((name, t));
        }
        for o in call.outputs {
            let held = Held {
                shape: o.shape,
                dtype: o.dtype,
            };
            self.engine.values().set_held(o.slot, held)?;
        }
        Ok(())
    }

    /// The call of one run: every port resolved against the manifest and checked against what
    /// its value holds.
    fn call(
        &mut self,
        stage: Stage,
        scale: Option<usize>,
        dims: &HashMap<&str, usize>,
        binds: &[(&str, Slot)],
    ) -> Result<Call> {
        let (g, ins, outs) = self.ports(stage, scale)?;
        let (g, ins, outs) = (g.clone(), ins.to_vec(), outs.to_vec());
        if let Some((n, _)) = binds
            .iter()
            .find(|(n, _)| !ins.iter().chain(&outs).any(|p| p.name == *n))
        {
            return Err(bad(&g, n, "is not a port of this graph".into()));
        }
        let slot_of = |name: &str| binds.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
        let mut inputs = vec![];
        for spec in ins.iter().filter(|s| io::past_block(&s.name).is_none()) {
            let shape = concrete(&g, spec, dims)?;
            let slot =
                slot_of(&spec.name).ok_or_else(|| bad(&g, &spec.name, "not given".into()))?;
            match self.engine.values_ref().held(slot) {
                Some(h) if h.has_view(&shape, spec.dtype) => {}
                Some(h) => {
                    return Err(bad(
                        &g,
                        &spec.name,
                        format!(
                        "is bound to {slot:?}, which holds {} {:?}; the graph takes {} {shape:?}",
                        h.dtype, h.shape, spec.dtype
                    ),
                    ))
                }
                None => {
                    return Err(bad(
                        &g,
                        &spec.name,
                        format!("is bound to {slot:?}, which holds nothing"),
                    ))
                }
            }
            inputs.push(PortBind {
                name: spec.name.clone(),
                slot,
                shape,
                dtype: spec.dtype,
            });
        }
        let mut outputs = vec![];
        for (j, spec) in outs.iter().enumerate() {
            if io::kv_new_block(&spec.name).is_some() {
                continue;
            }
            let slot = slot_of(&spec.name).unwrap_or(Slot::Port(stage, (ins.len() + j) as u16));
            if inputs.iter().any(|i| i.slot == slot) {
                return Err(bad(
                    &g,
                    &spec.name,
                    format!("(output) is bound to {slot:?}, which this run also reads"),
                ));
            }
            outputs.push(PortBind {
                name: spec.name.clone(),
                slot,
                shape: concrete(&g, spec, dims)?,
                dtype: spec.dtype,
            });
        }
        let kv = self.kv_use(&g, &ins, &outs, scale)?;
        Ok(Call {
            stage,
            scale,
            inputs,
            outputs,
            kv,
            to_host: g.probes.iter().map(|p| p.name.clone()).collect(),
        })
    }

    /// Where a stage with `kv_new_{i}` outputs writes in the cache (its scale's range of the
    /// schedule), and the past it reads (its profile's, which must end where the write begins).
    fn kv_use(
        &self,
        g: &GraphEntry,
        ins: &[IoSpec],
        outs: &[IoSpec],
        scale: Option<usize>,
    ) -> Result<Option<KvUse>> {
        let first_dim = |specs: &[IoSpec], which: fn(&str) -> Option<usize>| {
            specs
                .iter()
                .find(|o| which(&o.name).is_some())
                .map(|o| match o.shape.first() {
                    Some(star_artifact::onnx::Dim::Fixed(n)) => usize::try_from(*n).ok(),
                    _ => None,
                })
        };
        let Some(tokens) = first_dim(outs, io::kv_new_block) else {
            return Ok(None);
        };
        let tokens = tokens.ok_or_else(|| {
            bad(
                g,
                io::KV_NEW,
                "(output) has no token count in this scale's profile".into(),
            )
        })?;
        let begin = self
            .manifest
            .schedule
            .begin_end
            .get(scale.unwrap_or(0))
            .map(|b| b.0)
            .ok_or_else(|| {
                bad(
                    g,
                    io::KV_NEW,
                    format!("scale {scale:?} is not in the schedule"),
                )
            })?;
        let past = match first_dim(ins, io::past_block) {
            None => None,
            Some(Some(len)) if len == begin => Some(len),
            Some(_) => {
                return Err(bad(
                    g,
                    io::PAST,
                    format!("has no past of {begin} tokens in this scale's profile"),
                ))
            }
        };
        Ok(Some(KvUse {
            past,
            write: KvWrite { begin, tokens },
        }))
    }

    /// Run a stage on host tensors and return every output on the host (validation, tests):
    /// the inputs are uploaded into values of their own and the outputs read back, all counted.
    pub fn run_host(
        &mut self,
        stage: Stage,
        scale: Option<usize>,
        inputs: &[(&str, &Tensor)],
    ) -> Result<HashMap<String, Tensor>> {
        let (g, ins, outs) = self.ports(stage, scale)?;
        let (g, ins, outs) = (g.clone(), ins.to_vec(), outs.to_vec());
        let shapes: Vec<(&str, Vec<usize>)> =
            inputs.iter().map(|(n, t)| (*n, t.shape.clone())).collect();
        let bound = check_inputs(&g, &ins, &shapes)?;
        let dims: HashMap<&str, usize> = bound.iter().map(|(k, v)| (*k, *v)).collect();
        let mut binds = vec![];
        for (name, t) in inputs {
            let i = ins.iter().position(|s| s.name == *name).unwrap_or(0);
            let slot = Slot::Port(stage, i as u16);
            self.put(stage, slot, t)?;
            binds.push((*name, slot));
        }
        self.run_with(stage, scale, &dims, &binds)?;
        let mut out = HashMap::new();
        for (j, spec) in outs.iter().enumerate() {
            if io::kv_new_block(&spec.name).is_none() {
                let slot = Slot::Port(stage, (ins.len() + j) as u16);
                out.insert(spec.name.clone(), self.get(stage, slot)?);
            }
        }
        Ok(out)
    }
}

/// The symbolic batch dims of a generation of `b` images: B, B2 = 2B guidance rows, and N =
/// 2B text rows (prompts and negatives).
fn batch_dims(b: usize) -> HashMap<&'static str, usize> {
    HashMap::from([("B", b), ("B2", 2 * b), ("N", 2 * b)])
}

/// The concrete shape of a port: fixed dims as declared, symbolic ones from `dims`.
fn concrete(g: &GraphEntry, spec: &IoSpec, dims: &HashMap<&str, usize>) -> Result<Vec<usize>> {
    use star_artifact::onnx::Dim;
    spec.shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => usize::try_from(*v)
                .map_err(|_| bad(g, &spec.name, format!("has a negative dimension {v}"))),
            Dim::Sym(s) => dims
                .get(s.as_str())
                .copied()
                .ok_or_else(|| bad(g, &spec.name, format!("dimension {s} is not bound"))),
        })
        .collect()
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
