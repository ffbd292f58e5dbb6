//! A memory-mapped `.safetensors` reader: the header is parsed, tensor bytes stay in the mapping
//! until a caller converts one tensor, so a multi-GB checkpoint never needs a second copy in RAM.

use crate::error::{io_err, ArtifactError, Result};
use crate::tensor::Tensor;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
}

/// Little-endian bytes of one tensor converted to f32 (the exporter's working precision).
pub fn bytes_to_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DType::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DType::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DType::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        DType::U8 | DType::Bool => bytes.iter().map(|&b| b as f32).collect(),
    })
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

pub struct SafeTensors {
    pub path: PathBuf,
    mmap: Mmap,
    data_offset: usize,
    pub entries: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
}

impl SafeTensors {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |why: String| ArtifactError::BadSafetensors {
            path: path.to_path_buf(),
            why,
        };
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: read-only mapping; the file is not expected to change while we read it.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        if mmap.len() < 8 {
            return Err(bad(format!("{} bytes, too short for a header", mmap.len())));
        }
        let n = u64::from_le_bytes(mmap[..8].try_into().unwrap()) as usize;
        if n > 100 << 20 || 8 + n > mmap.len() {
            return Err(bad(format!(
                "header length {n} exceeds the file ({} bytes): truncated?",
                mmap.len()
            )));
        }
        let header: serde_json::Value = serde_json::from_slice(&mmap[8..8 + n])
            .map_err(|e| bad(format!("header is not JSON: {e}")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| bad("header is not a JSON object".into()))?;
        let data_len = mmap.len() - 8 - n;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (k, v) in obj {
            if k == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (mk, mv) in m {
                        metadata.insert(mk.clone(), mv.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let dt = v["dtype"]
                .as_str()
                .and_then(DType::parse)
                .ok_or_else(|| bad(format!("tensor '{k}': unsupported dtype {}", v["dtype"])))?;
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .ok_or_else(|| bad(format!("tensor '{k}': no shape")))?
                .iter()
                .map(|d| d.as_u64().map(|x| x as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(format!("tensor '{k}': bad shape")))?;
            let offs = v["data_offsets"]
                .as_array()
                .ok_or_else(|| bad(format!("tensor '{k}': no data_offsets")))?;
            let (start, end) = match (
                offs.first().and_then(|x| x.as_u64()),
                offs.get(1).and_then(|x| x.as_u64()),
            ) {
                (Some(s), Some(e)) => (s as usize, e as usize),
                _ => return Err(bad(format!("tensor '{k}': bad data_offsets"))),
            };
            let want = shape.iter().product::<usize>() * dt.size();
            if end < start || end - start != want {
                return Err(bad(format!(
                    "tensor '{k}': {} bytes for shape {shape:?} {}",
                    end.saturating_sub(start),
                    dt.name()
                )));
            }
            if end > data_len {
                return Err(bad(format!("tensor '{k}' ends at byte {end} past the data ({data_len} bytes): truncated file")));
            }
            entries.insert(
                k.clone(),
                Entry {
                    dtype: dt,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(SafeTensors {
            path: path.to_path_buf(),
            mmap,
            data_offset: 8 + n,
            entries,
            metadata,
        })
    }

    /// Byte offset of an entry's data in the file.
    pub fn file_offset(&self, e: &Entry) -> usize {
        self.data_offset + e.start
    }

    pub fn bytes(&self, e: &Entry) -> &[u8] {
        &self.mmap[self.data_offset + e.start..self.data_offset + e.end]
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// One tensor as f32 or int64 (integer dtypes stay integers).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ArtifactError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let b = self.bytes(e);
        Ok(match e.dtype {
            DType::I64 => Tensor::i64(
                e.shape.clone(),
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::I32 => Tensor::i64(
                e.shape.clone(),
                b.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            dt => Tensor::f32(e.shape.clone(), bytes_to_f32(dt, b).unwrap()),
        })
    }
}
