//! Checkpoint files as one lazily-read tensor table: PyTorch zip-pickles (`.pth`/`.bin`),
//! `.safetensors`, and Hugging Face folders. Tensor bytes stay in a read-only memory mapping until
//! a tensor is converted, so exporting a multi-GB file never holds two copies of it.

use crate::error::{io_err, ExportError, Result};
use crate::pickle::{self, PickleError, Value};
use memmap2::Mmap;
use star_artifact::safetensors::{bytes_to_f32, DType, SafeTensors};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

#[derive(Clone, Debug)]
pub enum Loc {
    /// Byte range of a stored (uncompressed) zip member in the mapping, plus the tensor view.
    Pth {
        data: (usize, usize),
        offset: usize,
        stride: Vec<usize>,
    },
    /// Compressed member: bytes were inflated into `inflated[key]`.
    PthInflated {
        key: String,
        offset: usize,
        stride: Vec<usize>,
    },
    Safe {
        file: usize,
        name: String,
    },
}

pub struct Checkpoint {
    pub path: PathBuf,
    /// Accept NaN/Inf weights (export --allow-nonfinite); by default a read refuses them.
    pub allow_nonfinite: bool,
    pub format: &'static str,
    pub tensors: BTreeMap<String, (TensorInfo, Loc)>,
    mmap: Option<Mmap>,
    inflated: BTreeMap<String, Vec<u8>>,
    safes: Vec<SafeTensors>,
}

