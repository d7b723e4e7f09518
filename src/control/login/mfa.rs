//! MFA with TOTP (docs/medplum-compat.md §10): the functions the `/auth/mfa/*` endpoints (`auth::mfa`),
//! the sign-in page and `/auth/login` share (secret, enrolment URI, QR code, code checks,
//! attempt limits).
//!
//! TOTP as otplib's `authenticator`: SHA-1, 6 digits, 30 s steps, ±1 step. The secret lives in
//! the User resource (`mfaSecret`, base32), which no read ever returns.
//!
//! Stricter than Medplum v5.0.2, which has no limits (docs/contract.md §2):
//! - a code is accepted once: its time step must be later than any step this user already used
//!   (RFC 6238 §5.2), so a code seen over a shoulder cannot be replayed within its 90 s window;
//! - wrong codes are counted on the Login they were tried for: the fifth revokes a sign-in
//!   Login (the password step must be done again), and ten across the user's Logins within
//!   15 minutes lock MFA for that user until the window has passed (429). The counts are kept
//!   in `logins.extra` and written with compare-and-swap, so they hold across instances.

use crate::state::State;
use crate::store::{LoginRecord, StoreError, StoredResource, now_unix};
use base64::Engine;
use fhirgate_core::fhir::outcome::Outcome;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value, json};

use crate::control::base::index::index_rows;
use crate::control::base::users::memberships_of;
use crate::control::login::otp;
use crate::control::login::otp::Channel;
use crate::control::login::otp::Pending;
use crate::control::login::otp::valid_phone;
use crate::control::login::state::LoginFlow;
use crate::control::login::state::get_login;
use crate::control::login::state::keys;
use crate::control::web::error::ApiError;
use crate::obs::security::{SecurityEvent, SecurityEventKind};

/// Wrong codes one Login may try; the last one revokes a sign-in Login.
pub const MAX_LOGIN_FAILURES: usize = 5;

/// Wrong codes one user may try across Logins within [`USER_WINDOW`].
pub const MAX_USER_FAILURES: usize = 10;

/// Seconds over which a user's wrong codes add up.
pub const USER_WINDOW: i64 = 15 * 60;

/// How far back a user's Logins are read for used steps and failures.
const HISTORY: i64 = 24 * 3600;

/// Secret size: 160 bits, RFC 4226 §4's recommendation.
const SECRET_BYTES: usize = 20;

/// The shortest secret accepted from the store: otplib's default of 80 bits, so secrets
/// generated elsewhere still verify.
const MIN_SECRET_BYTES: usize = 10;

const STEP_SECONDS: u64 = 30;

/// How often a code check is retried when its Login changed in between.
const ATTEMPT_ROUNDS: usize = 5;

/// How often a User update is retried when another writer got in between.
const USER_UPDATE_TRIES: usize = 3;

/// `encodeURIComponent`'s set: everything but `A-Za-z0-9-_.!~*'()`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// A new random secret, base32 (RFC 4648, no padding), as stored in `User.mfaSecret`.
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    totp_rs::Secret::from(bytes.to_vec()).to_base32()
}

/// The key URI authenticator apps read (docs/medplum-compat.md §10).
pub fn enroll_uri(email: &str, secret: &str) -> String {
    format!(
        "otpauth://totp/{}?secret={}&issuer=medplum.com",
        utf8_percent_encode(&format!("Medplum - {email}"), URI_COMPONENT),
        utf8_percent_encode(secret, URI_COMPONENT),
    )
}

