//! Per-type validation and normalisation of an identity resource write, before it is stored:
//! who may set what on a client, memberships and their references, policies, domains.

use crate::state::State;
use crate::store::StoredResource;
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::policy::compiled::validate_policy;
use fhirgate_core::policy::model::{AccessPolicy, ProjectMembership};
use serde_json::{Value, json};

use crate::control::base::access::Caller;
use crate::control::base::domains::prepare_domain_configuration;
use crate::control::base::resources::fields::str_field;
use crate::control::base::saml_idp::check_saml_idp;
use crate::control::web::error::ApiError;
use fhirgate_core::fhir::path::is_valid_id;

/// What a write needs done besides storing the resource.
#[derive(Default)]
pub(super) struct SideEffects {
    /// A new primary secret for the client (`None`: keep the current one).
    pub(super) client_secret: Option<String>,
    /// A new retiring secret for the client (`None`: keep the current one).
    pub(super) client_retiring: Option<String>,
}

/// Takes `secret` / `retiringSecret` out of a ClientApplication body.
pub(super) fn take_client_secrets(resource: &mut Value) -> SideEffects {
    let mut fx = SideEffects::default();
    if let Some(obj) = resource.as_object_mut() {
        if let Some(Value::String(s)) = obj.remove("secret") {
            fx.client_secret = Some(s).filter(|s| !s.is_empty());
        }
        if let Some(Value::String(s)) = obj.remove("retiringSecret") {
            fx.client_retiring = Some(s).filter(|s| !s.is_empty());
        }
    }
    fx
}

/// An update that omits `identityProvider.clientSecret` (it never saw it) keeps the stored one.
pub(super) fn keep_idp_secret(new: &mut Value, old: &Value) {
    let Some(secret) = old
        .get("identityProvider")
        .and_then(|i| i.get("clientSecret"))
        .cloned()
    else {
        return;
    };
    if let Some(idp) = new
        .get_mut("identityProvider")
        .and_then(Value::as_object_mut)
        && !idp.contains_key("clientSecret")
    {
        idp.insert("clientSecret".into(), secret);
    }
}

/// The fields of a ClientApplication that decide how it authenticates and where its codes and
/// tokens go (docs/contract.md §2): only a project admin sets or changes them.
const CLIENT_CREDENTIAL_FIELDS: [&str; 9] = [
    "jwksUri",
    "jwks",
    "identityProvider",
    "redirectUri",
    "redirectUris",
    "accessTokenLifetime",
    "refreshTokenLifetime",
    "pkceOptional",
    "launchUri",
];

/// Refuses a ClientApplication write that would take the client over: a non-admin setting or
/// changing a credential-bearing field, or anyone changing a secret other than through
/// `$rotate-secret` (a secret may be given only when the client is created, by an admin).
pub(super) fn check_client_write(
    caller: &Caller,
    new: &Value,
    existing: Option<&Value>,
    fx: &SideEffects,
) -> Result<(), ApiError> {
    let secret_given = fx.client_secret.is_some() || fx.client_retiring.is_some();
    if existing.is_some() && secret_given {
        return Err(ApiError::invalid(
            "ClientApplication.secret",
            "Secrets change only through $rotate-secret",
        ));
    }
    if caller.is_admin() {
        return Ok(());
    }
    if secret_given {
        return Err(ApiError::forbidden());
    }
    let changed = |field: &str| {
        let was = existing.and_then(|e| e.get(field));
        let now = new.get(field);
        match field {
            // The stored secret is never shown, so an update leaves it out: compare without it.
            "identityProvider" => {
                let strip = |v: Option<&Value>| {
                    v.cloned().map(|mut v| {
                        if let Some(o) = v.as_object_mut() {
                            o.remove("clientSecret");
                        }
                        v
                    })
                };
                strip(was) != strip(now) || now.and_then(|i| i.get("clientSecret")).is_some()
            }
            _ => was != now,
        }
    };
    if CLIENT_CREDENTIAL_FIELDS.iter().any(|f| changed(f)) {
        return Err(ApiError::forbidden());
    }
    Ok(())
}

fn reference_id<'a>(v: &'a Value, field: &str, expected_type: &str) -> Option<&'a str> {
    let r = v.get(field)?.get("reference")?.as_str()?;
    let (ty, id) = r.split_once('/')?;
    (ty == expected_type && is_valid_id(id)).then_some(id)
}

