//! Drives a running development dmpay through a live-stream flash sale: the platform
//! makes Sam a seller, Sam lists 5 mugs in stream `live-42`, 20 funded viewers tap Buy at
//! once (5 are sold, 15 told SOLD_OUT), Vic opens a stream tab with his card and buys
//! twice on it, Wes pays for one with his wallet and his card, Sam refunds one sale with
//! the unit back on sale, the stream ends (the tab is captured once), and Sam reads his
//! sales and balances.
//!
//! ```sh
//! DMPAY_ENV=development cargo run --example live_shop_demo -- http://127.0.0.1:50051
//! ```

use std::time::Duration;

use dmpay::api::pb;
use dmpay::config::Config;
use tonic::Request;
use tonic_types::StatusExt;

type Channel = tonic::transport::Channel;

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let config = Config::load(None)?;
    let token =
        |sub: &str, scope: &str| dmpay::auth::mint_dev_token(&config.jwt(), sub, scope, Duration::from_secs(600));
    let user_scopes = "payments:write payments:read methods:write";
    // A fresh run id, so the demo can run again on the same database.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let stream = format!("live-42-{run}");
    let sam_id = format!("sam-{run}");
    let sam = token(&sam_id, user_scopes)?;
    let platform = token("platform", "accounts:admin ledger:write shopping:admin")?;
    let channel = Channel::from_shared(addr)?.connect().await?;
    let mut accounts = pb::accounts_client::AccountsClient::new(channel.clone());
    let mut shopping = pb::shopping_client::ShoppingClient::new(channel.clone());
    let mut ledger = pb::ledger_client::LedgerClient::new(channel.clone());

    // The platform makes Sam a seller (default commission).
    accounts
        .upsert_account(authed(pb::UpsertAccountRequest { user_id: sam_id.clone(), ..Default::default() }, &platform))
        .await?;
    let account = accounts
        .set_seller(authed(
            pb::SetSellerRequest { user_id: sam_id.clone(), seller: true, commission_bps: None, reason: "demo".into() },
            &platform,
        ))
        .await?
        .into_inner();
    println!("{sam_id} is a seller, commission {} bps", account.commission_bps);

    // Sam lists 5 mugs at 12.00, at most one per viewer.
    let listing = shopping
        .create_listing(authed(
            pb::CreateListingRequest {
                idempotency_key: "mugs".into(),
                stream_id: stream.clone(),
                title: "Hand-thrown mug".into(),
                unit_price: usd("12.00"),
                quantity: 5,
                per_buyer_max: 1,
                ..Default::default()
            },
            &sam,
        ))
        .await?
        .into_inner();
    println!("listing {} in {stream}: {} x {}", listing.listing_id, listing.quantity, amount(&listing.unit_price));

    // 20 viewers with 20.00 each tap Buy at once.
    let mut viewers = Vec::new();
    for i in 0..20 {
        let id = format!("viewer{i}-{run}");
        accounts
            .upsert_account(authed(pb::UpsertAccountRequest { user_id: id.clone(), ..Default::default() }, &platform))
            .await?;
        let fund = pb::PostEntryRequest {
            idempotency_key: format!("fund-{id}"),
            kind: "deposit".into(),
            postings: vec![
                pb::Posting {
                    account_code: "platform:treasury:USD".into(),
                    direction: pb::Direction::Debit as i32,
                    amount: usd("20.00"),
                },
                pb::Posting {
                    account_code: format!("user:{id}:wallet:USD"),
                    direction: pb::Direction::Credit as i32,
                    amount: usd("20.00"),
                },
            ],
            ..Default::default()
        };
        ledger.post_entry(authed(fund, &platform)).await?;
        viewers.push((id.clone(), token(&id, user_scopes)?));
    }
    let mut taps = tokio::task::JoinSet::new();
    for (id, t) in viewers.clone() {
        let (mut shop, listing_id) = (shopping.clone(), listing.listing_id.clone());
        taps.spawn(async move {
            let req =
                pb::PurchaseRequest { idempotency_key: "tap".into(), listing_id, quantity: 1, ..Default::default() };
            (id, shop.purchase(authed(req, &t)).await)
        });
    }
    let (mut sold, mut sold_out) = (Vec::new(), 0);
    while let Some(r) = taps.join_next().await {
        match r? {
            (id, Ok(p)) => {
                let p = p.into_inner();
                println!("  {id}: bought, sold {}/{}", p.listing_sold, listing.quantity);
                sold.push(p);
            }
            (_, Err(e)) => {
                let reason = e.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default();
                if reason == "SOLD_OUT" {
                    sold_out += 1;
                } else {
                    println!("  refused: {:?} {reason} {}", e.code(), e.message());
                }
            }
        }
    }
    println!("burst: {} sold, {sold_out} told SOLD_OUT", sold.len());

    // Vic opens a tab with his card and buys on it twice (an unlimited listing).
    let vic_id = format!("vic-{run}");
    let vic = token(&vic_id, user_scopes)?;
    let mut methods = pb::payment_methods_client::PaymentMethodsClient::new(channel.clone());
    let card = pb::TokenizeCardRequest {
        card_number: "4242424242424242".into(),
        exp_month: 12,
        exp_year: 2030,
        cvc: "123".into(),
        holder_name: "Vic".into(),
        postal_code: "10115".into(),
    };
    let pm = methods.tokenize_card(authed(card, &vic)).await?.into_inner();
    methods
        .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token, make_default: true }, &vic))
        .await?;
    let stickers = shopping
        .create_listing(authed(
            pb::CreateListingRequest {
                idempotency_key: "stickers".into(),
                stream_id: stream.clone(),
                title: "Sticker pack".into(),
                unit_price: usd("3.50"),
                unlimited: true,
                ..Default::default()
            },
            &sam,
        ))
        .await?
        .into_inner();
    let tab = shopping
        .open_tab(authed(
            pb::OpenTabRequest {
                idempotency_key: "tab".into(),
                stream_id: stream.clone(),
                cap: usd("25.00"),
                ..Default::default()
            },
            &vic,
        ))
        .await?
        .into_inner();
    println!(
        "vic: tab {} authorized for {} -> {:?}",
        tab.tab_id,
        amount(&tab.cap),
        pb::TabStatus::try_from(tab.status)
    );
    for k in 0..2 {
        let req = pb::PurchaseRequest {
            idempotency_key: format!("sticker-{k}"),
            listing_id: stickers.listing_id.clone(),
            quantity: 1,
            tab_id: tab.tab_id.clone(),
            ..Default::default()
        };
        let p = shopping.purchase(authed(req, &vic)).await?.into_inner();
        println!("  vic: bought {} on the tab ({})", p.purchase_id, amount(&p.amount));
    }

    // Wes has no tab and 1.00 in his wallet: one tap pays 1.00 from the wallet and the
    // rest by his card, authorized, then captured once the purchase is made.
    let wes_id = format!("wes-{run}");
    let wes = token(&wes_id, user_scopes)?;
    let card = pb::TokenizeCardRequest {
        card_number: "5555555555554444".into(),
        exp_month: 12,
        exp_year: 2030,
        cvc: "123".into(),
        holder_name: "Wes".into(),
        postal_code: "10115".into(),
    };
    let pm = methods.tokenize_card(authed(card, &wes)).await?.into_inner();
    methods
        .link_payment_method(authed(pb::LinkPaymentMethodRequest { token: pm.token, make_default: true }, &wes))
        .await?;
    let fund = pb::PostEntryRequest {
        idempotency_key: format!("fund-{wes_id}"),
        kind: "deposit".into(),
        postings: vec![
            pb::Posting {
                account_code: "platform:treasury:USD".into(),
                direction: pb::Direction::Debit as i32,
                amount: usd("1.00"),
            },
            pb::Posting {
                account_code: format!("user:{wes_id}:wallet:USD"),
                direction: pb::Direction::Credit as i32,
                amount: usd("1.00"),
            },
        ],
        ..Default::default()
    };
    ledger.post_entry(authed(fund, &platform)).await?;
    let req = pb::PurchaseRequest {
        idempotency_key: "sticker".into(),
        listing_id: stickers.listing_id.clone(),
        quantity: 1,
        ..Default::default()
    };
    let p = shopping.purchase(authed(req, &wes)).await?.into_inner();
    println!(
        "  wes: bought {} for {}: {} from the wallet, {} by card (+{} fee)",
        p.purchase_id,
        amount(&p.amount),
        amount(&p.wallet_amount),
        amount(&p.card_amount),
        amount(&p.fee_amount)
    );

    // Sam refunds the first mug sale in full and puts the mug back on sale.
    if let Some(first) = sold.first() {
        let r = shopping
            .refund_purchase(authed(
                pb::RefundPurchaseRequest {
                    purchase_id: first.purchase_id.clone(),
                    amount: None,
                    restock_quantity: 1,
                    idempotency_key: "refund-1".into(),
                },
                &sam,
            ))
            .await?
            .into_inner();
        println!(
            "sam refunds {}: {} back, {:?}",
            r.purchase_id,
            amount(&r.refunded_amount),
            pb::PurchaseStatus::try_from(r.status)
        );
    }

    // The stream ends: listings close, the tab is captured once.
    let ended =
        shopping.end_stream(authed(pb::EndStreamRequest { stream_id: stream.clone() }, &platform)).await?.into_inner();
    println!("stream ended: {} listings closed, {} tabs closed", ended.listings_closed, ended.tabs_closed);
    let tab = shopping.get_tab(authed(pb::GetTabRequest { tab_id: tab.tab_id }, &vic)).await?.into_inner();
    println!(
        "vic's tab: spent {}, captured {} -> {:?}",
        amount(&tab.spent),
        amount(&tab.captured),
        pb::TabStatus::try_from(tab.status)
    );

    // Sam's statement: sales and balances.
    let sales = shopping
        .list_sales(authed(pb::ListSalesRequest { page_size: 50, ..Default::default() }, &sam))
        .await?
        .into_inner();
    println!("sam's sales ({}):", sales.sales.len());
    for s in &sales.sales {
        println!(
            "  {} {} x{} {} (commission {}, refunded {}) {:?}{}",
            s.purchase_id,
            s.buyer_id,
            s.quantity,
            amount(&s.amount),
            amount(&s.commission),
            amount(&s.refunded_amount),
            pb::PurchaseStatus::try_from(s.status),
            match (s.tab_id.is_empty(), amount(&s.card_amount).as_str()) {
                (true, _) => String::new(),
                (false, "0.00") => " on a tab".to_owned(),
                (false, card) => format!(" {card} by card"),
            }
        );
    }
    let b = shopping
        .get_seller_balance(authed(pb::GetSellerBalanceRequest { currency: "USD".into(), ..Default::default() }, &sam))
        .await?
        .into_inner();
    println!("sam's money: pending {}, available {}", amount(&b.pending), amount(&b.available));
    Ok(())
}
