//! The `sample` stage: guidance, the top-k / top-p filter and the RNG contract's draw, on the
//! engine, so that a scale's logits never go to the host. FP32 at every precision, opset 17,
//! operators TensorRT's parser takes. The Rust sampler (`star_pipeline::sampler`) is the
//! reference it is tested against (`tests/tests/sample_parity.rs`).
//!
//! Inputs: `logits` (B2, tokens, V); the guidance pair `[1 + t, t]` as the host rounds them to
//! f32, so that the mix is the reference's bit for bit; `top_k`, the k to keep (V when off);
//! `top_p`, the nucleus threshold 1 − p as f32 (−1 when off); `uniforms` (B, tokens). Outputs:
//! `idx` (B, tokens) and `prob` (B, tokens), the drawn token and its probability.
//!
//! Per row, as the reference: g = (1 + t)·cond − t·uncond. Top-k: entries below the k-th largest
//! go (ties at it kept). Top-p: in ascending order, equal values in index order, entries whose
//! cumulative probability is at most the threshold go, except the largest. That order comes from
//! one TopK over the row reversed (TopK puts the lower index first among equals, so the reversed
//! row gives the reference's descending order: the higher index first); the cumulative sums are
//! the reversed cumulative sums of that list plus the mass of the ties at the k-th value that
//! the list has no room for. The boundary value and how many of its ties stay come from the
//! list (and, for ties at the k-th value beyond it, from their count and probability); which
//! ties stay (the highest indices) from an exclusive cumulative count over the row.
//! The draw: the first token id, in ascending order, whose cumulative probability exceeds u times
//! the total (the last one with a probability when none does).
//!
//! Where it can differ from the reference (the parity test counts these): f32 sums instead of the
//! reference's f64 accumulations, so a uniform within rounding of a cumulative boundary, or a
//! cumulative sum within rounding of the top-p threshold.

use super::builder::G;
use star_artifact::dtype::Dtype;
use star_artifact::onnx::{dtype, AttributeProto, Dim};
use star_artifact::stage::io;

fn sym(s: &str) -> Dim {
    Dim::Sym(s.into())
}

/// Shapes of the values the graph states (for ONNX Runtime's memory planner, `G::annotate`).
struct Shapes {
    full: [Dim; 3],
    one: [Dim; 3],
    list: [Dim; 3],
}

/// The sample graph for a vocabulary of `v` tokens.
pub fn sample(g: &mut G, v: usize) {
    let vd = Dim::Fixed(v as i64);
    let rows = || [sym("B"), sym("tokens")];
    let sh = Shapes {
        full: [sym("B"), sym("tokens"), vd.clone()],
        one: [sym("B"), sym("tokens"), Dim::Fixed(1)],
        list: [sym("B"), sym("tokens"), sym("k")],
    };
    let logits = g.input(
        io::LOGITS,
        Dtype::Float32,
        &[sym("B2"), sym("tokens"), vd.clone()],
    );
    let guidance = g.input(io::GUIDANCE, Dtype::Float32, &[Dim::Fixed(2)]);
    let top_k = g.input(io::TOP_K, Dtype::Int64, &[Dim::Fixed(1)]);
    let top_p = g.input(io::TOP_P, Dtype::Float32, &[Dim::Fixed(1)]);
    let uniforms = g.input(io::UNIFORMS, Dtype::Float32, &rows());

    let guided = guide(g, &logits, &guidance, &sh);
    let filtered = filter(g, &guided, &top_k, &top_p, &sh);
    let (idx, prob) = draw(g, &filtered, &uniforms, v, &sh);
    g.output(&idx, io::IDX, Dtype::Int64, &rows());
    g.output(&prob, io::PROB, Dtype::Float32, &rows());
}

/// (1 + t)·cond − t·uncond over the rows [conditional ; unconditional].
fn guide(g: &mut G, logits: &str, guidance: &str, sh: &Shapes) -> String {
    let b2 = g.dim(logits, 0);
    let two = g.c_i64(&[2], &[1]);
    let b = g.div(&b2, &two);
    let zero = g.c_i64(&[0], &[1]);
    let cond = g.slice_dyn(logits, 0, &zero, &b);
    g.annotate(&cond, dtype::FLOAT, &sh.full);
    let uncond = g.slice_dyn(logits, 0, &b, &b2);
    g.annotate(&uncond, dtype::FLOAT, &sh.full);
    let a = g.pick(guidance, 0, 0);
    let t = g.pick(guidance, 0, 1);
    let ca = g.mul(&a, &cond);
    let ut = g.mul(&t, &uncond);
    let guided = g.sub(&ca, &ut);
    g.annotate(&guided, dtype::FLOAT, &sh.full);
    guided
}

