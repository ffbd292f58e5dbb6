//! The bodies every route reads and writes, as types: the OpenAPI document (`/openapi.json`)
//! is generated from them and from the handlers' annotations, and the handlers build their
//! responses from them, so the two cannot drift apart.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/images/generations`: OpenAI's images request plus STAR's sampling fields. Every
/// field is checked on its own; a refused one is a 422 naming it in `error.param`.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImagesRequest {
    /// The text to draw (UTF-8; CLIP keeps its first 75 tokens).
    #[schema(min_length = 1, example = "a red circle on a blue background")]
    pub(crate) prompt: String,
    /// Images to generate (at most `--max-images`; 1 with `stream`).
    #[schema(minimum = 1)]
    pub(crate) n: Option<u32>,
    /// `auto` or the model's own size (`WxH`).
    #[schema(example = "auto")]
    pub(crate) size: Option<String>,
    /// Only `b64_json` (there is no image storage for `url`).
    pub(crate) response_format: Option<ResponseFormat>,
    /// Only `png`.
    pub(crate) output_format: Option<OutputFormat>,
    /// The served model's id (`GET /v1/models`).
    pub(crate) model: Option<String>,
    /// `auto` (the model has one quality).
    pub(crate) quality: Option<Quality>,
    /// `auto` or `opaque` (images are RGB).
    pub(crate) background: Option<Background>,
    /// `auto` or `low` (the server does not moderate).
    pub(crate) moderation: Option<Moderation>,
    /// Accepted and not used.
    pub(crate) user: Option<String>,
    /// Accepted and not used.
    pub(crate) safety_identifier: Option<String>,
    /// With `stream`: progressive previews before the image, 0 to 3.
    #[schema(minimum = 0, maximum = 3)]
    pub(crate) partial_images: Option<u32>,
    /// Server-Sent Events: `image_generation.partial_image` events, then one
    /// `image_generation.completed`.
    pub(crate) stream: Option<bool>,
    /// Image i uses seed + i; the same seed gives the same bytes as `star-run --seed`.
    pub(crate) seed: Option<u64>,
    pub(crate) negative_prompt: Option<String>,
    /// Classifier-free guidance at the last scale (ramped from 0).
    #[schema(minimum = 0.0)]
    pub(crate) cfg_scale: Option<f64>,
    /// 0: off; at most the model's vocabulary.
    pub(crate) top_k: Option<u64>,
    /// In [0, 1]; 0 is off.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub(crate) top_p: Option<f64>,
    /// The stable sampler where the model has one (default true).
    pub(crate) stable_sampling: Option<bool>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ResponseFormat {
    B64Json,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutputFormat {
    Png,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Quality {
    Auto,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Background {
    Auto,
    Opaque,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Moderation {
    Auto,
    Low,
}

/// One generated image.
#[derive(Serialize, Deserialize, ToSchema, Clone)]
pub(crate) struct ImageData {
    /// The PNG, base64.
    pub(crate) b64_json: String,
    /// The seed that makes exactly this image.
    pub(crate) seed: u64,
}

/// OpenAI's token usage of a generation: input tokens are the prompt's CLIP tokens, output
/// tokens the image tokens drawn over all scales.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) input_tokens: u64,
    pub(crate) input_tokens_details: InputTokensDetails,
    pub(crate) output_tokens: u64,
    pub(crate) total_tokens: u64,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Copy)]
pub(crate) struct InputTokensDetails {
    pub(crate) text_tokens: u64,
    pub(crate) image_tokens: u64,
}

/// The response of a generation.
#[derive(Serialize, Deserialize, ToSchema, Clone)]
pub(crate) struct ImagesResponse {
    pub(crate) created: u64,
    pub(crate) data: Vec<ImageData>,
    /// `WxH`.
    pub(crate) size: String,
    pub(crate) output_format: String,
    pub(crate) background: String,
    pub(crate) usage: Usage,
}

/// What every image event of `stream: true` carries.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct ImageEvent {
    /// `image_generation.partial_image` or `image_generation.completed`
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) b64_json: String,
    pub(crate) created_at: u64,
    pub(crate) size: String,
    /// `auto`: the model has one quality.
    pub(crate) quality: String,
    pub(crate) background: String,
    pub(crate) output_format: String,
}

/// The last event of `stream: true`: the same image bytes as the response without `stream`.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct CompletedEvent {
    #[serde(flatten)]
    pub(crate) image: ImageEvent,
    pub(crate) usage: Usage,
}

/// A progressive preview of `stream: true`: the decoder's image of the scales drawn so far.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct PartialImageEvent {
    #[serde(flatten)]
    pub(crate) image: ImageEvent,
    /// 0-based, in order.
    pub(crate) partial_image_index: u32,
}