/// Validation and normalisation per type; returns the project the resource belongs to.
pub(super) async fn prepare(
    state: &State,
    caller: &Caller,
    resource: &mut Value,
    existing: Option<&StoredResource>,
) -> Result<Option<String>, ApiError> {
    let resource_type = str_field(resource, "resourceType")
        .unwrap_or_default()
        .to_string();
    let requested_project = resource
        .get("meta")
        .and_then(|m| m.get("project"))
        .and_then(Value::as_str)
        .map(str::to_string);
    // The project a new resource goes to: the caller's, or for super admins an explicit one.
    let default_project = || -> Result<String, ApiError> {
        match requested_project.as_deref() {
            Some(p) if caller.super_admin() && p != caller.project_id() => {
                if caller.snap.projects.contains_key(p) {
                    Ok(p.to_string())
                } else {
                    Err(ApiError::bad_request("Invalid project"))
                }
            }
            _ => Ok(caller.project_id().to_string()),
        }
    };
    match resource_type.as_str() {
        "Project" => {
            if existing.is_none() && !caller.super_admin() {
                return Err(ApiError::forbidden());
            }
            if !caller.super_admin() {
                if let Some(obj) = resource.as_object_mut() {
                    obj.remove("superAdmin");
                }
                if let (Some(old), Some(obj)) = (existing, resource.as_object_mut())
                    && let Some(v) = old.content.get("superAdmin")
                {
                    obj.insert("superAdmin".into(), v.clone());
                }
            }
            if let Some(owner) = resource.get("owner")
                && owner
                    .get("reference")
                    .and_then(Value::as_str)
                    .is_none_or(|r| !r.starts_with("User/"))
            {
                return Err(ApiError::invalid(
                    "Project.owner",
                    "Project owner must be a User",
                ));
            }
            // A Project belongs to itself.
            Ok(Some(
                str_field(resource, "id").unwrap_or_default().to_string(),
            ))
        }
        "ProjectMembership" => {
            let project = match existing {
                Some(old) => old
                    .project_id
                    .clone()
                    .unwrap_or_else(|| caller.project_id().to_string()),
                None if caller.super_admin() => {
                    match reference_id(resource, "project", "Project") {
                        Some(p) if caller.snap.projects.contains_key(p) => p.to_string(),
                        Some(_) => {
                            return Err(ApiError::invalid(
                                "ProjectMembership.project",
                                "Invalid project",
                            ));
                        }
                        None => default_project()?,
                    }
                }
                None => caller.project_id().to_string(),
            };
            if let Some(obj) = resource.as_object_mut() {
                obj.insert(
                    "project".into(),
                    json!({"reference": format!("Project/{project}")}),
                );
                if let Some(old) = existing
                    && let Some(user) = old.content.get("user")
                {
                    obj.insert("user".into(), user.clone());
                }
            }
            validate_membership(state, resource, &project, existing.map(|e| e.id.as_str())).await?;
            Ok(Some(project))
        }
        "User" => {
            if let Some(obj) = resource.as_object_mut() {
                obj.remove("passwordHash");
                obj.remove("mfaSecret");
                if let Some(old) = existing {
                    for key in ["passwordHash", "mfaSecret"] {
                        if let Some(v) = old.content.get(key) {
                            obj.insert(key.into(), v.clone());
                        }
                    }
                }
                if let Some(Value::String(email)) = obj.get("email") {
                    let lower = email.trim().to_lowercase();
                    obj.insert("email".into(), Value::String(lower));
                }
            }
            let project = match existing {
                Some(old) => old.project_id.clone(),
                None if caller.super_admin() => {
                    match reference_id(resource, "project", "Project") {
                        Some(p) if caller.snap.projects.contains_key(p) => Some(p.to_string()),
                        Some(_) => {
                            return Err(ApiError::invalid("User.project", "Invalid project"));
                        }
                        None => None,
                    }
                }
                None => Some(caller.project_id().to_string()),
            };
            if let Some(obj) = resource.as_object_mut() {
                match &project {
                    Some(p) => obj.insert(
                        "project".into(),
                        json!({"reference": format!("Project/{p}")}),
                    ),
                    None => obj.remove("project"),
                };
            }
            if let Some(email) = str_field(resource, "email") {
                let project_filter = project
                    .as_ref()
                    .map(|p| ("project".to_string(), vec![format!("Project/{p}")]));
                let mut filters = vec![("email".to_string(), vec![email.to_string()])];
                filters.extend(project_filter);
                let same = state
                    .store
                    .search("User", &filters, project.as_deref(), 10)
                    .await?;
                let id = str_field(resource, "id").unwrap_or_default();
                if same.iter().any(|u| u.id != id && u.project_id == project) {
                    return Err(ApiError::conflict("Email already registered"));
                }
            }
            Ok(project)
        }
        "ClientApplication" => {
            if let Some(status) = resource.get("status")
                && !matches!(status.as_str(), Some("active" | "off" | "error"))
            {
                return Err(ApiError::invalid(
                    "ClientApplication.status",
                    "Invalid status",
                ));
            }
            if let Some(jwks) = resource.get("jwks") {
                check_client_jwks(jwks)?;
            }
            check_saml_idp(resource, "ClientApplication.identityProvider.saml")?;
            for field in ["accessTokenLifetime", "refreshTokenLifetime"] {
                if let Some(v) = resource.get(field)
                    && v.as_str().and_then(crate::config::parse_lifetime).is_none()
                {
                    return Err(ApiError::invalid(
                        &format!("ClientApplication.{field}"),
                        "Constraint clapp-1 not met: Token lifetime must be a valid string representing time duration (eg. 2w, 1h)",
                    ));
                }
            }
            match existing {
                Some(old) => Ok(old.project_id.clone()),
                None => default_project().map(Some),
            }
        }
        "AccessPolicy" => {
            let policy: AccessPolicy = serde_json::from_value(resource.clone())
                .map_err(|e| ApiError::bad_request(format!("Invalid AccessPolicy: {e}")))?;
            if let Err(errors) = validate_policy(&policy) {
                let text = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                // Well-formed but not enforceable as written: refused, never saved to fail later.
                return Err(ApiError::Outcome(Outcome::Unprocessable(format!(
                    "Invalid AccessPolicy: {text}"
                ))));
            }
            match existing {
                Some(old) => Ok(old.project_id.clone()),
                None => default_project().map(Some),
            }
        }
        "SmartAppLaunch" => {
            check_launch_context(resource)?;
            match existing {
                Some(old) => Ok(old.project_id.clone()),
                None => default_project().map(Some),
            }
        }
        // Protected: only super admins get here (the type check refuses everyone else).
        "DomainConfiguration" => prepare_domain_configuration(state, resource, existing).await,
        _ => Err(ApiError::not_found()),
    }
}

