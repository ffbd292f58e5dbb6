//! The values that pass between stages, owned by the engine in its memory (the host for ort-cpu,
//! the device for ort-cuda and tensorrt): one buffer per `Slot`, allocated once per (schedule,
//! batch) at the largest size any scale needs and kept at the same address across scales and
//! generations, so that a binding made once stays valid (and a CUDA graph captured over it). A
//! scale whose value is smaller binds a view of the buffer's first elements. The pipeline holds
//! slots, not tensors; a copy to or from the host is made only where it asks for one, and
//! `ModelDir` counts each (`Transfers`).

use crate::error::{EngineError, Result};
use crate::memory::Memory;
use star_artifact::dtype::Dtype;
use star_artifact::stage::Stage;
use star_artifact::tensor::Tensor;
use std::collections::BTreeMap;

/// A value the engine owns. The pipeline names what a stage reads and writes by slot; which
/// graph port binds to which slot is the pipeline's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// The prompts' token ids and attention mask, (2B, 77): uploaded once per generation.
    InputIds,
    AttentionMask,
    /// The text encoder's outputs, (2B, 77, W) and (2B, W).
    TextHidden,
    TextPooled,
    /// The cross-attention K/V and mask bias: written by `text_kv`, read by every step.
    TextKv,
    TextBias,
    /// A scale's embedded input (B2, n, C): `text_kv` writes scale 0's, `vq` the next scale's.
    X,
    /// The step's last hidden state and logits.
    Hidden,
    Logits,
    /// The stable sampler's logits.
    SamplerLogits,
    /// The sample graph's parameters: the guidance pair, top-k, the top-p threshold, and the
    /// RNG contract's uniforms (B, n).
    Guidance,
    TopK,
    TopP,
    Uniforms,
    /// What the sample graph drew, (B, n): token ids and their probabilities.
    Idx,
    Prob,
    /// A scale's tokens as chosen on the host (the stable sampler's reveal, a replayed record).
    Tokens,
    /// The stable sampler's reveal mask (B, n).
    RevealMask,
    /// The scale index the vq and sampler graphs take.
    Scale,
    /// The accumulated VQ map: two buffers, read from one and written to the other (a graph
    /// never reads and writes one buffer in the same run).
    FHat(u8),
    NextIn,
    ImageRaw,
    Image,
    /// A port of a stage that no other stage reads (inputs of `ModelDir::run_host`, outputs
    /// that are only observed such as calibration probes): its index among the graph's inputs
    /// then outputs.
    Port(Stage, u16),
}

/// What a slot holds now: its shape and element type (a graph output's, or an upload's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bytes()
    }

    /// Whether `shape` of `dtype` may be bound as a view of this value: the same element type,
    /// the same trailing dims after the first, and no more elements (the first rows, such as
    /// the conditional half of (2B, ...), or the first of several stacked values).
    pub fn has_view(&self, shape: &[usize], dtype: Dtype) -> bool {
        let n: usize = shape.iter().product();
        dtype == self.dtype
            && !shape.is_empty()
            && shape.len() <= self.shape.len()
            && shape[1..] == self.shape[self.shape.len() + 1 - shape.len()..]
            && n <= self.shape.iter().product::<usize>()
    }
}

/// What the pipeline (through `ModelDir`) asks of an engine's values.
pub trait ValueStore {
    /// Make the slot's buffer at least `bytes` long. A buffer that is already long enough keeps
    /// its address and contents; a longer one replaces it (its contents are gone) and bumps
    /// `epoch`.
    fn reserve(&mut self, slot: Slot, bytes: usize) -> Result<()>;
    /// Record that the slot now holds `held` (a run wrote it); its buffer must be long enough.
    fn set_held(&mut self, slot: Slot, held: Held) -> Result<()>;
    fn held(&self, slot: Slot) -> Option<&Held>;
    /// Upload `held`'s value: `bytes` are its first bytes (the rest, where shorter, keeps what
    /// the buffer held: parts of a value the caller never reads).
    fn write(&mut self, slot: Slot, held: Held, bytes: &[u8]) -> Result<()>;
    /// A value of `held` zero-filled on the engine (no transfer).
    fn zero(&mut self, slot: Slot, held: Held) -> Result<()>;
    /// The slot's value as a host tensor (float32 or int64).
    fn read(&self, slot: Slot) -> Result<Tensor>;
    /// The slot's first byte as the engine binds it; None before `reserve`.
    fn address(&mut self, slot: Slot) -> Option<*mut u8>;
    /// Bumped by every (re)allocation: bindings made before it are stale.
    fn epoch(&self) -> u64;
    /// Bytes allocated over all slots.
    fn allocated(&self) -> usize;
    /// Give every buffer back (the next use allocates again).
    fn clear(&mut self);
}

