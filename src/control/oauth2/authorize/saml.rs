//! SAML sign-in from the sign-in page (`login::saml` does the SAML):
//!
//! 1. `step=sso` (the page's "Sign in with <IdP>" button, for a client with an IdP of its own,
//!    or its single sign-on form, by the domain of a work e-mail address): the sign-in is kept
//!    in flight under a fresh AuthRequest id (what the app asked for, the hash of this
//!    browser's CSRF token), and the browser is sent to the IdP with the request;
//! 2. `POST /auth/saml/acs`: the IdP's Response, taken once for the sign-in in flight it
//!    answers, verified, and — when it vouches for a user of the client's project — a Login,
//!    bound to the browser that started the sign-in;
//! 3. `GET /oauth2/authorize?…&step=saml&login=…`: that browser (its CSRF cookie) carries on
//!    with the ordinary steps: MFA, profile, consent, code.
//!
//! `GET /auth/saml/metadata` is the SP's metadata, for the IdP's administrator.

use axum::extract::State as AxState;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::control::base::domains::domain_saml_idp;
use crate::control::base::saml_idp::client_saml_idp;
use crate::control::login::external::ExternalLogin;
use crate::control::login::external::external_login;
use crate::control::login::saml::SpEndpoints;
use crate::control::login::saml::request::{
    authn_request, new_request_id, redirect_url, sp_metadata,
};
use crate::control::login::saml::response::{
    Expected, SamlError, claimed_request, decode, read_identity, signed_parts,
};
use crate::control::login::saml::xmlsec;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::PENDING_LIFETIME;
use crate::control::login::state::get_login;
use crate::control::login::state::is_granted;
use crate::control::login::state::keys;
use crate::control::login::state::set_extra;
use crate::control::oauth2::authorize::render::START_AGAIN;
use crate::control::oauth2::authorize::render::accept_form;
use crate::control::oauth2::authorize::render::continue_page;
use crate::control::oauth2::authorize::render::inline_message;
use crate::control::oauth2::authorize::render::message_page;
use crate::control::oauth2::authorize::render::signin_page;
use crate::control::oauth2::authorize::request::AcsForm;
use crate::control::oauth2::authorize::request::AuthRequest;
use crate::control::oauth2::authorize::request::Params;
use crate::control::oauth2::authorize::request::check_request;
use crate::control::oauth2::authorize::session::csrf_value;
use crate::control::web::AppState;
use crate::control::web::ControlState;
use crate::control::web::body::user_agent;
use crate::control::web::client_addr::client_ip;
use crate::control::web::error::ApiError;
use crate::state::ClientInfo;
use crate::store::{LoginRecord, now_unix};
use crate::tokens::hashes_equal;

/// A SAML sign-in in flight, kept under its AuthRequest's id.
#[derive(Serialize, Deserialize)]
struct InFlight {
    /// The authorization request's parameters, form-encoded.
    params: String,
    /// The keyed hash of the CSRF token of the browser that started it.
    csrf: String,
    /// The e-mail domain whose IdP it went to; `None`: the client's own IdP.
    domain: Option<String>,
}

/// `step=sso`: off to the IdP.
pub(super) async fn start(
    state: &ControlState,
    parts: &Parts,
    p: &Params,
) -> Result<Response, ApiError> {
    let email = p.one("email").unwrap_or_default().trim().to_lowercase();
    let (request, csrf) = match accept_form(state, parts, p, &email).await? {
        Ok(accepted) => accepted,
        Err(answer) => return Ok(answer),
    };
    let refused = async |message: &str| {
        let message = Some(message.to_string());
        signin_page(
            state,
            &request,
            &csrf,
            message,
            &email,
            StatusCode::BAD_REQUEST,
        )
        .await
    };
    let (idp, domain) = if email.is_empty() {
        match client_saml_idp(&request.client) {
            Some(idp) => (idp, None),
            None => return refused("This application has no single sign-on").await,
        }
    } else {
        let domain = email
            .rsplit_once('@')
            .map(|(_, d)| d.to_string())
            .filter(|d| !d.is_empty())
            .unwrap_or_default();
        match domain_saml_idp(state, &domain).await? {
            Some(idp) => (idp, Some(domain)),
            None => return refused("Single sign-on is not set up for this e-mail address").await,
        }
    };
    if !xmlsec::available().await {
        return refused("Single sign-on is not available on this server").await;
    }

    let now = now_unix();
    let request_id = new_request_id();
    let sp = SpEndpoints::of(&state.config.base_url);
    let xml = authn_request(&idp, &sp, &request_id, now);
    let Some(url) = redirect_url(&idp, &xml, &request_id) else {
        return refused("Single sign-on is not available on this server").await;
    };
    let in_flight = InFlight {
        params: carried_params(&request),
        csrf: state.hash_secret(&csrf),
        domain,
    };
    let text = serde_json::to_string(&in_flight)
        .map_err(|e| ApiError::internal("a SAML sign-in's state", e))?;
    state
        .store
        .put_saml_request(&request_id, &text, now + PENDING_LIFETIME, now)
        .await?;
    continue_page(&request, &idp.name, &url)
}

