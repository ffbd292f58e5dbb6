//! The Open Inference Protocol (KServe v2) for the served model, as tritonclient speaks it:
//! server metadata and health, model readiness and metadata, and `infer` with JSON or binary
//! tensor data (`Inference-Header-Content-Length`). `infer` takes `prompt` (BYTES) and
//! optionally `negative_prompt` (BYTES), `seed` (INT64), `cfg_scale`, `top_p` (FP32/FP64) and
//! `top_k` (INT32/INT64), each a one-element tensor or a request parameter of the same name
//! (not both); it gives `image`, UINT8 (H, W, 3): the pixels `star-run --seed` writes.

use crate::api::{
    InferOutput, InferRequest, InferResponse, ModelMetadata, ServerMetadata, TensorMetadata,
    V2Error,
};
use crate::errors::ApiError;
use crate::request::Output;
use crate::state::AppState;
use crate::submit::{admit, enqueue, wait};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const HEADER_LENGTH: &str = "inference-header-content-length";

/// The optional inputs: (name, datatypes accepted).
const OPTIONAL: &[(&str, &[&str])] = &[
    ("negative_prompt", &["BYTES"]),
    ("seed", &["INT64", "UINT64", "INT32"]),
    ("cfg_scale", &["FP32", "FP64"]),
    ("top_k", &["INT32", "INT64"]),
    ("top_p", &["FP32", "FP64"]),
];

/// Server metadata.
#[utoipa::path(get, path = "/v2", tag = "kserve-v2",
    responses((status = 200, body = ServerMetadata)))]
pub(crate) async fn server_metadata() -> Response {
    axum::Json(ServerMetadata {
        name: "star-deploy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: vec!["binary_tensor_data".into()],
    })
    .into_response()
}

/// The model or a 404 in the protocol's shape; `version`, when given, must be the model's.
fn served(st: &AppState, name: &str, version: Option<&str>) -> Result<(), ApiError> {
    if name != st.model_name {
        return Err(ApiError::not_found(format!(
            "model '{name}' is not served here (serving '{}')",
            st.model_name
        )));
    }
    if let Some(v) = version.filter(|v| *v != st.manifest.model_hash) {
        return Err(ApiError::not_found(format!(
            "model '{name}' has no version '{v}' (its version is '{}')",
            st.manifest.model_hash
        )));
    }
    Ok(())
}

/// Model readiness: 200 when it serves, 503 while warming up or draining.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "kserve-v2",
    params(("name" = String, Path)),
    responses((status = 200, description = "Ready"), (status = 404, body = V2Error), (status = 503, body = V2Error)))]
pub(crate) async fn model_ready(
    State(st): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    ready_of(&st, &name, None)
}

/// Model readiness of a version.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "kserve-v2",
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, description = "Ready"), (status = 404, body = V2Error), (status = 503, body = V2Error)))]
pub(crate) async fn version_ready(
    State(st): State<Arc<AppState>>,
    UrlPath((name, version)): UrlPath<(String, String)>,
) -> Response {
    ready_of(&st, &name, Some(&version))
}

fn ready_of(st: &AppState, name: &str, version: Option<&str>) -> Response {
    if let Err(e) = served(st, name, version) {
        return e.kserve();
    }
    if st.ready.load(Ordering::SeqCst) && !st.draining.load(Ordering::SeqCst) {
        StatusCode::OK.into_response()
    } else {
        ApiError::unavailable("the model is not ready (warming up or shutting down)").kserve()
    }
}

/// Model metadata: what `infer` takes and gives.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "kserve-v2",
    params(("name" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = V2Error)))]
pub(crate) async fn model_metadata(
    State(st): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    metadata_of(&st, &name, None)
}

/// Model metadata of a version.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "kserve-v2",
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = V2Error)))]
pub(crate) async fn version_metadata(
    State(st): State<Arc<AppState>>,
    UrlPath((name, version)): UrlPath<(String, String)>,
) -> Response {
    metadata_of(&st, &name, Some(&version))
}

fn metadata_of(st: &AppState, name: &str, version: Option<&str>) -> Response {
    if let Err(e) = served(st, name, version) {
        return e.kserve();
    }
    let t = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape,
    };
    let mut inputs = vec![t("prompt", "BYTES", vec![1])];
    inputs.extend(OPTIONAL.iter().map(|(n, d)| t(n, d[0], vec![1])));
    let side = st.manifest.schedule.image_size as i64;
    axum::Json(ModelMetadata {
        name: st.model_name.clone(),
        versions: vec![st.manifest.model_hash.clone()],
        platform: "star-deploy".into(),
        inputs,
        outputs: vec![t("image", "UINT8", vec![side, side, 3])],
    })
    .into_response()
}

