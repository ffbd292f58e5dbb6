//! The two vocabularies of the contract that used to be strings: the precision a graph computes
//! in, and the element type of a tensor. Both serialise as the strings the manifest has always
//! held ("fp16", "float32"), and every `match` on them names each variant: adding bf16 or fp8
//! is a compile error at every place that must handle it.

use serde::{Deserialize, Serialize};

/// What a graph (and a model directory, by its scale stages) computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Fp16, Precision::Int8];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        }
    }

    pub fn parse(s: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.name() == s)
    }

    /// "fp32, fp16, int8": for messages that list what is accepted.
    pub fn list() -> String {
        Precision::ALL.map(Precision::name).join(", ")
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no precision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownPrecision(pub String);

impl std::fmt::Display for UnknownPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "'{}' is not a precision ({})", self.0, Precision::list())
    }
}

impl std::error::Error for UnknownPrecision {}

impl std::str::FromStr for Precision {
    type Err = UnknownPrecision;
    fn from_str(s: &str) -> Result<Self, UnknownPrecision> {
        Precision::parse(s).ok_or_else(|| UnknownPrecision(s.to_string()))
    }
}

/// The element type of a tensor, named as the manifest names it (ONNX's type, lower case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Float32,
    Float16,
    Bfloat16,
    Float64,
    Int64,
    Int32,
    Int8,
    Uint8,
    Bool,
}

impl Dtype {
    pub const ALL: [Dtype; 9] = [
        Dtype::Float32,
        Dtype::Float16,
        Dtype::Bfloat16,
        Dtype::Float64,
        Dtype::Int64,
        Dtype::Int32,
        Dtype::Int8,
        Dtype::Uint8,
        Dtype::Bool,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float16 => "float16",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float64 => "float64",
            Dtype::Int64 => "int64",
            Dtype::Int32 => "int32",
            Dtype::Int8 => "int8",
            Dtype::Uint8 => "uint8",
            Dtype::Bool => "bool",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::Float64 | Dtype::Int64 => 8,
            Dtype::Float32 | Dtype::Int32 => 4,
            Dtype::Float16 | Dtype::Bfloat16 => 2,
            Dtype::Int8 | Dtype::Uint8 | Dtype::Bool => 1,
        }
    }

    /// ONNX's TensorProto.DataType code.
    pub fn onnx(self) -> i32 {
        use crate::onnx::dtype as t;
        match self {
            Dtype::Float32 => t::FLOAT,
            Dtype::Float16 => t::FLOAT16,
            Dtype::Bfloat16 => t::BFLOAT16,
            Dtype::Float64 => t::DOUBLE,
            Dtype::Int64 => t::INT64,
            Dtype::Int32 => t::INT32,
            Dtype::Int8 => t::INT8,
            Dtype::Uint8 => t::UINT8,
            Dtype::Bool => t::BOOL,
        }
    }

    /// The type of ONNX code `code`; None for a type no STAR graph uses.
    pub fn from_onnx(code: i32) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.onnx() == code)
    }

    pub fn parse(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_manifest_strings() {
        for p in Precision::ALL {
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.name())
            );
            assert_eq!(Precision::parse(p.name()), Some(p));
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert!(serde_json::from_str::<Precision>("\"bf16\"").is_err());
        assert!("fp64"
            .parse::<Precision>()
            .unwrap_err()
            .to_string()
            .contains("fp32, fp16, int8"));
        for d in Dtype::ALL {
            assert_eq!(
                serde_json::to_string(&d).unwrap(),
                format!("\"{}\"", d.name())
            );
            assert_eq!(Dtype::parse(d.name()), Some(d));
            assert_eq!(Dtype::from_onnx(d.onnx()), Some(d));
        }
        assert_eq!(Dtype::from_onnx(0), None);
        assert_eq!(Dtype::Int64.bytes(), 8);
        assert_eq!(Dtype::Float16.bytes(), 2);
    }
}
