//! What a hook can observe: every intermediate tensor of a generation, typed. Its `Display` is
//! the name the official golden records give the tensor (`s03.b2.k`, `s09.u01.mask_after`,
//! `text.hidden`), which replay and validate look up; compare and the tests match on the
//! variants instead of parsing names back.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Obs {
    TextInputIds,
    TextAttentionMask,
    TextHidden,
    TextPooled,
    /// Block `block`'s K (`v` false) or V of scale `scale`'s tokens, as the release's
    /// (B2, H, n, hd).
    Kv {
        scale: usize,
        block: usize,
        v: bool,
    },
    /// The last block's output of a scale (the step's `hidden`).
    BlockOut {
        scale: usize,
        block: usize,
    },
    /// The step's logits (B2, n, V).
    Logits(usize),
    /// Guided logits (B, n, V), with the ramped guidance.
    LogitsCfg(usize),
    /// Guided logits after top-k / top-p (plain scales).
    LogitsFiltered(usize),
    /// What this model draws with the run's uniforms, before any substitution.
    Drawn(usize),
    /// The scale's final token ids (B, n).
    Idx(usize),
    FHat(usize),
    NextIn(usize),
    /// A stable-sampler sub-step's tensor.
    Sub {
        scale: usize,
        sub: usize,
        what: SubObs,
    },
    ImageRaw,
    Image,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubObs {
    /// The sampler's logits (branch B).
    SamplerLogits,
    LogitsCfg,
    LogitsFiltered,
    Drawn,
    /// The reveal mask after the sub-step.
    MaskAfter,
}

impl Obs {
    /// Logits a comparison measures (cosine, max error).
    pub fn is_logits(self) -> bool {
        matches!(
            self,
            Obs::Logits(_)
                | Obs::Sub {
                    what: SubObs::SamplerLogits,
                    ..
                }
        )
    }

    /// A draw before substitution (token agreement counts these).
    pub fn is_drawn(self) -> bool {
        matches!(
            self,
            Obs::Drawn(_)
                | Obs::Sub {
                    what: SubObs::Drawn,
                    ..
                }
        )
    }

    /// The choices a run keeps: a scale's tokens, a sub-step's reveal mask.
    pub fn is_choice(self) -> bool {
        matches!(
            self,
            Obs::Idx(_)
                | Obs::Sub {
                    what: SubObs::MaskAfter,
                    ..
                }
        )
    }

    /// Computed by the text encoder (checked at that graph's precision).
    pub fn is_text(self) -> bool {
        matches!(
            self,
            Obs::TextInputIds | Obs::TextAttentionMask | Obs::TextHidden | Obs::TextPooled
        )
    }
}

impl fmt::Display for Obs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Obs::TextInputIds => f.write_str("text.input_ids"),
            Obs::TextAttentionMask => f.write_str("text.attention_mask"),
            Obs::TextHidden => f.write_str("text.hidden"),
            Obs::TextPooled => f.write_str("text.pooled"),
            Obs::Kv { scale, block, v } => {
                write!(f, "s{scale:02}.b{block}.{}", if v { "v" } else { "k" })
            }
            Obs::BlockOut { scale, block } => write!(f, "s{scale:02}.b{block}.out"),
            Obs::Logits(s) => write!(f, "s{s:02}.logits"),
            Obs::LogitsCfg(s) => write!(f, "s{s:02}.logits_cfg"),
            Obs::LogitsFiltered(s) => write!(f, "s{s:02}.logits_filtered"),
            Obs::Drawn(s) => write!(f, "s{s:02}.drawn"),
            Obs::Idx(s) => write!(f, "s{s:02}.idx"),
            Obs::FHat(s) => write!(f, "s{s:02}.f_hat"),
            Obs::NextIn(s) => write!(f, "s{s:02}.next_in"),
            Obs::Sub { scale, sub, what } => {
                let w = match what {
                    SubObs::SamplerLogits => "sampler_logits",
                    SubObs::LogitsCfg => "logits_cfg",
                    SubObs::LogitsFiltered => "logits_filtered",
                    SubObs::Drawn => "drawn",
                    SubObs::MaskAfter => "mask_after",
                };
                write!(f, "s{scale:02}.u{sub:02}.{w}")
            }
            Obs::ImageRaw => f.write_str("image_raw"),
            Obs::Image => f.write_str("image"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_records_names() {
        let cases = [
            (Obs::TextInputIds, "text.input_ids"),
            (Obs::TextPooled, "text.pooled"),
            (
                Obs::Kv {
                    scale: 3,
                    block: 2,
                    v: true,
                },
                "s03.b2.v",
            ),
            (
                Obs::BlockOut {
                    scale: 12,
                    block: 7,
                },
                "s12.b7.out",
            ),
            (Obs::Logits(0), "s00.logits"),
            (Obs::LogitsFiltered(9), "s09.logits_filtered"),
            (
                Obs::Sub {
                    scale: 9,
                    sub: 1,
                    what: SubObs::MaskAfter,
                },
                "s09.u01.mask_after",
            ),
            (
                Obs::Sub {
                    scale: 13,
                    sub: 14,
                    what: SubObs::SamplerLogits,
                },
                "s13.u14.sampler_logits",
            ),
            (Obs::Image, "image"),
        ];
        for (o, name) in cases {
            assert_eq!(o.to_string(), name);
        }
        assert!(Obs::Logits(1).is_logits() && !Obs::LogitsCfg(1).is_logits());
        assert!(Obs::Drawn(2).is_drawn() && Obs::Idx(2).is_choice());
        assert!(Obs::TextHidden.is_text() && !Obs::Image.is_text());
    }
}
