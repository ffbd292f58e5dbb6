//! star-calibration: the numeric half of INT8 deployment. Activation statistics are gathered per
//! tensor (`ActivationStats`), a range is chosen per tensor (`Method`), and the results form a
//! `CalibrationTable` whose hash goes into the model and engine manifests. `star-export
//! --precision int8` gathers the statistics and writes the Q/DQ graphs; the selectors are
//! tested on known distributions here.

pub mod range;
pub mod stats;
pub mod table;

pub use range::{int8_scale, Method};
pub use stats::{ActivationStats, CalibrationError};
pub use table::CalibrationTable;
