//! A minimal host tensor: row-major data plus shape. The runtime and the validators only need
//! float32 and int64 (the dtypes of every stage boundary and of the golden records).

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape,
            data: Data::F32(data),
        }
    }
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape,
            data: Data::I64(data),
        }
    }
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor::f32(shape, vec![0.0; n])
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            _ => None,
        }
    }
    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "float32",
            Data::I64(_) => "int64",
        }
    }
    /// Its element type.
    pub fn dtype(&self) -> crate::dtype::Dtype {
        match self.data {
            Data::F32(_) => crate::dtype::Dtype::Float32,
            Data::I64(_) => crate::dtype::Dtype::Int64,
        }
    }
    /// Its elements as bytes, in the machine's order (what an engine's buffer holds).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: viewing initialised f32 / i64 elements as bytes.
        unsafe {
            match &self.data {
                Data::F32(v) => std::slice::from_raw_parts(
                    v.as_ptr() as *const u8,
                    std::mem::size_of_val(&v[..]),
                ),
                Data::I64(v) => std::slice::from_raw_parts(
                    v.as_ptr() as *const u8,
                    std::mem::size_of_val(&v[..]),
                ),
            }
        }
    }
    /// A tensor of `shape` from the bytes of its elements (machine order); None for another
    /// element type or a byte count that is not the shape's.
    pub fn from_bytes(shape: Vec<usize>, dtype: crate::dtype::Dtype, b: &[u8]) -> Option<Tensor> {
        let n: usize = shape.iter().product();
        match dtype {
            crate::dtype::Dtype::Float32 if b.len() == n * 4 => Some(Tensor::f32(
                shape,
                b.chunks_exact(4)
                    .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )),
            crate::dtype::Dtype::Int64 if b.len() == n * 8 => Some(Tensor::i64(
                shape,
                b.chunks_exact(8)
                    .map(|c| i64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            )),
            _ => None,
        }
    }
    /// Values as f64 (int64 converted), for comparisons.
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
    /// Keep only `indices` along `axis` (the fixtures' token probing).
    pub fn select(&self, axis: usize, indices: &[usize]) -> Tensor {
        let outer: usize = self.shape[..axis].iter().product();
        let dim = self.shape[axis];
        let inner: usize = self.shape[axis + 1..].iter().product();
        let mut shape = self.shape.clone();
        shape[axis] = indices.len();
        macro_rules! pick {
            ($v:expr) => {{
                let mut out = Vec::with_capacity(outer * indices.len() * inner);
                for o in 0..outer {
                    for &i in indices {
                        let s = (o * dim + i) * inner;
                        out.extend_from_slice(&$v[s..s + inner]);
                    }
                }
                out
            }};
        }
        match &self.data {
            Data::F32(v) => Tensor::f32(shape, pick!(v)),
            Data::I64(v) => Tensor::i64(shape, pick!(v)),
        }
    }
    /// Contiguous range [start, end) along `axis`.
    pub fn slice(&self, axis: usize, start: usize, end: usize) -> Tensor {
        let idx: Vec<usize> = (start..end).collect();
        self.select(axis, &idx)
    }
}
