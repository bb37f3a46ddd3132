//! Keys and envelope encryption of card numbers.
//!
//! Each record gets its own random data key (DEK). The PAN is sealed with the DEK
//! (AES-256-GCM), and the DEK is wrapped by a key-encryption key (KEK) that has an id.
//! The associated data binds both ciphertexts to the record's token and account, so a
//! ciphertext copied into another row does not decrypt. Rotation re-wraps DEKs under the
//! active KEK without touching the PAN ciphertext. Fingerprints are HMAC-SHA256 of the
//! PAN under a key of their own, so equal cards can be found without decrypting.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::card::Pan;

/// The development KEK (id `dev-1`). Public, so production refuses it.
pub const DEV_KEKS: &str = "dev-1:ZG1wYXktZGV2LWtlay1kby1ub3QtdXNlLWluLXByb2Q=";
/// The development fingerprint key. Public, so production refuses it.
pub const DEV_FINGERPRINT_KEY: &str = "ZG1wYXktZGV2LWZpbmdlcnByaW50LW5vdC1wcm9kISE=";

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Config(String),
    #[error("no KEK with id {0:?} is configured")]
    UnknownKek(String),
    #[error("the ciphertext does not decrypt for this record")]
    Decrypt,
}

struct Kek {
    id: String,
    cipher: Aes256Gcm,
    dev: bool,
}

/// The configured KEKs and the fingerprint key. Never printed.
pub struct KeyRing {
    keks: Vec<Kek>,
    active: String,
    fingerprint_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keks.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("KeyRing").field("kek_ids", &ids).field("active", &self.active).finish_non_exhaustive()
    }
}

/// A sealed PAN as stored: the KEK id, the wrapped DEK and the PAN ciphertext (each
/// `nonce || ciphertext-with-tag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub kek_id: String,
    pub wrapped_dek: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

fn decode_key(what: &str, b64: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| KeyError::Config(format!("{what}: not base64")))?,
    );
    if bytes.len() != 32 {
        return Err(KeyError::Config(format!("{what}: must be 32 bytes (base64 of 32 random bytes)")));
    }
    Ok(bytes)
}

fn aad(kind: &str, token: &str, user: &str, kek_id: &str) -> Vec<u8> {
    format!("dmpay:{kind}:v1\u{0}{token}\u{0}{user}\u{0}{kek_id}").into_bytes()
}

fn seal(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    // Encryption with a fresh nonce and a valid key cannot fail for inputs this small.
    let ct = cipher.encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad }).unwrap_or_default();
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

fn open(cipher: &Aes256Gcm, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(KeyError::Decrypt);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| KeyError::Decrypt)
}