/// The authorization request's parameters as the page's forms carry them.
fn carried_params(request: &AuthRequest) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for h in request.hidden("") {
        if h.name != "step" && h.name != "csrf" {
            out.append_pair(h.name, &h.value);
        }
    }
    out.finish()
}

/// `GET /auth/saml/metadata`.
pub async fn metadata(AxState(state): AxState<AppState>) -> Response {
    let sp = SpEndpoints::of(&state.config.base_url);
    (
        [(header::CONTENT_TYPE, "application/samlmetadata+xml")],
        sp_metadata(&sp),
    )
        .into_response()
}

/// A refused Response: the page says why (in words that echo nothing the Response said), the
/// log says which check refused it.
fn refused(client: Option<&ClientInfo>, e: SamlError) -> Result<Response, ApiError> {
    tracing::warn!(reason = ?e, "SAML response refused");
    let status = match e {
        SamlError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::FORBIDDEN,
    };
    message_page(client, &e.to_string(), status)
}

/// `POST /auth/saml/acs {SAMLResponse, RelayState}`.
pub async fn acs(
    AxState(state): AxState<AppState>,
    parts: Parts,
    AcsForm(p): AcsForm,
) -> Result<Response, ApiError> {
    let xml = match decode(p.one("SAMLResponse").unwrap_or_default()) {
        Ok(x) => x,
        Err(e) => return refused(None, e),
    };
    // The sign-in this claims to answer, taken at once: whatever happens next, no second
    // Response (a replay, or a forgery that guessed the id) can use it again.
    let Some(request_id) = claimed_request(&xml).filter(|id| p.one("RelayState") == Some(id))
    else {
        return refused(None, SamlError::Unsolicited);
    };
    let now = now_unix();
    let Some(text) = state.store.take_saml_request(&request_id, now).await? else {
        return refused(None, SamlError::Unsolicited);
    };
    let in_flight: InFlight =
        serde_json::from_str(&text).map_err(|e| ApiError::internal("a SAML sign-in's state", e))?;
    let request = match check_request(&state, &Params::parse(in_flight.params.as_bytes())).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let client = Some(&request.client);
    let idp = match &in_flight.domain {
        Some(domain) => domain_saml_idp(&state, domain).await?,
        None => client_saml_idp(&request.client),
    };
    let Some(idp) = idp else {
        return message_page(
            client,
            "Single sign-on is no longer set up",
            StatusCode::FORBIDDEN,
        );
    };

    let signed = match signed_parts(&xml) {
        Ok(s) => s,
        Err(e) => return refused(client, e),
    };
    if let Err(e) = xmlsec::verify(&xml, &signed, &idp.certificates).await {
        return refused(client, e);
    }
    let sp = SpEndpoints::of(&state.config.base_url);
    let expected = Expected {
        idp: &idp,
        sp: &sp,
        request_id: &request_id,
        now,
        skew: state.config.saml_clock_skew.as_secs() as i64,
    };
    let identity = match read_identity(&xml, &expected) {
        Ok(i) => i,
        Err(e) => return refused(client, e),
    };
    let seen = state.hash_secret(&format!(
        "saml\0{}\0{}",
        idp.entity_id, identity.assertion_id
    ));
    if !state
        .store
        .claim_assertion(&seen, identity.valid_until, now)
        .await?
    {
        return refused(client, SamlError::Replayed);
    }

    let (email, external_id) = if idp.use_subject {
        (None, Some(identity.name_id.clone()))
    } else {
        let Some(email) = identity.email.clone() else {
            return refused(client, SamlError::NoIdentity);
        };
        (Some(email), None)
    };
    if let Some(domain) = &in_flight.domain
        && !email
            .as_deref()
            .is_some_and(|e| e.ends_with(&format!("@{domain}")))
    {
        return message_page(
            client,
            "Your organization signed you in with an address of another domain",
            StatusCode::FORBIDDEN,
        );
    }
    let external = ExternalLogin {
        auth_method: "saml",
        email,
        external_id,
        project_id: request.client.project_id.clone(),
        client,
        ask: request.ask(),
        remote_address: client_ip(&state, &parts)?,
        user_agent: user_agent(&parts.headers),
        force_first_membership: false,
        membership_id: None,
        bind_redirect_uri: true,
        own_mfa: true,
    };
    let mut login = match external_login(&state, &external).await {
        Ok(l) => l,
        Err(e) => {
            let message = match inline_message(&e) {
                Some(m) if m == "User not found" => {
                    "Your organization signed you in, but no account of this application is yours"
                        .to_string()
                }
                Some(m) => m,
                None => return Err(e),
            };
            return message_page(client, &message, StatusCode::FORBIDDEN);
        }
    };
    tracing::info!(login = %login.id, "SAML sign-in");
    let stored = get_login(&state, &login.id).await?;
    set_extra(
        &mut login,
        keys::AUTHORIZE_STATE,
        Value::String(request.state.clone()),
    );
    set_extra(&mut login, keys::CSRF, Value::String(in_flight.csrf));
    if !state
        .store
        .update_login_extra_cas(&login.id, &stored.extra, &login.extra)
        .await?
    {
        return Err(ApiError::conflict("Login changed; try again"));
    }
    let mut next = url::Url::parse(&state.config.base_url)
        .and_then(|b| b.join("oauth2/authorize"))
        .map_err(|e| ApiError::internal("the sign-in page URL", e))?;
    next.set_query(Some(&in_flight.params));
    next.query_pairs_mut()
        .append_pair("step", "saml")
        .append_pair("login", &login.id);
    Ok((
        StatusCode::SEE_OTHER,
        [(header::LOCATION, next.to_string())],
    )
        .into_response())
}

