//! A JSON body extractor whose every rejection (malformed JSON, wrong types,
//! missing fields, oversized bodies) answers in OpenAI's error shape, naming
//! the offending field where there is one.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| ct.starts_with("application/json") || ct.contains("+json"));
        if !is_json {
            return Err(ApiError::bad_request(
                "expected a JSON body with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        wire::parse_body(&bytes).map(Json).map_err(|e| {
            let error = ApiError {
                param: e.param,
                ..ApiError::bad_request(e.message)
            };
            match e.code {
                Some(code) => error.with_code(code),
                None => error,
            }
        })
    }
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ApiError::bad_request(
                "the request body is larger than this server accepts (MAX_BODY_BYTES)",
            )
        }
        .with_code("request_too_large")
    } else {
        ApiError::bad_request(format!("could not read the request body: {rejection}"))
    }
}
