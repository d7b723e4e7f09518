//! `GET /auth/me` (docs/medplum-compat.md §2.6): who the caller is, in the shape `MedplumClient`
//! reads after every token response — project, membership, profile, user configuration and
//! the effective AccessPolicy.

use crate::state::State;
use axum::extract::State as AxState;
use axum::response::Response;
use fhirgate_core::policy::model::ProjectMembership;
use serde_json::{Map, Value, json};

use crate::control::base::access::Caller;
use crate::control::base::upstream::profile_resource;
use crate::control::base::users::read_user;
use crate::control::login::state::LoginFlow;
use crate::control::web::AppState;
use crate::control::web::body::ok_json;
use crate::control::web::error::ApiError;

/// Sessions listed in `security.sessions` are the Logins of the last hour.
const SESSION_WINDOW: i64 = 3600;

fn pick(source: &Value, keys: &[&str], resource_type: &str) -> Value {
    let mut out = Map::new();
    out.insert("resourceType".into(), Value::String(resource_type.into()));
    for k in keys {
        if let Some(v) = source.get(*k) {
            out.insert((*k).to_string(), v.clone());
        }
    }
    Value::Object(out)
}

pub async fn me(AxState(state): AxState<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let membership = serde_json::to_value(caller.membership.as_ref())
        .map_err(|e| ApiError::internal("serializing a membership", e))?;
    let mut body = Map::new();
    let user = read_user(&state, &caller.identity.user_ref)
        .await?
        .map(|u| u.content);
    if let Some(u) = &user {
        body.insert(
            "user".into(),
            pick(u, &["id", "email", "identifier"], "User"),
        );
    }
    body.insert(
        "project".into(),
        pick(
            &caller.project.content,
            &["id", "name", "description", "strictMode", "superAdmin"],
            "Project",
        ),
    );
    body.insert(
        "membership".into(),
        pick(
            &membership,
            &["id", "identifier", "user", "profile", "admin"],
            "ProjectMembership",
        ),
    );
    body.insert("profile".into(), profile_resource(&state, &caller).await);
    body.insert("config".into(), user_configuration(&caller));
    let policy = serde_json::to_value(caller.policy.access_policy())
        .map_err(|e| ApiError::internal("serializing a policy", e))?;
    body.insert("accessPolicy".into(), policy);
    if let Some(u) = &user {
        body.insert("security".into(), security(&state, &caller, u).await?);
    }
    Ok(ok_json(&Value::Object(body)))
}

/// The synthetic UserConfiguration Medplum builds when the membership has none.
fn user_configuration(caller: &Caller) -> Value {
    let link = |name: &str, target: &str| json!({"name": name, "target": target});
    let mut menu = vec![json!({
        "title": "Favorites",
        "link": [
            link("Patients", "/Patient"),
            link("Practitioners", "/Practitioner"),
            link("Organizations", "/Organization"),
            link("Orders", "/ServiceRequest"),
            link("Diagnostic Reports", "/DiagnosticReport"),
            link("Questionnaires", "/Questionnaire"),
        ]
    })];
    if caller.is_admin() {
        let mut admin = vec![
            link("Project", "/admin/project"),
            link("AccessPolicy", "/AccessPolicy"),
            link("Subscriptions", "/Subscription"),
            link("Batch", "/batch"),
        ];
        if !caller.super_admin() {
            admin.push(link("Config", "/admin/config"));
        }
        menu.push(json!({"title": "Admin", "link": admin}));
    }
    if caller.super_admin() {
        menu.push(json!({"title": "Super Admin", "link": [link("Super Admin", "/admin/super")]}));
    }
    json!({"resourceType": "UserConfiguration", "menu": menu})
}

/// `security` for Users: MFA state, recent sessions and active memberships.
async fn security(state: &State, caller: &Caller, user: &Value) -> Result<Value, ApiError> {
    let user_ref = caller.identity.user_ref.as_str();
    let since = crate::store::now_unix() - SESSION_WINDOW;
    let sessions: Vec<Value> = state
        .store
        .logins_for_user(user_ref, since)
        .await?
        .into_iter()
        .filter(|l| l.membership_id.is_some() && !l.revoked)
        .map(|l| {
            let flow = LoginFlow::of(&l);
            let mut s = json!({"id": l.id, "lastUpdated": crate::store::unix_rfc3339(l.auth_time), "authMethod": l.auth_method});
            if let Some(ip) = l.remote_address {
                s["remoteAddress"] = Value::String(ip);
            }
            if let Some(ua) = flow.user_agent {
                let (browser, os) = browser_and_os(&ua);
                if let Some(b) = browser {
                    s["browser"] = Value::String(b.into());
                }
                if let Some(o) = os {
                    s["os"] = Value::String(o.into());
                }
            }
            s
        })
        .collect();
    let mine = state
        .store
        .search(
            "ProjectMembership",
            &[("user".to_string(), vec![user_ref.to_string()])],
            None,
            1000,
        )
        .await?;
    let mine: Vec<(String, ProjectMembership)> = mine
        .into_iter()
        .filter_map(|r| Some((r.id, serde_json::from_value(r.content).ok()?)))
        .collect();
    let mut memberships: Vec<(&String, Value)> = mine
        .iter()
        .filter(|(_, m)| m.user.reference.as_deref() == Some(user_ref) && m.is_active())
        .map(|(id, m)| {
            let mut v =
                json!({"resourceType": "ProjectMembership", "id": id, "profile": m.profile});
            if let Some(i) = m.extra.get("identifier") {
                v["identifier"] = i.clone();
            }
            if let Some(a) = m.admin {
                v["admin"] = Value::Bool(a);
            }
            (id, v)
        })
        .collect();
    memberships.sort_by(|a, b| a.0.cmp(b.0));
    Ok(json!({
        "mfaEnrolled": user.get("mfaEnrolled").and_then(Value::as_bool).unwrap_or(false),
        "sessions": sessions,
        "memberships": memberships.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    }))
}

/// Browser and operating system names from a User-Agent, for the session list. Only the family
/// names: enough for a person to recognise a session.
fn browser_and_os(ua: &str) -> (Option<&'static str>, Option<&'static str>) {
    // The first name whose marker the user agent contains.
    let first = |table: &[(&str, &'static str)]| {
        table
            .iter()
            .find(|(needle, _)| ua.contains(needle))
            .map(|(_, name)| *name)
    };
    let browser = first(&[
        ("Edg/", "Edge"),
        ("OPR/", "Opera"),
        ("Firefox/", "Firefox"),
        ("Chrome/", "Chrome"),
        ("Chromium/", "Chromium"),
        ("Safari/", "Safari"),
        ("curl/", "curl"),
        ("node", "Node.js"),
    ]);
    let os = first(&[
        ("Windows", "Windows"),
        ("iPhone", "iOS"),
        ("iPad", "iOS"),
        ("Android", "Android"),
        ("Mac OS X", "Mac OS"),
        ("CrOS", "Chrome OS"),
        ("Linux", "Linux"),
    ]);
    (browser, os)
}