/// Generate an image.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "kserve-v2",
    params(("name" = String, Path)),
    request_body(content = InferRequest, description = "JSON, or JSON followed by binary tensor data (header `Inference-Header-Content-Length`: the JSON's length)",
        content_type = "application/json"),
    responses(
        (status = 200, description = "`image`, UINT8 (H, W, 3); binary after the JSON when asked for (`binary_data`, `binary_data_output`)", body = InferResponse),
        (status = 400, body = V2Error), (status = 404, body = V2Error), (status = 408, body = V2Error),
        (status = 413, body = V2Error), (status = 429, body = V2Error), (status = 500, body = V2Error),
        (status = 503, body = V2Error), (status = 504, body = V2Error)))]
pub(crate) async fn infer(
    State(st): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer_of(&st, &name, None, &headers, &body)
        .await
        .unwrap_or_else(ApiError::kserve)
}

/// Generate an image with a version of the model.
#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "kserve-v2",
    params(("name" = String, Path), ("version" = String, Path)),
    request_body(content = InferRequest, content_type = "application/json"),
    responses((status = 200, body = InferResponse), (status = 400, body = V2Error), (status = 404, body = V2Error),
        (status = 503, body = V2Error)))]
pub(crate) async fn version_infer(
    State(st): State<Arc<AppState>>,
    UrlPath((name, version)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer_of(&st, &name, Some(&version), &headers, &body)
        .await
        .unwrap_or_else(ApiError::kserve)
}

async fn infer_of(
    st: &AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    served(st, name, version)?;
    admit(st)?;
    let (req, binary_data) = split(headers, body)?;
    let request: InferRequest = serde_json::from_slice(req)
        .map_err(|e| ApiError::bad_request(format!("the inference request is not valid: {e}")))?;
    let binary_out = binary_output(&request)?;
    let fields = inputs(&request, binary_data)?;
    let (mut gen, _) = crate::submit::parse_object(st, &fields).map_err(|e| {
        // The protocol's error is one string: it names the input.
        ApiError::bad_request(match e.param {
            Some(p) if !e.message.contains(&p) => format!("{p}: {}", e.message),
            _ => e.message,
        })
    })?;
    gen.output = Output::Rgb;
    let rx = enqueue(st, gen, None)?;
    let finished = wait(st, rx).await?;
    let rgb = finished
        .images
        .into_iter()
        .next()
        .map(|i| i.bytes)
        .ok_or_else(|| ApiError::server("the run returned no image"))?;
    let side = st.manifest.schedule.image_size as i64;
    Ok(respond(
        st,
        request.id,
        rgb,
        vec![side, side, 3],
        binary_out,
    ))
}

/// The JSON part and the binary part of a request.
fn split<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    let Some(v) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let n: usize = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ApiError::bad_request(format!("{HEADER_LENGTH} is not a length")))?;
    if n > body.len() {
        return Err(ApiError::bad_request(format!(
            "{HEADER_LENGTH} is {n}, over the body's {} bytes",
            body.len()
        )));
    }
    Ok(body.split_at(n))
}

/// Whether `image` goes as binary data after the JSON; an output other than `image` is refused.
fn binary_output(r: &InferRequest) -> Result<bool, ApiError> {
    let all = r
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_output"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(outputs) = &r.outputs else {
        return Ok(all);
    };
    let mut binary = all;
    for o in outputs {
        if o.name != "image" {
            return Err(ApiError::bad_request(format!(
                "unknown output '{}': this model gives 'image'",
                o.name
            )));
        }
        if let Some(b) = o.parameters.as_ref().and_then(|p| p.get("binary_data")) {
            binary = b.as_bool().unwrap_or(false);
        }
    }
    Ok(binary)
}