impl KeyRing {
    /// `keks` is `id:base64key[,id:base64key...]`; `active` defaults to the first.
    pub fn new(keks: &SecretString, active: Option<&str>, fingerprint_key: &SecretString) -> Result<Self, KeyError> {
        let mut ring = Vec::new();
        for item in keks.expose_secret().split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, b64) = item
                .split_once(':')
                .ok_or_else(|| KeyError::Config("DMPAY_VAULT_KEKS: entries are id:base64key".into()))?;
            if id.is_empty()
                || id.len() > 64
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(KeyError::Config("DMPAY_VAULT_KEKS: ids are 1 to 64 of [A-Za-z0-9_-]".into()));
            }
            if ring.iter().any(|k: &Kek| k.id == id) {
                return Err(KeyError::Config(format!("DMPAY_VAULT_KEKS: duplicate id {id:?}")));
            }
            let key = decode_key("DMPAY_VAULT_KEKS", b64)?;
            let dev = DEV_KEKS.split_once(':').is_some_and(|(_, d)| d == b64.trim());
            let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| KeyError::Config("bad KEK".into()))?;
            ring.push(Kek { id: id.to_owned(), cipher, dev });
        }
        let first = ring.first().ok_or_else(|| KeyError::Config("DMPAY_VAULT_KEKS: at least one KEK".into()))?;
        let active = active.map(str::to_owned).unwrap_or_else(|| first.id.clone());
        if !ring.iter().any(|k| k.id == active) {
            return Err(KeyError::Config(format!("DMPAY_VAULT_ACTIVE_KEK: {active:?} is not in DMPAY_VAULT_KEKS")));
        }
        let fingerprint_key = decode_key("DMPAY_VAULT_FINGERPRINT_KEY", fingerprint_key.expose_secret())?;
        Ok(KeyRing { keks: ring, active, fingerprint_key })
    }

    /// Whether any development key is in use (production refuses that).
    pub fn uses_dev_keys(&self) -> bool {
        let dev_fp = base64::engine::general_purpose::STANDARD.decode(DEV_FINGERPRINT_KEY).unwrap_or_default();
        self.keks.iter().any(|k| k.dev) || *self.fingerprint_key == dev_fp
    }

    pub fn active_kek(&self) -> &str {
        &self.active
    }

    fn kek(&self, id: &str) -> Result<&Kek, KeyError> {
        self.keks.iter().find(|k| k.id == id).ok_or_else(|| KeyError::UnknownKek(id.to_owned()))
    }

    /// Seals a PAN for the record (`token`, `user`) under a fresh DEK and the active KEK.
    pub fn seal_pan(&self, pan: &Pan, token: &str, user: &str) -> Sealed {
        let mut dek = Zeroizing::new([0u8; 32]);
        rand::thread_rng().fill_bytes(dek.as_mut());
        let Ok(dek_cipher) = Aes256Gcm::new_from_slice(dek.as_ref()) else {
            unreachable!("a 32-byte key is always valid for AES-256-GCM")
        };
        let ciphertext = seal(&dek_cipher, pan.expose().as_bytes(), &aad("pan", token, user, ""));
        let kek = self.kek(&self.active).unwrap_or(&self.keks[0]);
        let wrapped_dek = seal(&kek.cipher, dek.as_ref(), &aad("dek", token, user, &kek.id));
        Sealed { kek_id: kek.id.clone(), wrapped_dek, ciphertext }
    }

    fn unwrap_dek(&self, sealed: &Sealed, token: &str, user: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let kek = self.kek(&sealed.kek_id)?;
        open(&kek.cipher, &sealed.wrapped_dek, &aad("dek", token, user, &kek.id))
    }

    /// Opens a sealed PAN; fails for a ciphertext that belongs to another record.
    pub fn open_pan(&self, sealed: &Sealed, token: &str, user: &str) -> Result<Pan, KeyError> {
        let dek = self.unwrap_dek(sealed, token, user)?;
        let cipher = Aes256Gcm::new_from_slice(&dek).map_err(|_| KeyError::Decrypt)?;
        let plain = open(&cipher, &sealed.ciphertext, &aad("pan", token, user, ""))?;
        let digits = String::from_utf8(plain.to_vec()).map_err(|_| KeyError::Decrypt)?;
        Ok(Pan::from_validated(Zeroizing::new(digits)))
    }

    /// Re-wraps the record's DEK under the active KEK; the PAN ciphertext is unchanged.
    pub fn rewrap(&self, sealed: &Sealed, token: &str, user: &str) -> Result<Sealed, KeyError> {
        let dek = self.unwrap_dek(sealed, token, user)?;
        let kek = self.kek(&self.active)?;
        Ok(Sealed {
            kek_id: kek.id.clone(),
            wrapped_dek: seal(&kek.cipher, &dek, &aad("dek", token, user, &kek.id)),
            ciphertext: sealed.ciphertext.clone(),
        })
    }

    /// HMAC-SHA256 of the PAN, hex: equal cards have equal fingerprints.
    pub fn fingerprint(&self, pan: &Pan) -> String {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.fingerprint_key) else {
            unreachable!("HMAC takes keys of any length")
        };
        mac.update(pan.expose().as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::card::validate;

    fn ring(keks: &str, active: Option<&str>) -> KeyRing {
        KeyRing::new(&SecretString::from(keks), active, &SecretString::from(DEV_FINGERPRINT_KEY)).unwrap()
    }

    fn pan() -> Pan {
        validate("4242424242424242", 12, 2030, "123", (2026, 1)).unwrap().pan
    }

    fn key(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let r = ring(DEV_KEKS, None);
        let sealed = r.seal_pan(&pan(), "pm_a", "alice");
        assert_eq!(r.open_pan(&sealed, "pm_a", "alice").unwrap().expose(), "4242424242424242");
        assert!(!String::from_utf8_lossy(&sealed.ciphertext).contains("4242424242424242"));
        // The same ciphertext in another row (token or account) does not open.
        assert!(matches!(r.open_pan(&sealed, "pm_b", "alice"), Err(KeyError::Decrypt)));
        assert!(matches!(r.open_pan(&sealed, "pm_a", "mallory"), Err(KeyError::Decrypt)));
        // Fresh DEK and nonces each time.
        assert_ne!(r.seal_pan(&pan(), "pm_a", "alice"), sealed);
    }

    #[test]
    fn rotation_rewraps_and_the_old_kek_can_go() {
        let old = ring(&format!("k1:{}", key(1)), None);
        let sealed = old.seal_pan(&pan(), "pm_a", "alice");
        assert_eq!(sealed.kek_id, "k1");
        let both = ring(&format!("k1:{},k2:{}", key(1), key(2)), Some("k2"));
        let rewrapped = both.rewrap(&sealed, "pm_a", "alice").unwrap();
        assert_eq!(rewrapped.kek_id, "k2");
        assert_eq!(rewrapped.ciphertext, sealed.ciphertext);
        let new_only = ring(&format!("k2:{}", key(2)), None);
        assert_eq!(new_only.open_pan(&rewrapped, "pm_a", "alice").unwrap().expose(), "4242424242424242");
        assert!(matches!(new_only.open_pan(&sealed, "pm_a", "alice"), Err(KeyError::UnknownKek(_))));
    }

    #[test]
    fn fingerprints_are_keyed_and_stable() {
        let r = ring(DEV_KEKS, None);
        assert_eq!(r.fingerprint(&pan()), r.fingerprint(&pan()));
        assert_eq!(r.fingerprint(&pan()).len(), 64);
        let other = KeyRing::new(&SecretString::from(DEV_KEKS), None, &SecretString::from(key(9))).unwrap();
        assert_ne!(other.fingerprint(&pan()), r.fingerprint(&pan()));
    }

    #[test]
    fn config_errors_and_dev_detection() {
        assert!(ring(DEV_KEKS, None).uses_dev_keys());
        let prod =
            KeyRing::new(&SecretString::from(format!("p1:{}", key(3)).as_str()), None, &SecretString::from(key(4)))
                .unwrap();
        assert!(!prod.uses_dev_keys());
        for bad in
            ["", "nokey", "a:notbase64!", &format!("a:{}", base64::engine::general_purpose::STANDARD.encode([1u8; 16]))]
        {
            assert!(KeyRing::new(&SecretString::from(bad), None, &SecretString::from(key(4))).is_err(), "{bad}");
        }
        assert!(KeyRing::new(
            &SecretString::from(format!("a:{}", key(1)).as_str()),
            Some("b"),
            &SecretString::from(key(4))
        )
        .is_err());
        let shown = format!("{:?}", ring(DEV_KEKS, None));
        assert!(!shown.contains("ZG1w"), "{shown}");
    }
}
