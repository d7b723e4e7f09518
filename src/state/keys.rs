//! Signing keys over time. A key is stored with the moment it starts to sign (`created_at`) and,
//! once a newer key replaces it, the moment it retires (a settings row written by the rotation).
//! At any moment the keyring holds every stored active key that has not retired: the key that
//! signs (the newest that has started) first, then the others, which only verify. So a rotation
//! publishes the new key in every instance's JWKS and keyring (through the change feed) before
//! any token signed with it can exist, and keeps the old key verifying until every token it
//! signed has expired. Each instance derives the same keyring from the store and its clock; the
//! change feed rebuilds the snapshot when the next start or retirement comes due.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::config::{Config, parse_lifetime};
use crate::sealed::{KeyEncryptionKey, SealError, is_sealed};
use crate::store::{Store, StoreError, StoredKey, now_unix};
use crate::tokens::SigningKey;

/// ID tokens live one hour (`control::token`); they are verified with the same keys.
const ID_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Added to every retirement: instances' clocks differ by a little.
const CLOCK_SKEW_MARGIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot generate a key: {0}")]
    Generate(String),
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// The settings row holding a sealed known value: it proves, at every start, that this
/// instance's key-encryption key is the one the store's secrets were sealed with.
const KEK_CHECK_SETTING: &str = "key_encryption_check";
const KEK_CHECK_PURPOSE: &str = "key-encryption-check";
/// The client-secret hash key, sealed.
const HASH_KEY_SETTING: &str = "secret_hash_key_sealed";
const HASH_KEY_PURPOSE: &str = "secret-hash-key";
/// Where versions before sealing kept the hash key in clear.
const LEGACY_HASH_KEY_SETTING: &str = "secret_hash_key";

fn key_purpose(kid: &str) -> String {
    format!("signing-key:{kid}")
}

/// A new key's stored form: `key`'s PKCS#8 DER (`der`) sealed under `kek`, with its kid and
/// algorithm.
pub fn sealed_key(
    kek: &KeyEncryptionKey,
    key: &SigningKey,
    der: &[u8],
    created_at: i64,
) -> Result<StoredKey, SealError> {
    Ok(StoredKey {
        private_der: kek.seal(der, &key_purpose(&key.kid))?,
        id: key.kid.clone(),
        alg: format!("{:?}", key.alg()),
        active: true,
        created_at,
    })
}

/// The usable key of a stored one (sealed, or in clear from before sealing existed).
pub fn open_key(kek: &KeyEncryptionKey, k: &StoredKey) -> Result<SigningKey, String> {
    if is_sealed(&k.private_der) {
        let der = kek
            .open(&k.private_der, &key_purpose(&k.id))
            .map_err(|e| e.to_string())?;
        SigningKey::from_pkcs8(k.id.clone(), &der).map_err(|e| e.to_string())
    } else {
        SigningKey::from_base64_pkcs8(k.id.clone(), &k.private_der).map_err(|e| e.to_string())
    }
}

/// Checks `kek` against the store (the first start records its check value), so an instance
/// given another key refuses to start rather than fail on its first token.
pub async fn verify_kek(store: &Store, kek: &KeyEncryptionKey) -> Result<(), KeyError> {
    let candidate = kek.seal(b"fhirgate", KEK_CHECK_PURPOSE)?;
    let check = store.setting_init(KEK_CHECK_SETTING, &candidate).await?;
    match kek.open(&check, KEK_CHECK_PURPOSE) {
        Ok(v) if v == b"fhirgate" => Ok(()),
        _ => Err(SealError::WrongKey.into()),
    }
}