/// The request's inputs and parameters as the images request's fields.
fn inputs(r: &InferRequest, mut binary: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let mut fields = Map::new();
    for input in &r.inputs {
        let allowed: &[&str] = match input.name.as_str() {
            "prompt" => &["BYTES"],
            n => OPTIONAL
                .iter()
                .find(|(o, _)| *o == n)
                .map(|(_, d)| *d)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unknown input '{n}': this model takes prompt, negative_prompt, seed, cfg_scale, top_k and top_p"
                    ))
                })?,
        };
        if !allowed.contains(&input.datatype.as_str()) {
            return Err(ApiError::bad_request(format!(
                "input '{}' is {}, not {}",
                input.name,
                input.datatype,
                allowed.join(" or ")
            )));
        }
        if input.shape.iter().product::<i64>() != 1 {
            return Err(ApiError::bad_request(format!(
                "input '{}' has shape {:?}: it takes one element ([1])",
                input.name, input.shape
            )));
        }
        let size = input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .and_then(Value::as_u64);
        let value = match size {
            Some(n) => {
                let n = n as usize;
                if n > binary.len() {
                    return Err(ApiError::bad_request(format!(
                        "input '{}' declares {n} bytes of binary data; {} remain",
                        input.name,
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                from_binary(&input.name, &input.datatype, mine)?
            }
            None => from_json(&input.name, input.data.as_ref())?,
        };
        fields.insert(input.name.clone(), value);
    }
    if let Some(params) = &r.parameters {
        for (k, v) in params {
            if k == "binary_data_output" {
                continue;
            }
            if !OPTIONAL.iter().any(|(o, _)| o == k) {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter '{k}': sampling parameters are negative_prompt, seed, cfg_scale, top_k and top_p"
                )));
            }
            if fields.contains_key(k) {
                return Err(ApiError::bad_request(format!(
                    "'{k}' is given both as an input and as a parameter"
                )));
            }
            fields.insert(k.clone(), v.clone());
        }
    }
    if !fields.contains_key("prompt") {
        return Err(ApiError::bad_request("input 'prompt' (BYTES) is required"));
    }
    Ok(fields)
}

/// One element of binary tensor data (little-endian; BYTES: a 4-byte length, then the bytes).
fn from_binary(name: &str, datatype: &str, b: &[u8]) -> Result<Value, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "input '{name}': {} bytes are not one {datatype}",
            b.len()
        ))
    };
    let arr = |n: usize| -> Result<&[u8], ApiError> { (b.len() == n).then_some(b).ok_or_else(bad) };
    Ok(match datatype {
        "BYTES" => {
            let len = b.get(..4).ok_or_else(bad)?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if b.len() != 4 + len {
                return Err(bad());
            }
            let s = std::str::from_utf8(&b[4..])
                .map_err(|_| ApiError::bad_request(format!("input '{name}' is not UTF-8")))?;
            json!(s)
        }
        "INT64" => json!(i64::from_le_bytes(arr(8)?.try_into().map_err(|_| bad())?)),
        "UINT64" => json!(u64::from_le_bytes(arr(8)?.try_into().map_err(|_| bad())?)),
        "INT32" => json!(i32::from_le_bytes(arr(4)?.try_into().map_err(|_| bad())?)),
        "FP32" => json!(f32::from_le_bytes(arr(4)?.try_into().map_err(|_| bad())?) as f64),
        "FP64" => json!(f64::from_le_bytes(arr(8)?.try_into().map_err(|_| bad())?)),
        _ => return Err(bad()),
    })
}

/// One element of JSON tensor data (`[x]` or `[[x]]`).
fn from_json(name: &str, data: Option<&Value>) -> Result<Value, ApiError> {
    let mut v = data.ok_or_else(|| {
        ApiError::bad_request(format!(
            "input '{name}' has neither data nor binary_data_size"
        ))
    })?;
    while let Value::Array(a) = v {
        v = match a.as_slice() {
            [one] => one,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "input '{name}' must hold one element"
                )))
            }
        };
    }
    Ok(v.clone())
}

/// The response: `image` as JSON data or as binary data after the JSON.
fn respond(
    st: &AppState,
    id: Option<String>,
    rgb: Vec<u8>,
    shape: Vec<i64>,
    binary: bool,
) -> Response {
    let mut out = InferOutput {
        name: "image".into(),
        datatype: "UINT8".into(),
        shape,
        parameters: None,
        data: None,
    };
    if binary {
        out.parameters = Some(Map::from_iter([(
            "binary_data_size".to_string(),
            json!(rgb.len()),
        )]));
    } else {
        out.data = Some(rgb.clone());
    }
    let head = InferResponse {
        model_name: st.model_name.clone(),
        model_version: st.manifest.model_hash.clone(),
        id,
        outputs: vec![out],
    };
    let json = serde_json::to_vec(&head).unwrap_or_default();
    if !binary {
        return (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response();
    }
    let n = json.len();
    let mut body = json;
    body.extend_from_slice(&rgb);
    let mut r = (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response();
    r.headers_mut().insert(HEADER_LENGTH, HeaderValue::from(n));
    r
}