struct Buf<M> {
    mem: M,
    cap: usize,
    held: Option<Held>,
}

/// The value store over an engine's memory.
pub struct Values<M: Memory> {
    with: M::Alloc,
    bufs: BTreeMap<Slot, Buf<M>>,
    epoch: u64,
}

impl<M: Memory> Values<M> {
    pub fn new(with: M::Alloc) -> Self {
        Values {
            with,
            bufs: BTreeMap::new(),
            epoch: 0,
        }
    }

    fn buf(&self, slot: Slot) -> Result<&Buf<M>> {
        self.bufs.get(&slot).ok_or_else(|| {
            EngineError::Unsupported(format!("engine value {slot:?} is not allocated"))
        })
    }

    fn fits(&self, slot: Slot, bytes: usize) -> Result<()> {
        let cap = self.buf(slot)?.cap;
        if bytes > cap {
            return Err(EngineError::Unsupported(format!(
                "engine value {slot:?}: {bytes} bytes do not fit its {cap}"
            )));
        }
        Ok(())
    }
}

impl<M: Memory> ValueStore for Values<M> {
    fn reserve(&mut self, slot: Slot, bytes: usize) -> Result<()> {
        if self.bufs.get(&slot).is_some_and(|b| b.cap >= bytes) {
            return Ok(());
        }
        // The old buffer goes first, so that two are never held at once.
        self.bufs.remove(&slot);
        self.epoch += 1;
        let mem = M::alloc(&self.with, bytes).map_err(|e| match e {
            EngineError::OutOfMemory(m) => {
                EngineError::OutOfMemory(format!("{m} for the engine value {slot:?}"))
            }
            e => e,
        })?;
        self.bufs.insert(
            slot,
            Buf {
                mem,
                cap: bytes,
                held: None,
            },
        );
        Ok(())
    }

    fn set_held(&mut self, slot: Slot, held: Held) -> Result<()> {
        self.fits(slot, held.bytes())?;
        if let Some(b) = self.bufs.get_mut(&slot) {
            b.held = Some(held);
        }
        Ok(())
    }

    fn held(&self, slot: Slot) -> Option<&Held> {
        self.bufs.get(&slot).and_then(|b| b.held.as_ref())
    }

    fn write(&mut self, slot: Slot, held: Held, bytes: &[u8]) -> Result<()> {
        if bytes.len() > held.bytes() {
            return Err(EngineError::Unsupported(format!(
                "engine value {slot:?}: {} bytes for a value of {:?} {}",
                bytes.len(),
                held.shape,
                held.dtype
            )));
        }
        self.reserve(slot, held.bytes())?;
        let with = &self.with;
        if let Some(b) = self.bufs.get_mut(&slot) {
            b.mem.copy_from_host(with, 0, bytes)?;
            b.held = Some(held);
        }
        Ok(())
    }

    fn zero(&mut self, slot: Slot, held: Held) -> Result<()> {
        self.reserve(slot, held.bytes())?;
        let with = &self.with;
        if let Some(b) = self.bufs.get_mut(&slot) {
            b.mem.zero(with, 0, held.bytes())?;
            b.held = Some(held);
        }
        Ok(())
    }

    fn read(&self, slot: Slot) -> Result<Tensor> {
        let b = self.buf(slot)?;
        let held = b.held.as_ref().ok_or_else(|| {
            EngineError::Unsupported(format!("engine value {slot:?} read before it was written"))
        })?;
        let mut bytes = vec![0u8; held.bytes()];
        b.mem.copy_to_host(&self.with, 0, &mut bytes)?;
        Tensor::from_bytes(held.shape.clone(), held.dtype, &bytes).ok_or_else(|| {
            EngineError::Unsupported(format!(
                "engine value {slot:?} is {}; only float32 and int64 values are read",
                held.dtype
            ))
        })
    }

    fn address(&mut self, slot: Slot) -> Option<*mut u8> {
        let with = &self.with;
        self.bufs.get_mut(&slot).map(|b| b.mem.base(with))
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn allocated(&self) -> usize {
        self.bufs.values().map(|b| b.cap).sum()
    }

    fn clear(&mut self) {
        if !self.bufs.is_empty() {
            self.bufs.clear();
            self.epoch += 1;
        }
    }
}

/// Host ↔ engine copies of one kind of traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    pub host_to_engine_bytes: u64,
    pub engine_to_host_bytes: u64,
    pub host_copies: u64,
}

