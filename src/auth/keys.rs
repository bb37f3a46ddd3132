//! Verification keys: the HS256 secret and public keys from a PEM or JWKS file.

use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use secrecy::{ExposeSecret, SecretString};

#[derive(Debug, thiserror::Error)]
#[error("DMPAY_JWT_PUBLIC_KEYS: {0}")]
pub struct KeyError(pub String);

/// One verification key, usable only with `alg`.
#[derive(Clone)]
pub(crate) struct Key {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub key: DecodingKey,
}

impl Key {
    pub fn hs256(secret: &SecretString) -> Self {
        Key { alg: Algorithm::HS256, kid: None, key: DecodingKey::from_secret(secret.expose_secret().as_bytes()) }
    }
}

/// Reads a JWKS document (JSON with `keys`) or a single PEM public key (RSA, EC P-256 or
/// Ed25519). Symmetric keys are refused here: HS256 is configured separately.
pub(crate) fn load_public_keys(path: &Path) -> Result<Vec<Key>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| KeyError(format!("{}: {e}", path.display())))?;
    if text.trim_start().starts_with('{') {
        return load_jwks(&text);
    }
    let pem = text.as_bytes();
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(vec![Key { alg: Algorithm::RS256, kid: None, key }]);
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok(vec![Key { alg: Algorithm::ES256, kid: None, key }]);
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok(vec![Key { alg: Algorithm::EdDSA, kid: None, key }]);
    }
    Err(KeyError(format!(
        "{}: neither a JWKS document nor an RSA, EC P-256 or Ed25519 public key in PEM",
        path.display()
    )))
}

fn load_jwks(text: &str) -> Result<Vec<Key>, KeyError> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| KeyError(format!("invalid JWKS: {e}")))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for (i, jwk) in set.keys.iter().enumerate() {
        let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
            (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
            (Some(KeyAlgorithm::EdDSA), _) => Algorithm::EdDSA,
            (Some(other), _) => return Err(KeyError(format!("keys[{i}]: algorithm {other:?} not supported"))),
            (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
            (None, AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
            (None, _) => return Err(KeyError(format!("keys[{i}]: only RSA, EC P-256 and Ed25519 keys are accepted"))),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| KeyError(format!("keys[{i}]: {e}")))?;
        keys.push(Key { alg, kid: jwk.common.key_id.clone(), key });
    }
    if keys.is_empty() {
        return Err(KeyError("the JWKS document has no keys".into()));
    }
    Ok(keys)
}