/// What `step=saml` comes to: the Login to carry on with (and this browser's CSRF token), or
/// the answer.
pub(super) enum SignedIn {
    CarryOn(Box<LoginRecord>, String),
    Answer(Response),
}

/// `GET /oauth2/authorize?…&step=saml&login=…`: the browser that started the sign-in carries on.
pub(super) async fn signed_in(
    state: &ControlState,
    parts: &Parts,
    p: &Params,
) -> Result<SignedIn, ApiError> {
    let request = match check_request(state, p).await {
        Ok(r) => r,
        Err(refusal) => return Ok(SignedIn::Answer(refusal.into_response())),
    };
    let now = now_unix();
    let login = match p.one("login") {
        Some(id) => get_login(state, id).await.ok(),
        None => None,
    };
    let login = login.filter(|l| {
        !l.revoked
            && l.expires_at > now
            && !is_granted(l)
            && l.auth_method == "saml"
            && l.client_id.as_deref() == Some(request.client.id.as_str())
    });
    let csrf = csrf_value(state, parts);
    let bound = match (&login, &csrf) {
        (Some(l), Some(token)) => LoginFlow::of(l)
            .csrf
            .is_some_and(|h| hashes_equal(&h, &state.hash_secret(token))),
        _ => false,
    };
    Ok(match (login, csrf) {
        (Some(login), Some(csrf)) if bound => SignedIn::CarryOn(Box::new(login), csrf),
        _ => SignedIn::Answer(message_page(
            Some(&request.client),
            START_AGAIN,
            StatusCode::FORBIDDEN,
        )?),
    })
}
