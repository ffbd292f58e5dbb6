//! star-calibration: the numeric half of INT8 deployment. Activation statistics are gathered per
//! tensor (`ActivationStats`), a range is chosen per tensor (`Method`), and the results form a
//! `CalibrationTable` whose hash goes into the engine manifest. Not yet wired into `star-export`
//! (Q/DQ insertion is a later step); the selectors are tested on known distributions here.

pub mod range;
pub mod stats;
pub mod table;

pub use range::Method;
pub use stats::{ActivationStats, CalibrationError};
pub use table::CalibrationTable;
