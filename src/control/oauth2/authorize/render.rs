//! The pages of the sign-in flow: sign-in, MFA, enrolment, profile choice, consent and
//! messages, rendered with `web::pages`.

use crate::control::base::domains::any_saml_domain;
use crate::control::base::saml_idp::client_saml_idp;
use crate::control::login::flow::login_memberships;
use crate::control::login::mfa::allowed_methods;
use crate::control::login::mfa::enroll_details;
use crate::control::login::mfa::ensure_secret;
use crate::control::login::mfa::read_user;
use crate::control::login::mfa::send_preferred_if_due;
use crate::control::login::mfa::usable_methods;
use crate::control::login::otp;
use crate::control::login::otp::Channel;
use crate::control::login::otp::Pending;
use crate::control::login::otp::mask_email;
use crate::control::login::otp::mask_phone;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::mfa_satisfied;
use crate::control::oauth2::authorize::request::AuthRequest;
use crate::control::oauth2::authorize::request::Params;
use crate::control::oauth2::authorize::request::check_request;
use crate::control::oauth2::authorize::request::client_name;
use crate::control::oauth2::authorize::request::login_client;
use crate::control::oauth2::authorize::session::csrf_cookie;
use crate::control::oauth2::authorize::session::csrf_matches;
use crate::control::web::error::ApiError;
use crate::control::web::pages;
use crate::control::web::pages::Choice;
use crate::control::web::pages::Frame;
use crate::control::web::pages::Hidden;
use crate::state::{ClientInfo, State};
use crate::store::{LoginRecord, now_unix};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use fhirgate_core::fhir::outcome::Outcome;
use fhirgate_core::policy::scope::{ScopeContext, SmartScope};
use serde::Serialize;
use serde_json::Value;

/// Where the page's forms post: relative, so `/api/oauth2/authorize` posts to itself too.
const ACTION: &str = "authorize";

pub(super) const TOO_MANY: &str = "Too many attempts. Wait a few minutes, then try again.";

pub(super) const START_AGAIN: &str =
    "This sign-in is no longer valid. Go back to the application and sign in again.";

