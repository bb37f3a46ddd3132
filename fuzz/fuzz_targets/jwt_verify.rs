//! The JWT path: `dmpay::auth::Verifier` (development config: HS256 with the dev
//! secret, issuer `dmpay-dev`, audience `dmpay`; plus an RS256 public key) on hostile
//! tokens.
//!
//! Input byte 0 picks the mode, the rest is its data:
//! - 0: `verify` on the text;
//! - 1: `verify_header` on the text (the `authorization` header value);
//! - 2: a valid dev token with mutations: the data are 3-byte edits (big-endian u16
//!   position mod the length, byte to xor there), and a leftover byte truncates the
//!   token to that many 256ths of its length;
//! - 3: a token signed with the right key over a fuzzed header and payload: the data
//!   are `HEADER_JSON \0 PAYLOAD_JSON` (raw bytes, base64url-encoded here);
//! - 4: the same, HMAC-SHA256-signed with the configured RSA *public* key as the secret
//!   (algorithm confusion: never accepted, whatever `alg` says).
//!
//! Oracles for every mode: no panic; an accepted token has three segments whose HMAC-
//! SHA256 under the secret is exactly its signature (so a token whose header, payload
//! or signature bytes changed is never accepted), a header with `alg` HS256, and claims
//! naming the configured `iss` and `aud`, a numeric unexpired `exp`, a numeric `nbf` (if
//! any) not in the future, and `sub` 1 to 128 characters equal to the principal's.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dmpay::auth::{mint_dev_token, Principal, Verifier};
use dmpay::config::Config;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::Value;

const RSA_PUBLIC_PEM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/rs256-public.pem");

struct Fixture {
    verifier: Verifier,
    secret: Vec<u8>,
    issuer: String,
    audience: String,
    token: String,
    rsa_pem: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // The dev config plus the test suite's RSA public key, so that RS256 is accepted
        // too and an HS256 token "signed" with that public key (algorithm confusion) can
        // be tried.
        let env = HashMap::from([
            ("DMPAY_ENV".to_string(), "development".to_string()),
            ("DMPAY_JWT_PUBLIC_KEYS".to_string(), RSA_PUBLIC_PEM.to_string()),
        ]);
        let config = Config::load_from(&env, None).expect("the dev config loads");
        let verifier = Verifier::new(&config.jwt()).expect("the dev verifier builds");
        // Valid for a day: longer than any fuzz run.
        let token = mint_dev_token(&config.jwt(), "alice", "payments:write payments:read", Duration::from_secs(86_400))
            .expect("a dev token mints");
        verifier.verify(&token).expect("the fresh dev token verifies");
        Fixture {
            verifier,
            secret: config.jwt_hs256_secret.expose_secret().as_bytes().to_vec(),
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            token,
            rsa_pem: std::fs::read(RSA_PUBLIC_PEM).expect("the RSA test key is readable"),
        }
    })
}

#[derive(Deserialize)]
struct OracleHeader {
    alg: String,
}

#[derive(Deserialize)]
struct OracleClaims {
    iss: Value,
    aud: Value,
    exp: Value,
    /// jsonwebtoken ignores an `nbf` that is not a number it reads as a u64 (a string, a
    /// negative number, 1e400, anything from 2^64 up): then there is none to check.
    #[serde(default, deserialize_with = "numeric_date_or_none")]
    nbf: Option<f64>,
    sub: String,
}

fn numeric_date_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let n = Option::<f64>::deserialize(d).unwrap_or(None);
    Ok(n.filter(|n| n.is_finite() && *n >= 0.0 && *n < u64::MAX as f64))
}

fn mac(secret: &[u8], signing_input: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(signing_input);
    m.finalize().into_bytes().to_vec()
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Everything an accepted `token` must satisfy.
fn check_accepted(f: &Fixture, token: &str, principal: &Principal) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted a token without three segments: {token:?}");
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("accepted signature is canonical base64url");
    let signing_input = format!("{}.{}", parts[0], parts[1]);
    assert_eq!(signature, mac(&f.secret, signing_input.as_bytes()), "accepted a forged signature: {token:?}");

    // Parsed as jsonwebtoken parses them: into structs that skip unknown fields (serde
    // does not check the UTF-8 of a skipped string, so the whole text need not be JSON).
    let header: OracleHeader = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("header base64"))
        .expect("accepted header has a string alg");
    assert_eq!(header.alg, "HS256");
    let claims: OracleClaims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("payload base64"))
        .expect("accepted claims have iss, aud, exp and sub");
    // jsonwebtoken takes `iss` and `aud` as a string or a list that names the expected one.
    let names = |v: &Value, want: &str| match v {
        Value::String(s) => s == want,
        Value::Array(list) => list.iter().any(|a| a.as_str() == Some(want)),
        _ => false,
    };
    assert!(names(&claims.iss, &f.issuer), "accepted a token of another issuer: {:?}", claims.iss);
    assert!(names(&claims.aud, &f.audience), "accepted a token for another audience: {:?}", claims.aud);
    let now = now_s();
    let exp = claims.exp.as_f64().expect("accepted a token without a numeric exp");
    assert!(exp + 5.0 + 2.0 >= now, "accepted an expired token: exp {exp}, now {now}");
    if let Some(nbf) = claims.nbf {
        assert!(nbf <= now + 5.0 + 2.0, "accepted a token before its nbf {nbf}, now {now}");
    }
    let sub = claims.sub;
    assert_eq!(sub, principal.sub);
    assert!(!sub.is_empty() && sub.len() <= 128);
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 5 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            if let Ok(p) = f.verifier.verify(&token) {
                check_accepted(f, &token, &p);
            }
        }
        1 => {
            let header = String::from_utf8_lossy(rest);
            if let Ok(p) = f.verifier.verify_header(Some(&header)) {
                let token = header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer "));
                check_accepted(f, token.expect("accepted without a Bearer prefix").trim(), &p);
            }
        }
        2 => {
            let mut token = f.token.clone().into_bytes();
            let mut edits = rest.chunks_exact(3);
            for edit in edits.by_ref() {
                let i = usize::from(u16::from_be_bytes([edit[0], edit[1]])) % token.len();
                token[i] ^= edit[2];
            }
            if let Some(cut) = edits.remainder().first() {
                token.truncate(usize::from(*cut) * token.len() / 256);
            }
            let changed = token != f.token.as_bytes();
            let token = String::from_utf8_lossy(&token);
            match f.verifier.verify(&token) {
                Ok(p) => {
                    assert!(!changed, "accepted a tampered token: {token:?}");
                    check_accepted(f, &token, &p);
                }
                Err(_) => assert!(changed, "the untouched dev token was refused"),
            }
        }
        m => {
            let (header, payload) = match rest.iter().position(|b| *b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b""[..]),
            };
            let key = if m == 3 { &f.secret } else { &f.rsa_pem };
            let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
            let signature = URL_SAFE_NO_PAD.encode(mac(key, signing_input.as_bytes()));
            let token = format!("{signing_input}.{signature}");
            if let Ok(p) = f.verifier.verify(&token) {
                check_accepted(f, &token, &p);
            }
        }
    }
});
