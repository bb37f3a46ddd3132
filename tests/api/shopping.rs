//! Live shopping through the real server: sellers, listings, a flash sale that never
//! oversells under parallel buyers, a failed payment giving its unit back, held proceeds
//! released after the hold or on delivery, refunds, commission, events and bad input.

use std::sync::Arc;

use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;
use crate::{backend_fn_tests, backend_tests};

pub(crate) const SHOP: &str = "payments:read payments:write";

pub(crate) fn reason(status: &tonic::Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

pub(crate) fn field(status: &tonic::Status) -> String {
    status.get_error_details().bad_request().map(|b| b.field_violations[0].field.clone()).unwrap_or_default()
}

pub(crate) fn amt(m: &Option<pb::Money>) -> String {
    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
}

pub(crate) fn shopping(app: &TestApp) -> pb::shopping_client::ShoppingClient<tonic::transport::Channel> {
    pb::shopping_client::ShoppingClient::new(app.channel.clone())
}

/// Makes `user` a seller (with a commission override when given).
pub(crate) async fn make_seller(app: &TestApp, user: &str, commission_bps: Option<i32>) -> pb::Account {
    app.users(&[user]).await;
    let admin = app.token("platform", "accounts:admin");
    app.accounts()
        .set_seller(authed(
            pb::SetSellerRequest { user_id: user.into(), seller: true, commission_bps, reason: "onboarded".into() },
            &admin,
        ))
        .await
        .expect("set seller")
        .into_inner()
}

pub(crate) fn listing_req(
    key: &str,
    stream: &str,
    price: &str,
    quantity: i64,
    per_buyer_max: i64,
) -> pb::CreateListingRequest {
    pb::CreateListingRequest {
        idempotency_key: key.into(),
        stream_id: stream.into(),
        title: "Ceramic mug".into(),
        unit_price: usd(price),
        quantity,
        unlimited: quantity == 0,
        per_buyer_max,
        ..Default::default()
    }
}

pub(crate) async fn create_listing(
    app: &TestApp,
    seller: &str,
    req: pb::CreateListingRequest,
) -> Result<pb::Listing, tonic::Status> {
    let t = app.token(seller, SHOP);
    shopping(app).create_listing(authed(req, &t)).await.map(|r| r.into_inner())
}

pub(crate) async fn buy(
    app: &TestApp,
    buyer: &str,
    key: &str,
    listing: &str,
    quantity: i64,
) -> Result<pb::PurchaseReceipt, tonic::Status> {
    let req =
        pb::PurchaseRequest { idempotency_key: key.into(), listing_id: listing.into(), quantity, ..Default::default() };
    purchase(app, buyer, req).await
}

pub(crate) async fn purchase(
    app: &TestApp,
    buyer: &str,
    req: pb::PurchaseRequest,
) -> Result<pb::PurchaseReceipt, tonic::Status> {
    let t = app.token(buyer, SHOP);
    shopping(app).purchase(authed(req, &t)).await.map(|r| r.into_inner())
}

pub(crate) async fn seller_balance(app: &TestApp, seller: &str) -> pb::SellerBalance {
    let t = app.token(seller, SHOP);
    shopping(app)
        .get_seller_balance(authed(
            pb::GetSellerBalanceRequest { currency: "USD".into(), seller_id: String::new() },
            &t,
        ))
        .await
        .expect("seller balance")
        .into_inner()
}

pub(crate) async fn get_listing(app: &TestApp, id: &str) -> pb::Listing {
    let t = app.token("viewer", SHOP);
    shopping(app).get_listing(authed(pb::GetListingRequest { listing_id: id.into() }, &t)).await.unwrap().into_inner()
}

pub(crate) async fn refund(
    app: &TestApp,
    seller: &str,
    purchase: &str,
    amount: Option<&str>,
    restock: i64,
    key: &str,
) -> Result<pb::PurchaseReceipt, tonic::Status> {
    let t = app.token(seller, SHOP);
    shopping(app)
        .refund_purchase(authed(
            pb::RefundPurchaseRequest {
                purchase_id: purchase.into(),
                amount: amount.and_then(usd),
                restock_quantity: restock,
                idempotency_key: key.into(),
            },
            &t,
        ))
        .await
        .map(|r| r.into_inner())
}

/// Funds `n` buyers named `{prefix}{i}` with `amount` each, a few at a time.
pub(crate) async fn fund_buyers(app: &TestApp, prefix: &str, n: usize, amount: &str) -> Vec<String> {
    let t = app.token("svc", LEDGER_SCOPES);
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    for name in &names {
        fund(app, &t, name, amount).await;
    }
    names
}

/// Waits for every task, in order. Every task is started first: `tasks` is often a lazy
/// `map` that spawns, which awaited one by one would run the calls one at a time.
pub(crate) async fn join_all<T>(tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let tasks: Vec<tokio::task::JoinHandle<T>> = tasks.into_iter().collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// A flash sale of K units with 10 x K parallel buyers sells exactly K: every other
/// buyer gets SOLD_OUT and is charged nothing, the seller's pending balance and the
/// platform's commission are exactly K sales' worth, and the books balance.
async fn flash_sale_sells_exactly_k(app: TestApp) {
    const K: usize = 25;
    make_seller(&app, "seller", None).await;
    let listing = create_listing(&app, "seller", listing_req("fs-1", "live-1", "10.00", K as i64, 1)).await.unwrap();
    assert_eq!(listing.status, pb::ListingStatus::Open as i32);
    let buyers = fund_buyers(&app, "fan", 10 * K, "20.00").await;
    let app = Arc::new(app);
    let calls = buyers.iter().map(|b| {
        let (app, b, id) = (app.clone(), b.clone(), listing.listing_id.clone());
        tokio::spawn(async move { (b.clone(), buy(&app, &b, "tap", &id, 1).await) })
    });
    let results: Vec<(String, Result<pb::PurchaseReceipt, tonic::Status>)> = join_all(calls).await;
    let mut sold_counts = Vec::new();
    let mut winners = Vec::new();
    for (buyer, r) in &results {
        match r {
            Ok(p) => {
                assert_eq!(amt(&p.amount), "10.00");
                assert_eq!(amt(&p.commission), "0.50", "the default commission is 5%");
                sold_counts.push(p.listing_sold);
                winners.push(buyer.clone());
            }
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                assert_eq!(reason(s), "SOLD_OUT", "{s:?}");
            }
        }
    }
    assert_eq!(winners.len(), K, "exactly K purchases");
    sold_counts.sort_unstable();
    assert_eq!(sold_counts, (1..=K as i64).collect::<Vec<_>>(), "each sale saw the count after it, once");
    let l = get_listing(&app, &listing.listing_id).await;
    assert_eq!((l.sold, l.status), (K as i64, pb::ListingStatus::SoldOut as i32));
    assert_eq!(app.count("purchases").await, K as i64);
    for (buyer, r) in &results {
        let w = app.wallet(buyer).await;
        let expected = if r.is_ok() { "10.00" } else { "20.00" };
        assert_eq!(amt(&w.available), expected, "{buyer}");
    }
    let b = seller_balance(&app, "seller").await;
    assert_eq!((amt(&b.pending), amt(&b.available)), (format!("{:.2}", K as f64 * 9.5), "0.00".into()));
    let t = app.token("svc", LEDGER_SCOPES);
    let commissions = balance(&app, &t, "platform:commissions:USD").await;
    assert_eq!(amt(&commissions.posted), format!("{:.2}", K as f64 * 0.5));
    // Another tap after the sale: SOLD_OUT at once, nothing written.
    let late = buy(&app, &buyers[0], "late", &listing.listing_id, 1).await.unwrap_err();
    assert_eq!(reason(&late), "SOLD_OUT");
    assert_eq!(app.count("purchases").await, K as i64);
    assert_books_balance(&app).await;
}

/// A live stream's burst on one seller, purchases and sends to them at once, runs on
/// PostgreSQL as hot-account batches, each gathering calls while the seller's batch in
/// flight commits. Every purchase and send is booked once, with its one event, and
/// the outbox sequence has no gap. SQLite's one worker never has a batch in flight while
/// it gathers, so none of its batches is hot.
async fn a_burst_on_one_seller_is_booked_exactly(backend: Backend) {
    // Calls per round, half purchases and half sends; rounds until a batch was hot.
    const PER_ROUND: usize = 60;
    const ROUNDS_MAX: usize = 5;
    let Some(app) = TestApp::spawn(backend).await else { return };
    make_seller(&app, "seller", None).await;
    let stock = (PER_ROUND * ROUNDS_MAX) as i64;
    let listing = create_listing(&app, "seller", listing_req("hot-1", "live-hot", "2.00", stock, 1)).await.unwrap();
    let fans = fund_buyers(&app, "hot", PER_ROUND * ROUNDS_MAX, "10.00").await;
    let postgres = backend == Backend::Postgres;
    let app = Arc::new(app);
    let mut calls_made = 0;
    for round in 0..ROUNDS_MAX {
        let calls = fans[round * PER_ROUND..(round + 1) * PER_ROUND].iter().enumerate().map(|(i, fan)| {
            let (app, fan, id) = (app.clone(), fan.clone(), listing.listing_id.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    buy(&app, &fan, "tap", &id, 1).await.map(|_| ())
                } else {
                    let t = app.token(&fan, PAY_SCOPES);
                    app.send(&t, "tip", "seller", "1.00", pb::FundingSource::Balance).await.map(|_| ())
                }
            })
        });
        for r in join_all(calls).await {
            r.expect("every call of the burst succeeds");
        }
        calls_made += PER_ROUND;
        if !postgres || app.metric("dmpay_ledger_hot_batches_total").await > 0.0 {
            break;
        }
    }
    let hot = app.metric("dmpay_ledger_hot_batches_total").await;
    if postgres {
        assert!(hot > 0.0, "{calls_made} calls on one seller made no hot batch");
    } else {
        assert_eq!(hot, 0.0);
    }
    let (purchases, sends) = (calls_made.div_ceil(2) as i64, (calls_made / 2) as i64);
    assert_eq!(get_listing(&app, &listing.listing_id).await.sold, purchases);
    assert_eq!(app.count("purchases").await, purchases);
    let b = seller_balance(&app, "seller").await;
    assert_eq!(amt(&b.pending), format!("{:.2}", purchases as f64 * 1.90), "price less the 5% commission");
    assert_eq!(amt(&app.wallet("seller").await.available), format!("{sends}.00"));
    for (i, fan) in fans[..calls_made].iter().enumerate() {
        let left = if i % 2 == 0 { "8.00" } else { "9.00" };
        assert_eq!(amt(&app.wallet(fan).await.available), left, "{fan}");
    }
    let count = |sql: &'static str| {
        let db = app.db.clone();
        async move { dmpay::with_db!(&db, pool => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await).unwrap() }
    };
    assert_eq!(count("SELECT COUNT(*) FROM payment_events WHERE event_type = 'purchase.completed'").await, purchases);
    assert_eq!(count("SELECT COUNT(*) FROM payment_events WHERE event_type = 'payment.settled'").await, sends);
    assert_eq!(
        count("SELECT MAX(sequence) - MIN(sequence) + 1 - COUNT(*) FROM payment_events").await,
        0,
        "the outbox sequence has no gap"
    );
    assert_books_balance(&app).await;
}

