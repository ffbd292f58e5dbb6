//! What a model directory must satisfy before anything runs: the manifest agrees with itself
//! (config relations, the schedule derived again from its scale sides, sampling defaults, file
//! names, model hash), with the I/O contract of every stage below (declared I/O and one shape
//! profile per served scale), and with the I/O its graph files declare. A hand-edited or damaged
//! manifest is refused here with the field it got wrong, instead of panicking (or computing
//! garbage) in the middle of a generation.

use crate::dtype::{Dtype, Precision};
use crate::error::{ArtifactError, Result};
use crate::manifest::{
    GraphEntry, IoSpec, Manifest, ModelConfig, Profile, Schedule, TextConfig, MANIFEST_FILE,
};
use crate::onnx::{self, Dim};
use crate::stage::{io, Stage, TEXT_LEN};
use std::path::{Component, Path};

/// One dimension of the contract.
#[derive(Clone, Debug)]
enum Exp {
    /// Fixed by the config or schedule (the field it comes from, for errors).
    Fixed(usize, &'static str),
    /// Batch rows: symbolic everywhere, profiles included.
    Batch(&'static str),
    /// Varies by scale: symbolic in the declaration, fixed in each scale's profile.
    Scaled(&'static str, usize, &'static str),
}

struct Port {
    name: String,
    dtype: Dtype,
    dims: Vec<Exp>,
}

fn port(name: impl Into<String>, dtype: Dtype, dims: Vec<Exp>) -> Port {
    Port {
        name: name.into(),
        dtype,
        dims,
    }
}

const F32: Dtype = Dtype::Float32;
const I64: Dtype = Dtype::Int64;

/// The inputs and outputs of a stage's graph, with the scale-dependent dims at scale `si`
/// (ignored by the stages that are not per scale); `kv` is the KV cache's element type.
fn contract(
    stage: Stage,
    si: usize,
    c: &ModelConfig,
    s: &Schedule,
    kv_dtype: Dtype,
) -> (Vec<Port>, Vec<Port>) {
    use Exp::{Batch as B, Fixed as F, Scaled as S};
    let sn = s.patch_nums.len();
    let pn = |i: usize| s.patch_nums.get(i).copied().unwrap_or(0);
    let side = pn(sn.saturating_sub(1));
    let tokens = S("tokens", pn(si) * pn(si), "schedule.patch_nums");
    let t77 = || F(TEXT_LEN, "77 text tokens");
    // K/V of one block, token-major within the block: (tokens, 2, B2, H, hd).
    let kv = |len: Exp| {
        vec![
            len,
            F(2, "2 (K and V)"),
            B("B2"),
            F(c.heads, "config.heads"),
            F(c.head_dim, "config.head_dim"),
        ]
    };
    let text_kv = || {
        vec![
            port(
                io::TEXT_KV,
                F32,
                vec![
                    F(c.depth, "config.depth"),
                    F(2, "2 (K and V)"),
                    B("B"),
                    F(c.heads, "config.heads"),
                    t77(),
                    F(c.head_dim, "config.head_dim"),
                ],
            ),
            port(
                io::TEXT_BIAS,
                F32,
                vec![B("B"), F(1, "1"), F(1, "1"), t77()],
            ),
        ]
    };
    let f_hat = || {
        vec![
            B("B"),
            F(c.cvae, "config.cvae"),
            F(side, "schedule.patch_nums (last)"),
            F(side, "schedule.patch_nums (last)"),
        ]
    };
    // One K/V output per block: each is written in place into its block's region of the cache.
    let step_out = |n: Exp| {
        let mut v: Vec<Port> = (0..c.depth)
            .map(|i| port(io::kv_new(i), kv_dtype, kv(n.clone())))
            .collect();
        v.extend([
            port(
                io::HIDDEN,
                F32,
                vec![B("B2"), n.clone(), F(c.width, "config.width")],
            ),
            port(
                io::LOGITS,
                F32,
                vec![B("B2"), n, F(c.vocab, "config.vocab")],
            ),
        ]);
        v
    };
    let scale_in = || port(io::SCALE, I64, vec![F(1, "1")]);
    // Scale 0's embedded start token (text_kv makes it, step_first takes it).
    let x0 = || {
        port(
            io::X,
            F32,
            vec![
                B("B2"),
                F(1, "1 token at scale 0"),
                F(c.width, "config.width"),
            ],
        )
    };
    match stage {
        Stage::TextEncoder => (
            vec![
                port(io::INPUT_IDS, I64, vec![B("N"), t77()]),
                port(io::ATTENTION_MASK, I64, vec![B("N"), t77()]),
            ],
            vec![
                port(
                    io::HIDDEN,
                    F32,
                    vec![B("N"), t77(), F(c.text.width, "config.text.width")],
                ),
                port(
                    io::POOLED,
                    F32,
                    vec![B("N"), F(c.text.width, "config.text.width")],
                ),
            ],
        ),
        Stage::TextKv => {
            let mut outs = vec![x0()];
            outs.extend(text_kv());
            (
                vec![
                    port(
                        io::HIDDEN,
                        F32,
                        vec![B("B"), t77(), F(c.text_width, "config.text_width")],
                    ),
                    port(io::ATTENTION_MASK, I64, vec![B("B"), t77()]),
                    port(
                        io::POOLED,
                        F32,
                        vec![B("B2"), F(c.text_width, "config.text_width")],
                    ),
                ],
                outs,
            )
        }
        Stage::StepFirst => {
            let mut ins = vec![x0()];
            ins.extend(text_kv());
            (ins, step_out(F(1, "1 token at scale 0")))
        }
        Stage::Step => {
            let past = S(
                "past",
                s.begin_end.get(si).map(|b| b.0).unwrap_or(0),
                "schedule.begin_end",
            );
            let mut ins = vec![port(
                io::X,
                F32,
                vec![B("B2"), tokens.clone(), F(c.width, "config.width")],
            )];
            ins.extend((0..c.depth).map(|i| port(io::past(i), kv_dtype, kv(past.clone()))));
            ins.extend(text_kv());
            (ins, step_out(tokens))
        }
        Stage::Sampler => (
            vec![
                port(
                    io::HIDDEN,
                    F32,
                    vec![B("B2"), tokens.clone(), F(c.width, "config.width")],
                ),
                port(
                    io::POOLED,
                    F32,
                    vec![B("B2"), F(c.text_width, "config.text_width")],
                ),
                port(io::IDX, I64, vec![B("B"), tokens.clone()]),
                port(io::MASK, F32, vec![B("B"), tokens.clone()]),
                scale_in(),
            ],
            vec![port(
                io::LOGITS,
                F32,
                vec![B("B2"), tokens, F(c.vocab, "config.vocab")],
            )],
        ),
        Stage::Sample => {
            let v = || F(c.vocab, "config.vocab");
            let rows = || vec![B("B"), tokens.clone()];
            (
                vec![
                    port(io::LOGITS, F32, vec![B("B2"), tokens.clone(), v()]),
                    port(io::GUIDANCE, F32, vec![F(2, "2 (1 + t, t)")]),
                    port(io::TOP_K, I64, vec![F(1, "1")]),
                    port(io::TOP_P, F32, vec![F(1, "1")]),
                    port(io::UNIFORMS, F32, rows()),
                ],
                vec![port(io::IDX, I64, rows()), port(io::PROB, F32, rows())],
            )
        }
        Stage::Vq => {
            // At the last scale the next-scale input is the full map (the runtime ignores it).
            let next = if si + 1 < sn { pn(si + 1) } else { side };
            (
                vec![
                    port(io::IDX, I64, vec![B("B"), tokens]),
                    port(io::F_HAT, F32, f_hat()),
                    scale_in(),
                ],
                vec![
                    port(io::F_HAT_OUT, F32, f_hat()),
                    port(
                        io::NEXT_IN,
                        F32,
                        vec![
                            B("B"),
                            S("next_tokens", next * next, "schedule.patch_nums"),
                            F(c.cvae, "config.cvae"),
                        ],
                    ),
                    port(
                        io::X,
                        F32,
                        vec![
                            B("B2"),
                            S("next_tokens", next * next, "schedule.patch_nums"),
                            F(c.width, "config.width"),
                        ],
                    ),
                ],
            )
        }
        Stage::Decoder => {
            let px = || F(s.image_size, "schedule.image_size");
            (
                vec![port(io::F_HAT, F32, f_hat())],
                vec![
                    port(
                        io::IMAGE_RAW,
                        F32,
                        vec![B("B"), F(3, "3 (RGB)"), px(), px()],
                    ),
                    port(io::IMAGE, F32, vec![B("B"), F(3, "3 (RGB)"), px(), px()]),
                ],
            )
        }
    }
}

/// The scales a stage's graph serves under this config and schedule.
pub fn stage_scales(stage: Stage, c: &ModelConfig, s: &Schedule) -> Vec<usize> {
    let sn = s.patch_nums.len();
    match stage {
        Stage::StepFirst => vec![0],
        Stage::Step => (0..sn).collect(),
        Stage::Sampler => (0..sn)
            .filter(|&i| c.sampler_blocks > 0 && s.substeps.get(i).is_some_and(|v| !v.is_empty()))
            .collect(),
        Stage::Sample | Stage::Vq => (0..sn).collect(),
        Stage::TextEncoder | Stage::TextKv | Stage::Decoder => vec![],
    }
}

/// Every stage a model directory with this config and schedule contains, in export order.
pub fn required_stages(c: &ModelConfig, s: &Schedule) -> Vec<Stage> {
    Stage::ALL
        .into_iter()
        .filter(|&st| !st.per_scale() || !stage_scales(st, c, s).is_empty())
        .collect()
}

fn specs(ps: &[Port], scaled_fixed: bool) -> Vec<IoSpec> {
    ps.iter()
        .map(|p| IoSpec {
            name: p.name.clone(),
            dtype: p.dtype,
            shape: p
                .dims
                .iter()
                .map(|d| match d {
                    Exp::Fixed(v, _) => Dim::Fixed(*v as i64),
                    Exp::Batch(s) => Dim::Sym(s.to_string()),
                    Exp::Scaled(s, v, _) => {
                        if scaled_fixed {
                            Dim::Fixed(*v as i64)
                        } else {
                            Dim::Sym(s.to_string())
                        }
                    }
                })
                .collect(),
        })
        .collect()
}

/// The contract of one stage as manifest entries: (inputs, outputs, scales, profiles).
#[allow(clippy::type_complexity)]
pub fn expected_io(
    stage: Stage,
    c: &ModelConfig,
    s: &Schedule,
    kv_dtype: Dtype,
) -> (Vec<IoSpec>, Vec<IoSpec>, Vec<usize>, Vec<Profile>) {
    let scales = stage_scales(stage, c, s);
    let (ins, outs) = contract(stage, scales.first().copied().unwrap_or(0), c, s, kv_dtype);
    let profiles = scales
        .iter()
        .map(|&si| {
            let (i, o) = contract(stage, si, c, s, kv_dtype);
            Profile {
                scale: si,
                inputs: specs(&i, true),
                outputs: specs(&o, true),
            }
        })
        .collect();
    (specs(&ins, false), specs(&outs, false), scales, profiles)
}

fn show(d: &[Dim]) -> String {
    let v: Vec<String> = d
        .iter()
        .map(|x| match x {
            Dim::Fixed(v) => v.to_string(),
            Dim::Sym(s) => s.clone(),
        })
        .collect();
    format!("[{}]", v.join(", "))
}

/// Compare declared ports (or one scale's profile) with the contract, naming the field.
fn match_ports(
    what: &str,
    kind: &str,
    got: &[IoSpec],
    want: &[Port],
    profile: bool,
) -> std::result::Result<(), String> {
    let names = |v: &[IoSpec]| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    let want_names: Vec<String> = want.iter().map(|p| p.name.clone()).collect();
    if names(got) != want_names {
        return Err(format!(
            "graphs: {what} lists {kind}s {:?}, the stage's contract is {:?}",
            names(got),
            want_names
        ));
    }
    for (p, w) in got.iter().zip(want) {
        if p.dtype != w.dtype {
            return Err(format!(
                "graphs: {what} {kind} {} has dtype '{}', expected '{}'",
                p.name, p.dtype, w.dtype
            ));
        }
        if p.shape.len() != w.dims.len() {
            return Err(format!(
                "graphs: {what} {kind} {} has shape {} of rank {}, expected rank {}",
                p.name,
                show(&p.shape),
                p.shape.len(),
                w.dims.len()
            ));
        }
        for (k, (d, e)) in p.shape.iter().zip(&w.dims).enumerate() {
            let fixed = match e {
                Exp::Fixed(x, f) => Some((*x, *f)),
                Exp::Scaled(_, x, f) if profile => Some((*x, *f)),
                _ => None,
            };
            match (d, fixed, e) {
                (Dim::Fixed(v), Some((x, _)), _) if *v >= 0 && *v as usize == x => {}
                (_, Some((x, field)), _) => {
                    return Err(format!(
                        "{field} gives {x} but {what} {kind} {} has {} at dim {k} (shape {}): the manifest disagrees with its graphs",
                        p.name,
                        show(std::slice::from_ref(d)).trim_matches(['[', ']']),
                        show(&p.shape)
                    ))
                }
                (Dim::Sym(a), None, Exp::Batch(b) | Exp::Scaled(b, _, _)) if a == b => {}
                (_, None, Exp::Batch(b) | Exp::Scaled(b, _, _)) => {
                    return Err(format!(
                        "graphs: {what} {kind} {} dim {k} is {}, expected the dynamic dimension '{b}'",
                        p.name,
                        show(std::slice::from_ref(d)).trim_matches(['[', ']'])
                    ))
                }
                (_, None, Exp::Fixed(..)) => unreachable!("fixed dims always have a value"),
            }
        }
    }
    Ok(())
}

/// A graph's declared I/O and every profile against the contract.
fn match_graph(
    g: &GraphEntry,
    c: &ModelConfig,
    s: &Schedule,
    kv_dtype: Dtype,
) -> std::result::Result<(), String> {
    let what = format!("{} (stage {})", g.file, g.stage);
    let scales = stage_scales(g.stage, c, s);
    let (ins, outs) = contract(
        g.stage,
        scales.first().copied().unwrap_or(0),
        c,
        s,
        kv_dtype,
    );
    match_ports(&what, "input", &g.inputs, &ins, false)?;
    match_ports(&what, "output", &g.outputs, &outs, false)?;
    if g.scales != scales {
        return Err(format!(
            "graphs: {what} serves scales {:?}, config and schedule give {scales:?}",
            g.scales
        ));
    }
    let listed: Vec<usize> = g.profiles.iter().map(|p| p.scale).collect();
    if listed != scales {
        return Err(format!(
            "graphs: {what} has profiles for scales {listed:?}, expected {scales:?}"
        ));
    }
    for p in &g.profiles {
        let (ins, outs) = contract(g.stage, p.scale, c, s, kv_dtype);
        let at = format!("{what} scale {} profile", p.scale);
        match_ports(&at, "input", &p.inputs, &ins, true)?;
        match_ports(&at, "output", &p.outputs, &outs, true)?;
    }
    Ok(())
}

/// A path inside the model directory: relative, no `..`, no root.
fn inside(file: &str) -> bool {
    let p = Path::new(file);
    !file.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// The manifest agrees with itself and with the stage contract. `dir` only names the file in
/// errors; nothing is read.
pub fn check_manifest(m: &Manifest, dir: &Path) -> Result<()> {
    check_manifest_why(m).map_err(|why| ArtifactError::Manifest {
        path: dir.join(MANIFEST_FILE),
        why,
    })
}

fn check_manifest_why(m: &Manifest) -> std::result::Result<(), String> {
    if m.opset != onnx::OPSET {
        return Err(format!(
            "opset {} (this build writes and reads opset {})",
            m.opset,
            onnx::OPSET
        ));
    }
    check_config(&m.config)?;
    check_text(&m.config.text)?;
    check_schedule(m)?;
    check_sampling_defaults(m)?;
    check_files(m)?;
    check_graphs(m)?;
    check_calibration(m)?;
    let hash = model_hash(m);
    if hash != m.model_hash {
        return Err(format!(
            "model_hash = '{}', but the listed file hashes give '{hash}'",
            m.model_hash
        ));
    }
    Ok(())
}

/// The transformer's and the VQ's sizes: plausible, and agreeing with each other.
fn check_config(c: &ModelConfig) -> std::result::Result<(), String> {
    // Sizes: positive, and small enough that no product below can overflow.
    let sizes: [(&str, usize); 13] = [
        ("config.depth", c.depth),
        ("config.width", c.width),
        ("config.heads", c.heads),
        ("config.head_dim", c.head_dim),
        ("config.vocab", c.vocab),
        ("config.cvae", c.cvae),
        ("config.text_width", c.text_width),
        ("config.text.width", c.text.width),
        ("config.text.layers", c.text.layers),
        ("config.text.heads", c.text.heads),
        ("config.text.mlp", c.text.mlp),
        ("config.text.vocab", c.text.vocab),
        ("config.vq.phi_count", c.vq.phi_count),
    ];
    for (field, v) in sizes {
        if v == 0 || v > 1 << 24 {
            return Err(format!("{field} = {v} is not a plausible size"));
        }
    }
    if c.heads * c.head_dim != c.width {
        return Err(format!(
            "config.width = {} but config.heads x config.head_dim = {} x {} = {}",
            c.width,
            c.heads,
            c.head_dim,
            c.heads * c.head_dim
        ));
    }
    if !c.text.width.is_multiple_of(c.text.heads) {
        return Err(format!(
            "config.text.width = {} is not a multiple of config.text.heads = {}",
            c.text.width, c.text.heads
        ));
    }
    if c.text_width != c.text.width {
        return Err(format!(
            "config.text_width = {} but config.text.width = {}",
            c.text_width, c.text.width
        ));
    }
    if c.vq.vocab != c.vocab {
        return Err(format!(
            "config.vq.vocab = {} but config.vocab = {}",
            c.vq.vocab, c.vocab
        ));
    }
    if c.vq.cvae != c.cvae {
        return Err(format!(
            "config.vq.cvae = {} but config.cvae = {}",
            c.vq.cvae, c.cvae
        ));
    }
    if c.vq.decoder_widths.is_empty() || c.vq.decoder_widths.contains(&0) {
        return Err(format!(
            "config.vq.decoder_widths = {:?} is not a list of positive widths",
            c.vq.decoder_widths
        ));
    }
    Ok(())
}

/// The text encoder's settings.
fn check_text(t: &TextConfig) -> std::result::Result<(), String> {
    if !["gelu", "quick_gelu"].contains(&t.act.as_str()) {
        return Err(format!(
            "config.text.act = '{}' (expected gelu or quick_gelu)",
            t.act
        ));
    }
    if !(t.eps.is_finite() && t.eps > 0.0 && t.eps < 1.0) {
        return Err(format!(
            "config.text.eps = {} is not a plausible epsilon",
            t.eps
        ));
    }
    if t.max_positions < TEXT_LEN {
        return Err(format!(
            "config.text.max_positions = {} is below the {TEXT_LEN} text tokens",
            t.max_positions
        ));
    }
    for (field, id) in [
        ("config.text.eos_id", t.eos_id),
        ("config.text.bos_id", t.bos_id),
        ("config.text.pad_id", t.pad_id),
    ] {
        if id < 0 || id as usize >= t.vocab {
            return Err(format!(
                "{field} = {id} is outside the text vocabulary (config.text.vocab = {})",
                t.vocab
            ));
        }
    }
    Ok(())
}

/// The schedule is a function of the scale sides: derived again, compared field by field.
fn check_schedule(m: &Manifest) -> std::result::Result<(), String> {
    let (c, s) = (&m.config, &m.schedule);
    let want = crate::schedule::derive(&s.patch_nums, c.vq.phi_count, c.sampler_blocks > 0)
        .map_err(|e| format!("schedule.patch_nums: {e}"))?;
    let fields: [(&str, bool, String, String); 5] = [
        (
            "schedule.image_size",
            s.image_size == want.image_size,
            s.image_size.to_string(),
            want.image_size.to_string(),
        ),
        (
            "schedule.total_tokens",
            s.total_tokens == want.total_tokens,
            s.total_tokens.to_string(),
            want.total_tokens.to_string(),
        ),
        (
            "schedule.begin_end",
            s.begin_end == want.begin_end,
            format!("{:?}", s.begin_end),
            format!("{:?}", want.begin_end),
        ),
        (
            "schedule.phi_index",
            s.phi_index == want.phi_index,
            format!("{:?}", s.phi_index),
            format!("{:?}", want.phi_index),
        ),
        (
            "schedule.substeps",
            s.substeps == want.substeps,
            format!("{:?}", s.substeps),
            format!("{:?}", want.substeps),
        ),
    ];
    for (field, ok, got, exp) in fields {
        if !ok {
            return Err(format!(
                "{field} = {got}, but schedule.patch_nums {:?} gives {exp}",
                s.patch_nums
            ));
        }
    }
    Ok(())
}

/// The sampling defaults are values a request could give.
fn check_sampling_defaults(m: &Manifest) -> std::result::Result<(), String> {
    let c = &m.config;
    let d = &m.sampling_defaults;
    if !(d.cfg.is_finite() && d.cfg >= 0.0) {
        return Err(format!(
            "sampling_defaults.cfg = {} must be a finite number >= 0",
            d.cfg
        ));
    }
    if d.top_k > c.vocab {
        return Err(format!(
            "sampling_defaults.top_k = {} exceeds config.vocab = {}",
            d.top_k, c.vocab
        ));
    }
    if !(0.0..=1.0).contains(&d.top_p) {
        return Err(format!(
            "sampling_defaults.top_p = {} must be in [0, 1]",
            d.top_p
        ));
    }
    Ok(())
}

/// Every listed file is inside the model directory.
fn check_files(m: &Manifest) -> std::result::Result<(), String> {
    for f in &m.files {
        if !inside(&f.file) {
            return Err(format!(
                "files: '{}' is not a path inside the model directory",
                f.file
            ));
        }
    }
    Ok(())
}

/// Graphs: exactly the required set, each matching its contract and precision.
fn check_graphs(m: &Manifest) -> std::result::Result<(), String> {
    let (c, s) = (&m.config, &m.schedule);
    let required = required_stages(c, s);
    for (i, g) in m.graphs.iter().enumerate() {
        if g.file != g.stage.file() {
            return Err(format!(
                "graphs[{i}].file '{}': the {} graph is {}",
                g.file,
                g.stage,
                g.stage.file()
            ));
        }
        if !required.contains(&g.stage) {
            return Err(format!(
                "graphs[{i}]: stage '{}' is not part of this model (config and schedule call for {:?})",
                g.stage,
                required.iter().map(|s| s.name()).collect::<Vec<_>>()
            ));
        }
        if m.graphs[..i].iter().any(|h| h.stage == g.stage) {
            return Err(format!("graphs[{i}]: stage {} is listed twice", g.stage));
        }
    }
    // The precisions first: a relabelled model is named as such, not by its first port.
    for st in &required {
        let Some(g) = m.graph(*st) else {
            return Err(format!("graphs: no graph for stage '{st}'"));
        };
        let want = st.graph_precision(m.precision);
        if g.precision != want {
            return Err(format!(
                "graphs: {} is '{}', but a {} model's {st} graph is '{want}'",
                g.file, g.precision, m.precision
            ));
        }
    }
    let kv = crate::manifest::kv_cache_dtype(m.precision);
    if m.kv_cache_dtype != kv {
        return Err(format!(
            "kv_cache_dtype = '{}', but a {} model's KV cache is {kv}",
            m.kv_cache_dtype, m.precision
        ));
    }
    for st in &required {
        let Some(g) = m.graph(*st) else {
            return Err(format!("graphs: no graph for stage '{st}'"));
        };
        match_graph(g, c, s, m.kv_cache_dtype)?;
        if let Some(p) = g
            .probes
            .iter()
            .find(|p| !p.name.starts_with(crate::stage::io::PROBE_PREFIX) || p.dtype != F32)
        {
            return Err(format!(
                "graphs: {} lists probe {} ({}), not a float32 '{}' calibration output",
                g.file,
                p.name,
                p.dtype,
                crate::stage::io::PROBE_PREFIX
            ));
        }
    }
    Ok(())
}

/// An INT8 model has a calibration record naming listed files; no other model has one.
fn check_calibration(m: &Manifest) -> std::result::Result<(), String> {
    match (&m.calibration, m.precision) {
        (None, Precision::Int8) => {
            return Err("precision 'int8' without a calibration record: re-export the model".into())
        }
        (Some(_), p @ (Precision::Fp32 | Precision::Fp16)) => {
            return Err(format!(
                "a calibration record in a '{p}' model: only int8 models have one"
            ))
        }
        (Some(cal), _) => {
            if !(7..=8).contains(&cal.weight_bits) {
                return Err(format!(
                    "calibration.weight_bits = {}, INT8 weights have 7 or 8 bits",
                    cal.weight_bits
                ));
            }
            for f in [&cal.table_file, &cal.trt_cache_file] {
                if !m.files.iter().any(|e| &e.file == f) {
                    return Err(format!(
                        "calibration names {f}, which files does not list (its size and hash)"
                    ));
                }
            }
        }
        (None, Precision::Fp32 | Precision::Fp16) => {}
    }
    Ok(())
}

/// sha256 over every file hash then every graph hash, first 16 hex digits: names the model.
pub fn model_hash(m: &Manifest) -> String {
    let mut h = String::new();
    for f in &m.files {
        h.push_str(&f.sha256);
    }
    for g in &m.graphs {
        h.push_str(&g.sha256);
    }
    crate::hash::sha256_bytes(h.as_bytes())[..16].to_string()
}

/// The distinct indices `i` of initializers named `{prefix}{i}.{rest}`.
fn indices(inits: &[(String, Vec<i64>)], prefix: &str) -> std::collections::BTreeSet<usize> {
    inits
        .iter()
        .filter_map(|(n, _)| n.strip_prefix(prefix))
        .filter_map(|r| r.split('.').next()?.parse().ok())
        .collect()
}

/// Dimensions of the initializer `name` (also stored transposed, as `name^T`, with its dims
/// swapped back).
fn dims_of(inits: &[(String, Vec<i64>)], name: &str) -> Option<Vec<i64>> {
    inits.iter().find_map(|(n, d)| {
        if n == name {
            Some(d.clone())
        } else if n.split_once("^T").map(|(base, _)| base) == Some(name) {
            Some(d.iter().rev().copied().collect())
        } else {
            None
        }
    })
}

/// Fields of the config that no graph input or output shows, checked against the weights and
/// attributes inside the graphs that use them. (The text encoder's head count is baked into
/// reshape constants and is only checked to divide its width.)
fn check_graph_weights(
    g: &GraphEntry,
    model: &onnx::ModelProto,
    c: &ModelConfig,
) -> std::result::Result<(), String> {
    let graph = match &model.graph {
        Some(g) => g,
        None => return Ok(()),
    };
    let inits: Vec<(String, Vec<i64>)> = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone()))
        .collect();
    let mismatch = |field: &str, value: String, graph_has: String| {
        Err(format!(
            "{field} = {value} but {} has {graph_has}: the manifest disagrees with its graphs",
            g.file
        ))
    };
    let first = |d: &Option<Vec<i64>>| d.as_ref().and_then(|d| d.first().copied());
    match g.stage {
        Stage::TextEncoder => {
            const L: &str = "clip/text_model.";
            let layers = indices(&inits, &format!("{L}encoder.layers.")).len();
            if layers != c.text.layers {
                return mismatch(
                    "config.text.layers",
                    c.text.layers.to_string(),
                    format!("{layers} layers"),
                );
            }
            let fc1 = dims_of(&inits, &format!("{L}encoder.layers.0.mlp.fc1.weight"));
            if fc1.is_some() && first(&fc1) != Some(c.text.mlp as i64) {
                return mismatch(
                    "config.text.mlp",
                    c.text.mlp.to_string(),
                    format!("an MLP of width {}", first(&fc1).unwrap_or(0)),
                );
            }
            for (field, v, name) in [
                (
                    "config.text.vocab",
                    c.text.vocab,
                    "embeddings.token_embedding.weight",
                ),
                (
                    "config.text.max_positions",
                    c.text.max_positions,
                    "embeddings.position_embedding.weight",
                ),
            ] {
                let d = dims_of(&inits, &format!("{L}{name}"));
                if d.is_some() && first(&d) != Some(v as i64) {
                    return mismatch(
                        field,
                        v.to_string(),
                        format!("{name} of {} rows", first(&d).unwrap_or(0)),
                    );
                }
            }
            let erf = graph.node.iter().any(|n| n.op_type == "Erf");
            if erf != (c.text.act == "gelu") {
                return mismatch(
                    "config.text.act",
                    format!("'{}'", c.text.act),
                    if erf { "an erf GELU" } else { "no erf GELU" }.into(),
                );
            }
            for n in graph
                .node
                .iter()
                .filter(|n| n.op_type == "LayerNormalization")
            {
                if let Some(a) = n.attribute.iter().find(|a| a.name == "epsilon") {
                    if a.f != c.text.eps {
                        return mismatch(
                            "config.text.eps",
                            c.text.eps.to_string(),
                            format!("LayerNormalization epsilon {}", a.f),
                        );
                    }
                }
            }
        }
        Stage::Decoder => {
            let levels = indices(&inits, "vq/decoder.up.").len();
            let widths = &c.vq.decoder_widths;
            if levels != widths.len() {
                return mismatch(
                    "config.vq.decoder_widths",
                    format!("{widths:?}"),
                    format!("{levels} up levels"),
                );
            }
            for (k, &w) in widths.iter().enumerate() {
                let name = format!("vq/decoder.up.{}.block.0.conv1.weight", levels - 1 - k);
                let d = dims_of(&inits, &name);
                if d.is_some() && first(&d) != Some(w as i64) {
                    return mismatch(
                        "config.vq.decoder_widths",
                        format!("{widths:?}"),
                        format!("width {} at level {k}", first(&d).unwrap_or(0)),
                    );
                }
            }
        }
        Stage::Sampler => {
            let blocks = indices(&inits, "star/feat_extract_blocks.").len();
            if blocks != c.sampler_blocks {
                return mismatch(
                    "config.sampler_blocks",
                    c.sampler_blocks.to_string(),
                    format!("{blocks} refiner blocks"),
                );
            }
        }
        _ => {}
    }
    Ok(())
}

/// The graph computes in the precision the manifest says: INT8 graphs quantize (Q/DQ over int8
/// weights), FP16 graphs multiply FP16 weights and have no Q/DQ, FP32 graphs neither.
fn check_graph_precision(
    g: &GraphEntry,
    model: &onnx::ModelProto,
) -> std::result::Result<(), String> {
    let Some(graph) = &model.graph else {
        return Ok(());
    };
    let dtype: std::collections::HashMap<&str, i32> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.data_type))
        .collect();
    let int8_dq = graph.node.iter().any(|n| {
        n.op_type == "DequantizeLinear"
            && n.input.first().and_then(|i| dtype.get(i.as_str())) == Some(&onnx::dtype::INT8)
    });
    let qdq = graph
        .node
        .iter()
        .any(|n| n.op_type == "QuantizeLinear" || n.op_type == "DequantizeLinear");
    let f16_matmul = graph.node.iter().any(|n| {
        n.op_type == "MatMul"
            && n.input
                .iter()
                .any(|i| dtype.get(i.as_str()) == Some(&onnx::dtype::FLOAT16))
    });
    let ok = match g.precision {
        Precision::Int8 => int8_dq && !f16_matmul,
        Precision::Fp16 => f16_matmul && !qdq,
        Precision::Fp32 => !qdq && !f16_matmul,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the manifest says {} is '{}', but the graph {}: the manifest disagrees with its graphs",
            g.file,
            g.precision,
            match (int8_dq, f16_matmul) {
                (true, _) => "quantizes int8 weights",
                (false, true) => "multiplies float16 weights",
                (false, false) => "multiplies float32 weights only",
            }
        ))
    }
}