/// The key URI as a QR code: a PNG data URL.
pub fn qr_data_url(uri: &str) -> Result<String, ApiError> {
    let png = qrcodegen_image::draw_png(uri).map_err(|e| ApiError::internal("QR code", e))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

/// `{enrollUri, enrollQrCode}` for a user's e-mail and secret.
pub fn enroll_details(email: &str, secret: &str) -> Result<(String, String), ApiError> {
    let uri = enroll_uri(email, secret);
    let qr = qr_data_url(&uri)?;
    Ok((uri, qr))
}

/// The time step `token` is valid for at `now` (±1 step), if any. Anything but six digits
/// (spaces allowed between them, as people type them) is simply wrong.
pub fn check_code(secret: &str, token: &str, now: u64) -> Option<u64> {
    let digits: String = token.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = totp(secret)?;
    totp.check(&digits, now)
}

/// The code for `now` (tests and tools; the server never needs it).
#[cfg(test)]
pub fn code_at(secret: &str, now: u64) -> Option<String> {
    Some(totp(secret)?.generate(now).to_string())
}

fn totp(secret: &str) -> Option<totp_rs::Totp> {
    let secret = totp_rs::Secret::try_from_base32(secret.trim_end_matches('=')).ok()?;
    if secret.as_ref().len() < MIN_SECRET_BYTES {
        return None;
    }
    Some(
        totp_rs::Builder::new()
            .with_algorithm(totp_rs::Algorithm::SHA1)
            .with_digits(6)
            .with_skew(1)
            .with_step_duration(STEP_SECONDS)
            .with_secret(secret)
            .build_noncompliant(),
    )
}

/// A User as stored, with the fields MFA reads.
pub(crate) struct MfaUser {
    pub stored: StoredResource,
}

impl MfaUser {
    pub fn id(&self) -> &str {
        &self.stored.id
    }
    pub fn email(&self) -> &str {
        self.stored
            .content
            .get("email")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
    pub fn enrolled(&self) -> bool {
        self.stored
            .content
            .get("mfaEnrolled")
            .and_then(Value::as_bool)
            == Some(true)
    }
    pub fn secret(&self) -> Option<&str> {
        self.stored
            .content
            .get("mfaSecret")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// The methods the user is enrolled in, the preferred first: `User.mfaMethod` (Medplum's
    /// list, `totp` | `email`, and fhirgate's `sms`), or `totp` alone for a user enrolled before
    /// there were others.
    pub fn methods(&self) -> Vec<String> {
        let listed: Vec<String> = self
            .stored
            .content
            .get("mfaMethod")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|m| matches!(*m, "totp" | "email" | "sms"))
            .map(str::to_string)
            .collect();
        match (listed.is_empty(), self.enrolled()) {
            (false, _) => listed,
            (true, true) => vec!["totp".to_string()],
            (true, false) => Vec::new(),
        }
    }

    /// The phone number SMS codes go to (`mfaPhone`, E.164).
    pub fn phone(&self) -> Option<&str> {
        self.stored
            .content
            .get("mfaPhone")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Where the user's codes of `channel` go: the e-mail address, or the enrolled phone.
    pub fn address(&self, channel: Channel) -> Option<&str> {
        match channel {
            Channel::Email => Some(self.email()).filter(|e| !e.is_empty()),
            Channel::Sms => self.phone(),
        }
    }

    /// Where the codes of a method being enrolled go: the phone given for it, or the address.
    pub fn pending_address<'a>(&'a self, pending: &'a Pending) -> Option<&'a str> {
        pending
            .phone
            .as_deref()
            .or_else(|| self.address(pending.channel))
    }

    /// The secret, or 400 `missing` when there is none.
    pub fn secret_or(&self, missing: &str) -> Result<String, ApiError> {
        self.secret()
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad_request(missing))
    }

    /// The secret of a user about to enrol: 400 when already enrolled or when there is none.
    pub fn enrolment_secret(&self) -> Result<String, ApiError> {
        if self.enrolled() {
            return Err(ApiError::bad_request("Already enrolled"));
        }
        self.secret_or("Secret not found")
    }
}

/// Reads the User behind a `User/<id>` reference.
pub(crate) async fn read_user(state: &State, user_ref: &str) -> Result<Option<MfaUser>, ApiError> {
    Ok(crate::control::base::users::read_user(state, user_ref)
        .await?
        .map(|stored| MfaUser { stored }))
}

/// Changes a User with compare-and-swap on its version, retrying when another writer got in
/// between. `change` sees the current content each time and may refuse.
pub(crate) async fn update_user(
    state: &State,
    user_id: &str,
    change: impl Fn(&MfaUser, &mut Map<String, Value>) -> Result<(), ApiError>,
) -> Result<MfaUser, ApiError> {
    for _ in 0..USER_UPDATE_TRIES {
        let stored = state
            .store
            .read("User", user_id)
            .await?
            .ok_or_else(|| ApiError::bad_request("User not found"))?;
        let current = MfaUser { stored };
        let mut content = current.stored.content.clone();
        let Some(obj) = content.as_object_mut() else {
            return Err(ApiError::internal("stored User", "not an object"));
        };
        change(&current, obj)?;
        match state
            .store
            .put(
                content.clone(),
                current.stored.project_id.as_deref(),
                &index_rows(&content),
                Some(&current.stored.version_id),
                false,
            )
            .await
        {
            Ok(stored) => return Ok(MfaUser { stored }),
            Err(StoreError::VersionConflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(
        "The user changed during the update; try again",
    ))
}

/// Makes sure the user has a secret; returns the user as stored afterwards.
pub(crate) async fn ensure_secret(state: &State, user: MfaUser) -> Result<MfaUser, ApiError> {
    if user.secret().is_some() {
        return Ok(user);
    }
    let secret = new_secret();
    update_user(state, &user.stored.id, |current, obj| {
        if current.secret().is_none() {
            obj.insert("mfaSecret".into(), Value::String(secret.clone()));
        }
        Ok(())
    })
    .await
}

/// What the user's recent Logins say: wrong codes in the window, and the last step used.
struct History {
    recent_failures: usize,
    last_step: Option<u64>,
}

async fn history(state: &State, user_ref: &str, now: i64) -> Result<History, ApiError> {
    let logins = state
        .store
        .logins_for_user(user_ref, now.saturating_sub(HISTORY))
        .await?;
    let mut h = History {
        recent_failures: 0,
        last_step: None,
    };
    for l in &logins {
        let flow = LoginFlow::of(l);
        h.recent_failures += flow
            .mfa_failures
            .iter()
            .filter(|t| **t > now - USER_WINDOW)
            .count();
        if let Some(step) = flow.mfa_step {
            h.last_step = Some(h.last_step.map_or(step, |s| s.max(step)));
        }
    }
    Ok(h)
}

/// Why a code was not accepted.
enum Rejected {
    /// Wrong, or a step already used.
    Wrong,
    /// Too many wrong codes: 429.
    Throttled,
}

impl Rejected {
    /// The stable reason of the security event.
    fn label(&self) -> &'static str {
        match self {
            Rejected::Wrong => "wrong_code",
            Rejected::Throttled => "throttled",
        }
    }

    /// The answer: `wrong_text` (400) for a wrong code, 429 when throttled.
    fn error(self, wrong_text: &'static str) -> ApiError {
        match self {
            Rejected::Wrong => ApiError::bad_request(wrong_text),
            Rejected::Throttled => ApiError::Outcome(Outcome::TooManyRequests),
        }
    }
}

/// What a code may be: a TOTP code of `secret`, or a code sent for this Login to one of
/// `destinations` (keyed hashes, `otp::destination_hash`): the user's enrolled e-mail address or
/// phone, or the one being enrolled. A code sent anywhere else proves nothing.
pub(crate) struct Accept<'a> {
    pub secret: Option<&'a str>,
    pub destinations: &'a [String],
}

/// The methods a sign-in may use: the user's, less those its project does not allow. Before a
/// project is chosen (a user of several), only what every one of the user's projects allows:
/// the factor a sign-in passes with must be good wherever it then goes.
pub(crate) async fn usable_methods(
    state: &State,
    login: &LoginRecord,
    user: &MfaUser,
) -> Result<Vec<String>, ApiError> {
    let projects: Vec<String> = match login.project_id.as_deref() {
        Some("new") => Vec::new(),
        Some(p) => vec![p.to_string()],
        None => memberships_of(state, &login.user_ref, None, None)
            .await?
            .iter()
            .filter_map(|(_, m)| m.project.reference.as_deref())
            .filter_map(|r| r.strip_prefix("Project/"))
            .map(str::to_string)
            .collect(),
    };
    let allowed: Vec<Vec<String>> = projects
        .iter()
        .map(|p| allowed_methods(state, Some(p)))
        .collect();
    Ok(user
        .methods()
        .into_iter()
        .filter(|m| allowed.iter().all(|a| a.contains(m)))
        .collect())
}

/// Where the sent-code methods among `methods` send to, as destination hashes.
pub(crate) fn destinations(state: &State, user: &MfaUser, methods: &[String]) -> Vec<String> {
    methods
        .iter()
        .filter_map(|m| user.address(Channel::parse(m)?))
        .map(|to| otp::destination_hash(state, to))
        .collect()
}

/// Which factor a code was accepted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// An authenticator's code, of this time step.
    Totp { step: u64 },
    /// A code sent to the user (`login::otp`).
    Sent(Channel),
}

/// Checks `token` for `user` on behalf of the Login `login_id`, counting a failure on that Login:
/// a code sent for this Login (`login::otp`), else, with `secret`, a TOTP code. On success the
/// sent code is spent or the accepted step recorded, and `on_success` may change the Login's
/// `extra` in the same write. `revoke_on_limit`: the fifth wrong code revokes the Login.
async fn attempt(
    state: &State,
    login_id: &str,
    user_ref: &str,
    accept: &Accept<'_>,
    token: &str,
    revoke_on_limit: bool,
    on_success: impl Fn(&mut Map<String, Value>, Factor),
) -> Result<Result<(LoginRecord, Factor), Rejected>, ApiError> {
    // Each round reads the Login again after another writer got in between; a Login that keeps
    // changing under us is refused rather than spun on.
    for _ in 0..ATTEMPT_ROUNDS {
        let now = now_unix();
        let login = state
            .store
            .login(login_id)
            .await?
            .ok_or_else(ApiError::not_found)?;
        if login.revoked {
            return Err(ApiError::bad_request("Login revoked"));
        }
        let mut failures = LoginFlow::of(&login).mfa_failures;
        let own_failures = failures.len();
        let h = history(state, user_ref, now).await?;
        if own_failures >= MAX_LOGIN_FAILURES || h.recent_failures >= MAX_USER_FAILURES {
            return Ok(Err(Rejected::Throttled));
        }
        let sent = otp::accepted(state, &login, token, now)
            .filter(|(_, to)| accept.destinations.iter().any(|d| d == to));
        let factor = match sent {
            Some((channel, _)) => Some(Factor::Sent(channel)),
            None => accept
                .secret
                .and_then(|secret| check_code(secret, token, now.max(0) as u64))
                .filter(|s| h.last_step.is_none_or(|last| *s > last))
                .map(|step| Factor::Totp { step }),
        };
        let mut extra = login.extra.clone();
        if !extra.is_object() {
            extra = Value::Object(Map::new());
        }
        let Some(obj) = extra.as_object_mut() else {
            return Err(ApiError::internal("login extra", "not an object"));
        };
        let Some(factor) = factor else {
            failures.push(now);
            obj.insert(keys::MFA_FAILURES.into(), json!(failures));
            if !state
                .store
                .update_login_extra_cas(&login.id, &login.extra, &extra)
                .await?
            {
                continue;
            }
            if revoke_on_limit && failures.len() >= MAX_LOGIN_FAILURES {
                tracing::warn!(login = %login.id, "too many wrong MFA codes; login revoked");
                state.store.revoke_login(&login.id).await?;
            }
            return Ok(Err(Rejected::Wrong));
        };
        match factor {
            Factor::Totp { step } => {
                obj.insert(keys::MFA_STEP.into(), json!(step));
            }
            Factor::Sent(_) => otp::spend(obj),
        }
        on_success(obj, factor);
        if state
            .store
            .update_login_extra_cas(&login.id, &login.extra, &extra)
            .await?
        {
            let mut updated = login;
            updated.extra = extra;
            return Ok(Ok((updated, factor)));
        }
    }
    Err(ApiError::conflict("Login changed; try again"))
}

/// The checks of `verifyMfaToken` on a Login, in Medplum's order.
pub(crate) fn check_login_open(login: &LoginRecord) -> Result<(), ApiError> {
    if login.revoked {
        return Err(ApiError::bad_request("Login revoked"));
    }
    let flow = LoginFlow::of(login);
    if flow.granted {
        return Err(ApiError::bad_request("Login granted"));
    }
    if flow.mfa_verified {
        return Err(ApiError::bad_request("Login already verified"));
    }
    Ok(())
}

/// A code checked during sign-in: a Login past its attempt limit is revoked; success marks the
/// Login verified (and, for a forced enrolment, no longer waiting for one).
async fn sign_in_attempt(
    state: &State,
    login: &LoginRecord,
    accept: &Accept<'_>,
    token: &str,
    enrolment: bool,
) -> Result<Result<(LoginRecord, Factor), Rejected>, ApiError> {
    attempt(
        state,
        &login.id,
        &login.user_ref,
        accept,
        token,
        true,
        |extra, factor| {
            extra.insert(keys::MFA_VERIFIED.into(), Value::Bool(true));
            // A code sent to a method being enrolled proves it: the enrolment is complete.
            let pending =
                matches!(factor, Factor::Sent(_)) && extra.remove(otp::PENDING_METHOD).is_some();
            if enrolment || pending {
                extra.insert(keys::MFA_ENROLL_REQUIRED.into(), Value::Bool(false));
            }
        },
    )
    .await
}

/// The MFA step of a sign-in, shared by `/auth/mfa/*` and the sign-in page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInCode {
    /// A code of an enrolled user (`/auth/mfa/verify`).
    Verify,
    /// The first code of a forced enrolment (`User.mfaRequired`, `/auth/mfa/login-enroll`).
    Enroll,
}

