//! One-time codes sent to a person: by e-mail (the mailer) or by SMS (the operator's hook), for
//! the `email` and `sms` MFA methods (`login::mfa`). A code is 6 digits, kept on the Login it
//! was sent for as a keyed hash with its channel and expiry (`mfaSentCode`), good for
//! [`CODE_LIFETIME`], once; a new one replaces it. Wrong codes count against the same limits as
//! TOTP codes (`login::mfa::attempt`); sends are limited per Login ([`MAX_SENDS`]), per user
//! ([`MAX_USER_SENDS`]) and per destination.

use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value, json};

use crate::state::State;
use crate::store::{LoginRecord, now_unix};

use crate::control::base::outbound;
use crate::control::web::error::ApiError;

/// Seconds a sent code is good for (Medplum's is 20 minutes; a shorter window is stricter).
pub const CODE_LIFETIME: i64 = 600;

/// Codes one Login may have sent; then 429 (every send reaches a person's inbox or phone, and
/// an SMS costs the operator money).
pub const MAX_SENDS: u64 = 5;

/// Codes one user's sign-ins may have sent within [`USER_SEND_WINDOW`].
pub const MAX_USER_SENDS: u64 = 10;

/// Seconds over which a user's sends add up.
pub const USER_SEND_WINDOW: i64 = 3600;

/// Codes one destination (an address, a number) gets per hour, whoever's sign-ins ask, counted
/// by each instance: no one pumps texts to a number through many accounts.
const DESTINATION_SENDS_PER_HOUR: u32 = 20;

fn destination_limiter() -> &'static governor::DefaultKeyedRateLimiter<String> {
    static LIMITER: std::sync::LazyLock<governor::DefaultKeyedRateLimiter<String>> =
        std::sync::LazyLock::new(|| {
            let per_hour = std::num::NonZeroU32::new(DESTINATION_SENDS_PER_HOUR)
                .unwrap_or(std::num::NonZeroU32::MIN);
            governor::RateLimiter::keyed(governor::Quota::per_hour(per_hour))
        });
    &LIMITER
}

/// Key of `LoginRecord.extra`: `{channel, hash, expiresAt, to}` (`to`: a keyed hash of where the
/// code went, so a code proves that destination and no other).
pub const SENT_CODE: &str = "mfaSentCode";

/// Key of `LoginRecord.extra`: how many codes this Login sent (never reset).
pub const SENDS: &str = "mfaSends";

/// Key of `LoginRecord.extra`: a method being enrolled during this sign-in, `{method, phone?}`;
/// it is added to the User once a code sent to it is verified.
pub const PENDING_METHOD: &str = "mfaPendingMethod";

const SMS_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a code goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Email,
    Sms,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        match s {
            "email" => Some(Channel::Email),
            "sms" => Some(Channel::Sms),
            _ => None,
        }
    }
}

/// A sent-code method being enrolled during a sign-in (`PENDING_METHOD`), with the number an SMS
/// goes to: a code sent to it, once verified, enrols it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub channel: Channel,
    pub phone: Option<String>,
}

impl Pending {
    pub fn of(login: &LoginRecord) -> Option<Pending> {
        let p = login.extra.get(PENDING_METHOD)?;
        Some(Pending {
            channel: Channel::parse(p.get("method")?.as_str()?)?,
            phone: p.get("phone").and_then(Value::as_str).map(str::to_string),
        })
    }

    pub fn to_json(&self) -> Value {
        let mut pending = json!({"method": self.channel.as_str()});
        if let Some(phone) = &self.phone {
            pending["phone"] = Value::String(phone.clone());
        }
        pending
    }
}

/// A code sent for a Login (`SENT_CODE`), as stored.
struct SentCode<'a> {
    channel: Channel,
    hash: &'a str,
    expires_at: i64,
    /// [`destination_hash`] of where it went.
    to: &'a str,
}