/// A purchase from the wallet alone (`BALANCE`), which never charges a card.
async fn buy_from_wallet(
    app: &TestApp,
    buyer: &str,
    key: &str,
    listing: &str,
) -> Result<pb::PurchaseReceipt, tonic::Status> {
    let req = pb::PurchaseRequest {
        idempotency_key: key.into(),
        listing_id: listing.into(),
        quantity: 1,
        funding_source: pb::PurchaseFundingSource::Balance as i32,
        ..Default::default()
    };
    purchase(app, buyer, req).await
}

/// A purchase whose payment fails (the wallet cannot cover it) takes no unit: the
/// listing's two units still go to the next two buyers.
async fn a_failed_payment_gives_its_unit_back(app: TestApp) {
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("two", "live-2", "30.00", 2, 1)).await.unwrap();
    fund_buyers(&app, "rich", 2, "50.00").await;
    fund_buyers(&app, "poor", 1, "5.00").await;
    let refused = buy_from_wallet(&app, "poor0", "p", &l.listing_id).await.unwrap_err();
    assert_eq!((refused.code(), reason(&refused)), (Code::FailedPrecondition, "INSUFFICIENT_FUNDS".into()));
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 0, "the failed payment holds no unit");
    assert_eq!(app.count("purchases").await, 0, "a refused tap writes nothing");
    // In one parallel burst with the poor buyer again: both units sell to the others.
    let (a, b, c) = tokio::join!(
        buy(&app, "rich0", "r", &l.listing_id, 1),
        buy_from_wallet(&app, "poor0", "p2", &l.listing_id),
        buy(&app, "rich1", "r", &l.listing_id, 1)
    );
    assert!(a.is_ok() && c.is_ok(), "{a:?} {c:?}");
    // Refused for its wallet if it came first, or sold out if it came last.
    let refused = reason(&b.unwrap_err());
    assert!(refused == "INSUFFICIENT_FUNDS" || refused == "SOLD_OUT", "{refused}");
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 2);
    assert_eq!(amt(&app.wallet("poor0").await.available), "5.00");
    assert_books_balance(&app).await;
}

