//! The OpenAI images request plus STAR's fields, checked field by field: a refused field is a
//! 422 naming it.

use crate::admission::MemoryModel;
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// The encoding of a request's images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    Png,
    Rgb,
}

/// What a request asks the model for, validated.
#[derive(Clone, Debug)]
pub(crate) struct GenRequest {
    pub(crate) prompt: String,
    pub(crate) negative: String,
    pub(crate) n: usize,
    pub(crate) seed: u64,
    pub(crate) cfg: Option<f64>,
    pub(crate) top_k: Option<usize>,
    pub(crate) top_p: Option<f64>,
    pub(crate) stable_sampling: bool,
    /// Progressive previews wanted (`partial_images`, with `stream` or a job).
    pub(crate) partial_images: u32,
    pub(crate) output: Output,
}

/// A refused field: (message, param).
impl GenRequest {
    /// Whether two requests can share one model run: the same sampling settings and negative
    /// prompt (the prompts and seeds are per image).
    pub(crate) fn batches_with(&self, other: &GenRequest) -> bool {
        self.negative == other.negative
            && self.cfg == other.cfg
            && self.top_k == other.top_k
            && self.top_p == other.top_p
            && self.stable_sampling == other.stable_sampling
            // Previews are decoded for the whole batch: only requests asking the same share.
            && self.partial_images == other.partial_images
    }
}

pub(crate) struct FieldError(pub(crate) String, pub(crate) String);

pub(crate) fn fe(message: String, param: &str) -> FieldError {
    FieldError(message, param.to_string())
}

/// An optional field: absent or null is None; a value `get` cannot read is refused.
pub(crate) fn optional<T>(
    obj: &serde_json::Map<String, Value>,
    k: &str,
    get: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Option<T>, FieldError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v)
            .map(Some)
            .ok_or_else(|| fe(format!("{k} must be {what}"), k)),
    }
}

/// What the server serves, as far as a request can be checked against it.
pub(crate) struct Served<'a> {
    pub(crate) model_name: &'a str,
    /// "WxH" of the model's images.
    pub(crate) size: &'a str,
    pub(crate) vocab: usize,
    pub(crate) max_images: usize,
    /// The memory model, once warm-up measured it.
    pub(crate) memory: Option<MemoryModel>,
}

/// The OpenAI images request plus STAR's fields, checked field by field (422 naming the field).
pub(crate) fn parse_request(
    state: &Served<'_>,
    body: &[u8],
) -> Result<(GenRequest, bool), FieldError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| fe(format!("the body is not JSON: {e}"), "body"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| fe("the body must be a JSON object".into(), "body"))?;
    parse_fields(state, obj)
}