/// What the user sees for an error of the Login functions; `None` for errors that are ours.
pub(super) fn inline_message(e: &ApiError) -> Option<String> {
    match e {
        ApiError::Outcome(Outcome::BadRequest(text)) => Some(text.clone()),
        ApiError::Outcome(Outcome::Conflict(text)) => Some(text.clone()),
        ApiError::Outcome(Outcome::TooManyRequests) => Some(TOO_MANY.to_string()),
        ApiError::Outcome(Outcome::NotFound) => Some("Not found".to_string()),
        ApiError::Invalid { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// What the code step says: where a code was sent (and sends the preferred method's, once), and
/// the other methods to get a code from.
#[derive(Serialize)]
struct CodeView {
    /// "by e-mail to d…@clinic.example", "by text message to ••• ••• ••99"; `None`: an
    /// authenticator app's code.
    sent: Option<String>,
    /// The methods a new code can be sent to: `(channel, label)`.
    resend: Vec<Choice>,
    /// The user has an authenticator app too: its codes are taken as well.
    totp: bool,
}

async fn code_view(state: &State, login: &LoginRecord) -> Result<CodeView, ApiError> {
    let Some(user) = read_user(state, &login.user_ref).await? else {
        return Ok(CodeView {
            sent: None,
            resend: Vec::new(),
            totp: false,
        });
    };
    // A method being enrolled is the only one; otherwise the usable ones, whose preferred code
    // goes out on its own.
    let pending = Pending::of(login);
    let mut login = login.clone();
    let methods = match &pending {
        Some(p) => vec![p.channel.as_str().to_string()],
        None => {
            let methods = usable_methods(state, &login, &user).await?;
            if let Some(updated) = send_preferred_if_due(state, &login, &user, &methods).await {
                login = updated;
            }
            methods
        }
    };
    let describe = |channel: Channel| {
        let to = match &pending {
            Some(p) => user.pending_address(p),
            None => user.address(channel),
        }
        .unwrap_or_default();
        match channel {
            Channel::Email => format!("by e-mail to {}", mask_email(to)),
            Channel::Sms => format!("by text message to {}", mask_phone(to)),
        }
    };
    let sent = otp::outstanding(&login, now_unix()).map(describe);
    let resend = methods
        .iter()
        .filter_map(|m| Channel::parse(m))
        .map(|channel| Choice {
            id: channel.as_str().to_string(),
            label: match channel {
                Channel::Email => "Send a new code by e-mail".to_string(),
                Channel::Sms => "Send a new code by text message".to_string(),
            },
            detail: String::new(),
        })
        .collect();
    let totp = methods.iter().any(|m| m == "totp");
    Ok(CodeView { sent, resend, totp })
}

/// The page a Login that is not ready needs next.
pub(super) async fn render_step(
    state: &State,
    login: &LoginRecord,
    csrf: &str,
    error: Option<String>,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let client = login_client(state, login).await;
    let flow = LoginFlow::of(login);
    let redirect_uri = flow.ask.redirect_uri.as_deref();
    let frame = |title: &'static str, step: &'static str| Frame {
        title,
        client_name: client.as_ref().and_then(client_name),
        error: error.clone(),
        action: ACTION,
        hidden: vec![
            Hidden::new("step", step),
            Hidden::new("login", login.id.clone()),
            Hidden::new("csrf", csrf),
        ],
    };
    let csp = pages::content_security_policy(redirect_uri);
    let respond = |html: String| Ok(pages::html_response(status, html, &csp, &[]));
    let enrolling = flow.mfa_enroll_required;
    if !flow.mfa_verified && enrolling && Pending::of(login).is_none() {
        let user = read_user(state, &login.user_ref)
            .await?
            .ok_or_else(|| ApiError::bad_request("User not found"))?;
        let user = ensure_secret(state, user).await?;
        let secret = user.secret().unwrap_or_default().to_string();
        let (_, qr) = enroll_details(user.email(), &secret)?;
        let allowed = allowed_methods(state, login.project_id.as_deref());
        #[derive(Serialize)]
        struct Enroll {
            qr: String,
            secret: String,
            email: bool,
            sms: bool,
        }
        return respond(pages::render(
            "enroll.html",
            &frame("Set up two-step verification", "enroll"),
            &Enroll {
                qr,
                secret,
                email: allowed.iter().any(|m| m == "email"),
                sms: allowed.iter().any(|m| m == "sms"),
            },
        )?);
    }
    if !mfa_satisfied(login) {
        let view = code_view(state, login).await?;
        return respond(pages::render(
            "mfa.html",
            &frame("Two-step verification", "mfa"),
            &view,
        )?);
    }
    if login.membership_id.is_none() {
        let memberships = login_memberships(state, login).await?;
        let snap = state.snapshot();
        #[derive(Serialize)]
        struct Profiles {
            profiles: Vec<Choice>,
        }
        let profiles = memberships
            .iter()
            .filter(|(_, m)| m.is_active())
            .map(|(id, m)| {
                let reference = m.profile_ref().unwrap_or_default().to_string();
                let project = m
                    .project
                    .type_and_id()
                    .and_then(|(_, pid)| snap.projects.get(pid))
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                Choice {
                    id: id.clone(),
                    label: m
                        .profile
                        .display
                        .clone()
                        .unwrap_or_else(|| reference.clone()),
                    detail: if project.is_empty() {
                        reference
                    } else {
                        format!("{reference} · {project}")
                    },
                }
            })
            .collect::<Vec<_>>();
        if profiles.is_empty() {
            return message_page(
                client.as_ref(),
                "Profile not active",
                StatusCode::BAD_REQUEST,
            );
        }
        return respond(pages::render(
            "profile.html",
            &frame("Choose a profile", "profile"),
            &Profiles { profiles },
        )?);
    }
    consent_page(
        state,
        client.as_ref(),
        &login.scope,
        redirect_uri.unwrap_or_default(),
        vec![
            Hidden::new("step", "consent"),
            Hidden::new("login", login.id.clone()),
            Hidden::new("csrf", csrf),
        ],
        csrf,
        error,
        status,
    )
}

/// The consent page of a signed-in person, whose answer comes back as the `resume` step.
pub(super) fn resume_consent_page(
    state: &State,
    request: &AuthRequest,
    csrf: &str,
    error: Option<String>,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let mut hidden = request.hidden(csrf);
    hidden[0] = Hidden::new("step", "resume");
    consent_page(
        state,
        Some(&request.client),
        &request.scope,
        &request.redirect_uri,
        hidden,
        csrf,
        error,
        status,
    )
}

#[allow(clippy::too_many_arguments)]
fn consent_page(
    state: &State,
    client: Option<&ClientInfo>,
    scope: &str,
    redirect_uri: &str,
    hidden: Vec<Hidden>,
    csrf: &str,
    error: Option<String>,
    status: StatusCode,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct ScopeItem {
        value: String,
        label: String,
    }
    #[derive(Serialize)]
    struct Consent {
        scopes: Vec<ScopeItem>,
    }
    let mut scopes: Vec<ScopeItem> = Vec::new();
    for word in scope.split_ascii_whitespace() {
        if scopes.iter().any(|s| s.value == word) {
            continue;
        }
        scopes.push(ScopeItem {
            value: word.to_string(),
            label: describe_scope(word),
        });
    }
    let frame = Frame {
        title: "Allow access",
        client_name: client.and_then(client_name),
        error,
        action: ACTION,
        hidden,
    };
    let html = pages::render("consent.html", &frame, &Consent { scopes })?;
    let csp = pages::content_security_policy(Some(redirect_uri));
    Ok(pages::html_response(
        status,
        html,
        &csp,
        &[csrf_cookie(state, csrf)],
    ))
}

/// A post of one of the sign-in page's own forms (password, Google, single sign-on): the
/// authorization request it carries and this browser's CSRF token; or the answer instead — the
/// refusal of a bad request, or the page again (403, a fresh token, `email` kept) when the
/// form's token is not this browser's.
pub(super) async fn accept_form(
    state: &State,
    parts: &Parts,
    p: &Params,
    email: &str,
) -> Result<Result<(AuthRequest, String), Response>, ApiError> {
    let request = match check_request(state, p).await {
        Ok(r) => r,
        Err(refusal) => return Ok(Err(refusal.into_response())),
    };
    match csrf_matches(state, parts, p) {
        Some(csrf) => Ok(Ok((request, csrf))),
        None => {
            let message = Some("This form has expired. Please sign in again.".to_string());
            let fresh = crate::tokens::random_hex(32);
            let page = signin_page(
                state,
                &request,
                &fresh,
                message,
                email,
                StatusCode::FORBIDDEN,
            )
            .await?;
            Ok(Err(page))
        }
    }
}

pub(super) async fn signin_page(
    state: &State,
    request: &AuthRequest,
    csrf: &str,
    error: Option<String>,
    email: &str,
    status: StatusCode,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct SignIn {
        email: String,
        welcome: Option<String>,
        /// "Sign in with Google", when the server has a Google client id.
        google_client_id: Option<String>,
        google_hidden: Vec<Hidden>,
        /// "Sign in with <IdP>", when the client has a SAML IdP of its own.
        sso_idp_name: Option<String>,
        /// The single sign-on form, when some e-mail domain signs in through SAML.
        sso_by_email: bool,
        sso_hidden: Vec<Hidden>,
    }
    let frame = Frame {
        title: "Sign in",
        client_name: client_name(&request.client),
        error,
        action: ACTION,
        hidden: request.hidden(csrf),
    };
    let email = if email.is_empty() {
        request.login_hint.clone().unwrap_or_default()
    } else {
        email.to_string()
    };
    let welcome = request
        .client
        .content
        .pointer("/signInForm/welcomeString")
        .and_then(Value::as_str)
        .map(str::to_string);
    let google_client_id = state.config.google.client_ids.first().cloned();
    let mut google_hidden = request.hidden(csrf);
    google_hidden[0] = Hidden::new("step", "google");
    let csp = pages::content_security_policy(Some(&request.redirect_uri));
    let csp = if google_client_id.is_some() {
        pages::with_google_sign_in(&csp)
    } else {
        csp
    };
    let mut sso_hidden = request.hidden(csrf);
    sso_hidden[0] = Hidden::new("step", "sso");
    let page = SignIn {
        email,
        welcome,
        google_client_id,
        google_hidden,
        sso_idp_name: client_saml_idp(&request.client).map(|idp| idp.name),
        sso_by_email: any_saml_domain(state).await,
        sso_hidden,
    };
    let html = pages::render("signin.html", &frame, &page)?;
    Ok(pages::html_response(
        status,
        html,
        &csp,
        &[csrf_cookie(state, csrf)],
    ))
}

/// The way to the IdP: the page goes on by itself (a refresh, which `form-action` does not
/// govern, so the IdP need not be named in this page's policy), or by its link.
pub(super) fn continue_page(
    request: &AuthRequest,
    idp_name: &str,
    url: &str,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct Continue<'a> {
        name: &'a str,
        url: &'a str,
    }
    let frame = Frame {
        title: "Single sign-on",
        client_name: client_name(&request.client),
        error: None,
        action: ACTION,
        hidden: Vec::new(),
    };
    let html = pages::render(
        "continue.html",
        &frame,
        &Continue {
            name: idp_name,
            url,
        },
    )?;
    Ok(pages::html_response(
        StatusCode::OK,
        html,
        &pages::content_security_policy(None),
        &[],
    ))
}

pub(super) fn message_page(
    client: Option<&ClientInfo>,
    message: &str,
    status: StatusCode,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct Message<'a> {
        message: &'a str,
    }
    let frame = Frame {
        title: "Sign-in stopped",
        client_name: client.and_then(client_name),
        error: None,
        action: ACTION,
        hidden: Vec::new(),
    };
    let html = pages::render("message.html", &frame, &Message { message })?;
    Ok(pages::html_response(
        status,
        html,
        &pages::content_security_policy(None),
        &[],
    ))
}

/// Words a person can judge a scope by.
pub(super) fn describe_scope(word: &str) -> String {
    let fixed = match word {
        "openid" => Some("Confirm who you are"),
        "profile" => Some("See your name and profile"),
        "fhirUser" => Some("Know which health record is yours"),
        "email" => Some("See your e-mail address"),
        "phone" => Some("See your phone number"),
        "address" => Some("See your address"),
        "offline_access" | "offline" => Some("Stay connected when you are not using it"),
        "online_access" => Some("Stay connected while you use it"),
        "launch" => Some("Use the context it was launched in"),
        "launch/patient" => Some("Ask which patient to work with"),
        "launch/encounter" => Some("Ask which encounter to work with"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    let Some(s) = SmartScope::parse(word) else {
        return format!("Use the permission “{word}”");
    };
    let mut verbs = Vec::new();
    if s.read {
        verbs.push("read");
    }
    if s.search {
        verbs.push("search");
    }
    if s.create {
        verbs.push("create");
    }
    if s.update {
        verbs.push("update");
    }
    if s.delete {
        verbs.push("delete");
    }
    let verbs = match verbs.as_slice() {
        [] => "use".to_string(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    let what = if s.resource_type == "*" {
        "all kinds of records".to_string()
    } else {
        format!("{} records", s.resource_type)
    };
    let whose = match s.context {
        ScopeContext::Patient => " of the patient",
        ScopeContext::User => " you can access",
        ScopeContext::System => "",
    };
    let mut text = format!("{} {what}{whose}", capitalise(&verbs));
    if let Some(c) = &s.criteria {
        text.push_str(&format!(" (only where {c})"));
    }
    text
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