impl SignInCode {
    /// Checks `token` on the Login `login_id`; the Login, marked verified, when it is right.
    pub async fn check(
        self,
        state: &State,
        login_id: &str,
        token: &str,
    ) -> Result<LoginRecord, ApiError> {
        let login = get_login(state, login_id).await?;
        match self {
            SignInCode::Verify => verify_login(state, login, token).await,
            SignInCode::Enroll => login_enroll(state, login, token).await,
        }
    }
}

/// Checks `token` for the Login's user and marks the Login `mfaVerified`.
async fn verify_login(
    state: &State,
    login: LoginRecord,
    token: &str,
) -> Result<LoginRecord, ApiError> {
    check_login_open(&login)?;
    let user = read_user(state, &login.user_ref)
        .await?
        .ok_or_else(|| ApiError::bad_request("User not enrolled in MFA"))?;
    let methods = usable_methods(state, &login, &user).await?;
    // A method chosen at sign-in counts only while the user must enrol and has none.
    let enrolling = LoginFlow::of(&login).mfa_enroll_required && user.methods().is_empty();
    let pending = Pending::of(&login).filter(|_| enrolling);
    if methods.is_empty() && pending.is_none() {
        return Err(ApiError::bad_request(if user.methods().is_empty() {
            "User not enrolled in MFA"
        } else {
            "MFA method not allowed"
        }));
    }
    // TOTP codes count only for a user enrolled in TOTP; a sent code, for where it went.
    let secret = methods
        .iter()
        .any(|m| m == "totp")
        .then(|| user.secret())
        .flatten();
    let mut to = destinations(state, &user, &methods);
    if let Some(address) = pending.as_ref().and_then(|p| user.pending_address(p)) {
        to.push(otp::destination_hash(state, address));
    }
    let accept = Accept {
        secret,
        destinations: &to,
    };
    let verified = sign_in_attempt(state, &login, &accept, token, false).await?;
    let event = SecurityEvent::new(SecurityEventKind::MfaVerification).subject(&login.user_ref);
    match verified {
        Ok((login, factor)) => {
            if let (Factor::Sent(channel), Some(pending)) = (factor, pending)
                && channel == pending.channel
            {
                add_method(state, &user, channel.as_str(), pending.phone.as_deref()).await?;
            }
            event.emit();
            Ok(login)
        }
        Err(r) => {
            event.failed(r.label()).emit();
            Err(r.error("Invalid MFA token"))
        }
    }
}