/// The request's fields, checked one by one (the OpenAI body's, or KServe's inputs and
/// parameters under the same names): (request, stream).
pub(crate) fn parse_fields(
    state: &Served<'_>,
    obj: &serde_json::Map<String, Value>,
) -> Result<(GenRequest, bool), FieldError> {
    if let Some(k) = obj
        .keys()
        .find(|k| !crate::api::IMAGES_REQUEST_FIELDS.contains(&k.as_str()))
    {
        return Err(fe(format!("unknown field '{k}'"), k));
    }
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(fe("prompt is empty".into(), "prompt")),
        Some(_) => return Err(fe("prompt must be a string".into(), "prompt")),
        None => return Err(fe("prompt is required".into(), "prompt")),
    };
    let uint = |k: &str| optional(obj, k, Value::as_u64, "a non-negative integer");
    let n = uint("n")?.unwrap_or(1) as usize;
    if n == 0 || n > state.max_images {
        return Err(fe(
            format!("n must be between 1 and {}", state.max_images),
            "n",
        ));
    }
    if let Some(m) = state.memory {
        // At least one image: the warm-up showed that one fits, and what the system has left is
        // checked before every run anyway.
        if n > m.fit().max(1) {
            return Err(fe(
                format!(
                    "n={n} needs about {} MB of memory, over the {} MB this server gives runs (95% of its limit): at most {} images per request here",
                    m.peak_of(m.base, n) >> 20,
                    m.usable() >> 20,
                    m.fit().max(1)
                ),
                "n",
            ));
        }
    }
    check_choice(obj, "size", &["auto", state.size], "this model makes only")?;
    check_choice(obj, "quality", &["auto"], "this model has one quality:")?;
    check_choice(obj, "background", &["auto", "opaque"], "images are RGB:")?;
    check_choice(
        obj,
        "moderation",
        &["auto", "low"],
        "this server does not moderate:",
    )?;
    for k in ["user", "safety_identifier"] {
        optional(obj, k, |v| v.as_str().map(str::to_string), "a string")?;
    }
    match obj.get("response_format").map(|v| v.as_str()) {
        None | Some(Some("b64_json")) => {}
        Some(Some("url")) => {
            return Err(fe(
                "response_format 'url' is not supported (no image storage): use b64_json".into(),
                "response_format",
            ))
        }
        Some(_) => {
            return Err(fe(
                "response_format must be 'b64_json'".into(),
                "response_format",
            ))
        }
    }
    match obj.get("output_format").map(|v| v.as_str()) {
        None | Some(Some("png")) => {}
        Some(_) => return Err(fe("output_format must be 'png'".into(), "output_format")),
    }
    if let Some(m) = obj.get("model") {
        if m.as_str() != Some(state.model_name) {
            return Err(fe(
                format!(
                    "model {m} is not served here: this server serves '{}'",
                    state.model_name
                ),
                "model",
            ));
        }
    }
    let seed = uint("seed")?.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let negative = match obj.get("negative_prompt") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(fe(
                "negative_prompt must be a string".into(),
                "negative_prompt",
            ))
        }
    };
    let num = |k: &str| optional(obj, k, Value::as_f64, "a number");
    let cfg = num("cfg_scale")?;
    if let Some(c) = cfg {
        star_pipeline::args::cfg(&c.to_string()).map_err(|e| fe(e, "cfg_scale"))?;
    }
    let top_p = num("top_p")?;
    if let Some(t) = top_p {
        star_pipeline::args::top_p(&t.to_string()).map_err(|e| fe(e, "top_p"))?;
    }
    let top_k = uint("top_k")?.map(|k| k as usize);
    if let Some(k) = top_k {
        if k > state.vocab {
            return Err(fe(
                format!("top_k {k} exceeds the model's vocabulary ({})", state.vocab),
                "top_k",
            ));
        }
    }
    let stream = optional(obj, "stream", Value::as_bool, "a boolean")?.unwrap_or(false);
    if stream && n > 1 {
        // OpenAI's stream events carry no image index: one image per streamed request.
        return Err(fe("n must be 1 with stream: true".into(), "n"));
    }
    let partial_images = uint("partial_images")?.unwrap_or(0);
    if partial_images > 3 {
        return Err(fe(
            "partial_images must be between 0 and 3".into(),
            "partial_images",
        ));
    }
    let stable_sampling = match obj.get("stable_sampling") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(fe(
                "stable_sampling must be a boolean".into(),
                "stable_sampling",
            ))
        }
    };
    Ok((
        GenRequest {
            prompt,
            negative,
            n,
            seed,
            cfg,
            top_k,
            top_p,
            stable_sampling,
            partial_images: partial_images as u32,
            output: Output::Png,
        },
        stream,
    ))
}

/// A string field that must be one of `allowed` (absent or null: the first).
fn check_choice(
    obj: &serde_json::Map<String, Value>,
    k: &str,
    allowed: &[&str],
    why: &str,
) -> Result<(), FieldError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(v)) if allowed.contains(&v.as_str()) => Ok(()),
        Some(v) => Err(fe(
            format!(
                "{k} {v} is not supported: {why} {}",
                allowed
                    .iter()
                    .map(|a| format!("'{a}'"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            k,
        )),
    }
}
