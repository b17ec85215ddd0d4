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
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(&mut de) {
            // One JSON value and nothing after it but whitespace.
            Ok(value) => match de.end() {
                Ok(()) => Ok(Json(value)),
                Err(e) => Err(ApiError::bad_request(format!(
                    "could not parse the JSON body: {e}"
                ))),
            },
            Err(err) => {
                let mut path = err.path().to_string();
                if path == "." {
                    path = flattened_field_path(&bytes).unwrap_or(path);
                }
                let inner = err.into_inner();
                let message = if inner.is_syntax() || inner.is_eof() {
                    format!("could not parse the JSON body: {inner}")
                } else {
                    format!("invalid request body: {inner}")
                };
                let mut error = ApiError::bad_request(message);
                if path != "." && !inner.is_syntax() && !inner.is_eof() {
                    error.param = Some(path);
                }
                Err(error)
            }
        }
    }
}

/// Fields inside `#[serde(flatten)]` lose their path in serde's error; the shared
/// sampling fields are the flattened ones, so read them alone to name the field.
fn flattened_field_path(bytes: &[u8]) -> Option<String> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let err = serde_path_to_error::deserialize::<_, crate::wire::SamplingFields>(de).err()?;
    let path = err.path().to_string();
    (path != ".").then_some(path)
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
