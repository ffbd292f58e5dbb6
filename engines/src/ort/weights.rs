//! ort-cpu's weights: one read-only mapping of `weights.bin` shared by every session, and the
//! sessions created over it.

use super::{ort_environment, ort_err, Place};
use crate::error::{EngineError, Result};
use star_artifact::ArtifactError;
use std::collections::HashMap;
use std::path::Path;

/// Weights shared by every session of a model directory, with no copy of their bytes: each
/// external initializer becomes an ONNX Runtime value over a read-only mapping of `weights.bin`,
/// handed to every session that names it (AddInitializer). Sessions pre-pack their MatMul
/// weights into one shared container, so a weight used by `step_first` and `step` is packed
/// once. After each session is created the mapping's pages are released (MADV_DONTNEED): what a
/// session pre-packed is never read again, and what it reads directly (biases, embedding tables)
/// faults back in from the page cache. Resident: the packed weights plus the working set, not a
/// second unpacked copy.
pub struct WeightPool {
    // Field order is drop order: the values before the mappings they point into.
    values: HashMap<String, std::sync::Arc<ort::value::DynValue>>,
    /// Where each value's bytes are: (file, offset, length, dims, dtype); a second graph naming
    /// the same weight must agree.
    origin: HashMap<String, (String, usize, usize, Vec<i64>, i32)>,
    maps: HashMap<String, std::sync::Arc<memmap2::Mmap>>,
    bytes: usize,
    prepacked: ort::session::builder::PrepackedWeights,
}

impl Default for WeightPool {
    fn default() -> Self {
        WeightPool {
            values: HashMap::new(),
            origin: HashMap::new(),
            maps: HashMap::new(),
            bytes: 0,
            prepacked: ort::session::builder::PrepackedWeights::new(),
        }
    }
}

impl WeightPool {
    /// Number of shared values and their total bytes.
    pub fn stats(&self) -> (usize, usize) {
        (self.values.len(), self.bytes)
    }