/// The top-k / top-p filter (removed entries −inf), with the reference's ties.
fn filter(g: &mut G, guided: &str, top_k: &str, top_p: &str, sh: &Shapes) -> String {
    let neg = g.scalar(f32::NEG_INFINITY);
    // The reference's descending order: TopK over the reversed row.
    let rev = reverse_last(g, guided);
    g.annotate(&rev, dtype::FLOAT, &sh.full);
    let sorted = g.op_n(
        "TopK",
        &[&rev, top_k],
        vec![
            AttributeProto::int("axis", -1),
            AttributeProto::int("largest", 1),
            AttributeProto::int("sorted", 1),
        ],
        2,
    );
    let sl = sorted[0].clone();
    g.annotate(&sl, dtype::FLOAT, &sh.list);
    g.annotate(&sorted[1], dtype::INT64, &sh.list);
    let one_i = g.c_i64(&[1], &[1]);
    let k_last = g.sub(top_k, &one_i);
    let kth = g.slice_dyn(&sl, 2, &k_last, top_k);
    g.annotate(&kth, dtype::FLOAT, &sh.one);
    let below = g.op("Less", &[guided, &kth], vec![]);
    let kept_k = g.op("Where", &[&below, &neg, guided], vec![]);
    g.annotate(&kept_k, dtype::FLOAT, &sh.full);

    // Probabilities of the row and of the list: the same operations on the same values.
    let m = reduce_attr(g, "ReduceMax", &kept_k);
    g.annotate(&m, dtype::FLOAT, &sh.one);
    let (e, z) = exp_sum(g, &kept_k, &m, sh);
    let _ = e;
    let sd = g.sub(&sl, &m);
    g.annotate(&sd, dtype::FLOAT, &sh.list);
    let se = g.op("Exp", &[&sd], vec![]);
    g.annotate(&se, dtype::FLOAT, &sh.list);
    let sp = g.div(&se, &z);
    g.annotate(&sp, dtype::FLOAT, &sh.list);

    // Ties at the k-th value the list has no room for: the first in ascending order.
    let kd = g.sub(&kth, &m);
    let ke = g.op("Exp", &[&kd], vec![]);
    let p_kth = g.div(&ke, &z);
    g.annotate(&p_kth, dtype::FLOAT, &sh.one);
    let in_row = count(g, "Equal", &kept_k, &kth);
    let in_list = count(g, "Equal", &sl, &kth);
    let missing = g.sub(&in_row, &in_list);
    let tail = g.mul(&missing, &p_kth);
    g.annotate(&tail, dtype::FLOAT, &sh.one);

    // The reference's cumulative sums at each list entry, and how many entries stay (R >= 1).
    let axis = g.c_i64(&[-1], &[]);
    let cum = g.op(
        "CumSum",
        &[&sp, &axis],
        vec![AttributeProto::int("reverse", 1)],
    );
    g.annotate(&cum, dtype::FLOAT, &sh.list);
    let acc = g.add(&cum, &tail);
    g.annotate(&acc, dtype::FLOAT, &sh.list);
    let over = count(g, "Greater", &acc, top_p);
    let one_f = g.scalar(1.0);
    let r = g.op("Max", &[&over, &one_f], vec![]);
    g.annotate(&r, dtype::FLOAT, &sh.one);
    let r_i = g.cast(&r, dtype::INT64);
    let r_last = g.sub(&r_i, &one_i);
    g.annotate(&r_last, dtype::INT64, &sh.one);
    let zero_f = g.scalar(0.0);
    let lstar = g.op(
        "GatherElements",
        &[&sl, &r_last],
        vec![AttributeProto::int("axis", -1)],
    );
    g.annotate(&lstar, dtype::FLOAT, &sh.one);
    // Of the entries equal to the boundary value, the R − (entries above it) with the highest
    // indices stay, and when every list entry stays, also those of the ties the list had no
    // room for whose own cumulative sums j · p_kth (j = 1..missing, the smallest first) exceed
    // the threshold: missing − min(missing, floor(threshold / p_kth)).
    let above_n = count(g, "Greater", &sl, &lstar);
    let in_list_kept = g.sub(&r, &above_n);
    let tiny = g.scalar(1e-30);
    let p_safe = g.op("Max", &[&p_kth, &tiny], vec![]);
    let ratio = g.div(top_p, &p_safe);
    let floor = g.op("Floor", &[&ratio], vec![]);
    let lo = g.op("Max", &[&floor, &zero_f], vec![]);
    let removed = g.op("Min", &[&lo, &missing], vec![]);
    let extra = g.sub(&missing, &removed);
    g.annotate(&extra, dtype::FLOAT, &sh.one);
    let ties_kept = g.add(&in_list_kept, &extra);
    g.annotate(&ties_kept, dtype::FLOAT, &sh.one);
    let tie = g.op("Equal", &[&kept_k, &lstar], vec![]);
    let tie_f = g.cast(&tie, dtype::FLOAT);
    g.annotate(&tie_f, dtype::FLOAT, &sh.full);
    let after = g.op(
        "CumSum",
        &[&tie_f, &axis],
        vec![
            AttributeProto::int("reverse", 1),
            AttributeProto::int("exclusive", 1),
        ],
    );
    g.annotate(&after, dtype::FLOAT, &sh.full);
    let early = g.op("Less", &[&after, &ties_kept], vec![]);
    let tie_stays = g.op("And", &[&tie, &early], vec![]);
    let above = g.op("Greater", &[&kept_k, &lstar], vec![]);
    let stays = g.op("Or", &[&above, &tie_stays], vec![]);
    // Top-p off (threshold < 0): everything top-k left stays.
    let off = g.op("Less", &[top_p, &zero_f], vec![]);
    let stays = g.op("Or", &[&stays, &off], vec![]);
    let filtered = g.op("Where", &[&stays, &kept_k, &neg], vec![]);
    g.annotate(&filtered, dtype::FLOAT, &sh.full);
    filtered
}

