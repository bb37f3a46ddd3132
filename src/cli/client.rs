//! What every client command (`pay`, `cards`, `accounts`, `finance`) shares: the
//! server's address, the caller's token, and errors that say what to change.
//!
//! - The address comes from `--addr` or `DMPAY_ADDR`, as `host:port` or a URL.
//! - The token comes from `--token` or `DMPAY_TOKEN`; without one, a development server's
//!   token is minted for `--user` (`DMPAY_USER`) with the dev secret, as `dmpay token`
//!   would, and production refuses.
//! - A failed call prints its gRPC code, message, reason and each field at fault.

use std::time::Duration;

use tonic::transport::Channel;
use tonic::Request;
use tonic_types::StatusExt;

use crate::config::Config;

/// How long a minted development token lives: one command's worth.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(300);

/// The server's address as a URL: `host:port` gets `http://`.
pub fn url_of(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// A channel to the server at `addr`, or an error naming the address and the setting.
pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let url = url_of(addr);
    let endpoint = Channel::from_shared(url.clone()).map_err(|_| {
        anyhow::anyhow!("{addr:?} is not a server address like 127.0.0.1:50051 (set --addr or DMPAY_ADDR)")
    })?;
    endpoint.connect_timeout(Duration::from_secs(5)).connect().await.map_err(|e| {
        let cause = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
        anyhow::anyhow!(
            "cannot reach dmpay at {url} ({cause}); start it (`make run`) or point --addr / DMPAY_ADDR at it"
        )
    })
}

/// The bearer token a client command sends: the given one, or in development one
/// minted for `user` with `scope`.
pub fn token(config: &Config, given: Option<&str>, user: Option<&str>, scope: &str) -> anyhow::Result<String> {
    if let Some(t) = given {
        return Ok(t.to_owned());
    }
    let Some(user) = user else {
        anyhow::bail!("say who acts: --user (DMPAY_USER) on a development server, or --token (DMPAY_TOKEN)");
    };
    crate::auth::mint_dev_token(&config.jwt(), user, scope, DEV_TOKEN_TTL)
        .map_err(|e| anyhow::anyhow!("{e}; pass --token or set DMPAY_TOKEN"))
}

/// `msg` with the caller's token.
pub fn authed<T>(msg: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(req)
}

/// A refused call as one readable error: code, message, and the details a client acts
/// on (the reason, each field at fault, when to retry).
pub fn refused(status: tonic::Status) -> anyhow::Error {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let details = status.get_error_details();
    if let Some(info) = details.error_info() {
        text.push_str(&format!(" [reason {}]", info.reason));
    }
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            text.push_str(&format!("\n  field {}: {}", v.field, v.description));
        }
    }
    if let Some(retry) = details.retry_info().and_then(|r| r.retry_delay) {
        text.push_str(&format!("\n  retry in {:.1} s", retry.as_secs_f64()));
    }
    anyhow::anyhow!(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_port_becomes_a_url() {
        assert_eq!(url_of("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(url_of(" localhost:1 "), "http://localhost:1");
        assert_eq!(url_of("https://pay.example.com"), "https://pay.example.com");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named_with_the_setting() {
        // Port 1 on loopback: nothing listens there.
        let e = connect("127.0.0.1:1").await.unwrap_err().to_string();
        assert!(e.contains("http://127.0.0.1:1") && e.contains("DMPAY_ADDR"), "{e}");
        let e = connect("not an address").await.unwrap_err().to_string();
        assert!(e.contains("DMPAY_ADDR"), "{e}");
    }
}
