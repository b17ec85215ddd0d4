//! The OpenAPI 3 document, generated from the handlers' wire types (utoipa),
//! served at `/openapi.json` with a browsable UI at `/docs` (Swagger UI, its
//! assets built into the binary).

use utoipa::OpenApi;

use super::types::*;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "llmservice",
        description = "Local language models behind an OpenAI-compatible API."
    ),
    paths(
        super::chat::chat_completions,
        super::completions::completions,
        super::embeddings::embeddings,
        super::embeddings::rerank,
        super::functions::list_functions,
        super::models::health,
        super::models::list_models,
        super::models::get_model,
        super::models::model_action,
        super::models::chat_models,
        super::models::embedding_models,
        super::tokens::tokenize,
        super::tokens::detokenize,
        super::cache_stats,
        super::metrics,
    ),
    components(schemas(ErrorResponse, ErrorDetail, Usage, ChatCompletionChunk))
)]
pub struct ApiDoc;