/// At start: verifies `kek`, seals what an earlier version stored in clear (the hash key and
/// every signing key, retired ones too) and returns the client-secret hash key.
pub async fn open_store_secrets(
    store: &Store,
    kek: &KeyEncryptionKey,
) -> Result<Vec<u8>, KeyError> {
    verify_kek(store, kek).await?;
    let hash_key = match store.setting(HASH_KEY_SETTING).await? {
        Some(sealed) => kek.open(&sealed, HASH_KEY_PURPOSE)?,
        None => {
            let clear = match store.setting(LEGACY_HASH_KEY_SETTING).await? {
                Some(v) => v,
                None => crate::tokens::random_hex(32),
            };
            let sealed = kek.seal(clear.as_bytes(), HASH_KEY_PURPOSE)?;
            // Another instance may seal at the same time: the value in force wins.
            let in_force = store.setting_init(HASH_KEY_SETTING, &sealed).await?;
            kek.open(&in_force, HASH_KEY_PURPOSE)?
        }
    };
    store.delete_setting(LEGACY_HASH_KEY_SETTING).await?;
    for (kid, stored) in store.key_secrets().await? {
        if is_sealed(&stored) {
            continue;
        }
        let Ok(der) = STANDARD.decode(&stored) else {
            tracing::error!(%kid, "a stored signing key is unreadable; left as it is");
            continue;
        };
        let sealed = kek.seal(&der, &key_purpose(&kid))?;
        store.replace_key_secret(&kid, &stored, &sealed).await?;
    }
    Ok(hash_key)
}

/// A stored key's schedule (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledKey {
    pub id: String,
    /// `ES256` or `RS256`: each algorithm has its own signer.
    pub alg: String,
    pub signs_from: i64,
    pub retire_at: Option<i64>,
}

