//! Fail closed: what a server must have before it serves.
//!
//! dmpay runs in production unless development is chosen explicitly (`DMPAY_ENV`), and
//! production refuses every value published in this repository or too weak to keep a
//! secret: the development JWT secret and vault keys, a short or empty HS256 secret, a
//! misspelt `off`, and a card processor nobody named. Each refusal names the setting to
//! change. These checks run when a server starts (`Application::build`) and before the
//! commands that use the secrets themselves (`dmpay vault rotate`); the client commands
//! (`dmpay finance ...`) only talk to a server and need none of them.

use secrecy::ExposeSecret;

use super::{Config, ConfigError, Environment, DEV_JWT_SECRET};

/// Shortest HS256 secret production accepts, in bytes: the HMAC-SHA256 key size, so a
/// secret cannot be guessed faster than the signature can be forged.
pub const HS256_SECRET_LEN_MIN: usize = 32;

/// Words that read as "switch it off" but are not the one spelling that does (`off`):
/// taken as a secret they would be a public, guessable HS256 key.
const OFF_LOOKALIKES: &[&str] = &["off", "none", "disabled", "disable", "false", "no", "0", "null", "nil", ""];

/// The card processors dmpay can talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessorKind {
    /// The built-in sandbox: test cards, no real money.
    Sandbox,
}

/// Refuses an HS256 secret that is an `off` in disguise, in every mode: `OFF` or
/// `disabled` would otherwise become a three-letter signing key.
pub(super) fn check_hs256_spelling(secret: &str) -> Result<(), ConfigError> {
    if secret != "off" && OFF_LOOKALIKES.contains(&secret.trim().to_ascii_lowercase().as_str()) {
        return Err(ConfigError::Invalid {
            name: "DMPAY_JWT_HS256_SECRET",
            detail: if secret.is_empty() {
                "empty; set a secret of at least 32 bytes, or exactly `off` to switch HS256 off".into()
            } else {
                format!("{secret:?} is not a secret; exactly `off` (lower case) switches HS256 off")
            },
        });
    }
    Ok(())
}

/// A database URL fit for a log line: the password and the query (which may carry
/// one) left out.
pub fn url_for_logs(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "(unparsable URL)".into() };
    let rest = rest.split('?').next().unwrap_or("");
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => format!("{scheme}://{rest}"),
    }
}

impl Config {
    /// What a starting server warns about: the published development secrets in use
    /// (development mode accepts them; production refuses them before this).
    pub fn startup_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.env == Environment::Development {
            out.push(
                "DEVELOPMENT MODE (DMPAY_ENV=development): the /demo page and its tokens are served; never expose                  this server"
                    .to_owned(),
            );
        }
        if self.hs256_enabled() && self.jwt_hs256_secret.expose_secret() == DEV_JWT_SECRET {
            out.push(
                "the PUBLISHED development JWT secret signs and verifies tokens: anyone can mint any token                  (set DMPAY_JWT_HS256_SECRET)"
                    .to_owned(),
            );
        }
        if self.key_ring().is_ok_and(|ring| ring.uses_dev_keys()) {
            out.push(
                "the PUBLISHED development vault keys encrypt card data (set DMPAY_VAULT_KEKS and                  DMPAY_VAULT_FINGERPRINT_KEY)"
                    .to_owned(),
            );
        }
        if self.sandbox_in_production() {
            out.push(
                "the SANDBOX card processor serves in production (DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION=true): \
                 no real card is charged"
                    .to_owned(),
            );
        }
        out
    }

    /// Whether the sandbox processor serves in production, by the operator's explicit
    /// choice (`DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION`): the server warns at start
    /// and exports `dmpay_sandbox_processor_in_production 1`.
    pub fn sandbox_in_production(&self) -> bool {
        self.env == Environment::Production && self.processor == Some(ProcessorKind::Sandbox)
    }

    /// Everything production refuses. Development accepts the published defaults (the
    /// server warns loudly when it starts with them).
    pub fn check_for_serving(&self) -> Result<(), ConfigError> {
        let refuse = |detail: String| Err(ConfigError::Production(detail));
        if self.env != Environment::Production {
            return Ok(());
        }
        let secret = self.jwt_hs256_secret.expose_secret();
        if self.hs256_enabled() {
            if secret == DEV_JWT_SECRET {
                return refuse(if self.jwt_public_keys.is_some() {
                    // Public keys are configured; the dev HS256 secret would still verify
                    // tokens anyone can mint, so it must not stay enabled beside them.
                    "the development JWT secret beside DMPAY_JWT_PUBLIC_KEYS: set DMPAY_JWT_HS256_SECRET=off".into()
                } else {
                    "the development JWT secret: set DMPAY_JWT_HS256_SECRET (at least 32 bytes) or \
                     DMPAY_JWT_PUBLIC_KEYS"
                        .into()
                });
            }
            if secret.len() < HS256_SECRET_LEN_MIN {
                return refuse(format!(
                    "DMPAY_JWT_HS256_SECRET shorter than {HS256_SECRET_LEN_MIN} bytes ({} given)",
                    secret.len()
                ));
            }
        }
        let ring =
            self.key_ring().map_err(|e| ConfigError::Invalid { name: "DMPAY_VAULT_KEKS", detail: e.to_string() })?;
        if ring.uses_dev_keys() {
            return refuse("the development vault keys: set DMPAY_VAULT_KEKS and DMPAY_VAULT_FINGERPRINT_KEY".into());
        }
        match self.processor {
            None => refuse(
                "a card processor nobody named: set DMPAY_PROCESSOR (the only one built in is `sandbox`, which \
                 production also refuses unless DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION=true)"
                    .into(),
            ),
            Some(ProcessorKind::Sandbox) if !self.allow_sandbox_in_production => refuse(
                "DMPAY_PROCESSOR=sandbox: the sandbox moves no real money; set \
                 DMPAY_ALLOW_SANDBOX_PROCESSOR_IN_PRODUCTION=true only for a staging system that must run as \
                 production"
                    .into(),
            ),
            Some(ProcessorKind::Sandbox) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_hold_no_password() {
        assert_eq!(url_for_logs("postgres://app:s3cret@db:5432/pay?sslmode=require"), "postgres://app@db:5432/pay");
        assert_eq!(url_for_logs("postgres://db/pay?password=s3cret"), "postgres://db/pay");
        assert_eq!(url_for_logs("sqlite://var/dmpay.db"), "sqlite://var/dmpay.db");
        assert_eq!(url_for_logs("p@ss://"), "p@ss://");
        assert!(!url_for_logs("nonsense").contains("nonsense"));
    }

    #[test]
    fn only_the_documented_off_switches_hs256_off() {
        assert!(check_hs256_spelling("off").is_ok());
        assert!(check_hs256_spelling("a-real-secret").is_ok());
        for bad in ["OFF", "Off", " off", "off ", "disabled", "None", "false", "0", ""] {
            let err = check_hs256_spelling(bad).unwrap_err();
            assert!(err.to_string().starts_with("DMPAY_JWT_HS256_SECRET"), "{bad:?}: {err}");
        }
    }
}
