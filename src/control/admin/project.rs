//! `GET /admin/projects/:projectId`.

use axum::extract::{Path, Request, State as AxState};
use axum::response::Response;
use serde_json::json;

use crate::control::base::access::authenticate_admin;
use crate::control::base::access::target_project;
use crate::control::web::AppState;
use crate::control::web::body::ok_json;
use crate::control::web::error::ApiError;

/// `GET /admin/projects/:projectId`.
pub async fn get_project(
    AxState(state): AxState<AppState>,
    Path(project_id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let caller = authenticate_admin(&state, &parts).await?;
    let project = target_project(&caller, &project_id)?;
    let mut p = json!({"id": project.id, "name": project.name});
    for key in ["secret", "site"] {
        if let Some(v) = project.content.get(key) {
            p[key] = v.clone();
        }
    }
    Ok(ok_json(&json!({ "project": p })))
}
