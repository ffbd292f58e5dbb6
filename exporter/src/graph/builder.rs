//! A small ONNX graph builder. Weights go through a `WeightStore` that writes each tensor once into
//! the shared external-data file, however many graphs reference it; small constants (shapes, RoPE
//! tables, resampling matrices) are stored inline.

use crate::error::{io_err, ExportError, Result};
use star_artifact::dtype::Dtype;
use star_artifact::manifest::IoSpec;
use star_artifact::onnx::{
    self, AttributeProto, Dim, GraphProto, NodeProto, StringStringEntryProto, TensorProto,
    ValueInfoProto,
};
use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

/// Numeric policy of one graph (`Stage::graph_precision` of the directory's precision).
/// FP16: matrix products in FP16 with FP16 weights, everything between them (norms, softmax,
/// RoPE, the q/k normalisation, GELU, residuals, the logits head) in FP32 with explicit casts.
/// INT8: the blocks' linear layers as Q/DQ pairs (per-channel symmetric weights, per-tensor
/// symmetric activations from the calibration table, zero-point 0), the rest FP32.
pub use star_artifact::dtype::Precision;

/// What a linear layer may be lowered to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lin {
    /// A transformer block's projection: FP16 in FP16 graphs, Q/DQ in INT8 graphs, probed for
    /// calibration.
    Block,
    /// Any other projection: FP16 in FP16 graphs, FP32 otherwise.
    Plain,
    /// The logits heads: always FP32 (sampling reads them).
    Head,
}

/// Tokens per calibration probe and run (see `G::probe`).
pub const PROBE_TOKENS: i64 = 256;
/// The probes' position multiplier: a prime larger than any scale's token count (64² + 1).
const PROBE_PRIME: i64 = 7919;

/// Activation ranges (tensor name -> amax) an INT8 graph quantizes its block inputs with.
pub type Amax = std::collections::BTreeMap<String, f32>;

pub struct WeightStore {
    pub file_name: String,
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    pos: u64,
    /// key -> (offset, length, dims, ONNX data type)
    index: HashMap<String, (u64, u64, Vec<usize>, i32)>,
}

/// Big tensors start on 64 KiB boundaries (page- and mapping-aligned for any loader that maps the
/// file; star-run itself reads each weight once into a pool shared by all sessions).
const BIG_ALIGN: u64 = 65536;
const SMALL_ALIGN: u64 = 64;

