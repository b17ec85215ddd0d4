//! `GET /v1/functions`: the built-in functions the server can run itself.

use axum::Json;
use serde_json::{json, Value};

use crate::chat::builtins;

#[utoipa::path(get, path = "/v1/functions", responses((status = 200, description = "The built-in functions this server can execute (`execute_builtin_functions: true`)")))]
pub async fn list_functions() -> Json<Value> {
    let data: Vec<Value> = builtins::registry()
        .iter()
        .map(|b| json!({"name": b.name, "description": b.description, "parameters": (b.parameters)()}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}