/// Forced enrolment during sign-in: checks `token` against the secret the user was given, marks
/// the user enrolled and the Login verified.
async fn login_enroll(
    state: &State,
    login: LoginRecord,
    token: &str,
) -> Result<LoginRecord, ApiError> {
    let user = read_user(state, &login.user_ref)
        .await?
        .ok_or_else(|| ApiError::bad_request("Secret not found"))?;
    let secret = user.enrolment_secret()?;
    check_login_open(&login)?;
    let accept = Accept {
        secret: Some(&secret),
        destinations: &[],
    };
    let (verified, _) = sign_in_attempt(state, &login, &accept, token, true)
        .await?
        .map_err(|r| r.error("Invalid MFA token"))?;
    update_user(state, user.id(), |current, obj| {
        // The secret the code was checked against must still be the one stored.
        if current.secret() != Some(secret.as_str()) {
            return Err(ApiError::bad_request("Secret not found"));
        }
        obj.insert("mfaEnrolled".into(), Value::Bool(true));
        push_method(obj, &current.methods(), "totp");
        Ok(())
    })
    .await?;
    SecurityEvent::new(SecurityEventKind::MfaEnrolment)
        .subject(&verified.user_ref)
        .emit();
    Ok(verified)
}

/// A Project's `setting` named `name`, from the snapshot.
fn project_setting(state: &State, project_id: Option<&str>, name: &str) -> Option<Value> {
    state
        .snapshot()
        .projects
        .get(project_id?)?
        .setting(name)
        .cloned()
}