/// An error of the OpenAI routes (and STAR's own), in OpenAI's shape.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct OpenAiError {
    pub(crate) error: OpenAiErrorDetail,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub(crate) struct OpenAiErrorDetail {
    pub(crate) message: String,
    /// `invalid_request_error`, `not_found_error`, `rate_limit_error`, `timeout_error`,
    /// `server_error`, ...
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// The request field at fault, if one is.
    pub(crate) param: Option<String>,
    /// A machine-readable code (`invalid_value`, `unknown_parameter`, `rate_limit_exceeded`,
    /// ...) or null.
    pub(crate) code: Option<String>,
}

/// OpenAI's model object.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct Model {
    pub(crate) id: String,
    /// `model`
    pub(crate) object: String,
    pub(crate) created: u64,
    pub(crate) owned_by: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct ModelList {
    /// `list`
    pub(crate) object: String,
    pub(crate) data: Vec<Model>,
}

/// Readiness (`/ready`).
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct Readiness {
    pub(crate) ready: bool,
}

/// Where a job is: scales done of all, tokens drawn of all, time since it was created.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Default, Debug, PartialEq)]
pub(crate) struct Progress {
    pub(crate) scale: u32,
    pub(crate) scales: u32,
    pub(crate) tokens_done: u64,
    pub(crate) tokens_total: u64,
    pub(crate) elapsed_s: f64,
}

/// A job's status.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub(crate) fn terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

/// An async job (`/star/v1/jobs`).
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct JobView {
    pub(crate) id: String,
    pub(crate) status: JobStatus,
    pub(crate) poll_url: String,
    pub(crate) events_url: String,
    pub(crate) progress: Progress,
    /// Jobs queued ahead of this one (queued jobs only).
    pub(crate) queue_position: Option<u64>,
    /// The response body, once completed.
    pub(crate) result: Option<ImagesResponse>,
    /// Why it failed or was cancelled.
    pub(crate) error: Option<OpenAiErrorDetail>,
}

/// Open Inference Protocol: `GET /v2`.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct ServerMetadata {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) extensions: Vec<String>,
}

/// A tensor a model takes or gives.
#[derive(Serialize, Deserialize, ToSchema, Clone)]
pub(crate) struct TensorMetadata {
    pub(crate) name: String,
    pub(crate) datatype: String,
    pub(crate) shape: Vec<i64>,
}

/// Open Inference Protocol: `GET /v2/models/{name}`. Every input but `prompt` is optional.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct ModelMetadata {
    pub(crate) name: String,
    pub(crate) versions: Vec<String>,
    pub(crate) platform: String,
    pub(crate) inputs: Vec<TensorMetadata>,
    pub(crate) outputs: Vec<TensorMetadata>,
}

/// Open Inference Protocol: an input tensor of `infer`. `data` is absent when the tensor's
/// bytes follow the JSON (binary tensor data: `parameters.binary_data_size`).
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct InferInput {
    pub(crate) name: String,
    pub(crate) shape: Vec<i64>,
    pub(crate) datatype: String,
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) data: Option<serde_json::Value>,
}

/// An output `infer` is asked for (`parameters.binary_data`: its bytes after the JSON).
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct InferRequestedOutput {
    pub(crate) name: String,
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Open Inference Protocol: `POST /v2/models/{name}/infer`. Sampling settings are input
/// tensors or request `parameters` of the same names (`seed`, `negative_prompt`, `cfg_scale`,
/// `top_k`, `top_p`), not both.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct InferRequest {
    pub(crate) id: Option<String>,
    pub(crate) inputs: Vec<InferInput>,
    pub(crate) outputs: Option<Vec<InferRequestedOutput>>,
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// An output tensor of `infer`: `data` in JSON, or its bytes after the JSON
/// (`parameters.binary_data_size`).
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct InferOutput {
    pub(crate) name: String,
    pub(crate) datatype: String,
    pub(crate) shape: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct InferResponse {
    pub(crate) model_name: String,
    pub(crate) model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<String>,
    pub(crate) outputs: Vec<InferOutput>,
}

/// An error under /v2, in the Open Inference Protocol's shape.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct V2Error {
    pub(crate) error: String,
}

/// The request fields `ImagesRequest` declares (checked against the document by a test).
pub(crate) const IMAGES_REQUEST_FIELDS: &[&str] = &[
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "model",
    "quality",
    "background",
    "moderation",
    "user",
    "safety_identifier",
    "partial_images",
    "stream",
    "seed",
    "negative_prompt",
    "cfg_scale",
    "top_k",
    "top_p",
    "stable_sampling",
];

/// One Server-Sent Event as a client reads it (the `text/event-stream` responses' schema):
/// `event` names it, `data` is its JSON.
#[derive(Serialize, Deserialize, ToSchema)]
pub(crate) struct SseEvent {
    pub(crate) event: Option<String>,
    pub(crate) data: String,
    pub(crate) id: Option<String>,
    pub(crate) retry: Option<u64>,
}
