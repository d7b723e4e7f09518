//! Token issuance (docs/medplum-compat.md §3): the access, ID and refresh tokens of a Login, signed
//! with the current key, and the response body of the token endpoint.

use crate::state::{ClientInfo, State};
use crate::store::LoginRecord;
use crate::tokens::Claims;
use fhirgate_core::policy::scope::has_word;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use std::time::Duration;

use crate::control::base::clients::access_token_lifetime;
use crate::control::login::launch::LaunchContext;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::user_id;
use crate::control::web::error::ApiError;

/// ID tokens live one hour, whatever the access token lifetime (docs/medplum-compat.md §3.3).
const ID_TOKEN_LIFETIME: i64 = 3600;

/// Access token lifetime of a user's Login: its client's, or the server default without one.
pub(crate) fn user_access_lifetime(state: &State, client: Option<&ClientInfo>) -> Duration {
    match client {
        Some(c) => access_token_lifetime(state, c),
        None => state.config.access_token_lifetime,
    }
}

/// Everything the token response says about a user's Login.
struct UserFacts {
    email: Option<String>,
    given: String,
    family: String,
}

async fn user_facts(state: &State, login: &LoginRecord) -> Result<UserFacts, ApiError> {
    let user = match user_id(login) {
        Some(id) => state.store.read("User", id).await?.map(|u| u.content),
        None => None,
    };
    let field = |k: &str| {
        user.as_ref()
            .and_then(|u| u.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok(UserFacts {
        email: Some(field("email")).filter(|e| !e.is_empty()),
        given: field("firstName"),
        family: field("lastName"),
    })
}

/// Signs the tokens of a user's Login (authorization code and refresh grants).
pub(crate) async fn issue_user_tokens(
    state: &State,
    login: &LoginRecord,
    profile: &str,
    project_id: &str,
    client: Option<&ClientInfo>,
    refresh: Option<(&str, Duration)>,
    now: i64,
) -> Result<Value, ApiError> {
    let facts = user_facts(state, login).await?;
    let lifetime = user_access_lifetime(state, client);
    let sub = user_id(login).unwrap_or(login.user_ref.as_str());
    let mut context = LaunchContext::of(login);
    // A Patient is always its own context (also for Logins granted before contexts were kept).
    if let Some(own) = profile.strip_prefix("Patient/") {
        context.patient = Some(own.to_string());
    }
    issue_tokens(
        state,
        &Issue {
            login,
            sub,
            profile,
            project_id,
            client_id: login.client_id.as_deref(),
            lifetime,
            refresh,
            email: facts.email.as_deref(),
            names: Some((&facts.given, &facts.family)),
            context: &context,
            id_token_alg: id_token_alg(client, &login.scope),
            now,
        },
    )
}

/// How long a granted Login must stay known: as long as any token it issued can be valid.
pub(crate) fn granted_until(now: i64, access: Duration, refresh: Option<Duration>) -> i64 {
    let longest = access
        .as_secs()
        .max(ID_TOKEN_LIFETIME as u64)
        .max(refresh.map(|r| r.as_secs()).unwrap_or(0));
    now.saturating_add(i64::try_from(longest).unwrap_or(i64::MAX))
}

/// What a grant hands to [`issue_tokens`].
pub(crate) struct Issue<'a> {
    /// The Login, already stored.
    pub login: &'a LoginRecord,
    /// User id, or the client id for client credentials.
    pub sub: &'a str,
    /// `Practitioner/…`, `ClientApplication/…`, …
    pub profile: &'a str,
    pub project_id: &'a str,
    pub client_id: Option<&'a str>,
    pub lifetime: Duration,
    /// The refresh secret (as carried by the token, not its stored hash) and the refresh
    /// token's lifetime, when a refresh token is issued.
    pub refresh: Option<(&'a str, Duration)>,
    /// Put in the ID token when the scope asks for `email`.
    pub email: Option<&'a str>,
    /// `(given, family)`, put in the ID token when the scope asks for `profile`.
    pub names: Option<(&'a str, &'a str)>,
    /// SMART launch context of the token response.
    pub context: &'a LaunchContext,
    /// What the ID token is signed with ([`id_token_alg`]).
    pub id_token_alg: Algorithm,
    pub now: i64,
}

/// The extension by which a ClientApplication chooses its ID tokens' algorithm (`valueCode`
/// `RS256` or `ES256`; OIDC Dynamic Registration calls it `id_token_signed_response_alg`).
pub const ID_TOKEN_ALG_EXTENSION: &str =
    "https://fhirgate.dev/fhir/StructureDefinition/id-token-signed-response-alg";

/// The algorithm of an ID token: the client's choice, else RS256 for a SMART sign-in (SMART
/// App Launch requires RS256 for `sso-openid-connect`) and ES256 for the rest.
pub(crate) fn id_token_alg(client: Option<&ClientInfo>, scope: &str) -> Algorithm {
    let chosen = client
        .and_then(|c| c.content.get("extension"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(ID_TOKEN_ALG_EXTENSION))
        .and_then(|e| e.get("valueCode"))
        .and_then(Value::as_str);
    match chosen {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        _ if is_smart_sign_in(scope) => Algorithm::RS256,
        _ => Algorithm::ES256,
    }
}

/// A sign-in asked for SMART context or resource scopes.
fn is_smart_sign_in(scope: &str) -> bool {
    scope.split_ascii_whitespace().any(|w| {
        w == "fhirUser"
            || w == "launch"
            || w.starts_with("launch/")
            || w.starts_with("patient/")
            || w.starts_with("user/")
    })
}

/// Signs the access token (claims of docs/medplum-compat.md §3.2), the ID token (§3.3) and, when asked
/// for, the refresh token (§3.4); returns the response body of §3.5.
pub(crate) fn issue_tokens(state: &State, i: &Issue<'_>) -> Result<Value, ApiError> {
    let keyring = state.keyring();
    let issuer = state.config.base_url.clone();
    let login = i.login;
    let expires_in = i.lifetime.as_secs() as i64;
    // What the access and the ID token both say.
    let common = Claims {
        iss: issuer.clone(),
        iat: i.now,
        aud: i.client_id.map(str::to_string),
        client_id: i.client_id.map(str::to_string),
        login_id: Some(login.id.clone()),
        sub: Some(i.sub.to_string()),
        ..Default::default()
    };
    let access = Claims {
        exp: i.now.saturating_add(expires_in),
        username: Some(i.sub.to_string()),
        scope: Some(login.scope.clone()),
        profile: Some(i.profile.to_string()),
        patient: i.context.patient.clone(),
        ..common.clone()
    };
    let id_claims = Claims {
        exp: i.now.saturating_add(ID_TOKEN_LIFETIME),
        fhir_user: Some(i.profile.to_string()),
        nonce: LoginFlow::of(login).ask.nonce,
        auth_time: Some(login.auth_time),
        email: if login.scope.contains("email") {
            i.email.map(str::to_string)
        } else {
            None
        },
        ..common
    };
    let mut id_claims = id_claims;
    if has_word(&login.scope, "profile")
        && let Some((given, family)) = i.names
    {
        let full = [given, family]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        id_claims.name = Some(full).filter(|s| !s.is_empty());
        id_claims.given_name = Some(given.to_string()).filter(|s| !s.is_empty());
        id_claims.family_name = Some(family.to_string()).filter(|s| !s.is_empty());
    }
    let sign = |c: &Claims| {
        keyring
            .sign(c)
            .map_err(|e| ApiError::internal("signing a token", e))
    };
    let access_token = sign(&access)?;
    let id_token = match keyring.sign_with(i.id_token_alg, &id_claims) {
        Ok(t) => t,
        // No key of that algorithm yet (a store whose RS256 key another instance is still
        // creating): the ES256 key, which every client can verify through the JWKS.
        Err(crate::tokens::TokenError::NoSigningKey) => sign(&id_claims)?,
        Err(e) => return Err(ApiError::internal("signing a token", e)),
    };
    let mut body = json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": login.scope,
        "id_token": id_token,
        "access_token": access_token,
    });
    if let Some((secret, lifetime)) = i.refresh {
        let refresh = Claims {
            iss: issuer,
            iat: i.now,
            exp: i.now.saturating_add(lifetime.as_secs() as i64),
            aud: i.client_id.map(str::to_string),
            client_id: i.client_id.map(str::to_string),
            login_id: Some(login.id.clone()),
            refresh_secret: Some(secret.to_string()),
            ..Default::default()
        };
        body["refresh_token"] = Value::String(sign(&refresh)?);
    }
    body["project"] = json!({"reference": format!("Project/{}", i.project_id)});
    body["profile"] = json!({"reference": i.profile});
    if let Some(p) = &i.context.patient {
        body["patient"] = Value::String(p.clone());
    }
    if let Some(e) = &i.context.encounter {
        body["encounter"] = Value::String(e.clone());
    }
    if !i.context.fhir_context.is_empty() {
        body["fhirContext"] = Value::Array(i.context.fhir_context.clone());
    }
    body["smart_style_url"] = Value::String(format!(
        "{}fhir/R4/.well-known/smart-styles.json",
        state.config.base_url
    ));
    body["need_patient_banner"] = Value::Bool(i.context.patient.is_some());
    if login
        .scope
        .split_whitespace()
        .any(|w| w.starts_with("fhircast/"))
    {
        // docs/medplum-compat.md §3.5: FHIRcast scopes name the hub and a per-user topic. fhirgate
        // hosts no hub; the URL is where an operator mounts one behind the same base URL. The
        // topic is stable per user and unguessable without the installation's key.
        body["hub.url"] = Value::String(format!("{}fhircast/STU3", state.config.base_url));
        let topic = state.hash_secret(&format!("fhircast-topic:{}", login.user_ref));
        body["hub.topic"] = Value::String(topic.chars().take(32).collect());
    }
    Ok(body)
}