    /// Drop every mapped page from this process (they stay in the page cache and fault back in
    /// if read again).
    fn release_all(&self) {
        for m in self.maps.values() {
            // SAFETY: a read-only file mapping: dropped pages are re-read from the file.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Drop the mapped pages of these weights from this process (they stay in the page cache
    /// and fault back in if read again): called once a session has pre-packed them. Only the
    /// pages wholly inside each weight go, so a session that reads its weights through the
    /// mapping (not pre-packed) keeps its pages resident.
    pub(super) fn release_pages(&self, names: &[String]) {
        // A granule every page size divides (4 KiB to 64 KiB); large weights are 64 KiB-aligned
        // in the file, and the few smaller ones are not worth a system call.
        const GRANULE: usize = 64 << 10;
        for n in names {
            let Some((file, offset, length, _, _)) = self.origin.get(n) else {
                continue;
            };
            let Some(m) = self.maps.get(file) else {
                continue;
            };
            let begin = offset.next_multiple_of(GRANULE);
            let end = (offset + length) / GRANULE * GRANULE;
            if end > begin {
                // SAFETY: a read-only file mapping: dropped pages are re-read from the file.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, begin, end - begin)
                };
            }
        }
    }

    /// The shared values of every external initializer of `graph` (created on first use).
    fn for_graph(
        &mut self,
        graph: &Path,
        bytes: &[u8],
    ) -> Result<Vec<(String, std::sync::Arc<ort::value::DynValue>)>> {
        let model =
            star_artifact::onnx::decode_model(bytes).map_err(|e| ArtifactError::Manifest {
                path: graph.to_path_buf(),
                why: format!("not an ONNX model: {e}"),
            })?;
        let dir = graph.parent().unwrap_or(Path::new("."));
        let mut out = vec![];
        for t in model.graph.map(|g| g.initializer).unwrap_or_default() {
            if t.data_location != 1 {
                continue;
            }
            let get = |k: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == k)
                    .map(|e| e.value.clone())
            };
            let bad = |why: &str| -> EngineError {
                ArtifactError::Manifest {
                    path: graph.to_path_buf(),
                    why: format!("initializer {}: {why}", t.name),
                }
                .into()
            };
            let file = get("location").ok_or_else(|| bad("no location"))?;
            let offset: usize = get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
            let length: usize = get("length")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("no length"))?;
            let origin = (file.clone(), offset, length, t.dims.clone(), t.data_type);
            if let Some(o) = self.origin.get(&t.name) {
                if *o != origin {
                    return Err(bad(
                        "another graph names a different tensor with this name; re-export the model",
                    ));
                }
            } else {
                if !self.maps.contains_key(&file) {
                    let p = dir.join(&file);
                    let f = std::fs::File::open(&p).map_err(crate::error::io_err(&p))?;
                    // SAFETY: read-only mapping of a file the manifest check just verified.
                    let m = unsafe { memmap2::Mmap::map(&f) }.map_err(crate::error::io_err(&p))?;
                    self.maps.insert(file.clone(), std::sync::Arc::new(m));
                }
                let map = &self.maps[&file];
                let (elem, size) = match t.data_type {
                    star_artifact::onnx::dtype::FLOAT => (
                        ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                        4,
                    ),
                    star_artifact::onnx::dtype::FLOAT16 => (
                        ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                        2,
                    ),
                    star_artifact::onnx::dtype::INT8 => (
                        ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
                        1,
                    ),
                    other => return Err(bad(&format!("unsupported external data type {other}"))),
                };
                let numel = t
                    .dims
                    .iter()
                    .try_fold(1usize, |a, &d| {
                        usize::try_from(d).ok().and_then(|d| a.checked_mul(d))
                    })
                    .and_then(|n| n.checked_mul(size));
                if offset.checked_add(length).is_none_or(|e| e > map.len()) || numel != Some(length)
                {
                    return Err(bad(&format!(
                        "{length} bytes at offset {offset} do not fit {} ({} bytes) as {:?}",
                        file,
                        map.len(),
                        t.dims
                    )));
                }
                let ptr = map[offset..].as_ptr();
                if !(ptr as usize).is_multiple_of(size) {
                    return Err(bad("misaligned in the weights file; re-export the model"));
                }
                // SAFETY: in bounds and aligned (checked above); the mapping lives in `maps`
                // until after every value (field order) and is never written.
                let value = unsafe {
                    crate::ort::bind::value_over(ptr, length, &t.dims, elem, Place::Host)
                }
                .map_err(|e| ort_err(format!("weight {}", t.name))(ort::Error::new(e)))?;
                self.bytes += length;
                self.values
                    .insert(t.name.clone(), std::sync::Arc::new(value));
                self.origin.insert(t.name.clone(), origin);
            }
            out.push((t.name.clone(), self.values[&t.name].clone()));
        }
        Ok(out)
    }
}

pub struct OrtSession {
    pub(super) label: String,
    pub(super) session: ort::session::Session,
    /// The pool's weights it was given.
    pub(super) weights: Vec<String>,
    /// Its I/O bindings, one per call (dropped with the session when it is given back).
    pub(super) bindings: crate::engine::BindCache<ort::session::IoBinding>,
}

/// How a session holds its MatMul weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// Pre-packed into the pool's container, which `step_first` and `step` share.
    Shared,
    /// Pre-packed into a container of its own, so that it is created in parallel with others
    /// (ONNX Runtime holds a container's lock for a session's whole pre-packing).
    Own,
    /// Not pre-packed: MLAS packs each weight while it multiplies, reading the mapping.
    Off,
}

/// What a session that pre-packed its weights drops from the mapping once it exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Every page of the mapping (it faults back in where read directly).
    All,
    /// The pages of its own weights: another session reads its own through the mapping.
    Own,
    None,
}

