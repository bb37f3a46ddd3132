//! Drives a running dmpay like a chat client, so the finance commands have something to
//! show: alice links a card, tops up, and pays bob three times (card, split, wallet).
//!
//! ```sh
//! DMPAY_ENV=development cargo run --example dm_demo -- http://127.0.0.1:50051
//! ```

use std::time::Duration;

use dmpay::api::pb;
use dmpay::config::Config;
use tonic::Request;

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let config = Config::load(None)?;
    let token =
        |sub: &str, scope: &str| dmpay::auth::mint_dev_token(&config.jwt(), sub, scope, Duration::from_secs(600));
    let alice = token("alice", "payments:write payments:read methods:write")?;
    let treasury = token("treasury", "ledger:write")?;
    let platform = token("platform-users", "accounts:admin")?;
    let channel = tonic::transport::Channel::from_shared(addr)?.connect().await?;
    // The platform creates its users' accounts when they sign up; a payment to a name
    // without one is refused.
    let mut accounts = pb::accounts_client::AccountsClient::new(channel.clone());
    for (user, name) in [("alice", "Alice"), ("bob", "Bob")] {
        accounts
            .upsert_account(authed(
                pb::UpsertAccountRequest { user_id: user.into(), display_name: name.into(), ..Default::default() },
                &platform,
            ))
            .await?;
    }
    let mut methods = pb::payment_methods_client::PaymentMethodsClient::new(channel.clone());
    let mut payments = pb::payments_client::PaymentsClient::new(channel.clone());
    let mut ledger = pb::ledger_client::LedgerClient::new(channel);

    let card = pb::TokenizeCardRequest {
        card_number: "4242 4242 4242 4242".into(),
        exp_month: 12,
        exp_year: 2030,
        cvc: "123".into(),
        holder_name: "Alice".into(),
        postal_code: "10115".into(),
    };
    let pm = methods.tokenize_card(authed(card, &alice)).await?.into_inner();
    methods
        .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token, make_default: true }, &alice))
        .await?;
    let usd = |a: &str| Some(pb::Money { currency: "USD".into(), amount: a.into() });
    let posting = |code: &str, direction: pb::Direction, a: &str| pb::Posting {
        account_code: code.into(),
        direction: direction as i32,
        amount: usd(a),
    };
    ledger
        .post_entry(authed(
            pb::PostEntryRequest {
                idempotency_key: "demo-topup".into(),
                kind: "deposit".into(),
                postings: vec![
                    posting("platform:treasury:USD", pb::Direction::Debit, "25.00"),
                    posting("user:alice:wallet:USD", pb::Direction::Credit, "25.00"),
                ],
                ..Default::default()
            },
            &treasury,
        ))
        .await?;
    for (key, amount, funding) in [
        ("demo-1", "40.00", pb::FundingSource::Card),
        ("demo-2", "35.00", pb::FundingSource::Auto),
        ("demo-3", "12.50", pb::FundingSource::Auto),
    ] {
        let p = payments
            .send_payment(authed(
                pb::SendPaymentRequest {
                    idempotency_key: key.into(),
                    recipient_id: "bob".into(),
                    amount: usd(amount),
                    note: format!("demo {key}"),
                    conversation_id: "dm-alice-bob".into(),
                    funding_source: funding as i32,
                    ..Default::default()
                },
                &alice,
            ))
            .await?
            .into_inner();
        println!(
            "{} {} {} (card {}) -> {:?}",
            p.payment_id,
            p.amount.map(|m| m.amount).unwrap_or_default(),
            p.sender_id,
            p.card_funded_amount.map(|m| m.amount).unwrap_or_default(),
            pb::PaymentStatus::try_from(p.status)
        );
    }
    Ok(())
}