impl WeightStore {
    pub fn create(dir: &Path, file_name: &str) -> Result<Self> {
        let path = dir.join(file_name);
        let f = std::fs::File::create(&path).map_err(io_err(&path))?;
        Ok(WeightStore {
            file_name: file_name.into(),
            path,
            out: BufWriter::with_capacity(1 << 20, f),
            pos: 0,
            index: HashMap::new(),
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn add(&mut self, key: &str, dims: &[usize], data: &[f32]) -> Result<()> {
        let buf: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_bytes(key, dims, onnx::dtype::FLOAT, buf)
    }

    pub fn add_bytes(
        &mut self,
        key: &str,
        dims: &[usize],
        data_type: i32,
        buf: Vec<u8>,
    ) -> Result<()> {
        let bytes = buf.len() as u64;
        let align = if bytes >= BIG_ALIGN {
            BIG_ALIGN
        } else {
            SMALL_ALIGN
        };
        let pad = (align - self.pos % align) % align;
        let io = |e| ExportError::Io {
            path: self.path.clone(),
            source: e,
        };
        self.out.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        self.pos += pad;
        self.out.write_all(&buf).map_err(|e| ExportError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        self.index
            .insert(key.to_string(), (self.pos, bytes, dims.to_vec(), data_type));
        self.pos += bytes;
        Ok(())
    }

    pub fn finish(mut self) -> Result<PathBuf> {
        self.out.flush().map_err(io_err(&self.path))?;
        let f = self.out.into_inner().map_err(|e| ExportError::Io {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        let mut f = f;
        f.seek(std::io::SeekFrom::End(0))
            .map_err(io_err(&self.path))?;
        f.sync_all().map_err(io_err(&self.path))?;
        Ok(self.path)
    }

    fn proto(&self, key: &str) -> TensorProto {
        let (off, len, dims, data_type) = &self.index[key];
        TensorProto {
            name: key.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: *data_type,
            data_location: 1,
            external_data: vec![
                StringStringEntryProto {
                    key: "location".into(),
                    value: self.file_name.clone(),
                },
                StringStringEntryProto {
                    key: "offset".into(),
                    value: off.to_string(),
                },
                StringStringEntryProto {
                    key: "length".into(),
                    value: len.to_string(),
                },
            ],
            ..Default::default()
        }
    }
}

pub struct G<'s> {
    pub name: String,
    pub precision: Precision,
    /// FP32 calibration graphs: every block linear's input is also an output (`io::PROBE_PREFIX`).
    pub probing: bool,
    /// INT8 graphs: the calibration table.
    pub amax: Option<&'s Amax>,
    pub probe_specs: Vec<IoSpec>,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    /// Shapes of intermediate values that shape inference cannot name (see `annotate`).
    value_info: Vec<ValueInfoProto>,
    inits: Vec<TensorProto>,
    init_names: HashSet<String>,
    store: &'s mut WeightStore,
    counter: usize,
    pub in_specs: Vec<IoSpec>,
    pub out_specs: Vec<IoSpec>,
    /// The LayerNorm scale of ones of this graph (width, constant name).
    ones: Option<(usize, String)>,
    /// Bytes of FP32 attention scores one group of heads may take (`transformer::head_groups`).
    pub attention_budget: u64,
}

impl<'s> G<'s> {
    pub fn new(name: &str, precision: Precision, store: &'s mut WeightStore) -> Self {
        G {
            name: name.into(),
            precision,
            probing: false,
            attention_budget: super::DEFAULT_ATTENTION_BUDGET,
            amax: None,
            probe_specs: vec![],
            nodes: vec![],
            inputs: vec![],
            outputs: vec![],
            value_info: vec![],
            inits: vec![],
            init_names: HashSet::new(),
            store,
            counter: 0,
            in_specs: vec![],
            out_specs: vec![],
            ones: None,
        }
    }

    fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        format!("{}_{}", op.to_lowercase(), self.counter)
    }

    pub fn input(&mut self, name: &str, dtype: Dtype, dims: &[Dim]) -> String {
        self.inputs
            .push(ValueInfoProto::tensor(name, dtype.onnx(), dims));
        self.in_specs.push(IoSpec {
            name: name.into(),
            dtype,
            shape: dims.to_vec(),
        });
        name.to_string()
    }

    pub fn output(&mut self, value: &str, name: &str, dtype: Dtype, dims: &[Dim]) {
        self.nodes.push(NodeProto {
            input: vec![value.into()],
            output: vec![name.into()],
            op_type: "Identity".into(),
            name: format!("out_{name}"),
            ..Default::default()
        });
        self.outputs
            .push(ValueInfoProto::tensor(name, dtype.onnx(), dims));
        self.out_specs.push(IoSpec {
            name: name.into(),
            dtype,
            shape: dims.to_vec(),
        });
    }

    /// Make `value` itself the graph output `name`, with no Identity after it: its producer
    /// writes straight into the buffer a backend binds for the output, and its consumers read
    /// it from there. ONNX Runtime schedules an output's Identity late, keeping the value it
    /// copies alive until then: for the per-block K/V outputs that was every block's K/V of the
    /// scale at once (3.8 GB at d30/1024's last scale; measured). `value` is renamed everywhere.
    pub fn output_in_place(&mut self, value: &str, name: &str, dtype: Dtype, dims: &[Dim]) {
        debug_assert!(
            self.nodes
                .iter()
                .any(|n| n.output.iter().any(|o| o == value)),
            "{value} is not a node output"
        );
        debug_assert!(
            !self
                .nodes
                .iter()
                .any(|n| n.output.iter().any(|o| o == name)),
            "{name} is already a value"
        );
        for n in &mut self.nodes {
            for x in n.input.iter_mut().chain(n.output.iter_mut()) {
                if x == value {
                    *x = name.to_string();
                }
            }
        }
        self.value_info.retain(|v| v.name != value);
        self.outputs
            .push(ValueInfoProto::tensor(name, dtype.onnx(), dims));
        self.out_specs.push(IoSpec {
            name: name.into(),
            dtype,
            shape: dims.to_vec(),
        });
    }

    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let name = self.fresh(op);
        let outs: Vec<String> = (0..n).map(|i| format!("{name}_o{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.clone(),
            name,
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        outs
    }

    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.op_n(op, inputs, attrs, 1).pop().unwrap()
    }

    /// A shared weight: produced (read from the checkpoint, maybe transformed) only the first time
    /// any graph asks for `key`.
    pub fn weight(
        &mut self,
        key: &str,
        dims: &[usize],
        produce: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<String> {
        if !self.store.contains(key) {
            let data = produce()?;
            debug_assert_eq!(data.len(), dims.iter().product::<usize>(), "{key}");
            self.store.add(key, dims, &data)?;
        }
        if self.init_names.insert(key.to_string()) {
            let p = self.store.proto(key);
            self.inits.push(p);
        }
        Ok(key.to_string())
    }

    /// Whether the weights file already holds `key` (written for an earlier graph).
    pub fn has_weight(&self, key: &str) -> bool {
        self.store.contains(key)
    }

    /// A shared weight of any dtype given as little-endian bytes.
    pub fn weight_bytes(
        &mut self,
        key: &str,
        dims: &[usize],
        data_type: i32,
        produce: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<String> {
        if !self.store.contains(key) {
            let buf = produce()?;
            self.store.add_bytes(key, dims, data_type, buf)?;
        }
        if self.init_names.insert(key.to_string()) {
            let p = self.store.proto(key);
            self.inits.push(p);
        }
        Ok(key.to_string())
    }

    /// A shared fp16 weight given as raw bits (an fp16 source kept as fp16, e.g. an embedding
    /// table read through Gather and then cast: exact, and half the bytes).
    pub fn weight_f16(
        &mut self,
        key: &str,
        dims: &[usize],
        produce: impl FnOnce() -> Result<Vec<u16>>,
    ) -> Result<String> {
        if !self.store.contains(key) {
            let bits = produce()?;
            let buf = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.store.add_bytes(key, dims, onnx::dtype::FLOAT16, buf)?;
        }
        if self.init_names.insert(key.to_string()) {
            let p = self.store.proto(key);
            self.inits.push(p);
        }
        Ok(key.to_string())
    }

    pub fn c_f32(&mut self, data: &[f32], dims: &[i64]) -> String {
        let name = self.fresh("const");
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: onnx::dtype::FLOAT,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    pub fn c_i64(&mut self, data: &[i64], dims: &[i64]) -> String {
        let name = self.fresh("const");
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: onnx::dtype::INT64,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    pub fn c_i8(&mut self, data: &[i8], dims: &[i64]) -> String {
        let name = self.fresh("const");
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: onnx::dtype::INT8,
            raw_data: data.iter().map(|&v| v as u8).collect(),
            ..Default::default()
        });
        name
    }

    pub fn scalar(&mut self, v: f32) -> String {
        self.c_f32(&[v], &[])
    }

    /// State the shape of an intermediate value in symbols shape inference cannot derive (a
    /// dynamic Slice, a Split of a symbolic axis, a Concat of two symbols). ONNX Runtime keeps
    /// a declared symbol where its inference has none, and its memory planner reuses a dead
    /// buffer only for a value of the same shape: a value with an unnamed dimension matches
    /// nothing, stays on the planner's free list, and every later value scans past it. At
    /// d30 that scan was 9 s of session creation (nearly every value of `step` was unnamed).
    pub fn annotate(&mut self, x: &str, dtype: i32, dims: &[Dim]) {
        self.value_info.push(ValueInfoProto::tensor(x, dtype, dims));
    }

    /// Give `x` a stable tensor name (an Identity): the names calibration tables and TensorRT
    /// calibration caches refer to.
    pub fn named(&mut self, x: &str, name: &str) -> String {
        self.nodes.push(NodeProto {
            input: vec![x.into()],
            output: vec![name.into()],
            op_type: "Identity".into(),
            name: format!("name_{name}"),
            ..Default::default()
        });
        name.to_string()
    }

    /// An extra FP32 output of a calibration graph: `x` (rows, tokens, width), with at most
    /// `PROBE_TOKENS` tokens: m = min(tokens, PROBE_TOKENS) positions j·7919 mod tokens,
    /// j < m — distinct (7919 is a prime above every token count) and scattered over the whole
    /// pn×pn grid, where a plain stride would keep the same few columns of every row. Full
    /// tensors would not fit: at d30/1024 the 180 probes of the last scale hold 16 GB.
    pub fn probe(&mut self, x: &str, name: &str) {
        let n = self.dim(x, 1);
        let cap = self.c_i64(&[PROBE_TOKENS], &[1]);
        let m = self.op("Min", &[&n, &cap], vec![]);
        let m = self.squeeze(&m, &[0]);
        let zero = self.c_i64(&[0], &[]);
        let one = self.c_i64(&[1], &[]);
        let j = self.op("Range", &[&zero, &m, &one], vec![]);
        let prime = self.c_i64(&[PROBE_PRIME], &[]);
        let jp = self.mul(&j, &prime);
        let idx = self.op("Mod", &[&jp, &n], vec![]);
        let x = self.op("Gather", &[x, &idx], vec![AttributeProto::int("axis", 1)]);
        let x = x.as_str();
        let out = format!("{}{name}", star_artifact::stage::io::PROBE_PREFIX);
        // Every linear input is (rows, tokens, width).
        let dims: Vec<Dim> = (0..3).map(|i| Dim::Sym(format!("{out}_{i}"))).collect();
        self.nodes.push(NodeProto {
            input: vec![x.into()],
            output: vec![out.clone()],
            op_type: "Identity".into(),
            name: format!("out_{out}"),
            ..Default::default()
        });
        self.outputs
            .push(ValueInfoProto::tensor(&out, onnx::dtype::FLOAT, &dims));
        self.probe_specs.push(IoSpec {
            name: out,
            dtype: Dtype::Float32,
            shape: dims,
        });
    }

    /// A matrix product of two activations (attention): FP16 in FP16 graphs, FP32 otherwise
    /// (INT8 leaves attention unquantized).
    pub fn matmul_act(&mut self, a: &str, b: &str) -> String {
        if self.precision != Precision::Fp16 {
            return self.matmul(a, b);
        }
        let a16 = self.cast(a, onnx::dtype::FLOAT16);
        let b16 = self.cast(b, onnx::dtype::FLOAT16);
        let y = self.matmul(&a16, &b16);
        self.cast(&y, onnx::dtype::FLOAT)
    }

    /// An attention product with a K/V operand `kv` that is float16 when `kv_f16` (the KV
    /// cache at FP16 and INT8): in FP16 graphs both operands in FP16 (`kv` as it is), elsewhere
    /// both in FP32 (`kv` widened).
    pub fn matmul_kv(&mut self, a: &str, kv: &str, kv_f16: bool) -> String {
        match (self.precision == Precision::Fp16, kv_f16) {
            (true, true) => {
                let a16 = self.cast(a, onnx::dtype::FLOAT16);
                let y = self.matmul(&a16, kv);
                self.cast(&y, onnx::dtype::FLOAT)
            }
            (true, false) => self.matmul_act(a, kv),
            (false, true) => {
                let k32 = self.cast(kv, onnx::dtype::FLOAT);
                self.matmul(a, &k32)
            }
            (false, false) => self.matmul(a, kv),
        }
    }

    /// The KV cache's element type in this graph (`star_artifact::manifest::kv_cache_dtype`).
    pub fn kv_dtype(&self) -> Dtype {
        star_artifact::manifest::kv_cache_dtype(self.precision)
    }

    pub fn finish(mut self, doc: &str) -> (onnx::ModelProto, Vec<IoSpec>, Vec<IoSpec>) {
        // The stage's contract outputs first, then the probes (as the manifest lists them).
        let probe = star_artifact::stage::io::PROBE_PREFIX;
        self.outputs.sort_by_key(|o| o.name.starts_with(probe));
        let graph = GraphProto {
            node: self.nodes,
            name: self.name.clone(),
            initializer: self.inits,
            doc_string: doc.into(),
            input: self.inputs,
            output: self.outputs,
            value_info: self.value_info,
        };
        let model = onnx::ModelProto {
            ir_version: onnx::IR_VERSION,
            producer_name: "star-export".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(graph),
            opset_import: vec![onnx::OperatorSetIdProto {
                domain: String::new(),
                version: onnx::OPSET,
            }],
            ..Default::default()
        };
        (model, self.in_specs, self.out_specs)
    }

    // ---- operator helpers -------------------------------------------------------------------

    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.op("Add", &[a, b], vec![])
    }
    pub fn sub(&mut self, a: &str, b: &str) -> String {
        self.op("Sub", &[a, b], vec![])
    }
    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.op("Mul", &[a, b], vec![])
    }
    pub fn div(&mut self, a: &str, b: &str) -> String {
        self.op("Div", &[a, b], vec![])
    }
    pub fn matmul(&mut self, a: &str, b: &str) -> String {
        self.op("MatMul", &[a, b], vec![])
    }
    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.c_i64(shape, &[shape.len() as i64]);
        self.op("Reshape", &[x, &s], vec![])
    }
    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![AttributeProto::ints("perm", perm)])
    }
    pub fn softmax(&mut self, x: &str, axis: i64) -> String {
        self.op("Softmax", &[x], vec![AttributeProto::int("axis", axis)])
    }
    pub fn concat(&mut self, xs: &[&str], axis: i64) -> String {
        self.op("Concat", xs, vec![AttributeProto::int("axis", axis)])
    }
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.c_i64(axes, &[axes.len() as i64]);
        self.op("Unsqueeze", &[x, &a], vec![])
    }
    pub fn squeeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.c_i64(axes, &[axes.len() as i64]);
        self.op("Squeeze", &[x, &a], vec![])
    }
    pub fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> String {
        let s = self.c_i64(&[start], &[1]);
        let e = self.c_i64(&[end], &[1]);
        let a = self.c_i64(&[axis], &[1]);
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }
    /// Slice along `axis` with computed bounds (int64 tensors of shape (1,)).
    pub fn slice_dyn(&mut self, x: &str, axis: i64, start: &str, end: &str) -> String {
        let a = self.c_i64(&[axis], &[1]);
        self.op("Slice", &[x, start, end, &a], vec![])
    }
    /// Dim `axis` of `x` as an int64 tensor of shape (1,).
    pub fn dim(&mut self, x: &str, axis: i64) -> String {
        self.op(
            "Shape",
            &[x],
            vec![
                AttributeProto::int("start", axis),
                AttributeProto::int("end", axis + 1),
            ],
        )
    }
    /// Entries of an int64 table selected by an int64 index tensor.
    pub fn lookup(&mut self, table: &[i64], index: &str) -> String {
        let t = self.c_i64(table, &[table.len() as i64]);
        self.op("Gather", &[&t, index], vec![])
    }
    /// Reshape to a shape assembled from constant and computed parts (each (1,) or (k,)).
    pub fn reshape_dyn(&mut self, x: &str, parts: &[&str]) -> String {
        let shape = self.concat(parts, 0);
        self.op("Reshape", &[x, &shape], vec![])
    }
    /// Take index `i` along `axis`, removing that axis.
    pub fn pick(&mut self, x: &str, axis: i64, i: i64) -> String {
        let idx = self.c_i64(&[i], &[]);
        self.op(
            "Gather",
            &[x, &idx],
            vec![AttributeProto::int("axis", axis)],
        )
    }
    pub fn split(&mut self, x: &str, axis: i64, n: usize) -> Vec<String> {
        self.op_n("Split", &[x], vec![AttributeProto::int("axis", axis)], n)
    }
    pub fn cast(&mut self, x: &str, to: i32) -> String {
        self.op("Cast", &[x], vec![AttributeProto::int("to", to as i64)])
    }

    /// LayerNorm over the last axis without affine parameters (the STAR blocks' norms).
    pub fn layer_norm_plain(&mut self, x: &str, width: usize, eps: f32) -> String {
        // A graph-local constant, not a shared weight: no weight may be referenced by more than
        // two graphs, and these ones are needed by every transformer graph.
        let ones = match &self.ones {
            Some((w, name)) if *w == width => name.clone(),
            _ => {
                let name = self.c_f32(&vec![1.0; width], &[width as i64]);
                self.ones = Some((width, name.clone()));
                name
            }
        };
        self.op(
            "LayerNormalization",
            &[x, &ones],
            vec![
                AttributeProto::int("axis", -1),
                AttributeProto::float("epsilon", eps),
            ],
        )
    }

    pub fn layer_norm(&mut self, x: &str, gamma: &str, beta: &str, eps: f32) -> String {
        self.op(
            "LayerNormalization",
            &[x, gamma, beta],
            vec![
                AttributeProto::int("axis", -1),
                AttributeProto::float("epsilon", eps),
            ],
        )
    }

    /// F.normalize(x, dim=-1): x / max(||x||_2, 1e-12).
    pub fn l2_normalize(&mut self, x: &str) -> String {
        let n = self.op(
            "ReduceL2",
            &[x],
            vec![
                AttributeProto::ints("axes", &[-1]),
                AttributeProto::int("keepdims", 1),
            ],
        );
        let eps = self.scalar(1e-12);
        let n = self.op("Max", &[&n, &eps], vec![]);
        self.div(x, &n)
    }

    /// GELU with the tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))). Written
    /// with `Pow(x, 3)` in exactly this order because that is a form ONNX Runtime's optimizer
    /// fuses (with the fc1 bias) into one in-place FastGelu kernel; spelt x·x·x it stayed nine
    /// element-wise nodes with buffers of their own: fused, d30/1024's last step holds 0.23 GB
    /// less (benches/RESULTS.md). TensorRT parses Pow natively.
    pub fn gelu_tanh(&mut self, x: &str) -> String {
        let kappa = self.scalar(0.044715);
        let beta =
            self.scalar((std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let three = self.scalar(3.0);
        let x3 = self.op("Pow", &[x, &three], vec![]);
        let inner = self.mul(&kappa, &x3);
        let inner = self.add(x, &inner);
        let inner = self.mul(&beta, &inner);
        let t = self.op("Tanh", &[&inner], vec![]);
        let t = self.add(&one, &t);
        let hx = self.mul(&half, x);
        self.mul(&hx, &t)
    }

    /// Exact GELU: x * 0.5 * (1 + erf(x / sqrt 2)).
    pub fn gelu_erf(&mut self, x: &str) -> String {
        let r = self.scalar(std::f32::consts::FRAC_1_SQRT_2);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let e = self.mul(x, &r);
        let e = self.op("Erf", &[&e], vec![]);
        let e = self.add(&one, &e);
        let h = self.mul(x, &half);
        self.mul(&h, &e)
    }

    pub fn quick_gelu(&mut self, x: &str) -> String {
        let k = self.scalar(1.702);
        let s = self.mul(x, &k);
        let s = self.op("Sigmoid", &[&s], vec![]);
        self.mul(x, &s)
    }

    /// GroupNorm(groups) with affine, eps; x is (B, C, H, W) with C and H*W known. Computed as
    /// InstanceNormalization over (B, groups, C/groups*H*W): one fused kernel in ONNX Runtime and
    /// TensorRT alike, where the opset-18 GroupNormalization is a decomposed function in ONNX
    /// Runtime's CPU provider (measured: RESULTS.md).
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        &mut self,
        x: &str,
        c: usize,
        hw: usize,
        groups: usize,
        gamma: &str,
        beta: &str,
        eps: f32,
    ) -> String {
        let g = self.reshape(x, &[0, groups as i64, ((c / groups) * hw) as i64]);
        let ones = self.c_f32(&vec![1.0; groups], &[groups as i64]);
        let zeros = self.c_f32(&vec![0.0; groups], &[groups as i64]);
        let y = self.op(
            "InstanceNormalization",
            &[&g, &ones, &zeros],
            vec![AttributeProto::float("epsilon", eps)],
        );
        let side = (hw as f64).sqrt() as i64;
        let y = self.reshape(&y, &[0, c as i64, side, side]);
        let y = self.mul(&y, gamma);
        self.add(&y, beta)
    }

    pub fn conv(&mut self, x: &str, w: &str, b: &str, k: usize) -> String {
        let p = (k / 2) as i64;
        self.op(
            "Conv",
            &[x, w, b],
            vec![
                AttributeProto::ints("kernel_shape", &[k as i64, k as i64]),
                AttributeProto::ints("pads", &[p, p, p, p]),
            ],
        )
    }
}

pub fn write_model(path: &Path, model: &onnx::ModelProto) -> Result<()> {
    let bytes = onnx::encode_model(model);
    std::fs::write(path, bytes).map_err(io_err(path))
}