/// Proceeds stay pending for the hold, then become available (by the background
/// task); an order marked delivered is available at once.
async fn pending_becomes_available_after_the_hold(backend: Backend) {
    let Some(app) = TestApp::spawn_with(
        backend,
        &[
            ("DMPAY_SHOP_HOLD", "1h"),
            ("DMPAY_PAYMENTS_RESOLVE_INTERVAL", "200ms"),
            ("DMPAY_SHOP_COMMISSION_BPS", "1000"),
        ],
    )
    .await
    else {
        return;
    };
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("h", "live-3", "20.00", 0, 5)).await.unwrap();
    assert!(l.unlimited);
    fund_buyers(&app, "b", 2, "100.00").await;
    let p1 = buy(&app, "b0", "k", &l.listing_id, 2).await.unwrap();
    assert_eq!((amt(&p1.amount), amt(&p1.commission)), ("40.00".into(), "4.00".into()), "10% commission");
    let p2 = buy(&app, "b1", "k", &l.listing_id, 1).await.unwrap();
    let b = seller_balance(&app, "seller").await;
    assert_eq!((amt(&b.pending), amt(&b.available)), ("54.00".into(), "0.00".into()));
    // The seller cannot send held money.
    let seller = app.token("seller", PAY_SCOPES);
    let sent = app.send(&seller, "early", "b0", "1.00", pb::FundingSource::Balance).await.unwrap_err();
    assert_eq!(reason(&sent), "INSUFFICIENT_FUNDS");
    // Delivered: p2's share (18.00) is available at once.
    let admin = app.token("stream-service", "shopping:admin");
    let delivered = shopping(&app)
        .mark_delivered(authed(pb::MarkDeliveredRequest { purchase_id: p2.purchase_id.clone() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(delivered.released);
    let b = seller_balance(&app, "seller").await;
    assert_eq!((amt(&b.pending), amt(&b.available)), ("36.00".into(), "18.00".into()));
    // After the hold, the background task releases the rest.
    app.clock.set_offset_us(2 * 3_600_000_000);
    let mut released = false;
    for _ in 0..100 {
        let b = seller_balance(&app, "seller").await;
        if amt(&b.pending) == "0.00" {
            assert_eq!(amt(&b.available), "54.00");
            released = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(released, "the hold ended and nothing was released");
    let t = app.token("seller", SHOP);
    let sales = shopping(&app)
        .list_sales(authed(pb::ListSalesRequest { page_size: 1, ..Default::default() }, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sales.sales.len(), 1);
    assert_eq!(sales.sales[0].purchase_id, p2.purchase_id, "newest first");
    let next = shopping(&app)
        .list_sales(authed(
            pb::ListSalesRequest { page_size: 5, page_token: sales.next_page_token, ..Default::default() },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.sales.iter().map(|s| s.purchase_id.clone()).collect::<Vec<_>>(), vec![p1.purchase_id]);
    assert!(next.sales.iter().all(|s| s.released));
    assert_books_balance(&app).await;
    app.stop().await;
}

/// Refunds: partial from pending with units back on sale, the rest in full, the
/// commission returned in proportion, retries answered once; after the release a
/// refund comes from the wallet, and one the wallet cannot cover changes nothing.
async fn seller_refunds(app: TestApp) {
    make_seller(&app, "seller", Some(1000)).await;
    let l = create_listing(&app, "seller", listing_req("r", "live-4", "25.00", 10, 4)).await.unwrap();
    fund_buyers(&app, "b", 1, "200.00").await;
    let p = buy(&app, "b0", "k", &l.listing_id, 4).await.unwrap();
    assert_eq!((amt(&p.amount), amt(&p.commission)), ("100.00".into(), "10.00".into()));
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 4);

    let r1 = refund(&app, "seller", &p.purchase_id, Some("30.00"), 1, "rf-1").await.unwrap();
    assert_eq!(
        (amt(&r1.refunded_amount), r1.restocked, r1.status),
        ("30.00".into(), 1, pb::PurchaseStatus::PartiallyRefunded as i32)
    );
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 3, "the unit is back on sale");
    let again = refund(&app, "seller", &p.purchase_id, Some("30.00"), 1, "rf-1").await.unwrap();
    assert_eq!(amt(&again.refunded_amount), "30.00", "a retry refunds nothing more");
    let reused = refund(&app, "seller", &p.purchase_id, Some("31.00"), 1, "rf-1").await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    let over = refund(&app, "seller", &p.purchase_id, Some("70.01"), 0, "rf-x").await.unwrap_err();
    assert_eq!(reason(&over), "REFUND_EXCEEDS_PAYMENT");
    let restock = refund(&app, "seller", &p.purchase_id, Some("1.00"), 4, "rf-y").await.unwrap_err();
    assert_eq!(field(&restock), "restock_quantity");
    // Only the seller (or the platform) refunds; the buyer cannot.
    let by_buyer = refund(&app, "b0", &p.purchase_id, None, 0, "rf-b").await.unwrap_err();
    assert_eq!(by_buyer.code(), Code::NotFound);

    assert_eq!(amt(&app.wallet("b0").await.available), "130.00");
    let b = seller_balance(&app, "seller").await;
    assert_eq!(amt(&b.pending), "63.00", "90.00 share less 27.00 of the refund");
    let t = app.token("svc", LEDGER_SCOPES);
    assert_eq!(amt(&balance(&app, &t, "platform:commissions:USD").await.posted), "7.00");

    // The rest, in full: the whole commission comes back.
    let r2 = refund(&app, "seller", &p.purchase_id, None, 0, "rf-2").await.unwrap();
    assert_eq!((amt(&r2.refunded_amount), r2.status), ("100.00".into(), pb::PurchaseStatus::Refunded as i32));
    assert_eq!(amt(&app.wallet("b0").await.available), "200.00");
    assert_eq!(amt(&seller_balance(&app, "seller").await.pending), "0.00");
    assert_eq!(amt(&balance(&app, &t, "platform:commissions:USD").await.posted), "0.00");

    // After delivery the share is in the wallet: a refund comes from there.
    let p2 = buy(&app, "b0", "k2", &l.listing_id, 1).await.unwrap_err();
    assert_eq!(reason(&p2), "PER_BUYER_LIMIT", "4 bought already (refunds do not reset the count)");
    fund_buyers(&app, "c", 1, "50.00").await;
    let p2 = buy(&app, "c0", "k", &l.listing_id, 1).await.unwrap();
    let admin = app.token("stream-service", "shopping:admin");
    shopping(&app)
        .mark_delivered(authed(pb::MarkDeliveredRequest { purchase_id: p2.purchase_id.clone() }, &admin))
        .await
        .unwrap();
    assert_eq!(amt(&seller_balance(&app, "seller").await.available), "22.50");
    // The seller spends most of it: a full refund no longer fits and changes nothing.
    let seller = app.token("seller", PAY_SCOPES);
    app.send(&seller, "spend", "b0", "20.00", pb::FundingSource::Balance).await.unwrap();
    let short = refund(&app, "seller", &p2.purchase_id, None, 0, "rf-3").await.unwrap_err();
    assert_eq!(reason(&short), "INSUFFICIENT_FUNDS");
    let t2 = app.token("c0", SHOP);
    let after = shopping(&app)
        .get_purchase(authed(pb::GetPurchaseRequest { purchase_id: p2.purchase_id.clone() }, &t2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amt(&after.refunded_amount), "0.00", "a failed refund is undone");
    let small = refund(&app, "seller", &p2.purchase_id, Some("2.00"), 0, "rf-4").await.unwrap();
    assert_eq!(amt(&small.refunded_amount), "2.00");
    assert_eq!(amt(&app.wallet("c0").await.available), "27.00");
    assert_books_balance(&app).await;
}

/// Refused purchases and listings, each with a clear reason, writing nothing.
async fn bad_purchases_are_refused_and_write_nothing(app: TestApp) {
    make_seller(&app, "seller", None).await;
    app.users(&["nobody"]).await;
    let not_seller = create_listing(&app, "nobody", listing_req("x", "live-5", "1.00", 1, 1)).await.unwrap_err();
    assert_eq!(reason(&not_seller), "NOT_A_SELLER");
    for (req, f) in [
        (listing_req("x", "bad stream", "1.00", 1, 1), "stream_id"),
        (listing_req("x", "s", "1.00", 1_000_001, 1), "quantity"),
        (listing_req("x", "s", "-1.00", 1, 1), "unit_price.amount"),
        (listing_req("x", "s", "1.00", 1, -1), "per_buyer_max"),
        (pb::CreateListingRequest { title: String::new(), ..listing_req("x", "s", "1.00", 1, 1) }, "title"),
        (pb::CreateListingRequest { unlimited: true, ..listing_req("x", "s", "1.00", 1, 1) }, "quantity"),
    ] {
        let e = create_listing(&app, "seller", req).await.unwrap_err();
        assert_eq!((e.code(), field(&e)), (Code::InvalidArgument, f.to_owned()), "{e:?}");
    }
    let mallory = app.token("mallory", SHOP);
    let for_other = shopping(&app)
        .create_listing(authed(
            pb::CreateListingRequest { seller_id: "seller".into(), ..listing_req("x", "s", "1.00", 1, 1) },
            &mallory,
        ))
        .await
        .unwrap_err();
    assert_eq!(for_other.code(), Code::PermissionDenied);
    assert_eq!(app.count("listings").await, 0);

    let l = create_listing(&app, "seller", listing_req("ok", "live-5", "5.00", 10, 2)).await.unwrap();
    let soon = prost_types::Timestamp { seconds: 4_000_000_000, nanos: 0 };
    let later = create_listing(
        &app,
        "seller",
        pb::CreateListingRequest { starts_at: Some(soon), ..listing_req("later", "live-5", "5.00", 10, 2) },
    )
    .await
    .unwrap();
    assert_eq!(later.status, pb::ListingStatus::Scheduled as i32);
    fund_buyers(&app, "b", 1, "100.00").await;
    let closed = create_listing(&app, "seller", listing_req("closed", "live-5", "5.00", 10, 2)).await.unwrap();
    let t = app.token("seller", SHOP);
    shopping(&app)
        .close_listing(authed(pb::CloseListingRequest { listing_id: closed.listing_id.clone() }, &t))
        .await
        .unwrap();

    // (buyer, listing, quantity, the field named, code, reason)
    type Case<'a> = (&'a str, &'a str, i64, Option<&'a str>, Code, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("b0", closed.listing_id.as_str(), 1, None, Code::FailedPrecondition, "LISTING_CLOSED"),
        ("b0", later.listing_id.as_str(), 1, None, Code::FailedPrecondition, "LISTING_NOT_STARTED"),
        ("b0", l.listing_id.as_str(), 3, None, Code::ResourceExhausted, "PER_BUYER_LIMIT"),
        ("seller", l.listing_id.as_str(), 1, None, Code::FailedPrecondition, "OWN_LISTING"),
        ("b0", l.listing_id.as_str(), 0, Some("quantity"), Code::InvalidArgument, ""),
        ("b0", "lst_nothing", 1, None, Code::NotFound, ""),
    ];
    for (buyer, listing, q, f, code, r) in cases {
        let e = buy(&app, buyer, "bad", listing, q).await.unwrap_err();
        assert_eq!(e.code(), code, "{buyer} {listing} {q}: {e:?}");
        assert_eq!(reason(&e), r, "{e:?}");
        if let Some(f) = f {
            assert_eq!(field(&e), f);
        }
    }
    // In another currency than the buyer was shown.
    let eur = shopping(&app)
        .purchase(authed(
            pb::PurchaseRequest {
                idempotency_key: "eur".into(),
                listing_id: l.listing_id.clone(),
                quantity: 1,
                unit_price: Some(pb::Money { currency: "EUR".into(), amount: "5.00".into() }),
                ..Default::default()
            },
            &app.token("b0", SHOP),
        ))
        .await
        .unwrap_err();
    assert_eq!((eur.code(), field(&eur)), (Code::InvalidArgument, "unit_price".to_owned()), "{eur:?}");
    // A frozen buyer.
    let admin = app.token("platform", "accounts:admin");
    app.accounts()
        .freeze_account(authed(pb::FreezeAccountRequest { user_id: "b0".into(), reason: "review".into() }, &admin))
        .await
        .unwrap();
    let frozen = buy(&app, "b0", "frozen", &l.listing_id, 1).await.unwrap_err();
    assert_eq!(reason(&frozen), "ACCOUNT_FROZEN");
    assert_eq!(app.count("purchases").await, 0);
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 0);
    assert_eq!(amt(&app.wallet("b0").await.available), "100.00");
    assert_books_balance(&app).await;
}

/// The per-buyer maximum holds across parallel taps of one buyer with different keys,
/// and parallel retries with one key make one purchase.
async fn per_buyer_limit_and_retries_hold_in_parallel(app: TestApp) {
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("pb", "live-6", "2.00", 100, 3)).await.unwrap();
    fund_buyers(&app, "b", 2, "100.00").await;
    let app = Arc::new(app);
    let taps = (0..20).map(|i| {
        let (app, id) = (app.clone(), l.listing_id.clone());
        tokio::spawn(async move { buy(&app, "b0", &format!("tap-{i}"), &id, 1).await })
    });
    let ok = join_all(taps).await.into_iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3, "at most 3 per buyer");
    let same = (0..20).map(|_| {
        let (app, id) = (app.clone(), l.listing_id.clone());
        tokio::spawn(async move { buy(&app, "b1", "once", &id, 2).await })
    });
    let ids: std::collections::HashSet<String> =
        join_all(same).await.into_iter().map(|r| r.unwrap().purchase_id).collect();
    assert_eq!(ids.len(), 1, "one purchase for one key");
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 5);
    assert_eq!(amt(&app.wallet("b1").await.available), "96.00");
    let other = buy(&app, "b1", "once", &l.listing_id, 1).await.unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "the key with another quantity");
    // AddStock: a retry of any earlier add (not only the last) adds nothing.
    let t = app.token("seller", SHOP);
    let add = |key: &'static str, quantity: i64| {
        let (app, t, id) = (app.clone(), t.clone(), l.listing_id.clone());
        async move {
            shopping(&app)
                .add_stock(authed(pb::AddStockRequest { listing_id: id, quantity, idempotency_key: key.into() }, &t))
                .await
                .map(|r| r.into_inner().quantity)
        }
    };
    assert_eq!(add("more", 50).await.unwrap(), 150);
    assert_eq!(add("more", 50).await.unwrap(), 150);
    assert_eq!(add("again", 5).await.unwrap(), 155);
    assert_eq!(add("more", 50).await.unwrap(), 155, "a retry of an earlier add, after a later one");
    assert_eq!(add("more", 51).await.unwrap_err().code(), Code::AlreadyExists, "the key with another quantity");
    let parallel = (0..20).map(|_| tokio::spawn(add("burst", 10)));
    for q in join_all(parallel).await {
        q.unwrap();
    }
    assert_eq!(get_listing(&app, &l.listing_id).await.quantity, 165, "20 parallel retries add once");
    // Closed since: a retry of an add still answers the listing; a new add is refused.
    shopping(&app)
        .close_listing(authed(pb::CloseListingRequest { listing_id: l.listing_id.clone() }, &t))
        .await
        .unwrap();
    assert_eq!(add("again", 5).await.unwrap(), 165);
    assert_eq!(reason(&add("late", 5).await.unwrap_err()), "LISTING_CLOSED");
    assert_books_balance(&app).await;
}