/// A SmartAppLaunch names its context by reference: `patient` a Patient, `encounter` an
/// Encounter, each `fhirContext[]` entry any resource (SMART 2.2 `fhirContext`).
fn check_launch_context(resource: &Value) -> Result<(), ApiError> {
    let well_formed = |r: &str, ty: Option<&str>| {
        r.split_once('/').is_some_and(|(t, id)| {
            ty.is_none_or(|want| t == want)
                && fhirgate_core::fhir::types::is_resource_type(t)
                && is_valid_id(id)
        })
    };
    for (field, ty) in [("patient", "Patient"), ("encounter", "Encounter")] {
        if let Some(v) = resource.get(field) {
            let ok = v
                .get("reference")
                .and_then(Value::as_str)
                .is_some_and(|r| well_formed(r, Some(ty)));
            if !ok {
                return Err(ApiError::invalid(
                    &format!("SmartAppLaunch.{field}"),
                    format!("Expected a reference to a {ty}"),
                ));
            }
        }
    }
    if let Some(v) = resource.get("fhirContext") {
        let ok = v.as_array().is_some_and(|items| {
            items.iter().all(|i| {
                i.get("reference")
                    .and_then(Value::as_str)
                    .is_some_and(|r| well_formed(r, None))
            })
        });
        if !ok {
            return Err(ApiError::invalid(
                "SmartAppLaunch.fhirContext",
                "Expected references",
            ));
        }
    }
    Ok(())
}

/// An inline JWK Set (SMART 2.2 `jwks`) must be a set of public asymmetric keys: a symmetric key
/// would turn the assertion check into a shared secret stored in clear, and a private key has no
/// business in a resource anyone with read access sees.
fn check_client_jwks(jwks: &Value) -> Result<(), ApiError> {
    let bad = |text: &str| ApiError::invalid("ClientApplication.jwks", text);
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(jwks.clone()).map_err(|_| bad("Invalid JWK Set"))?;
    if set.keys.is_empty() {
        return Err(bad("Invalid JWK Set"));
    }
    let raw_keys = jwks.get("keys").and_then(Value::as_array);
    let private = raw_keys.into_iter().flatten().any(|k| {
        ["d", "p", "q", "dp", "dq", "qi", "k"]
            .iter()
            .any(|f| k.get(*f).is_some())
    });
    let symmetric = set.keys.iter().any(|k| {
        matches!(
            k.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        )
    });
    if private || symmetric {
        return Err(bad("A JWK Set may hold only public asymmetric keys"));
    }
    Ok(())
}

