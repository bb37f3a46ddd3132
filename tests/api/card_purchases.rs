//! Purchases paid by card (issue 23): the wallet first and a card for the rest, one
//! authorization per purchase captured once it is made or voided when it is refused, so
//! a refused buyer is charged nothing and a failed card payment holds no unit.

use std::sync::Arc;

use tonic::Code;

use crate::backend_fn_tests;
use crate::helpers::*;
use crate::shopping::{
    amt, buy, create_listing, field, fund_buyers, get_listing, join_all, listing_req, make_seller, open_tab, purchase,
    reason, seller_balance,
};

fn card_req(key: &str, listing: &str, funding: pb::PurchaseFundingSource, token: &str) -> pb::PurchaseRequest {
    pb::PurchaseRequest {
        idempotency_key: key.into(),
        listing_id: listing.into(),
        quantity: 1,
        funding_source: funding as i32,
        payment_method_token: token.into(),
        ..Default::default()
    }
}

/// The sandbox's calls of one kind for every single-purchase tab of `buyer`.
async fn buyer_card_calls(app: &TestApp, buyer: &str, kind: &str) -> Vec<i64> {
    dmpay::with_db!(&app.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT COALESCE(c.amount, 0) FROM sandbox_processor_calls c JOIN stream_tabs t \
         ON c.idempotency_key LIKE 'tab:' || t.tab_id || ':%' \
         WHERE t.buyer_id = $1 AND t.kind = 'purchase' AND c.kind = $2 ORDER BY c.amount"
    )
    .bind(buyer)
    .bind(kind)
    .fetch_all(pool)
    .await)
    .unwrap()
}

/// Wallet first, the card for the rest with its fee on top; CARD pays all by card;
/// BALANCE never touches the card; a retry answers the same purchase without another
/// card call; the authorization is captured once and booked.
async fn a_card_pays_what_the_wallet_cannot(backend: Backend) {
    let Some(app) =
        TestApp::spawn_with(backend, &[("DMPAY_CARD_FEE_BPS", "290"), ("DMPAY_CARD_FEE_FIXED_MINOR", "30")]).await
    else {
        return;
    };
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("c", "live-card", "10.00", 0, 10)).await.unwrap();
    fund_buyers(&app, "split", 1, "3.00").await;
    let t = app.token("split0", PAY_SCOPES);
    app.add_card(&t, &visa(31), true).await.unwrap();

    // AUTO (unset): 3.00 from the wallet, 7.00 by card plus 0.50 fee (2.9% + 0.30).
    let p = buy(&app, "split0", "k1", &l.listing_id, 1).await.unwrap();
    assert_eq!(
        (amt(&p.amount), amt(&p.wallet_amount), amt(&p.card_amount), amt(&p.fee_amount)),
        ("10.00".into(), "3.00".into(), "7.00".into(), "0.50".into())
    );
    assert!(!p.tab_id.is_empty(), "the authorization's tab is named");
    assert_eq!(amt(&app.wallet("split0").await.available), "0.00");
    assert_eq!(buyer_card_calls(&app, "split0", "authorize").await, vec![750]);
    assert_eq!(buyer_card_calls(&app, "split0", "capture").await, vec![750], "captured once, at once");
    let again = buy(&app, "split0", "k1", &l.listing_id, 1).await.unwrap();
    assert_eq!(again.purchase_id, p.purchase_id, "a retry answers the same purchase");
    assert_eq!(buyer_card_calls(&app, "split0", "authorize").await.len(), 1, "without another card call");

    // CARD: all by card, the wallet untouched; BALANCE with an empty wallet: refused.
    fund_buyers(&app, "card", 1, "50.00").await;
    let t = app.token("card0", PAY_SCOPES);
    let pm = app.add_card(&t, &visa(32), false).await.unwrap();
    let p = purchase(&app, "card0", card_req("k", &l.listing_id, pb::PurchaseFundingSource::Card, &pm.token))
        .await
        .unwrap();
    assert_eq!(
        (amt(&p.wallet_amount), amt(&p.card_amount), amt(&p.fee_amount)),
        ("0.00".into(), "10.00".into(), "0.59".into())
    );
    assert_eq!(amt(&app.wallet("card0").await.available), "50.00");
    assert_eq!(buyer_card_calls(&app, "card0", "capture").await, vec![1059]);
    let poor = purchase(&app, "split0", card_req("k2", &l.listing_id, pb::PurchaseFundingSource::Balance, "")).await;
    assert_eq!(reason(&poor.unwrap_err()), "INSUFFICIENT_FUNDS");
    // A wallet that covers it: AUTO charges no card.
    let p = buy(&app, "card0", "k2", &l.listing_id, 1).await.unwrap();
    assert_eq!((amt(&p.wallet_amount), amt(&p.card_amount), p.tab_id.as_str()), ("10.00".into(), "0.00".into(), ""));
    assert_eq!(buyer_card_calls(&app, "card0", "authorize").await.len(), 1);

    // The money: the seller's share of three sales pending, the fees booked, the tab
    // accounts back to zero, the books balanced.
    assert_eq!(amt(&seller_balance(&app, "seller").await.pending), "28.50");
    let svc = app.token("svc", LEDGER_SCOPES);
    assert_eq!(amt(&balance(&app, &svc, "platform:fees:USD").await.posted), "1.09");
    for b in ["split0", "card0"] {
        assert_eq!(amt(&balance(&app, &svc, &format!("user:{b}:tab:USD")).await.posted), "0.00", "{b}");
    }
    assert_eq!(app.count("stream_tabs WHERE kind = 'purchase' AND status <> 'closed'").await, 0);
    assert_books_balance(&app).await;
    app.stop().await;
}