/// The keyring at `now`: indices into `keys`, each algorithm's keys together with its signing
/// key first (ES256's ahead of the others); and the next moment the answer changes (a key
/// starts to sign or retires), if any.
///
/// The signer is the newest key that has started; if none has (only when a rotation retired the
/// old key before the new one starts, e.g. after a key compromise), the earliest pending one, so
/// tokens can still be issued.
pub fn ring_at(keys: &[ScheduledKey], now: i64) -> (Vec<usize>, Option<i64>) {
    let mut algs: Vec<&str> = keys.iter().map(|k| k.alg.as_str()).collect();
    algs.sort_unstable();
    algs.dedup();
    // ES256 leads: its signer signs every access token.
    algs.sort_by_key(|a| *a != "ES256");
    let mut ring = Vec::new();
    let mut next: Option<i64> = None;
    for alg in algs {
        let (family, family_next) = family_ring_at(keys, alg, now);
        ring.extend(family);
        next = match (next, family_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    (ring, next)
}

/// [`ring_at`] over the keys of one algorithm.
fn family_ring_at(keys: &[ScheduledKey], alg: &str, now: i64) -> (Vec<usize>, Option<i64>) {
    let mut live: Vec<usize> = (0..keys.len())
        .filter(|&i| keys[i].alg == alg && keys[i].retire_at.is_none_or(|r| r > now))
        .collect();
    live.sort_by(|&a, &b| {
        (keys[a].signs_from, &keys[a].id).cmp(&(keys[b].signs_from, &keys[b].id))
    });
    let signer = live
        .iter()
        .rposition(|&i| keys[i].signs_from <= now)
        .or(if live.is_empty() { None } else { Some(0) });
    if let Some(pos) = signer {
        let s = live.remove(pos);
        live.insert(0, s);
    }
    let next = live
        .iter()
        .flat_map(|&i| [Some(keys[i].signs_from), keys[i].retire_at])
        .flatten()
        .filter(|&t| t > now)
        .min();
    (live, next)
}

/// The stored keys with their schedules, as [`ring_at`] takes them.
pub async fn load_schedule(store: &Store) -> Result<Vec<(StoredKey, ScheduledKey)>, StoreError> {
    let retirements: std::collections::HashMap<String, i64> =
        store.key_retirements().await?.into_iter().collect();
    Ok(store
        .active_keys()
        .await?
        .into_iter()
        .map(|k| {
            let s = ScheduledKey {
                id: k.id.clone(),
                alg: k.alg.clone(),
                signs_from: k.created_at,
                retire_at: retirements.get(&k.id).copied(),
            };
            (k, s)
        })
        .collect())
}

/// The longest a token signed now could stay valid: access, refresh and ID tokens, with the
/// configured lifetimes and every client's own.
pub async fn longest_token_lifetime(
    store: &Store,
    config: &Config,
) -> Result<Duration, StoreError> {
    let mut longest = config
        .access_token_lifetime
        .max(config.refresh_token_lifetime)
        .max(ID_TOKEN_LIFETIME);
    for c in store.list("ClientApplication").await? {
        for field in ["accessTokenLifetime", "refreshTokenLifetime"] {
            if let Some(d) = c
                .content
                .get(field)
                .and_then(serde_json::Value::as_str)
                .and_then(parse_lifetime)
            {
                longest = longest.max(d);
            }
        }
    }
    Ok(longest)
}

/// What `fhirgate keys rotate` asks for.
#[derive(Debug, Clone, Default)]
pub struct RotateOptions {
    /// Overrides `key_publish_delay`.
    pub publish_delay: Option<Duration>,
    /// How long after the new key starts to sign the old ones retire. Default: the longest
    /// token lifetime plus a clock-skew margin. Shorter only on purpose (a compromised key).
    pub retire_after: Option<Duration>,
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The new ES256 key.
    pub kid: String,
    /// The new RS256 key (ID tokens of clients that ask for RS256).
    pub rsa_kid: String,
    /// When the new key starts to sign (unix seconds).
    pub signs_from: i64,
    /// Keys scheduled to retire at `retire_at` by this rotation.
    pub retiring: Vec<String>,
    pub retire_at: i64,
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Adds a new signing key: published at once, signing after the publish delay; the current keys
/// retire after the tokens they may still sign have expired.
pub async fn rotate(
    store: &Store,
    config: &Config,
    kek: &KeyEncryptionKey,
    opts: &RotateOptions,
) -> Result<Rotation, KeyError> {
    let generate_failed = |e: crate::tokens::TokenError| KeyError::Generate(e.to_string());
    let (key, der) =
        SigningKey::generate(uuid::Uuid::new_v4().to_string()).map_err(generate_failed)?;
    let (rsa_key, rsa_der) =
        SigningKey::generate_rsa(uuid::Uuid::new_v4().to_string()).map_err(generate_failed)?;
    // Rounded up: `now_unix` truncates, and the delay is a minimum.
    let now = now_unix().saturating_add(1);
    let signs_from =
        now.saturating_add(secs(opts.publish_delay.unwrap_or(config.key_publish_delay)));
    let retire_after = match opts.retire_after {
        Some(d) => d,
        None => longest_token_lifetime(store, config).await? + CLOCK_SKEW_MARGIN,
    };
    let retire_at = signs_from.saturating_add(secs(retire_after));
    let keys = [
        sealed_key(kek, &key, &der, signs_from)?,
        sealed_key(kek, &rsa_key, &rsa_der, signs_from)?,
    ];
    let retiring = store.rotate_signing_keys(&keys, retire_at).await?;
    Ok(Rotation {
        kid: key.kid,
        rsa_kid: rsa_key.kid,
        signs_from,
        retiring,
        retire_at,
    })
}

/// Marks the keys whose retirement has come inactive (they already left every keyring by the
/// clock; this keeps the table truthful). Returns their ids.
pub async fn deactivate_retired(store: &Store, now: i64) -> Result<Vec<String>, StoreError> {
    let due: Vec<String> = load_schedule(store)
        .await?
        .into_iter()
        .filter(|(_, s)| s.retire_at.is_some_and(|r| r <= now))
        .map(|(k, _)| k.id)
        .collect();
    store.deactivate_keys(&due).await?;
    Ok(due)
}

/// One line of `fhirgate keys list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub kid: String,
    /// `signing`, `published` (verifies, signs later), `verifying` (signed before, retires
    /// later) or `retired`.
    pub state: &'static str,
    pub signs_from: i64,
    pub retire_at: Option<i64>,
}

pub async fn status(store: &Store, now: i64) -> Result<Vec<KeyStatus>, StoreError> {
    let schedule: Vec<ScheduledKey> = load_schedule(store)
        .await?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    let (ring, _) = ring_at(&schedule, now);
    Ok(schedule
        .iter()
        .enumerate()
        .map(|(i, s)| KeyStatus {
            kid: s.id.clone(),
            state: match ring.iter().position(|&r| r == i) {
                Some(pos) if ring[..pos].iter().all(|&r| schedule[r].alg != s.alg) => "signing",
                Some(_) if s.signs_from > now => "published",
                Some(_) => "verifying",
                None => "retired",
            },
            signs_from: s.signs_from,
            retire_at: s.retire_at,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, signs_from: i64, retire_at: Option<i64>) -> ScheduledKey {
        ScheduledKey {
            id: id.into(),
            alg: "ES256".into(),
            signs_from,
            retire_at,
        }
    }

    fn ids(keys: &[ScheduledKey], now: i64) -> (Vec<&str>, Option<i64>) {
        let (ring, next) = ring_at(keys, now);
        (ring.iter().map(|&i| keys[i].id.as_str()).collect(), next)
    }

    #[test]
    fn one_key_signs_alone() {
        let keys = [key("a", 100, None)];
        assert_eq!(ids(&keys, 200), (vec!["a"], None));
    }

    #[test]
    fn a_rotation_publishes_first_signs_later_and_retires_the_old_key_last() {
        // Rotation at 1000: "b" signs from 1060, "a" retires at 5000.
        let keys = [key("a", 100, Some(5000)), key("b", 1060, None)];
        assert_eq!(ids(&keys, 1000), (vec!["a", "b"], Some(1060)));
        assert_eq!(ids(&keys, 1059), (vec!["a", "b"], Some(1060)));
        assert_eq!(ids(&keys, 1060), (vec!["b", "a"], Some(5000)));
        assert_eq!(ids(&keys, 4999), (vec!["b", "a"], Some(5000)));
        assert_eq!(ids(&keys, 5000), (vec!["b"], None));
    }

    #[test]
    fn the_newest_started_key_signs_whatever_the_order() {
        let keys = [
            key("c", 300, None),
            key("a", 100, Some(900)),
            key("b", 200, Some(900)),
        ];
        assert_eq!(ids(&keys, 250), (vec!["b", "a", "c"], Some(300)));
        assert_eq!(ids(&keys, 300), (vec!["c", "a", "b"], Some(900)));
        // Equal start times: the id decides, the same way on every instance.
        let tie = [key("y", 100, None), key("x", 100, None)];
        assert_eq!(ids(&tie, 100).0, vec!["y", "x"]);
    }

    #[test]
    fn each_algorithm_has_its_own_signer_es256_first() {
        let rsa = |id: &str, from: i64, retire: Option<i64>| ScheduledKey {
            alg: "RS256".into(),
            ..key(id, from, retire)
        };
        // A rotation at 1000 added "b" and "rb", both signing from 1060.
        let keys = [
            rsa("ra", 100, Some(5000)),
            key("a", 100, Some(5000)),
            rsa("rb", 1060, None),
            key("b", 1060, None),
        ];
        assert_eq!(ids(&keys, 1000), (vec!["a", "b", "ra", "rb"], Some(1060)));
        assert_eq!(ids(&keys, 1060), (vec!["b", "a", "rb", "ra"], Some(5000)));
        assert_eq!(ids(&keys, 5000), (vec!["b", "rb"], None));
    }

    #[test]
    fn a_key_retired_before_its_successor_starts_leaves_the_successor_signing() {
        let keys = [key("old", 100, Some(1000)), key("new", 1060, None)];
        assert_eq!(ids(&keys, 1000), (vec!["new"], Some(1060)));
        assert_eq!(ids(&[], 1000), (vec![], None));
    }
}