/// The stream's overlay sees each purchase with the units sold after it.
async fn purchase_events_reach_the_stream(app: TestApp) {
    use tokio_stream::StreamExt;
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("ev", "live-7", "3.00", 3, 1)).await.unwrap();
    fund_buyers(&app, "b", 3, "10.00").await;
    for i in 0..3 {
        buy(&app, &format!("b{i}"), "k", &l.listing_id, 1).await.unwrap();
    }
    let overlay = app.token("stream-service", "payments:watch_all");
    let mut stream = app
        .payments()
        .watch_payments(authed(pb::WatchPaymentsRequest { stream_id: "live-7".into(), ..Default::default() }, &overlay))
        .await
        .unwrap()
        .into_inner();
    let mut sold = Vec::new();
    while sold.len() < 3 {
        let e =
            tokio::time::timeout(std::time::Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(e.r#type, pb::PaymentEventType::PurchaseCompleted as i32);
        let p = e.purchase.unwrap();
        assert_eq!(p.listing_id, l.listing_id);
        sold.push(p.listing_sold);
    }
    assert_eq!(sold, vec![1, 2, 3]);
    // The seller sees their sales in their own feed; a stream filter with a
    // conversation is refused.
    let both = app
        .payments()
        .watch_payments(authed(
            pb::WatchPaymentsRequest { stream_id: "live-7".into(), conversation_id: "c".into(), ..Default::default() },
            &overlay,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&both), "stream_id");
}

pub(crate) async fn buy_on_tab(
    app: &TestApp,
    buyer: &str,
    key: &str,
    listing: &str,
    tab: &str,
) -> Result<pb::PurchaseReceipt, tonic::Status> {
    let t = app.token(buyer, SHOP);
    shopping(app)
        .purchase(authed(
            pb::PurchaseRequest {
                idempotency_key: key.into(),
                listing_id: listing.into(),
                quantity: 1,
                tab_id: tab.into(),
                ..Default::default()
            },
            &t,
        ))
        .await
        .map(|r| r.into_inner())
}

pub(crate) async fn open_tab(
    app: &TestApp,
    buyer: &str,
    key: &str,
    stream: &str,
    cap: &str,
) -> Result<pb::Tab, tonic::Status> {
    let t = app.token(buyer, SHOP);
    shopping(app)
        .open_tab(authed(
            pb::OpenTabRequest {
                idempotency_key: key.into(),
                stream_id: stream.into(),
                cap: usd(cap),
                payment_method_token: String::new(),
            },
            &t,
        ))
        .await
        .map(|r| r.into_inner())
}

pub(crate) async fn get_tab(app: &TestApp, buyer: &str, id: &str) -> pb::Tab {
    let t = app.token(buyer, SHOP);
    shopping(app).get_tab(authed(pb::GetTabRequest { tab_id: id.into() }, &t)).await.unwrap().into_inner()
}

/// The sandbox's calls of one kind for a tab.
pub(crate) async fn tab_calls(app: &TestApp, tab: &str, kind: &str) -> Vec<i64> {
    dmpay::with_db!(&app.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT COALESCE(amount, 0) FROM sandbox_processor_calls WHERE kind = $1 AND idempotency_key LIKE $2"
    )
    .bind(kind)
    .bind(format!("tab:{tab}:%"))
    .fetch_all(pool)
    .await)
    .unwrap()
}