/// The MFA methods members of a project may enrol in: the Project setting `allowedMfaMethods`
/// (comma-separated, as Medplum), else `totp`; `sms` only where the operator configured the SMS
/// hook.
pub fn allowed_methods(state: &State, project_id: Option<&str>) -> Vec<String> {
    let listed = project_setting(state, project_id, "allowedMfaMethods").and_then(|s| {
        s.get("valueString")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let mut methods: Vec<String> = listed
        .as_deref()
        .unwrap_or("totp")
        .split(',')
        .map(str::trim)
        .filter(|m| {
            matches!(*m, "totp" | "email") || (*m == "sms" && state.config.sms_hook.is_some())
        })
        .map(str::to_string)
        .collect();
    methods.dedup();
    if methods.is_empty() {
        methods.push("totp".into());
    }
    methods
}

/// The Project setting `mfaRequired`: every member signs in with a second factor.
pub fn project_requires_mfa(state: &State, project_id: &str) -> bool {
    project_setting(state, Some(project_id), "mfaRequired")
        .and_then(|s| s.get("valueBoolean").and_then(Value::as_bool))
        .unwrap_or(false)
}

/// A method the caller's project does not allow: 400.
pub(crate) fn require_allowed(
    state: &State,
    project_id: Option<&str>,
    method: &str,
) -> Result<(), ApiError> {
    if allowed_methods(state, project_id)
        .iter()
        .any(|m| m == method)
    {
        Ok(())
    } else {
        Err(ApiError::bad_request("MFA method not allowed"))
    }
}

/// Where `method`'s codes go: the e-mail address, or the phone given (enrolment) or stored.
pub(crate) fn destination(
    user: &MfaUser,
    channel: Channel,
    phone: Option<&str>,
) -> Result<String, ApiError> {
    match channel {
        Channel::Email => user
            .address(channel)
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad_request("User has no email address")),
        Channel::Sms => phone
            .or(user.phone())
            .filter(|p| valid_phone(p))
            .map(str::to_string)
            .ok_or_else(|| {
                ApiError::invalid(
                    "phone",
                    "Valid phone number in E.164 format (+15035550199) is required",
                )
            }),
    }
}

/// Sends a new code for a sign-in to `channel`: a method the user is enrolled in, or the one being
/// enrolled on this Login.
pub(crate) async fn send_code(
    state: &State,
    login: &LoginRecord,
    channel: Channel,
) -> Result<(), ApiError> {
    check_login_open(login)?;
    let not_enrolled = || match channel {
        Channel::Email => ApiError::bad_request("User not enrolled in email MFA"),
        Channel::Sms => ApiError::bad_request("User not enrolled in SMS MFA"),
    };
    let user = read_user(state, &login.user_ref)
        .await?
        .ok_or_else(not_enrolled)?;
    let enrolling = LoginFlow::of(login).mfa_enroll_required && user.methods().is_empty();
    let pending = Pending::of(login).filter(|p| enrolling && p.channel == channel);
    let enrolled = usable_methods(state, login, &user)
        .await?
        .iter()
        .any(|m| m == channel.as_str());
    if !enrolled && pending.is_none() {
        return Err(not_enrolled());
    }
    let phone = pending.and_then(|p| p.phone);
    let to = destination(&user, channel, phone.as_deref())?;
    otp::send(state, login, channel, &to).await.map(drop)
}

/// A sign-in whose user must enrol chooses a sent-code method: it is remembered on the Login and
/// a code sent to it (`phone` for SMS); verifying that code enrols the user.
pub(crate) async fn start_code_enrolment(
    state: &State,
    login: &LoginRecord,
    channel: Channel,
    phone: Option<&str>,
) -> Result<(), ApiError> {
    check_login_open(login)?;
    let user = read_user(state, &login.user_ref)
        .await?
        .ok_or_else(|| ApiError::bad_request("User not found"))?;
    // Only a sign-in that must enrol, of a user with no factor yet: anyone else adding a method
    // here would have passed MFA with a code sent wherever they liked.
    if !user.methods().is_empty() {
        return Err(ApiError::bad_request("Already enrolled"));
    }
    if !LoginFlow::of(login).mfa_enroll_required {
        return Err(ApiError::bad_request("MFA enrolment is not required"));
    }
    require_allowed(state, login.project_id.as_deref(), channel.as_str())?;
    let to = destination(&user, channel, phone)?;
    send_to(state, login, channel, &to, true).await
}

/// Sends a code for `login` to `to`; `enrolling`: `to` is a method being enrolled, remembered on
/// the Login first (the method, and for SMS the number) so that the code proves it.
pub(crate) async fn send_to(
    state: &State,
    login: &LoginRecord,
    channel: Channel,
    to: &str,
    enrolling: bool,
) -> Result<(), ApiError> {
    let mut login = login.clone();
    if enrolling {
        let pending = Pending {
            channel,
            phone: (channel == Channel::Sms).then(|| to.to_string()),
        };
        let mut extra = login.extra.clone();
        if let Some(obj) = extra.as_object_mut() {
            obj.insert(otp::PENDING_METHOD.into(), pending.to_json());
        }
        if !state
            .store
            .update_login_extra_cas(&login.id, &login.extra, &extra)
            .await?
        {
            return Err(ApiError::conflict("Login changed; try again"));
        }
        login.extra = extra;
    }
    otp::send(state, &login, channel, to).await.map(drop)
}

/// At the code step of a sign-in: sends the code of the preferred of `methods` (the usable ones)
/// when it is a sent one and none is out for this Login yet. Returns the Login as stored
/// afterwards, when a code went out.
pub(crate) async fn send_preferred_if_due(
    state: &State,
    login: &LoginRecord,
    user: &MfaUser,
    methods: &[String],
) -> Option<LoginRecord> {
    let channel = methods.first().and_then(|m| Channel::parse(m))?;
    if otp::outstanding(login, now_unix()).is_some() {
        return None;
    }
    let to = user.address(channel)?;
    // A code that cannot go out now does not stop the sign-in: the person may ask again, or
    // use another method.
    otp::send(state, login, channel, to)
        .await
        .inspect_err(|e| {
            tracing::warn!(error = ?e, channel = channel.as_str(), "sign-in code not sent");
        })
        .ok()
}

/// `methods` with `method` added (last, unless the list was empty).
pub(crate) fn push_method(obj: &mut Map<String, Value>, methods: &[String], method: &str) {
    let mut list: Vec<Value> = methods.iter().map(|m| json!(m)).collect();
    if !methods.iter().any(|m| m == method) {
        list.push(json!(method));
    }
    obj.insert("mfaMethod".into(), Value::Array(list));
}

/// `current`'s methods less `method` (all of them when `None`): what is no longer used goes
/// too (a removed authenticator's secret is rotated, so enrolling again needs a new entry; the
/// phone is removed), and the user is enrolled while any method is left.
pub(crate) fn remove_methods(
    obj: &mut Map<String, Value>,
    current: &MfaUser,
    method: Option<&str>,
) {
    let had = current.methods();
    let remaining: Vec<String> = match method {
        Some(m) => had.iter().filter(|x| *x != m).cloned().collect(),
        None => Vec::new(),
    };
    let totp = |list: &[String]| list.iter().any(|m| m == "totp");
    if totp(&had) && !totp(&remaining) {
        obj.insert("mfaSecret".into(), Value::String(new_secret()));
    }
    if !remaining.iter().any(|m| m == "sms") {
        obj.remove("mfaPhone");
    }
    obj.insert("mfaEnrolled".into(), Value::Bool(!remaining.is_empty()));
    obj.insert("mfaMethod".into(), json!(remaining));
}

/// Enrols `user` in `method` (`email`, or `sms` with its phone), after a code sent to it came
/// back.
pub(crate) async fn add_method(
    state: &State,
    user: &MfaUser,
    method: &str,
    phone: Option<&str>,
) -> Result<(), ApiError> {
    update_user(state, user.id(), |current, obj| {
        push_method(obj, &current.methods(), method);
        obj.insert("mfaEnrolled".into(), Value::Bool(true));
        if let Some(phone) = phone {
            obj.insert("mfaPhone".into(), Value::String(phone.to_string()));
        }
        if method == "email" {
            obj.insert("emailVerified".into(), Value::Bool(true));
        }
        Ok(())
    })
    .await?;
    SecurityEvent::new(SecurityEventKind::MfaEnrolment)
        .subject(&format!("User/{}", user.id()))
        .emit();
    Ok(())
}

/// Checks a code for an authenticated caller (enroll, disable). Basic callers have no Login
/// to count on; they are clients, refused before this.
pub(crate) async fn caller_attempt(
    state: &State,
    login_id: Option<&str>,
    user: &MfaUser,
    accept: &Accept<'_>,
    token: &str,
) -> Result<Factor, ApiError> {
    let Some(login_id) = login_id else {
        return Err(ApiError::forbidden());
    };
    attempt(
        state,
        login_id,
        &format!("User/{}", user.id()),
        accept,
        token,
        false,
        |_, _| {},
    )
    .await?
    .map(|(_, factor)| factor)
    .map_err(|r| r.error("Invalid token"))
}

#[cfg(test)]
mod tests;