/// Ten card buyers with empty wallets tap for two units at once: exactly two are
/// captured; every refused buyer's authorization (if it was made) is voided and nothing
/// captured. A declined card takes no unit; no card at all is NO_PAYMENT_METHOD.
async fn a_failed_card_payment_returns_its_unit(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[]).await else { return };
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("two", "live-cards", "12.00", 2, 1)).await.unwrap();
    let buyers: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    app.users(&buyers.iter().map(String::as_str).collect::<Vec<_>>()).await;
    app.users(&["declined", "nocard"]).await;
    for (i, b) in buyers.iter().enumerate() {
        app.add_card(&app.token(b, PAY_SCOPES), &visa(40 + i as u32), true).await.unwrap();
    }
    app.add_card(&app.token("declined", PAY_SCOPES), "4000000000000341", true).await.unwrap();

    // First the declined card and the buyer without one: refused, no unit taken.
    let d = buy(&app, "declined", "d", &l.listing_id, 1).await.unwrap_err();
    assert_eq!((d.code(), reason(&d)), (Code::FailedPrecondition, "CARD_DECLINED".into()));
    let n = buy(&app, "nocard", "n", &l.listing_id, 1).await.unwrap_err();
    assert_eq!(reason(&n), "NO_PAYMENT_METHOD");
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 0, "a failed card payment holds no unit");
    assert_eq!(app.count("purchases").await, 0);

    let app = Arc::new(app);
    let taps = buyers.iter().map(|b| {
        let (app, l, b) = (app.clone(), l.listing_id.clone(), b.clone());
        tokio::spawn(async move { buy(&app, &b, "tap", &l, 1).await })
    });
    let results = join_all(taps).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(reason(r), "SOLD_OUT", "{r:?}");
    }
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 2);
    for (b, r) in buyers.iter().zip(&results) {
        let (auths, captures, voids) = (
            buyer_card_calls(&app, b, "authorize").await,
            buyer_card_calls(&app, b, "capture").await,
            buyer_card_calls(&app, b, "void").await,
        );
        match r {
            Ok(p) => {
                assert_eq!(amt(&p.card_amount), "12.00");
                assert_eq!((auths, captures, voids.len()), (vec![1200], vec![1200], 0), "{b}: captured once");
            }
            Err(_) => {
                assert!(captures.is_empty(), "{b}: a refused buyer is charged nothing");
                assert_eq!(auths.len(), voids.len(), "{b}: every authorization voided");
            }
        }
    }
    assert_eq!(app.count("stream_tabs WHERE kind = 'purchase' AND status IN ('opening', 'open', 'closing')").await, 0);
    assert_eq!(amt(&seller_balance(&app, "seller").await.pending), "22.80");
    assert_books_balance(&app).await;
}