impl Traffic {
    fn add(&mut self, to_engine: bool, bytes: usize) {
        if to_engine {
            self.host_to_engine_bytes += bytes as u64;
        } else {
            self.engine_to_host_bytes += bytes as u64;
        }
        self.host_copies += 1;
    }
}

/// Every copy between the host and an engine's values or KV cache, in total and per stage
/// (the stage whose input was uploaded or whose output was read). On ort-cpu "engine" memory
/// is host memory too: these are the pipeline's own copies.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Transfers {
    #[serde(flatten)]
    pub total: Traffic,
    pub stages: BTreeMap<String, Traffic>,
}

impl Transfers {
    pub fn record(&mut self, stage: Stage, to_engine: bool, bytes: usize) {
        self.total.add(to_engine, bytes);
        self.stages
            .entry(stage.name().to_string())
            .or_default()
            .add(to_engine, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HostMem;

    fn held(shape: &[usize], dtype: Dtype) -> Held {
        Held {
            shape: shape.to_vec(),
            dtype,
        }
    }

    #[test]
    fn views_are_leading_rows_or_the_first_of_stacked_values() {
        let h = held(&[4, 77, 8], Dtype::Float32);
        assert!(h.has_view(&[4, 77, 8], Dtype::Float32));
        assert!(h.has_view(&[2, 77, 8], Dtype::Float32));
        assert!(h.has_view(&[77, 8], Dtype::Float32));
        assert!(!h.has_view(&[5, 77, 8], Dtype::Float32));
        assert!(!h.has_view(&[2, 78, 8], Dtype::Float32));
        assert!(!h.has_view(&[2, 77, 8], Dtype::Int64));
        assert!(!h.has_view(&[1, 4, 77, 8], Dtype::Float32));
    }

    #[test]
    fn buffers_keep_their_address_until_a_larger_value_needs_more() {
        let mut v = Values::<HostMem>::new(());
        v.reserve(Slot::X, 64).unwrap();
        let (a, e) = (v.address(Slot::X).unwrap(), v.epoch());
        let t = Tensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        v.write(Slot::X, held(&[2, 2], Dtype::Float32), t.bytes())
            .unwrap();
        assert_eq!((v.address(Slot::X).unwrap(), v.epoch()), (a, e));
        assert_eq!(v.read(Slot::X).unwrap(), t);
        v.reserve(Slot::X, 32).unwrap();
        assert_eq!((v.address(Slot::X).unwrap(), v.epoch()), (a, e));
        v.reserve(Slot::X, 65).unwrap();
        assert!(v.epoch() > e);
        assert!(v.read(Slot::X).is_err(), "a new buffer holds nothing yet");
        assert!(v.set_held(Slot::X, held(&[17, 1], Dtype::Float32)).is_err());
        v.zero(Slot::FHat(0), held(&[3], Dtype::Int64)).unwrap();
        assert_eq!(
            v.read(Slot::FHat(0)).unwrap(),
            Tensor::i64(vec![3], vec![0; 3])
        );
        assert_eq!(v.allocated(), 65 + 24);
        v.clear();
        assert!(v.address(Slot::X).is_none());
    }

    #[test]
    fn a_short_write_keeps_the_rest() {
        let mut v = Values::<HostMem>::new(());
        let t = Tensor::i64(vec![4], vec![1, 2, 3, 4]);
        v.write(Slot::Idx, held(&[4], Dtype::Int64), t.bytes())
            .unwrap();
        let first = Tensor::i64(vec![2], vec![9, 8]);
        v.write(Slot::Idx, held(&[4], Dtype::Int64), first.bytes())
            .unwrap();
        assert_eq!(
            v.read(Slot::Idx).unwrap(),
            Tensor::i64(vec![4], vec![9, 8, 3, 4])
        );
        assert!(v
            .write(Slot::Idx, held(&[1], Dtype::Int64), t.bytes())
            .is_err());
    }

    #[test]
    fn transfers_count_per_stage() {
        let mut t = Transfers::default();
        t.record(Stage::Sample, true, 40);
        t.record(Stage::Sample, false, 16);
        t.record(Stage::Decoder, false, 100);
        assert_eq!(t.total.host_to_engine_bytes, 40);
        assert_eq!(t.total.engine_to_host_bytes, 116);
        assert_eq!(t.total.host_copies, 3);
        assert_eq!(t.stages["sample"].host_copies, 2);
        let j = serde_json::to_value(&t).unwrap();
        assert_eq!(j["engine_to_host_bytes"], 116);
        assert_eq!(j["stages"]["decoder"]["engine_to_host_bytes"], 100);
    }
}