/// A viewer opens a tab (one authorization), buys several times on it without a card
/// call, cannot pass its cap even in parallel, and its closing captures the spend once.
async fn stream_tab_draws_then_captures_once(app: TestApp) {
    make_seller(&app, "seller", None).await;
    app.users(&["viewer", "other"]).await;
    let viewer = app.token("viewer", PAY_SCOPES);
    app.add_card(&viewer, &visa(7), true).await.unwrap();
    let l = create_listing(&app, "seller", listing_req("t", "live-t", "10.00", 0, 100)).await.unwrap();
    let elsewhere = create_listing(&app, "seller", listing_req("t2", "live-u", "10.00", 0, 100)).await.unwrap();
    let tab = open_tab(&app, "viewer", "tab-1", "live-t", "50.00").await.unwrap();
    assert_eq!(tab.status, pb::TabStatus::Open as i32);
    let again = open_tab(&app, "viewer", "tab-1", "live-t", "50.00").await.unwrap();
    assert_eq!(again.tab_id, tab.tab_id, "a retry answers the same tab");
    let second = open_tab(&app, "viewer", "tab-2", "live-t", "50.00").await.unwrap_err();
    assert_eq!(second.code(), Code::AlreadyExists, "one open tab per stream");
    assert_eq!(tab_calls(&app, &tab.tab_id, "authorize").await, vec![5000]);

    // In parallel, 10 taps of 10.00 on a 50.00 tab: exactly 5 go through.
    let app = Arc::new(app);
    let taps = (0..10).map(|i| {
        let (app, l, t) = (app.clone(), l.listing_id.clone(), tab.tab_id.clone());
        tokio::spawn(async move { buy_on_tab(&app, "viewer", &format!("tap-{i}"), &l, &t).await })
    });
    let results = join_all(taps).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 5);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(reason(r), "TAB_CAP", "{r:?}");
    }
    let t = get_tab(&app, "viewer", &tab.tab_id).await;
    assert_eq!((amt(&t.spent), t.status), ("50.00".into(), pb::TabStatus::Open as i32));
    assert_eq!(tab_calls(&app, &tab.tab_id, "capture").await, Vec::<i64>::new(), "no card call per purchase");
    assert_eq!(amt(&app.wallet("viewer").await.available), "0.00", "the wallet is untouched");
    assert_eq!(amt(&seller_balance(&app, "seller").await.pending), "47.50");
    // Another stream's listing, or someone else's tab: refused.
    let e = buy_on_tab(&app, "viewer", "x", &elsewhere.listing_id, &tab.tab_id).await.unwrap_err();
    assert_eq!(field(&e), "tab_id");
    fund_buyers(&app, "o", 1, "10.00").await;
    let e = buy_on_tab(&app, "o0", "x", &l.listing_id, &tab.tab_id).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Closing: one capture of the spend, booked against the tab account.
    let tk = app.token("viewer", SHOP);
    let closed = shopping(&app)
        .close_tab(authed(pb::CloseTabRequest { tab_id: tab.tab_id.clone() }, &tk))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((closed.status, amt(&closed.captured)), (pb::TabStatus::Closed as i32, "50.00".into()));
    let again = shopping(&app)
        .close_tab(authed(pb::CloseTabRequest { tab_id: tab.tab_id.clone() }, &tk))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.status, pb::TabStatus::Closed as i32, "closing twice is harmless");
    assert_eq!(tab_calls(&app, &tab.tab_id, "capture").await, vec![5000]);
    let svc = app.token("svc", LEDGER_SCOPES);
    assert_eq!(amt(&balance(&app, &svc, "user:viewer:tab:USD").await.posted), "0.00");
    let late = buy_on_tab(&app, "viewer", "late", &l.listing_id, &tab.tab_id).await.unwrap_err();
    assert_eq!(reason(&late), "TAB_NOT_OPEN");
    // A new tab for the stream once the old one is closed; nothing spent: voided.
    let next = open_tab(&app, "viewer", "tab-3", "live-t", "20.00").await.unwrap();
    let closed = shopping(&app)
        .close_tab(authed(pb::CloseTabRequest { tab_id: next.tab_id.clone() }, &tk))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amt(&closed.captured), "0.00");
    assert_eq!(tab_calls(&app, &next.tab_id, "capture").await, Vec::<i64>::new());
    assert_eq!(tab_calls(&app, &next.tab_id, "void").await.len(), 1);
    assert_books_balance(&app).await;
}