/// Bad funding input is refused naming the field, before any card call; a card purchase
/// works beside the viewer's open stream tab for the same stream.
async fn card_purchase_input_is_checked(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, &[]).await else { return };
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("b", "live-b", "5.00", 0, 10)).await.unwrap();
    app.users(&["v"]).await;
    app.add_card(&app.token("v", PAY_SCOPES), &visa(60), true).await.unwrap();
    let tab = open_tab(&app, "v", "tab", "live-b", "20.00").await.unwrap();
    let mut on_tab = card_req("x", &l.listing_id, pb::PurchaseFundingSource::Card, "");
    on_tab.tab_id = tab.tab_id.clone();
    assert_eq!(field(&purchase(&app, "v", on_tab).await.unwrap_err()), "funding_source");
    let balance_token =
        card_req("x", &l.listing_id, pb::PurchaseFundingSource::Balance, "pm_0123456789abcdef0123456789abcdef");
    assert_eq!(field(&purchase(&app, "v", balance_token).await.unwrap_err()), "payment_method_token");
    let unknown = card_req("x", &l.listing_id, pb::PurchaseFundingSource::Card, "pm_0123456789abcdef0123456789abcdef");
    assert_eq!(purchase(&app, "v", unknown).await.unwrap_err().code(), Code::NotFound);
    let mut bad = card_req("x", &l.listing_id, pb::PurchaseFundingSource::Card, "");
    bad.funding_source = 99;
    assert_eq!(field(&purchase(&app, "v", bad).await.unwrap_err()), "funding_source");
    // Over the tier's per-payment limit: refused before the card is touched.
    let dear = create_listing(&app, "seller", listing_req("dear", "live-b", "5000.00", 0, 10)).await.unwrap();
    let over = purchase(&app, "v", card_req("o", &dear.listing_id, pb::PurchaseFundingSource::Card, "")).await;
    assert_eq!(over.unwrap_err().code(), Code::ResourceExhausted);
    assert_eq!(app.count("stream_tabs WHERE kind = 'purchase'").await, 0, "nothing written, no card call");

    // Beside the open stream tab: a card purchase of its own, and the tab still open.
    let p = purchase(&app, "v", card_req("y", &l.listing_id, pb::PurchaseFundingSource::Card, "")).await.unwrap();
    assert_ne!(p.tab_id, tab.tab_id);
    assert_eq!(amt(&p.card_amount), "5.00");
    // A purchase's own authorization cannot be drawn on as a stream tab.
    let mut reuse = card_req("z", &l.listing_id, pb::PurchaseFundingSource::Unspecified, "");
    reuse.tab_id = p.tab_id.clone();
    assert_eq!(purchase(&app, "v", reuse).await.unwrap_err().code(), Code::NotFound);
    assert_books_balance(&app).await;
}

/// A crash after the card was authorized and before the purchase was decided leaves an
/// open single-purchase tab: once it expires the resolver voids it, and the buyer's retry
/// buys afresh under a new authorization.
async fn a_crash_after_the_authorization_is_voided(backend: Backend) {
    let Some(app) = TestApp::spawn_with(
        backend,
        &[("DMPAY_PAYMENTS_RESOLVE_AFTER", "1s"), ("DMPAY_PAYMENTS_RESOLVE_INTERVAL", "200ms")],
    )
    .await
    else {
        return;
    };
    make_seller(&app, "seller", None).await;
    let l = create_listing(&app, "seller", listing_req("r", "live-r", "8.00", 1, 1)).await.unwrap();
    app.users(&["v"]).await;
    app.add_card(&app.token("v", PAY_SCOPES), &visa(70), true).await.unwrap();
    // What the crashed attempt left: its tab open on a real authorization, expired.
    let usd = dmpay::kernel::money::Currency::from_code("USD").unwrap();
    let tab_id = "tab_0123456789abcdef0123456789abcdef";
    let card =
        app.vault.chargeable(&dmpay::kernel::ids::UserId::parse("u", "v").unwrap(), None, "charge").await.unwrap();
    let auth = app
        .vault
        .processor()
        .authorize(&format!("tab:{tab_id}:auth"), card.details(), dmpay::kernel::money::Money::from_minor(usd, 800))
        .await
        .unwrap();
    let past = app.clock.now_us() - 1_000_000;
    dmpay::with_db!(&app.db, pool => sqlx::query(
        "INSERT INTO stream_tabs (tab_id, buyer_id, stream_id, currency, cap, status, authorization_ref, \
         idempotency_key, request_hash, expires_at_us, created_at_us, updated_at_us, kind) \
         VALUES ($1, 'v', 'live-r', 'USD', 800, 'open', $2, 'purchase:crashed', 'h', $3, $3, $3, 'purchase')"
    )
    .bind(tab_id)
    .bind(&auth)
    .bind(past)
    .execute(pool)
    .await
    .map(|_| ()))
    .unwrap();
    let mut voided = false;
    for _ in 0..100 {
        if app.count("stream_tabs WHERE status = 'closed'").await == 1 {
            voided = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(voided, "the resolver did not close the crashed attempt's tab");
    assert_eq!(buyer_card_calls(&app, "v", "void").await.len(), 1);
    assert!(buyer_card_calls(&app, "v", "capture").await.is_empty());
    assert_eq!(get_listing(&app, &l.listing_id).await.sold, 0);
    // The retry buys the unit under an authorization of its own, captured once.
    let p = buy(&app, "v", "k", &l.listing_id, 1).await.unwrap();
    assert_ne!(p.tab_id, tab_id);
    assert_eq!(buyer_card_calls(&app, "v", "capture").await, vec![800]);
    assert_books_balance(&app).await;
    app.stop().await;
}

backend_fn_tests!(
    a_card_pays_what_the_wallet_cannot,
    a_failed_card_payment_returns_its_unit,
    card_purchase_input_is_checked,
    a_crash_after_the_authorization_is_voided,
);
