//! The dashboard's Analytics page: requests, tokens, time to first token and
//! latency over the last hour, day or week, per model and per key.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::analytics::{self, Report};
use crate::api::error::ApiError;
use crate::state::AppState;
use crate::wire::ErrorResponse;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AnalyticsQuery {
    /// `hour` (one point a minute), `day` (every 15 minutes) or `week` (hourly).
    pub range: Option<String>,
    /// Only this model's requests (a model id).
    pub model: Option<String>,
    /// Only this key's requests: `operator`, `anonymous`, or a named key's id.
    pub key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnalyticsReport {
    pub range: &'static str,
    #[serde(flatten)]
    pub report: Report,
    /// Names for the keys in `by_key` (named keys' ids → their names).
    pub key_names: HashMap<String, String>,
}

#[utoipa::path(get, path = "/admin/api/analytics", operation_id = "admin_analytics", security(("bearer" = []), ("x_api_key" = [])), params(AnalyticsQuery), responses((status = 200, description = "A time series and totals per model and per key", body = AnalyticsReport), (status = 400, description = "An unknown range", body = ErrorResponse), (status = 401, description = "No operator key", body = ErrorResponse)))]
pub async fn report(
    State(state): State<AppState>,
    Query(query): Query<AnalyticsQuery>,
) -> Result<axum::Json<AnalyticsReport>, ApiError> {
    let (range, span, step) = match query.range.as_deref().unwrap_or("hour") {
        "hour" => ("hour", 3600, 60),
        "day" => ("day", 86400, 900),
        "week" => ("week", 7 * 86400, 3600),
        other => {
            return Err(ApiError::invalid(
                "range",
                format!("range must be hour, day or week, not {other:?}"),
            ))
        }
    };
    let report = super::blocking("analytics_unavailable", move || {
        let report = state.analytics.report(&analytics::Query {
            now: chrono::Utc::now().timestamp(),
            range: Duration::from_secs(span),
            step: Duration::from_secs(step),
            model: query.model.filter(|m| !m.is_empty()),
            key: query.key.filter(|k| !k.is_empty()),
        })?;
        let key_names = state
            .keys
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|k| (k.id, k.name))
            .collect();
        Ok(AnalyticsReport {
            range,
            report,
            key_names,
        })
    })
    .await?;
    Ok(axum::Json(report))
}
