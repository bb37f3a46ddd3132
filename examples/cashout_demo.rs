//! Drives a running development dmpay through money out and money back, so the finance
//! commands have payouts and a dispute to show: Alice is paid 30.00 by Bob with the
//! sandbox's dispute test card and cashes 20.00 out instantly; Carol cashes 25.00 out to
//! a card whose payouts come back. A few seconds later the server's resolver has applied
//! the processor's notifications: Carol's payout is RETURNED, Bob's payment DISPUTED and
//! Alice owes what her wallet could not cover.
//!
//! ```sh
//! DMPAY_ENV=development cargo run --example cashout_demo -- http://127.0.0.1:50051
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

fn usd(a: &str) -> Option<pb::Money> {
    Some(pb::Money { currency: "USD".into(), amount: a.into() })
}

fn amount(m: &Option<pb::Money>) -> String {
    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
}

type Channel = tonic::transport::Channel;

/// Tokenizes and links `number` as the user's default card.
async fn link(channel: &Channel, token: &str, number: &str) -> anyhow::Result<()> {
    let mut methods = pb::payment_methods_client::PaymentMethodsClient::new(channel.clone());
    let card = pb::TokenizeCardRequest {
        card_number: number.into(),
        exp_month: 12,
        exp_year: 2030,
        cvc: "123".into(),
        holder_name: "Demo".into(),
        postal_code: "10115".into(),
    };
    let pm = methods.tokenize_card(authed(card, token)).await?.into_inner();
    methods
        .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token, make_default: true }, token))
        .await?;
    Ok(())
}

fn show_payout(who: &str, p: &pb::Payout) {
    println!(
        "{who}: payout {} of {} (fee {}, to the card {}) -> {:?}",
        p.payout_id,
        amount(&p.amount),
        amount(&p.fee),
        amount(&p.net_amount),
        pb::PayoutStatus::try_from(p.status)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let config = Config::load(None)?;
    let token =
        |sub: &str, scope: &str| dmpay::auth::mint_dev_token(&config.jwt(), sub, scope, Duration::from_secs(600));
    let scopes = "payments:write payments:read methods:write";
    let (alice, bob, carol) = (token("alice", scopes)?, token("bob", scopes)?, token("carol", scopes)?);
    let treasury = token("treasury", "ledger:write")?;
    let platform = token("platform-users", "accounts:admin")?;
    let channel = Channel::from_shared(addr)?.connect().await?;
    let mut accounts = pb::accounts_client::AccountsClient::new(channel.clone());
    for (user, name) in [("alice", "Alice"), ("bob", "Bob"), ("carol", "Carol")] {
        accounts
            .upsert_account(authed(
                pb::UpsertAccountRequest { user_id: user.into(), display_name: name.into(), ..Default::default() },
                &platform,
            ))
            .await?;
    }
    let mut payments = pb::payments_client::PaymentsClient::new(channel.clone());

    // Bob pays Alice with the sandbox's dispute test card: its captures are disputed.
    link(&channel, &bob, "4000000000000259").await?;
    let paid = payments
        .send_payment(authed(
            pb::SendPaymentRequest {
                idempotency_key: "cashout-demo-pay".into(),
                recipient_id: "alice".into(),
                amount: usd("30.00"),
                note: "concert tickets".into(),
                conversation_id: "dm-alice-bob".into(),
                funding_source: pb::FundingSource::Card as i32,
                ..Default::default()
            },
            &bob,
        ))
        .await?
        .into_inner();
    println!(
        "bob -> alice: payment {} of 30.00 by card -> {:?}",
        paid.payment_id,
        pb::PaymentStatus::try_from(paid.status)
    );

    // Alice cashes 20.00 out at once to her debit card.
    link(&channel, &alice, "4000056655665556").await?;
    let instant = pb::CreatePayoutRequest {
        idempotency_key: "cashout-demo-alice".into(),
        amount: usd("20.00"),
        speed: pb::PayoutSpeed::Instant as i32,
        payment_method_token: String::new(),
    };
    show_payout("alice", &payments.create_payout(authed(instant, &alice)).await?.into_inner());

    // Carol, topped up by the platform, cashes out to a card whose payouts come back.
    pb::ledger_client::LedgerClient::new(channel.clone())
        .post_entry(authed(
            pb::PostEntryRequest {
                idempotency_key: "cashout-demo-topup".into(),
                kind: "deposit".into(),
                postings: vec![
                    pb::Posting {
                        account_code: "platform:treasury:USD".into(),
                        direction: pb::Direction::Debit as i32,
                        amount: usd("50.00"),
                    },
                    pb::Posting {
                        account_code: "user:carol:wallet:USD".into(),
                        direction: pb::Direction::Credit as i32,
                        amount: usd("50.00"),
                    },
                ],
                ..Default::default()
            },
            &treasury,
        ))
        .await?;
    link(&channel, &carol, "4000000000004228").await?;
    let standard = pb::CreatePayoutRequest {
        idempotency_key: "cashout-demo-carol".into(),
        amount: usd("25.00"),
        speed: pb::PayoutSpeed::Standard as i32,
        payment_method_token: String::new(),
    };
    let carols = payments.create_payout(authed(standard, &carol)).await?.into_inner();
    show_payout("carol", &carols);

    // The resolver applies the processor's notifications within a few ticks.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let carols = payments.get_payout(authed(pb::GetPayoutRequest { payout_id: carols.payout_id }, &carol)).await?;
    show_payout("carol, later", &carols.into_inner());
    let p = payments.get_payment(authed(pb::GetPaymentRequest { payment_id: paid.payment_id }, &alice)).await?;
    println!("the payment, later: dispute {:?}", pb::DisputeStatus::try_from(p.into_inner().dispute_status));
    for (who, t) in [("alice", &alice), ("carol", &carol)] {
        let b = payments.get_balance(authed(pb::GetBalanceRequest { currency: "USD".into() }, t)).await?.into_inner();
        println!("{who}'s wallet: available {}", amount(&b.available));
    }
    let send = pb::SendPaymentRequest {
        idempotency_key: "cashout-demo-owing".into(),
        recipient_id: "bob".into(),
        amount: usd("1.00"),
        funding_source: pb::FundingSource::Balance as i32,
        ..Default::default()
    };
    match payments.send_payment(authed(send, &alice)).await {
        Ok(_) => println!("alice sent 1.00"),
        Err(e) => println!("alice tries to send 1.00: {:?} {}", e.code(), e.message()),
    }
    Ok(())
}