/// The I/O a graph file declares equals what the manifest says of it.
pub fn check_graph_file(g: &GraphEntry, path: &Path, bytes: &[u8], m: &Manifest) -> Result<()> {
    let opset = m.opset;
    let bad = |why: String| ArtifactError::Manifest {
        path: path.to_path_buf(),
        why,
    };
    let model = onnx::decode_model(bytes).map_err(|e| bad(format!("not an ONNX model: {e}")))?;
    if let Some(o) = model.opset_import.iter().find(|o| o.domain.is_empty()) {
        if o.version != opset {
            return Err(bad(format!(
                "graph has opset {}, the manifest says {opset}",
                o.version
            )));
        }
    }
    check_graph_weights(g, &model, &m.config).map_err(&bad)?;
    check_graph_precision(g, &model).map_err(&bad)?;
    let graph = model.graph.unwrap_or_default();
    // External data only from the files the manifest lists (and hashes).
    for t in graph.initializer.iter().filter(|t| t.data_location == 1) {
        let loc = t
            .external_data
            .iter()
            .find(|e| e.key == "location")
            .map(|e| e.value.as_str())
            .unwrap_or("");
        if !inside(loc) || !m.files.iter().any(|f| f.file == loc) {
            return Err(bad(format!(
                "initializer {} reads external data from '{loc}', which manifest.json does not list",
                t.name
            )));
        }
    }
    let declared = |v: &[onnx::ValueInfoProto]| -> std::result::Result<Vec<IoSpec>, String> {
        v.iter()
            .map(|vi| {
                let t = vi.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
                let code = t.map(|t| t.elem_type).unwrap_or_default();
                Ok(IoSpec {
                    name: vi.name.clone(),
                    dtype: Dtype::from_onnx(code).ok_or_else(|| {
                        format!(
                            "{} has element type {code} ({}), which no STAR graph uses",
                            vi.name,
                            onnx::dtype::name(code)
                        )
                    })?,
                    shape: t
                        .and_then(|t| t.shape.as_ref())
                        .map(|s| {
                            s.dim
                                .iter()
                                .map(|d| match (&d.dim_value, &d.dim_param) {
                                    (Some(v), _) => Dim::Fixed(*v),
                                    (None, Some(p)) => Dim::Sym(p.clone()),
                                    (None, None) => Dim::Sym("?".into()),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect()
    };
    // Initializers may also be listed as graph inputs by other tools; ours never are.
    let outputs: Vec<IoSpec> = g.outputs.iter().chain(&g.probes).cloned().collect();
    for (kind, got, want) in [
        ("inputs", declared(&graph.input).map_err(&bad)?, &g.inputs),
        ("outputs", declared(&graph.output).map_err(&bad)?, &outputs),
    ] {
        if &got != want {
            let show_all = |v: &[IoSpec]| {
                v.iter()
                    .map(|p| format!("{} {} {}", p.name, p.dtype, show(&p.shape)))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            return Err(bad(format!(
                "the graph declares {kind} {{{}}} but manifest.json says {{{}}}",
                show_all(&got),
                show_all(want)
            )));
        }
    }
    Ok(())
}
