//! MetaServer: metamanager's HTTP view for local applications, an [`axum::Router`] the edge's
//! local endpoint serves on loopback.
//!
//! | Method & path | What |
//! |---|---|
//! | `GET /v1/messages?after=<seq>&limit=<n>` | the journal: cloud messages applied, after `seq` (default 0), oldest first, at most `n` (default 100, max 1000): `{"messages": [{"seq": 1, "message": <KubeEdge JSON>}], "next": <last seq>}` |

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::store::MetaStore;

/// The routes over `store`.
pub fn router(store: Arc<MetaStore>) -> Router {
    Router::new()
        .route("/v1/messages", get(journal))
        .with_state(store)
}

#[derive(Debug, Deserialize)]
struct JournalQuery {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn journal(State(store): State<Arc<MetaStore>>, Query(q): Query<JournalQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match store.journal(q.after, limit) {
        Ok(rows) => {
            let next = rows.last().map_or(q.after, |(seq, _)| *seq);
            let messages: Vec<Value> = rows
                .into_iter()
                .map(|(seq, message)| json!({"seq": seq, "message": message}))
                .collect();
            axum::Json(json!({"messages": messages, "next": next})).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}