impl SentCode<'_> {
    fn of(login: &LoginRecord) -> Option<SentCode<'_>> {
        let sent = login.extra.get(SENT_CODE)?;
        Some(SentCode {
            channel: Channel::parse(sent.get("channel")?.as_str()?)?,
            hash: sent.get("hash")?.as_str()?,
            expires_at: sent.get("expiresAt")?.as_i64()?,
            to: sent.get("to")?.as_str()?,
        })
    }
}

/// A fresh code: 6 decimal digits, leading zeros kept.
fn new_code() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

/// The code stored on `login`, if one was sent and is still good, and `token` is it: its channel
/// and the keyed hash of the destination it went to.
pub fn accepted(
    state: &State,
    login: &LoginRecord,
    token: &str,
    now: i64,
) -> Option<(Channel, String)> {
    let sent = SentCode::of(login)?;
    let token = token.trim();
    (now < sent.expires_at
        && token.len() == 6
        && crate::tokens::hashes_equal(&state.hash_secret(token), sent.hash))
    .then(|| (sent.channel, sent.to.to_string()))
}

/// The keyed hash a destination is known by on a sent code.
pub fn destination_hash(state: &State, to: &str) -> String {
    state.hash_secret(&format!("mfa-destination:{}", to.trim().to_lowercase()))
}

/// Forgets the sent code (it was used).
pub fn spend(extra: &mut Map<String, Value>) {
    extra.remove(SENT_CODE);
}

/// The channel of the code out for this Login, while it is still good: polling the sign-in
/// sends no other.
pub fn outstanding(login: &LoginRecord, now: i64) -> Option<Channel> {
    SentCode::of(login)
        .filter(|sent| now < sent.expires_at)
        .map(|sent| sent.channel)
}

/// Stores a new code on the Login (compare-and-swap) and sends it to `to` over `channel`;
/// returns the Login as stored.
pub async fn send(
    state: &State,
    login: &LoginRecord,
    channel: Channel,
    to: &str,
) -> Result<LoginRecord, ApiError> {
    let code = new_code();
    let now = now_unix();
    let sends_of = |l: &LoginRecord| l.extra.get(SENDS).and_then(Value::as_u64).unwrap_or(0);
    let sends = sends_of(login);
    let too_many = || ApiError::Outcome(fhirgate_core::fhir::outcome::Outcome::TooManyRequests);
    if sends >= MAX_SENDS {
        return Err(too_many());
    }
    let user_sends: u64 = state
        .store
        .logins_for_user(&login.user_ref, now - USER_SEND_WINDOW)
        .await?
        .iter()
        .map(sends_of)
        .sum();
    if user_sends >= MAX_USER_SENDS {
        return Err(too_many());
    }
    let destination = destination_hash(state, to);
    let limiter = destination_limiter();
    limiter.retain_recent();
    if limiter.check_key(&destination).is_err() {
        tracing::warn!(
            channel = channel.as_str(),
            "sign-in codes to one destination throttled"
        );
        return Err(too_many());
    }
    let mut extra = login.extra.clone();
    let Some(obj) = extra.as_object_mut() else {
        return Err(ApiError::internal("login extra", "not an object"));
    };
    obj.insert(SENDS.into(), json!(sends + 1));
    obj.insert(
        SENT_CODE.into(),
        json!({
            "channel": channel.as_str(),
            "hash": state.hash_secret(&code),
            "expiresAt": now + CODE_LIFETIME,
            "to": destination,
        }),
    );
    if !state
        .store
        .update_login_extra_cas(&login.id, &login.extra, &extra)
        .await?
    {
        return Err(ApiError::conflict("Login changed; try again"));
    }
    match channel {
        Channel::Email => send_email(state, to, &code).await?,
        Channel::Sms => send_sms(state, to, &code).await?,
    }
    let mut sent = login.clone();
    sent.extra = extra;
    Ok(sent)
}

fn minutes() -> i64 {
    CODE_LIFETIME / 60
}