/// The draw: the first id whose cumulative probability exceeds u · total; a uniform at the very
/// top (u · total not below the last cumulative sum in f32) takes the last token with a
/// probability, as the reference does.
fn draw(g: &mut G, filtered: &str, uniforms: &str, v: usize, sh: &Shapes) -> (String, String) {
    let m = reduce_attr(g, "ReduceMax", filtered);
    g.annotate(&m, dtype::FLOAT, &sh.one);
    let (e, z) = exp_sum(g, filtered, &m, sh);
    let probs = g.div(&e, &z);
    g.annotate(&probs, dtype::FLOAT, &sh.full);
    let axis = g.c_i64(&[-1], &[]);
    let cum = g.op("CumSum", &[&probs, &axis], vec![]);
    g.annotate(&cum, dtype::FLOAT, &sh.full);
    let total = reduce_sum(g, &probs);
    g.annotate(&total, dtype::FLOAT, &sh.one);
    let u = g.unsqueeze(uniforms, &[-1]);
    g.annotate(&u, dtype::FLOAT, &sh.one);
    let target = g.mul(&u, &total);
    g.annotate(&target, dtype::FLOAT, &sh.one);
    let first = count(g, "LessOrEqual", &cum, &target);
    // The last id with a probability: the largest of the ids where probs > 0 (float ids: exact
    // below 2^24).
    let ids: Vec<f32> = (0..v).map(|i| i as f32).collect();
    let iota = g.c_f32(&ids, &[v as i64]);
    let zero_f = g.scalar(0.0);
    let minus = g.scalar(-1.0);
    let nonzero = g.op("Greater", &[&probs, &zero_f], vec![]);
    let where_ids = g.op("Where", &[&nonzero, &iota, &minus], vec![]);
    g.annotate(&where_ids, dtype::FLOAT, &sh.full);
    let last = reduce_attr(g, "ReduceMax", &where_ids);
    g.annotate(&last, dtype::FLOAT, &sh.one);
    let chosen_f = g.op("Min", &[&first, &last], vec![]);
    g.annotate(&chosen_f, dtype::FLOAT, &sh.one);
    let at = g.cast(&chosen_f, dtype::INT64);
    g.annotate(&at, dtype::INT64, &sh.one);
    let p = g.op(
        "GatherElements",
        &[&probs, &at],
        vec![AttributeProto::int("axis", -1)],
    );
    g.annotate(&p, dtype::FLOAT, &sh.one);
    let idx = g.squeeze(&at, &[-1]);
    let prob = g.squeeze(&p, &[-1]);
    (idx, prob)
}

/// The last axis reversed (a Slice with step −1).
fn reverse_last(g: &mut G, x: &str) -> String {
    let starts = g.c_i64(&[-1], &[1]);
    let ends = g.c_i64(&[i64::MIN], &[1]);
    let axes = g.c_i64(&[-1], &[1]);
    let steps = g.c_i64(&[-1], &[1]);
    g.op("Slice", &[x, &starts, &ends, &axes, &steps], vec![])
}

/// exp(x − m) and its sum over the last axis, as the reference's max-subtracted softmax
/// (removed entries, −inf, give exactly 0).
fn exp_sum(g: &mut G, x: &str, m: &str, sh: &Shapes) -> (String, String) {
    let d = g.sub(x, m);
    g.annotate(&d, dtype::FLOAT, &sh.full);
    let e = g.op("Exp", &[&d], vec![]);
    g.annotate(&e, dtype::FLOAT, &sh.full);
    let s = reduce_sum(g, &e);
    g.annotate(&s, dtype::FLOAT, &sh.one);
    (e, s)
}

/// How many entries along the last axis satisfy `op(x, y)`, as a float (B, tokens, 1).
fn count(g: &mut G, op: &str, x: &str, y: &str) -> String {
    let c = g.op(op, &[x, y], vec![]);
    let f = g.cast(&c, dtype::FLOAT);
    reduce_sum(g, &f)
}

/// ReduceSum over the last axis, kept (opset 13+: the axes are an input).
fn reduce_sum(g: &mut G, x: &str) -> String {
    let axes = g.c_i64(&[-1], &[1]);
    g.op(
        "ReduceSum",
        &[x, &axes],
        vec![AttributeProto::int("keepdims", 1)],
    )
}

/// ReduceMax / ReduceMin over the last axis, kept (opset 17: the axes are an attribute).
fn reduce_attr(g: &mut G, op: &str, x: &str) -> String {
    g.op(
        op,
        &[x],
        vec![
            AttributeProto::ints("axes", &[-1]),
            AttributeProto::int("keepdims", 1),
        ],
    )
}