/// A declined card fails the tab and charges nothing; a cap above the daily limit, a
/// viewer without a card and bad input are refused before any card call.
async fn tabs_refuse_bad_input_and_declines(app: TestApp) {
    app.users(&["viewer", "nocard"]).await;
    let viewer = app.token("viewer", PAY_SCOPES);
    app.add_card(&viewer, "4000000000000341", true).await.unwrap();
    let declined = open_tab(&app, "viewer", "d", "live-d", "20.00").await.unwrap_err();
    assert_eq!(reason(&declined), "CARD_DECLINED");
    let again = open_tab(&app, "viewer", "d", "live-d", "20.00").await.unwrap_err();
    assert_eq!(reason(&again), "CARD_DECLINED", "a retry answers the same");
    let nocard = open_tab(&app, "nocard", "n", "live-d", "20.00").await.unwrap_err();
    assert_eq!(reason(&nocard), "NO_PAYMENT_METHOD");
    let over = open_tab(&app, "viewer", "o", "live-d", "100000.00").await.unwrap_err();
    assert_eq!(reason(&over), "DAILY_LIMIT");
    let bad = open_tab(&app, "viewer", "b", "bad stream", "1.00").await.unwrap_err();
    assert_eq!(field(&bad), "stream_id");
    let bad = open_tab(&app, "viewer", "b", "s", "0.00").await.unwrap_err();
    assert_eq!(field(&bad), "cap.amount");
    assert_eq!(app.count("stream_tabs WHERE status <> 'failed'").await, 0);
    assert_eq!(app.count("sandbox_processor_calls WHERE kind = 'capture'").await, 0);
}

