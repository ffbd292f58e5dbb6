//! The calibration table: one amax per tensor name, the method that chose it, and a hash that an
//! engine manifest records so that a rebuilt table is never mixed with an old engine.

use crate::range::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationTable {
    pub method: Method,
    /// Prompts (or batches) the statistics were gathered on.
    pub samples: usize,
    pub amax: BTreeMap<String, f32>,
}

impl CalibrationTable {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("table serialises")
    }
    pub fn from_json(s: &str) -> serde_json::Result<Self> {
        serde_json::from_str(s)
    }
    /// sha256 of the canonical JSON (sorted names).
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.to_json().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hash_tracks_content() {
        let mut t = CalibrationTable {
            method: Method::Percentile(99.99),
            samples: 8,
            amax: BTreeMap::new(),
        };
        t.amax.insert("blocks.0.attn.mat_qkv.in".into(), 3.5);
        let back = CalibrationTable::from_json(&t.to_json()).unwrap();
        assert_eq!(back, t);
        let h = t.hash();
        t.amax.insert("blocks.0.attn.mat_qkv.in".into(), 3.25);
        assert_ne!(h, t.hash());
    }
}