fn storage_dtype(kind: &str) -> Option<DType> {
    Some(match kind {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

impl Checkpoint {
    /// Open a file or a Hugging Face folder; `.safetensors` by extension, everything else must be a
    /// PyTorch zip. `state_path` is the dict path to the state_dict inside a pickle (tried first;
    /// a flat state_dict at the top level is accepted too).
    pub fn open(path: &Path, state_path: &[&str]) -> Result<Checkpoint> {
        if path.is_dir() {
            return Self::open_dir(path);
        }
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            return Self::open_safetensors(&[path.to_path_buf()]);
        }
        Self::open_pth(path, state_path)
    }

    fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let mut safes: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
            .collect();
        safes.sort();
        if !safes.is_empty() {
            return Self::open_safetensors(&safes);
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            return Self::open_pth(&bin, &[]);
        }
        Err(ExportError::BadCheckpoint {
            path: dir.to_path_buf(),
            why: "folder holds no model.safetensors or pytorch_model.bin".into(),
        })
    }

    fn open_safetensors(files: &[PathBuf]) -> Result<Checkpoint> {
        let mut tensors = BTreeMap::new();
        let mut safes = vec![];
        for (i, f) in files.iter().enumerate() {
            let st = SafeTensors::open(f)?;
            for (name, e) in &st.entries {
                tensors.insert(
                    name.clone(),
                    (
                        TensorInfo {
                            dtype: e.dtype,
                            shape: e.shape.clone(),
                        },
                        Loc::Safe {
                            file: i,
                            name: name.clone(),
                        },
                    ),
                );
            }
            safes.push(st);
        }
        Ok(Checkpoint {
            allow_nonfinite: false,
            path: files[0].clone(),
            format: "safetensors",
            tensors,
            mmap: None,
            inflated: BTreeMap::new(),
            safes,
        })
    }

    fn open_pth(path: &Path, state_path: &[&str]) -> Result<Checkpoint> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        let not_zip = |why: String| ExportError::NotZip {
            path: path.to_path_buf(),
            why,
        };
        let mut zip = zip::ZipArchive::new(&file).map_err(|e| not_zip(e.to_string()))?;
        let names: Vec<String> = zip.file_names().map(|s| s.to_string()).collect();
        let pkl = names
            .iter()
            .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
            .cloned()
            .ok_or_else(|| not_zip("no data.pkl member".into()))?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let mut pkl_bytes = vec![];
        zip.by_name(&pkl)
            .map_err(|e| not_zip(e.to_string()))?
            .read_to_end(&mut pkl_bytes)
            .map_err(|e| not_zip(format!("reading data.pkl: {e}")))?;
        let root = pickle::load(&pkl_bytes).map_err(|e| match e {
            PickleError::Foreign(g) => ExportError::ForeignGlobal {
                path: path.to_path_buf(),
                global: g,
            },
            PickleError::Malformed(why) => ExportError::BadPickle {
                path: path.to_path_buf(),
                why,
            },
        })?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;

        // Find the state dict: the requested path, else the root itself.
        let mut state = root.clone();
        let mut found = true;
        for key in state_path {
            match state.dict_get(key) {
                Some(v) => state = v,
                None => {
                    found = false;
                    break;
                }
            }
        }
        if !found {
            state = root.clone();
        }
        let Value::Dict(d) = &state else {
            return Err(ExportError::BadCheckpoint {
                path: path.to_path_buf(),
                why: format!("the pickle holds a {}, not a state_dict", state.kind()),
            });
        };
        let mut tensors = BTreeMap::new();
        let mut inflated = BTreeMap::new();
        let mut storage_loc: BTreeMap<String, Option<(usize, usize)>> = BTreeMap::new();
        for (k, v) in d.borrow().iter() {
            let Some(name) = k.as_str() else { continue };
            let Value::Tensor(t) = v else { continue };
            let t: &Rc<pickle::TensorRef> = t;
            let dtype =
                storage_dtype(&t.storage.kind).ok_or_else(|| ExportError::BadCheckpoint {
                    path: path.to_path_buf(),
                    why: format!("tensor '{name}': unsupported storage {}", t.storage.kind),
                })?;
            let member = format!("{prefix}data/{}", t.storage.key);
            if !storage_loc.contains_key(&t.storage.key) {
                let mut zf = zip
                    .by_name(&member)
                    .map_err(|e| ExportError::BadCheckpoint {
                        path: path.to_path_buf(),
                        why: format!("tensor '{name}': storage member {member}: {e}"),
                    })?;
                let loc = if zf.compression() == zip::CompressionMethod::Stored {
                    let start = zf.data_start() as usize;
                    let end = start + zf.size() as usize;
                    if end > mmap.len() {
                        return Err(not_zip(format!(
                            "member {member} runs past the end of the file"
                        )));
                    }
                    Some((start, end))
                } else {
                    let mut buf = vec![];
                    zf.read_to_end(&mut buf)
                        .map_err(|e| not_zip(format!("inflating {member}: {e}")))?;
                    inflated.insert(t.storage.key.clone(), buf);
                    None
                };
                storage_loc.insert(t.storage.key.clone(), loc);
            }
            // Check the view fits inside its storage.
            let storage_bytes = match storage_loc[&t.storage.key] {
                Some((s, e)) => e - s,
                None => inflated[&t.storage.key].len(),
            };
            let numel: usize = t.shape.iter().product();
            let last = if numel == 0 {
                0
            } else {
                t.offset
                    + t.shape
                        .iter()
                        .zip(&t.stride)
                        .map(|(d, s)| (d - 1) * s)
                        .sum::<usize>()
                    + 1
            };
            if last * dtype.size() > storage_bytes {
                return Err(ExportError::BadCheckpoint {
                    path: path.to_path_buf(),
                    why: format!("tensor '{name}' {:?} needs {} bytes, its storage has {storage_bytes}: truncated file?", t.shape, last * dtype.size()),
                });
            }
            let loc = match storage_loc[&t.storage.key] {
                Some(range) => Loc::Pth {
                    data: range,
                    offset: t.offset,
                    stride: t.stride.clone(),
                },
                None => Loc::PthInflated {
                    key: t.storage.key.clone(),
                    offset: t.offset,
                    stride: t.stride.clone(),
                },
            };
            tensors.insert(
                name.to_string(),
                (
                    TensorInfo {
                        dtype,
                        shape: t.shape.clone(),
                    },
                    loc,
                ),
            );
        }
        if tensors.is_empty() {
            return Err(ExportError::BadCheckpoint {
                path: path.to_path_buf(),
                why: "no tensors found in the state_dict".into(),
            });
        }
        Ok(Checkpoint {
            allow_nonfinite: false,
            path: path.to_path_buf(),
            format: "pytorch-zip",
            tensors,
            mmap: Some(mmap),
            inflated,
            safes: vec![],
        })
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|(i, _)| i)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The raw fp16 bits of a contiguous fp16 tensor (None for any other dtype or layout), so an
    /// fp16 source can be stored as fp16 without a round trip through f32.
    pub fn read_f16_bits(&self, name: &str) -> Result<Option<Vec<u16>>> {
        let Some((info, loc)) = self.tensors.get(name) else {
            return Ok(None);
        };
        if info.dtype != DType::F16 {
            return Ok(None);
        }
        let numel: usize = info.shape.iter().product();
        let bytes: &[u8] = match loc {
            Loc::Safe { file, name } => {
                let st = &self.safes[*file];
                st.bytes(&st.entries[name])
            }
            Loc::Pth {
                data,
                offset,
                stride,
            } => {
                let contiguous = info.shape.len() <= 1
                    || stride.last() == Some(&1)
                        && stride[0] == info.shape[1..].iter().product::<usize>();
                if !contiguous {
                    return Ok(None);
                }
                let Some(m) = self.mmap.as_ref() else {
                    return Ok(None);
                };
                match m.get(data.0 + offset * 2..data.0 + (offset + numel) * 2) {
                    Some(b) => b,
                    None => return Err(self.short(name)),
                }
            }
            Loc::PthInflated { .. } => return Ok(None),
        };
        let bits: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        if !self.allow_nonfinite {
            // fp16: exponent bits all ones is Inf or NaN.
            if let Some(i) = bits.iter().position(|b| b & 0x7c00 == 0x7c00) {
                return Err(self.nonfinite(name, i, half::f16::from_bits(bits[i]).to_f32()));
            }
        }
        Ok(Some(bits))
    }

    fn short(&self, name: &str) -> ExportError {
        ExportError::BadCheckpoint {
            path: self.path.clone(),
            why: format!("tensor '{name}' extends past the end of its storage"),
        }
    }

    fn nonfinite(&self, name: &str, index: usize, value: f32) -> ExportError {
        ExportError::NonFinite {
            path: self.path.clone(),
            name: name.to_string(),
            index,
            value: value.to_string(),
        }
    }

    /// Read one tensor as f32 (fp16/bf16/fp64 are converted exactly or rounded to nearest).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let v = self.read_f32_raw(name)?;
        if !self.allow_nonfinite {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(self.nonfinite(name, i, v[i]));
            }
        }
        Ok(v)
    }

    fn read_f32_raw(&self, name: &str) -> Result<Vec<f32>> {
        let (info, loc) = self
            .tensors
            .get(name)
            .ok_or_else(|| ExportError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let el = info.dtype.size();
        let conv = |bytes: Option<&[u8]>| -> Result<Vec<f32>> {
            let b = bytes.ok_or_else(|| self.short(name))?;
            bytes_to_f32(info.dtype, b).ok_or_else(|| ExportError::BadCheckpoint {
                path: self.path.clone(),
                why: format!(
                    "tensor '{name}' has dtype {:?}, not a float type",
                    info.dtype
                ),
            })
        };
        let strided = |bytes: &[u8], offset: usize, stride: &[usize]| -> Result<Vec<f32>> {
            let numel: usize = info.shape.iter().product();
            let contiguous = {
                let mut expect = 1;
                let mut ok = true;
                for (d, s) in info.shape.iter().zip(stride).rev() {
                    if *d != 1 && *s != expect {
                        ok = false;
                    }
                    expect *= d;
                }
                ok
            };
            if contiguous {
                return conv(bytes.get(offset * el..(offset + numel) * el));
            }
            // A non-contiguous view (e.g. saved from a transpose): gather element by element.
            let mut out = Vec::with_capacity(numel);
            let mut idx = vec![0usize; info.shape.len()];
            for _ in 0..numel {
                let off = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
                out.extend(conv(bytes.get(off * el..(off + 1) * el))?);
                for ax in (0..idx.len()).rev() {
                    idx[ax] += 1;
                    if idx[ax] < info.shape[ax] {
                        break;
                    }
                    idx[ax] = 0;
                }
            }
            Ok(out)
        };
        match loc {
            Loc::Pth {
                data,
                offset,
                stride,
            } => {
                let m = self.mmap.as_ref().ok_or_else(|| self.short(name))?;
                strided(
                    m.get(data.0..data.1).ok_or_else(|| self.short(name))?,
                    *offset,
                    stride,
                )
            }
            Loc::PthInflated {
                key,
                offset,
                stride,
            } => strided(&self.inflated[key], *offset, stride),
            Loc::Safe { file, name } => {
                let st = &self.safes[*file];
                conv(Some(st.bytes(&st.entries[name])))
            }
        }
    }
}