async fn send_email(state: &State, to: &str, code: &str) -> Result<(), ApiError> {
    let email = crate::email::Email {
        to: to.to_string(),
        // The code is in the body only: subjects are logged and shown in notifications.
        subject: "Your fhirgate verification code".to_string(),
        body: format!(
            "Below is your requested fhirgate verification code. You can copy it into the open \
             browser window to confirm your sign-in.\n\n{code}\n\nThis code will expire in {} \
             minutes. If you did not try to sign in, you can safely ignore this email.\n\n\
             Thank you,\nfhirgate\n",
            minutes()
        ),
    };
    crate::email::send(&state.config, &email)
        .await
        .map(drop)
        .map_err(|_| ApiError::Outcome(fhirgate_core::fhir::outcome::Stock::CodeNotSent.outcome()))
}

async fn send_sms(state: &State, to: &str, code: &str) -> Result<(), ApiError> {
    let not_sent = || ApiError::Outcome(fhirgate_core::fhir::outcome::Stock::CodeNotSent.outcome());
    let Some(hook) = &state.config.sms_hook else {
        return Err(ApiError::bad_request("MFA method not allowed"));
    };
    let text = format!(
        "Your fhirgate verification code is {code}. It expires in {} minutes.",
        minutes()
    );
    // The outside-call client (`base::outbound`), built once: the hook is called rarely.
    static CLIENT: std::sync::LazyLock<reqwest::Client> =
        std::sync::LazyLock::new(|| outbound::client().unwrap_or_default());
    let mut request = CLIENT
        .post(&hook.url)
        .timeout(SMS_TIMEOUT)
        .json(&json!({"to": to, "text": text, "purpose": "mfa"}));
    if let Some(auth) = &hook.authorization {
        request = request.header("authorization", auth.0.as_str());
    }
    match request.send().await {
        Ok(resp) if resp.status().is_success() => {
            tracing::info!(to = %mask_phone(to), "sign-in code sent by SMS");
            Ok(())
        }
        Ok(resp) => {
            tracing::warn!(
                status = resp.status().as_u16(),
                "the SMS hook refused a sign-in code"
            );
            Err(not_sent())
        }
        Err(e) => {
            tracing::warn!(error = %e.without_url(), "the SMS hook could not be reached");
            Err(not_sent())
        }
    }
}

/// An e-mail address as shown on the sign-in page: the first letter of the name, and the domain.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((name, domain)) => {
            let first: String = name.chars().take(1).collect();
            format!("{first}…@{domain}")
        }
        None => String::new(),
    }
}

/// A phone number as shown back to its owner: the last two digits.
pub fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(char::is_ascii_digit).collect();
    let tail: String = digits.iter().rev().take(2).rev().collect();
    format!("••• ••• ••{tail}")
}

/// An E.164 number: `+`, then 8 to 15 digits.
pub fn valid_phone(phone: &str) -> bool {
    phone
        .strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_six_digits() {
        for _ in 0..200 {
            let c = new_code();
            assert_eq!(c.len(), 6, "{c}");
            assert!(c.bytes().all(|b| b.is_ascii_digit()), "{c}");
        }
    }

    #[test]
    fn one_destination_gets_a_bounded_number_of_codes() {
        let key = "destination-of-this-test".to_string();
        for _ in 0..DESTINATION_SENDS_PER_HOUR {
            assert!(destination_limiter().check_key(&key).is_ok());
        }
        assert!(destination_limiter().check_key(&key).is_err());
        assert!(
            destination_limiter()
                .check_key(&"another".to_string())
                .is_ok()
        );
    }

    #[test]
    fn phones_are_e164_and_shown_masked() {
        assert!(valid_phone("+15035550199"));
        assert!(!valid_phone("15035550199"));
        assert!(!valid_phone("+1503555"));
        assert!(!valid_phone("+1 503 555 0199"));
        assert_eq!(mask_phone("+15035550199"), "••• ••• ••99");
    }
}
