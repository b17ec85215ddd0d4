//! The OpenAPI 3 document, generated from the handlers' wire types (utoipa),
//! served at `/openapi.json` with a browsable UI at `/docs` (Swagger UI, its
//! assets built into the binary).

use utoipa::OpenApi;

use super::handlers;
use crate::wire::*;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "llmservice",
        description = "Local language models behind an OpenAI-compatible API."
    ),
    paths(
        handlers::chat::chat_completions,
        handlers::completions::completions,
        handlers::responses::create_response,
        handlers::responses::get_response,
        handlers::responses::delete_response,
        handlers::messages::messages,
        handlers::messages::count_tokens,
        handlers::ollama::version,
        handlers::ollama::tags,
        handlers::ollama::ps,
        handlers::ollama::show,
        handlers::ollama::chat,
        handlers::ollama::generate_text,
        handlers::ollama::embed,
        handlers::ollama::legacy_embeddings,
        handlers::ollama::pull,
        handlers::embeddings::embeddings,
        handlers::rerank::rerank,
        handlers::ingest::add_documents,
        handlers::ingest::add_files,
        handlers::rag::list_documents,
        handlers::rag::get_document,
        handlers::rag::delete_document,
        handlers::rag::rag_search,
        handlers::rag::rag_chat,
        handlers::rag::list_collections,
        handlers::rag::delete_collection,
        handlers::functions::list_functions,
        handlers::models::health,
        handlers::models::list_models,
        handlers::models::get_model,
        handlers::models::model_action,
        handlers::models::chat_models,
        handlers::models::embedding_models,
        handlers::tokens::tokenize,
        handlers::tokens::detokenize,
        handlers::ops::cache_stats,
        handlers::admin::keys::list_keys,
        handlers::admin::keys::create_key,
        handlers::admin::keys::revoke_key,
        handlers::admin::status::status,
        handlers::admin::status::settings,
        handlers::admin::status::flush_cache,
        handlers::admin::models::list,
        handlers::admin::models::get,
        handlers::admin::models::action,
        handlers::admin::models::put_settings,
        handlers::admin::downloads::start,
        handlers::admin::downloads::list,
        handlers::admin::downloads::get,
        handlers::admin::downloads::cancel,
        handlers::admin::downloads::events,
        handlers::admin::analytics::report,
        handlers::ops::metrics,
    ),
    modifiers(&BearerKey),
    security((), ("bearer" = []), ("x_api_key" = [])),
    components(schemas(
        ErrorResponse,
        ErrorDetail,
        Usage,
        ChatCompletionChunk,
        MessagesEvent,
        ResponsesEvent,
        RagChatEvent
    ))
)]
pub struct ApiDoc;

/// Declares how keys are sent (`Authorization: Bearer` or `x-api-key`), and
/// that they are asked for: always on `/admin` and `/internal`, on the API
/// when the server listens beyond loopback.
struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}