/// Bytes of a graph's external initializers (its share of `weights.bin`).
pub(super) fn external_bytes(graph: &Path, bytes: &[u8]) -> Result<usize> {
    let model = star_artifact::onnx::decode_model(bytes).map_err(|e| ArtifactError::Manifest {
        path: graph.to_path_buf(),
        why: format!("not an ONNX model: {e}"),
    })?;
    Ok(model
        .graph
        .map(|g| g.initializer)
        .unwrap_or_default()
        .iter()
        .filter(|t| t.data_location == 1)
        .filter_map(|t| t.external_data.iter().find(|e| e.key == "length"))
        .filter_map(|e| e.value.parse::<usize>().ok())
        .sum())
}

impl OrtSession {
    /// Create a session with the pool's shared values as initializers. The pool is locked only
    /// while the values are looked up, not while ONNX Runtime optimizes and pre-packs.
    /// `release`: which mapped pages to drop once the session has pre-packed its weights.
    pub fn load(
        graph: &Path,
        bytes: &[u8],
        label: &str,
        threads: usize,
        pool: &std::sync::Mutex<WeightPool>,
        packing: Packing,
        release: Release,
    ) -> Result<Self> {
        let env = ort_environment()?;
        let ctx = format!("loading {}", graph.display());
        let (inits, prepacked) = {
            let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
            let c = match packing {
                Packing::Shared => Some(p.prepacked.clone()),
                Packing::Own => Some(ort::session::builder::PrepackedWeights::new()),
                Packing::Off => None,
            };
            (p.for_graph(graph, bytes)?, c)
        };
        let weights: Vec<String> = inits.iter().map(|(n, _)| n.clone()).collect();
        let mut b = ort::session::Session::builder(env).map_err(ort_err(ctx.clone()))?;
        // Weights come from the shared pool; their pre-packed forms go into the pool's shared
        // container, so two graphs naming the same weight pack it once.
        b = match &prepacked {
            Some(c) => b
                .with_prepacked_weights(c)
                .map_err(|e| ort_err(ctx.clone())(e.into()))?,
            None => b
                .with_config_entry("session.disable_prepacking", "1")
                .map_err(|e| ort_err(ctx.clone())(e.into()))?,
        };
        for (name, value) in inits {
            b = b
                .with_initializer(&name, value)
                .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        }
        if threads > 0 {
            b = b
                .with_intra_threads(threads)
                .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        }
        // Idle intra-op threads sleep instead of spinning: with as many threads as cores,
        // spinning took the cores from the runtime's own work and from the thread creating the
        // next sessions (RESULTS.md: d16 warm 4.02 -> 3.48 s, d30 scale 0 18.3 -> 13.2 s).
        b = b
            .with_config_entry("session.intra_op.allow_spinning", "0")
            .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        // From the verified bytes: every external initializer is given above, so ONNX Runtime
        // reads no weight itself; it only checks that the external data paths resolve, from
        // the model directory.
        let dir = graph.parent().unwrap_or(Path::new("."));
        b = b
            .with_config_entry(
                "session.model_external_initializers_file_folder_path",
                dir.to_string_lossy(),
            )
            .map_err(|e| ort_err(ctx.clone())(e.into()))?;
        let session = b.commit_from_memory(bytes).map_err(ort_err(ctx))?;
        // What was pre-packed is never read through the mapping again; an unpacked session
        // reads its weights there at every run, so its pages stay.
        if prepacked.is_some() {
            let p = pool.lock().unwrap_or_else(|e| e.into_inner());
            match release {
                Release::All => p.release_all(),
                Release::Own => p.release_pages(&weights),
                Release::None => {}
            }
        }
        Ok(OrtSession {
            label: label.to_string(),
            session,
            weights,
            bindings: Default::default(),
        })
    }
}

impl OrtSession {
    pub fn name(&self) -> &str {
        &self.label
    }
}