/// A path-scoped view of a checkpoint (like candle's VarBuilder): `w.pp("blocks.3.attn")` then
/// `get("proj.weight", &[c, c])` checks existence and shape and names the full tensor on error.
#[derive(Clone)]
pub struct Weights<'a> {
    pub ckpt: &'a Checkpoint,
    pub prefix: String,
}

impl<'a> Weights<'a> {
    pub fn new(ckpt: &'a Checkpoint, prefix: &str) -> Self {
        Weights {
            ckpt,
            prefix: prefix.to_string(),
        }
    }
    pub fn pp(&self, sub: &str) -> Weights<'a> {
        let prefix = if self.prefix.is_empty() {
            sub.to_string()
        } else {
            format!("{}.{}", self.prefix, sub)
        };
        Weights {
            ckpt: self.ckpt,
            prefix,
        }
    }
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.info(&self.key(name)).is_some()
    }
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let key = self.key(name);
        self.ckpt
            .info(&key)
            .map(|i| i.shape.clone())
            .ok_or(ExportError::MissingTensor {
                path: self.ckpt.path.clone(),
                name: key,
            })
    }
    /// Check name and shape without reading data.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<String> {
        let key = self.key(name);
        let got = self.shape(name)?;
        if got != shape {
            return Err(ExportError::ShapeMismatch {
                path: self.ckpt.path.clone(),
                name: key,
                expected: shape.to_vec(),
                got,
            });
        }
        Ok(key)
    }
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let key = self.check(name, shape)?;
        self.ckpt.read_f32(&key)
    }
}
