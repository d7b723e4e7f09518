//! `GET /admin/projects/:projectId`.

use axum::response::Response;
use serde_json::json;

use crate::control::base::access::AdminProject;
use crate::control::web::body::ok_json;
use crate::control::web::error::ApiError;

/// `GET /admin/projects/:projectId`.
pub async fn get_project(AdminProject { project, .. }: AdminProject) -> Result<Response, ApiError> {
    let mut p = json!({"id": project.id, "name": project.name});
    for key in ["secret", "site"] {
        if let Some(v) = project.content.get(key) {
            p[key] = v.clone();
        }
    }
    Ok(ok_json(&json!({ "project": p })))
}
