//! The OpenAPI 3.1 document, generated from the handlers' annotations and the body types
//! (`crate::api`): nothing in it is written by hand.

use crate::{api, jobs_api, kserve, openai, ops};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "star-run serve",
        description = "STAR text-to-image: OpenAI's images API, the Open Inference Protocol (KServe v2), async jobs with Server-Sent Events, operations. Errors are OpenAI-shaped except under /v2 (`{\"error\": \"...\"}`)."
    ),
    paths(
        openai::generations,
        openai::models,
        openai::model,
        kserve::server_metadata,
        ops::v2_live,
        ops::v2_ready,
        kserve::model_metadata,
        kserve::version_metadata,
        kserve::model_ready,
        kserve::version_ready,
        kserve::infer,
        kserve::version_infer,
        jobs_api::create_job,
        jobs_api::get_job,
        jobs_api::cancel_job,
        jobs_api::job_events,
        ops::live,
        ops::ready,
        ops::metrics,
        openapi_json,
    ),
    components(schemas(api::CompletedEvent, api::PartialImageEvent)),
    tags(
        (name = "openai", description = "OpenAI images API"),
        (name = "kserve-v2", description = "Open Inference Protocol (KServe v2)"),
        (name = "jobs", description = "Async jobs and their events"),
        (name = "operations", description = "Health, metrics, this document"),
    )
)]
struct ApiDoc;

/// The OpenAPI 3.1 document of every route.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object)))]
pub(crate) async fn openapi_json() -> Response {
    axum::Json(document()).into_response()
}

pub(crate) fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_declares_what_the_parser_accepts() {
        let doc = serde_json::to_value(super::document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let props = doc["components"]["schemas"]["ImagesRequest"]["properties"]
            .as_object()
            .unwrap();
        let mut declared: Vec<&str> = props.keys().map(String::as_str).collect();
        let mut parsed = crate::api::IMAGES_REQUEST_FIELDS.to_vec();
        declared.sort();
        parsed.sort();
        assert_eq!(declared, parsed);
        for p in [
            "/v1/images/generations",
            "/v2/models/{name}/infer",
            "/star/v1/jobs/{id}/events",
        ] {
            assert!(doc["paths"][p].is_object(), "{p}");
        }
    }
}
