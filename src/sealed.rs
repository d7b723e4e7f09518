//! Secrets at rest (issue 10): the key-encryption key (KEK) that seals the signing keys' private
//! halves and the keyed-hash key of client secrets before they reach the store. The KEK itself
//! never enters the store: it comes from `key_encryption_key` (`FHIRGATE_KEY_ENCRYPTION_KEY`,
//! 32 bytes as base64) or from the file `key_encryption_key_file` [default
//! `<data_dir>/key-encryption-key`], which the first start creates with mode 0600. Someone who
//! reads a copy of the database (a backup, a replica, a SQL injection elsewhere) learns neither
//! a signing key nor the hash key.
//!
//! Sealed values are `sealed:v1:` + base64(nonce ‖ AES-256-GCM ciphertext ‖ tag); the
//! associated data names what the value is (`signing-key:<kid>`, `secret-hash-key`), so a sealed
//! value moved to another row does not open. The store keeps a sealed check value, so an
//! instance started with another KEK refuses to start instead of failing later.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

const PREFIX: &str = "sealed:v1:";
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "key_encryption_key: expected 32 bytes as base64 (generate one with `openssl rand -base64 32`)"
    )]
    BadKey,
    #[error("{path}: {error}")]
    File { path: PathBuf, error: String },
    #[error(
        "no key-encryption key: set FHIRGATE_KEY_ENCRYPTION_KEY or key_encryption_key_file to the one the serving instances use ({0} does not exist)"
    )]
    Missing(PathBuf),
    #[error(
        "this store's secrets were sealed with another key-encryption key: give every instance the same FHIRGATE_KEY_ENCRYPTION_KEY (or key_encryption_key_file)"
    )]
    WrongKey,
    #[error("a sealed value is damaged or belongs elsewhere ({0})")]
    Damaged(String),
    #[error("cannot seal: {0}")]
    Crypto(String),
}

/// Where the KEK comes from, as configured.
#[derive(Clone, PartialEq, Eq)]
pub enum KekSource {
    /// The value itself (environment or flag), base64.
    Value(String),
    /// A file holding it, base64; created on first start when it is the default one.
    File { path: PathBuf, create: bool },
}

impl std::fmt::Debug for KekSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KekSource::Value(_) => f.write_str("KekSource::Value(***)"),
            KekSource::File { path, create } => f
                .debug_struct("KekSource::File")
                .field("path", path)
                .field("create", create)
                .finish(),
        }
    }
}

/// The key-encryption key.
pub struct KeyEncryptionKey {
    key: RandomizedNonceKey,
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEncryptionKey(***)")
    }
}

fn decode_key(b64: &str) -> Result<KeyEncryptionKey, SealError> {
    let bytes = STANDARD.decode(b64.trim()).map_err(|_| SealError::BadKey)?;
    KeyEncryptionKey::from_bytes(&bytes)
}

impl KeyEncryptionKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<KeyEncryptionKey, SealError> {
        if bytes.len() != KEY_LEN {
            return Err(SealError::BadKey);
        }
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes).map_err(|_| SealError::BadKey)?;
        Ok(KeyEncryptionKey { key })
    }

    /// Reads the KEK from `source`; a default file that does not exist yet is created (0600,
    /// never overwritten) when `create` allows it.
    pub fn load(source: &KekSource) -> Result<KeyEncryptionKey, SealError> {
        match source {
            KekSource::Value(v) => decode_key(v),
            KekSource::File { path, create } => match std::fs::read_to_string(path) {
                Ok(text) => decode_key(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && *create => {
                    create_key_file(path)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(SealError::Missing(path.clone()))
                }
                Err(e) => Err(SealError::File {
                    path: path.clone(),
                    error: e.to_string(),
                }),
            },
        }
    }

    pub fn seal(&self, plaintext: &[u8], purpose: &str) -> Result<String, SealError> {
        let mut buf = plaintext.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(purpose.as_bytes()), &mut buf)
            .map_err(|e| SealError::Crypto(e.to_string()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&buf);
        Ok(format!("{PREFIX}{}", STANDARD.encode(out)))
    }

    pub fn open(&self, sealed: &str, purpose: &str) -> Result<Vec<u8>, SealError> {
        let damaged = || SealError::Damaged(purpose.to_string());
        let body = sealed.strip_prefix(PREFIX).ok_or_else(damaged)?;
        let raw = STANDARD.decode(body).map_err(|_| damaged())?;
        if raw.len() < NONCE_LEN {
            return Err(damaged());
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged())?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut buf)
            .map_err(|_| damaged())?;
        Ok(plain.to_vec())
    }
}

/// Whether a stored value is sealed (rather than a value written before sealing existed).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(PREFIX)
}

fn create_key_file(path: &Path) -> Result<KeyEncryptionKey, SealError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let file_error = |e: std::io::Error| SealError::File {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(file_error)?;
    }
    let mut bytes = [0u8; KEY_LEN];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|e| SealError::Crypto(e.to_string()))?;
    let encoded = STANDARD.encode(bytes);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(format!("{encoded}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(file_error)?;
            tracing::warn!(
                path = %path.display(),
                "created the key-encryption key; keep a copy apart from the database backups — without it the stored signing keys and client secret hashes cannot be used"
            );
            KeyEncryptionKey::from_bytes(&bytes)
        }
        // Another process created it in between: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(path).map_err(file_error)?;
            decode_key(&text)
        }
        Err(e) => Err(file_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> KeyEncryptionKey {
        KeyEncryptionKey::from_bytes(&[7u8; 32]).unwrap()
    }

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_purpose() {
        let k = kek();
        let sealed = k.seal(b"private key", "signing-key:a").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("private"));
        assert_eq!(k.open(&sealed, "signing-key:a").unwrap(), b"private key");
        assert!(matches!(
            k.open(&sealed, "signing-key:b"),
            Err(SealError::Damaged(_))
        ));
        let other = KeyEncryptionKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(other.open(&sealed, "signing-key:a").is_err());
        // Nonces are fresh: sealing twice never gives the same text.
        assert_ne!(sealed, k.seal(b"private key", "signing-key:a").unwrap());
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(k.open(&tampered, "signing-key:a").is_err());
        assert!(k.open("plain", "signing-key:a").is_err());
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert!(matches!(decode_key("c2hvcnQ="), Err(SealError::BadKey)));
        assert!(matches!(decode_key("not base64!"), Err(SealError::BadKey)));
        assert!(decode_key(&STANDARD.encode([1u8; 32])).is_ok());
    }

    #[test]
    fn the_default_file_is_created_once_private_and_reread() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("key-encryption-key");
        let source = KekSource::File {
            path: path.clone(),
            create: true,
        };
        let first = KeyEncryptionKey::load(&source).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let sealed = first.seal(b"x", "p").unwrap();
        let again = KeyEncryptionKey::load(&source).unwrap();
        assert_eq!(again.open(&sealed, "p").unwrap(), b"x");
        // Not created where it may not be.
        let missing = KekSource::File {
            path: dir.path().join("nope"),
            create: false,
        };
        assert!(matches!(
            KeyEncryptionKey::load(&missing),
            Err(SealError::Missing(_))
        ));
    }
}