/// A membership must deserialize into the model, name a user of an allowed type that belongs to
/// its project, reference only policies of its project, and keep per-project uniqueness.
async fn validate_membership(
    state: &State,
    resource: &Value,
    project: &str,
    own_id: Option<&str>,
) -> Result<(), ApiError> {
    let m: ProjectMembership = serde_json::from_value(resource.clone())
        .map_err(|e| ApiError::bad_request(format!("Invalid ProjectMembership: {e}")))?;
    let (user_type, user_id) = m
        .user
        .type_and_id()
        .ok_or_else(|| ApiError::invalid("ProjectMembership.user", "Invalid user reference"))?;
    let (profile_type, _) = m.profile.type_and_id().ok_or_else(|| {
        ApiError::invalid("ProjectMembership.profile", "Invalid profile reference")
    })?;
    match user_type {
        "ClientApplication" | "Bot" => {
            if m.profile.reference != m.user.reference {
                return Err(ApiError::invalid(
                    "ProjectMembership.profile",
                    "Profile must equal user for a ClientApplication or Bot",
                ));
            }
            if user_type == "ClientApplication" {
                let client = state.store.read("ClientApplication", user_id).await?;
                if client.is_none_or(|c| c.project_id.as_deref() != Some(project)) {
                    return Err(ApiError::invalid(
                        "ProjectMembership.user",
                        "ClientApplication does not belong to project",
                    ));
                }
            }
        }
        "User" => {
            let user = state.store.read("User", user_id).await?;
            match user {
                Some(u) if u.project_id.is_none() || u.project_id.as_deref() == Some(project) => {}
                _ => {
                    return Err(ApiError::invalid(
                        "ProjectMembership.user",
                        "User not found",
                    ));
                }
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "ProjectMembership.user",
                "Invalid user reference",
            ));
        }
    }
    if !matches!(
        profile_type,
        "Patient" | "Practitioner" | "RelatedPerson" | "ClientApplication" | "Bot"
    ) {
        return Err(ApiError::invalid(
            "ProjectMembership.profile",
            "Invalid profile reference",
        ));
    }
    let mut policies: Vec<&fhirgate_core::policy::model::Reference> =
        m.access_policy.iter().collect();
    policies.extend(m.access.iter().map(|a| &a.policy));
    for p in policies {
        let Some(("AccessPolicy", id)) = p.type_and_id() else {
            return Err(ApiError::invalid(
                "ProjectMembership.access",
                "Invalid access policy reference",
            ));
        };
        // Only the membership's own project's policies: the snapshot resolves references
        // within the project, so any other could never take effect (and must not).
        let found = state.store.read("AccessPolicy", id).await?;
        let ok = found.is_some_and(|f| f.project_id.as_deref() == Some(project));
        if !ok {
            return Err(ApiError::invalid(
                "ProjectMembership.access",
                "Access policy not found",
            ));
        }
    }
    let project_ref = format!("Project/{project}");
    let mut unique: Vec<(&str, String)> = Vec::new();
    if let Some(e) = &m.external_id {
        unique.push(("external-id", e.clone()));
    }
    if let Some(u) = &m.user_name {
        unique.push(("user-name", u.clone()));
    }
    // A client or bot has exactly one membership per project: its credentials resolve to it.
    if matches!(user_type, "ClientApplication" | "Bot") {
        unique.push(("profile", m.profile_ref().unwrap_or_default().to_string()));
    }
    for (name, value) in unique {
        let filters = vec![
            ("project".to_string(), vec![project_ref.clone()]),
            (name.to_string(), vec![value.clone()]),
        ];
        let dupes = state
            .store
            .search("ProjectMembership", &filters, Some(project), 2)
            .await?;
        if dupes.iter().any(|d| Some(d.id.as_str()) != own_id) {
            return Err(ApiError::conflict(format!(
                "Key (project, {name})=({project}, {value}) already exists."
            )));
        }
    }
    Ok(())
}

/// A reference to an AccessPolicy usable in `project`: one of its own.
pub(crate) async fn check_policy_reference(
    state: &State,
    project: &str,
    reference: &Value,
) -> Result<Value, ApiError> {
    let bad = || ApiError::invalid("accessPolicy", "Invalid access policy");
    let r = reference
        .get("reference")
        .and_then(Value::as_str)
        .ok_or_else(bad)?;
    let id = r
        .strip_prefix("AccessPolicy/")
        .filter(|id| is_valid_id(id))
        .ok_or_else(bad)?;
    let policy = state
        .store
        .read("AccessPolicy", id)
        .await?
        .ok_or_else(bad)?;
    if policy.project_id.as_deref() != Some(project) {
        return Err(bad());
    }
    Ok(json!({"reference": r}))
}

/// Fields the control API sets or checks itself on create, which policy readonlyFields (made for
/// updates) must not strip.
pub(super) fn create_managed_fields(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "ProjectMembership" => &["project", "user"],
        "User" => &["email", "project"],
        _ => &[],
    }
}