/// Ending a stream closes its listings and captures its open tabs.
async fn ending_a_stream_closes_listings_and_tabs(app: TestApp) {
    make_seller(&app, "seller", None).await;
    app.users(&["v1", "v2"]).await;
    let l = create_listing(&app, "seller", listing_req("e", "live-e", "4.00", 0, 10)).await.unwrap();
    let mut tabs = Vec::new();
    for v in ["v1", "v2"] {
        let t = app.token(v, PAY_SCOPES);
        app.add_card(&t, &visa(if v == "v1" { 11 } else { 12 }), true).await.unwrap();
        let tab = open_tab(&app, v, "k", "live-e", "20.00").await.unwrap();
        buy_on_tab(&app, v, "b", &l.listing_id, &tab.tab_id).await.unwrap();
        tabs.push((v, tab.tab_id));
    }
    let admin = app.token("stream-service", "shopping:admin");
    let ended = shopping(&app)
        .end_stream(authed(pb::EndStreamRequest { stream_id: "live-e".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ended.listings_closed, ended.tabs_closed), (1, 2));
    for (v, id) in &tabs {
        let t = get_tab(&app, v, id).await;
        assert_eq!((t.status, amt(&t.captured)), (pb::TabStatus::Closed as i32, "4.00".into()));
        assert_eq!(tab_calls(&app, id, "capture").await, vec![400]);
    }
    let closed = buy(&app, "v1", "after", &l.listing_id, 1).await.unwrap_err();
    assert_eq!(reason(&closed), "LISTING_CLOSED");
    assert_books_balance(&app).await;
}

/// A crash mid-close: the capture was made but not booked, or the closing began and
/// nothing else happened. The resolver finishes both, capturing each tab once.
async fn a_crash_mid_tab_is_finished_once(backend: Backend) {
    let Some(app) = TestApp::spawn_with(
        backend,
        &[("DMPAY_PAYMENTS_RESOLVE_AFTER", "1s"), ("DMPAY_PAYMENTS_RESOLVE_INTERVAL", "200ms")],
    )
    .await
    else {
        return;
    };
    make_seller(&app, "seller", None).await;
    app.users(&["v1", "v2"]).await;
    let l = create_listing(&app, "seller", listing_req("c", "live-c", "3.00", 0, 10)).await.unwrap();
    let mut tabs = Vec::new();
    for (i, v) in ["v1", "v2"].iter().enumerate() {
        let t = app.token(v, PAY_SCOPES);
        app.add_card(&t, &visa(20 + i as u32), true).await.unwrap();
        let tab = open_tab(&app, v, "k", "live-c", "20.00").await.unwrap();
        for k in 0..2 {
            buy_on_tab(&app, v, &format!("b{k}"), &l.listing_id, &tab.tab_id).await.unwrap();
        }
        tabs.push((v.to_string(), tab));
    }
    // As a process that died after fixing the amount: both tabs closing; v1's capture
    // even reached the processor before the crash, v2's did not.
    dmpay::with_db!(&app.db, pool => sqlx::query(
        "UPDATE stream_tabs SET status = 'closing', captured = spent, updated_at_us = updated_at_us - 5000000"
    )
    .execute(pool)
    .await
    .map(|_| ()))
    .unwrap();
    let processor = app.vault.processor().clone();
    let (_, v1) = &tabs[0];
    let auth: String = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT authorization_ref FROM stream_tabs WHERE tab_id = $1"
    )
    .bind(&v1.tab_id)
    .fetch_one(pool)
    .await)
    .unwrap();
    processor
        .capture(
            &format!("tab:{}:capture", v1.tab_id),
            &auth,
            dmpay::kernel::money::Money::from_minor(dmpay::kernel::money::Currency::from_code("USD").unwrap(), 600),
        )
        .await
        .expect("the capture before the crash");
    let mut done = false;
    for _ in 0..100 {
        let closed = app.count("stream_tabs WHERE status = 'closed'").await;
        if closed == 2 {
            done = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(done, "the resolver did not finish the tabs");
    for (v, tab) in &tabs {
        let t = get_tab(&app, v, &tab.tab_id).await;
        assert_eq!(amt(&t.captured), "6.00");
        assert_eq!(tab_calls(&app, &tab.tab_id, "capture").await.len(), 1, "{v}: captured once");
    }
    let svc = app.token("svc", LEDGER_SCOPES);
    for v in ["v1", "v2"] {
        assert_eq!(amt(&balance(&app, &svc, &format!("user:{v}:tab:USD")).await.posted), "0.00");
    }
    assert_eq!(app.count("ledger_entries WHERE kind = 'tab_capture'").await, 2, "each capture booked once");
    assert_books_balance(&app).await;
    app.stop().await;
}

/// Writes what `insert_refund` records before the money moves, as an attempt that
/// stopped `age_us` ago would have left it: the refund row and the purchase's counts.
async fn stall_refund(app: &TestApp, purchase: &str, id: &str, key: &str, amount: i64, commission: i64, age_us: i64) {
    let hash = dmpay::ledger::hash_request(&serde_json::json!({"amount": null, "restock": 0}));
    let then = app.clock.now_us() - age_us;
    let stmts = [
        format!(
            "UPDATE purchases SET refunded_amount = {amount}, commission_refunded = {commission} \
             WHERE purchase_id = '{purchase}'"
        ),
        format!(
            "INSERT INTO purchase_refunds (refund_id, purchase_id, amount, commission, restock, source, status, \
             idempotency_key, request_hash, created_at_us, updated_at_us) VALUES ('{id}', '{purchase}', {amount}, \
             {commission}, 0, 'available', 'pending', '{key}', '{hash}', {then}, {then})"
        ),
    ];
    for sql in stmts {
        dmpay::with_db!(&app.db, pool => sqlx::query(&sql).execute(pool).await.map(|_| ())).expect("stall a refund");
    }
}

/// A delivered sale of 25.00 (commission 2.50) whose seller then spent most of the
/// 22.50 share: a full refund of it cannot be covered from the wallet.
async fn delivered_sale_with_a_short_seller(app: &TestApp, buyer: &str, key: &str) -> String {
    let l = create_listing(app, "seller", listing_req(key, "live-9", "25.00", 10, 4)).await.unwrap();
    let p = buy(app, buyer, key, &l.listing_id, 1).await.unwrap();
    let admin = app.token("stream-service", "shopping:admin");
    shopping(app)
        .mark_delivered(authed(pb::MarkDeliveredRequest { purchase_id: p.purchase_id.clone() }, &admin))
        .await
        .unwrap();
    let seller = app.token("seller", PAY_SCOPES);
    let spendable = app.wallet("seller").await.available.unwrap().amount;
    let spend: rust_decimal::Decimal =
        spendable.parse::<rust_decimal::Decimal>().unwrap() - rust_decimal::Decimal::new(250, 2);
    app.send(&seller, &format!("spend-{key}"), "other", &format!("{spend:.2}"), pb::FundingSource::Balance)
        .await
        .unwrap();
    p.purchase_id
}

/// A refund left pending by an attempt that stalled is taken over by retries with its
/// key: 20 parallel retries while the seller's wallet goes from short to covered never
/// fail it (the stalled attempt's post could still land), never pay it twice, and it is
/// paid once the lease runs out and the wallet covers it. A refund abandoned for longer
/// is failed by the resolver, and its counts go back.
async fn a_stalled_refund_is_finished_by_one_attempt(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[("DMPAY_PAYMENTS_RESOLVE_INTERVAL", "200ms")]).await else {
        return;
    };
    make_seller(&app, "seller", Some(1000)).await;
    app.users(&["other"]).await;
    fund_buyers(&app, "b", 2, "100.00").await;
    let p = delivered_sale_with_a_short_seller(&app, "b0", "r").await;
    assert_eq!(amt(&app.wallet("seller").await.available), "2.50", "short of the 22.50 share");
    stall_refund(&app, &p, "prf_stalled", "rf-stalled", 2500, 250, 60_000_000).await;

    let app = Arc::new(app);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (app, pid) = (app.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            if i == 10 {
                // The seller is paid meanwhile: later attempts could cover the refund.
                let t = app.token("svc", LEDGER_SCOPES);
                fund(&app, &t, "seller", "30.00").await;
            }
            refund(&app, "seller", &pid, None, 0, "rf-stalled").await
        }));
    }
    for answer in join_all(tasks).await {
        match answer {
            Ok(r) => assert_eq!(amt(&r.refunded_amount), "25.00"),
            // Another attempt holds it, or a takeover was refused and left it pending:
            // never failed by a takeover.
            Err(e) => assert!(matches!(e.code(), Code::Aborted | Code::Unavailable), "{e:?}"),
        }
    }
    // Past the lease, a retry takes it over and the covered wallet pays it.
    app.clock.set_offset_us(31_000_000);
    let last = refund(&app, "seller", &p, None, 0, "rf-stalled").await.unwrap();
    assert_eq!((amt(&last.refunded_amount), last.status), ("25.00".into(), pb::PurchaseStatus::Refunded as i32));
    assert_eq!(amt(&app.wallet("b0").await.available), "100.00", "the buyer is paid back once");
    assert_eq!(app.count("ledger_entries WHERE kind = 'shop_refund'").await, 1);

    // Abandoned for ten minutes with a short seller: the resolver fails it.
    let q = delivered_sale_with_a_short_seller(&app, "b1", "q").await;
    stall_refund(&app, &q, "prf_gone", "rf-gone", 2500, 250, 600_000_000).await;
    let t = app.token("b1", SHOP);
    let mut failed = false;
    for _ in 0..100 {
        let purchase = shopping(&app)
            .get_purchase(authed(pb::GetPurchaseRequest { purchase_id: q.clone() }, &t))
            .await
            .unwrap()
            .into_inner();
        if amt(&purchase.refunded_amount) == "0.00" {
            failed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(failed, "the resolver failed the abandoned refund and undid its counts");
    let again = refund(&app, "seller", &q, None, 0, "rf-gone").await.unwrap_err();
    assert_eq!(reason(&again), "INSUFFICIENT_FUNDS", "a retry answers the failure");
    assert_eq!(amt(&app.wallet("b1").await.available), "75.00");
    assert_eq!(app.count("ledger_entries WHERE kind = 'shop_refund'").await, 1);
    assert_books_balance(&app).await;
}

/// Tab purchases share the buyer's rolling daily limit with their sends: 60 parallel
/// calls of 20.00 (tab purchases, wallet sends and card sends) from an unverified buyer
/// (500.00 a day) let exactly 500.00 through, whatever the interleaving.
async fn tab_purchases_and_sends_share_the_daily_limit(app: TestApp) {
    make_seller(&app, "seller", None).await;
    app.users(&["alice", "friend"]).await;
    let alice = app.token("alice", PAY_SCOPES);
    app.add_card(&alice, &visa(3), true).await.unwrap();
    let t = app.token("svc", LEDGER_SCOPES);
    fund(&app, &t, "alice", "500.00").await;
    let l = create_listing(&app, "seller", listing_req("d", "live-d", "20.00", 0, 100)).await.unwrap();
    let tab = open_tab(&app, "alice", "tab-d", "live-d", "500.00").await.unwrap();

    let app = Arc::new(app);
    let calls = (0..60).map(|i| {
        let (app, l, tab, alice) = (app.clone(), l.listing_id.clone(), tab.tab_id.clone(), alice.clone());
        tokio::spawn(async move {
            let funding = if i % 3 == 1 { pb::FundingSource::Balance } else { pb::FundingSource::Card };
            match i % 3 {
                0 => buy_on_tab(&app, "alice", &format!("tap-{i}"), &l, &tab).await.map(|_| ()),
                _ => app.send(&alice, &format!("send-{i}"), "friend", "20.00", funding).await.map(|_| ()),
            }
        })
    });
    let results = join_all(calls).await;
    let through = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(through, 25, "500.00 a day in calls of 20.00");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(reason(e), "DAILY_LIMIT", "{e:?}");
    }
    let spend: Option<i64> = dmpay::with_db!(&app.db, pool => sqlx::query_scalar(
        "SELECT CAST(SUM(amount) AS BIGINT) FROM payment_spend WHERE sender_id = 'alice'"
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!(spend, Some(50_000), "the limit's buckets count each accepted call once");
    let tapped = app.count("purchases WHERE buyer_id = 'alice'").await;
    assert_eq!(amt(&get_tab(&app, "alice", &tab.tab_id).await.spent), format!("{}.00", tapped * 20));
    assert_books_balance(&app).await;
}

backend_tests!(
    a_first_call_purchase_makes_the_account,
    tab_purchases_and_sends_share_the_daily_limit,
    stream_tab_draws_then_captures_once,
    tabs_refuse_bad_input_and_declines,
    ending_a_stream_closes_listings_and_tabs,
    flash_sale_sells_exactly_k,
    a_failed_payment_gives_its_unit_back,
    seller_refunds,
    bad_purchases_are_refused_and_write_nothing,
    per_buyer_limit_and_retries_hold_in_parallel,
    purchase_events_reach_the_stream,
);
backend_fn_tests!(
    a_burst_on_one_seller_is_booked_exactly,
    pending_becomes_available_after_the_hold,
    a_crash_mid_tab_is_finished_once,
    a_stalled_refund_is_finished_by_one_attempt,
);

/// A buyer whose first call is the purchase: no account is read or made before the
/// batch, which finds none; it is made then and the purchase goes through once.
async fn a_first_call_purchase_makes_the_account(app: TestApp) {
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("f", "live-f", "2.00", 5, 1)).await.unwrap();
    fund_buyers(&app, "fresh", 1, "5.00").await;
    dmpay::with_db!(&app.db, pool => sqlx::query("DELETE FROM accounts WHERE user_id = 'fresh0'")
        .execute(pool)
        .await
        .map(|_| ()))
    .unwrap();
    let p = buy(&app, "fresh0", "k", &l.listing_id, 1).await.unwrap();
    assert_eq!(app.count("accounts WHERE user_id = 'fresh0'").await, 1, "made by the purchase");
    assert_eq!(app.count("purchases").await, 1);
    assert_eq!(buy(&app, "fresh0", "k", &l.listing_id, 1).await.unwrap().purchase_id, p.purchase_id);
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 1);
    assert_books_balance(&app).await;
}
