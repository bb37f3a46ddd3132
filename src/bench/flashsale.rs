//! `dmpay bench payments --scenario flashsale`: a live-stream flash sale against a
//! running dmpay. One seller lists K units; N buyers, each with a funded wallet, tap Buy
//! once, `clients` of them at a time, as fast as the server answers. The report gives
//! the taps answered per second, the purchases per second until the listing sold out,
//! latency percentiles of both, and checks the outcome: exactly K units sold, each
//! paid once (the seller's pending balance and the commission are K sales' worth), every
//! other buyer refused with SOLD_OUT and charged nothing, and the ledger verifies.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::Channel;
use tonic::Request;
use tonic_types::StatusExt;

use crate::api::pb;
use crate::bench::cpu::{CpuSample, CpuUse};
use crate::bench::ledger::percentile;
use crate::config::Config;

/// Each buyer's wallet: enough for one unit.
const FUNDING: &str = "5.00";
const PRICE: &str = "1.00";
/// Setup calls in flight at once.
const SETUP_CONCURRENCY: usize = 32;

#[derive(Clone)]
pub struct Options {
    pub addr: String,
    pub clients: usize,
    /// Buyers, each tapping once.
    pub buyers: usize,
    /// Units on sale.
    pub units: usize,
    pub server_pid: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub clients: usize,
    pub buyers: usize,
    pub units: usize,
    /// Every buyer's tap answered, from the first to the last.
    pub taps_s: f64,
    pub taps_per_s: f64,
    /// From the first tap to the last accepted purchase.
    pub sold_out_s: f64,
    pub purchases: u64,
    pub purchases_per_s: f64,
    pub purchase_ms_p50: f64,
    pub purchase_ms_p99: f64,
    pub sold_out_ms_p50: f64,
    pub sold_out_ms_p99: f64,
    /// Refusals other than SOLD_OUT, by code and reason.
    pub errors: BTreeMap<String, u64>,
    pub sold_out_refusals: u64,
    /// The listing's own count.
    pub listing_sold: i64,
    /// The seller's pending balance and the commission are exactly the sales' worth.
    pub money_ok: bool,
    /// Every refused buyer's wallet is untouched and every buyer's paid exactly once.
    pub buyers_ok: bool,
    pub ledger_verified: bool,
    pub cpu: Option<CpuUse>,
}

impl Report {
    /// Exactly K sold, each paid once, every other buyer SOLD_OUT and charged
    /// nothing, and the books verify.
    pub fn ok(&self) -> bool {
        self.purchases as usize == self.units
            && self.listing_sold as usize == self.units
            && self.errors.is_empty()
            && self.sold_out_refusals as usize == self.buyers - self.units
            && self.money_ok
            && self.buyers_ok
            && self.ledger_verified
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "dmpay bench payments: flashsale scenario, {} units, {} buyers, {} clients\n\n",
            self.units, self.buyers, self.clients
        );
        let rows = vec![
            vec!["taps answered/s".to_owned(), format!("{:.0}", self.taps_per_s)],
            vec!["sold out after ms".to_owned(), format!("{:.0}", self.sold_out_s * 1000.0)],
            vec!["purchases/s until sold out".to_owned(), format!("{:.0}", self.purchases_per_s)],
            vec!["purchase p50 ms".to_owned(), format!("{:.2}", self.purchase_ms_p50)],
            vec!["purchase p99 ms".to_owned(), format!("{:.2}", self.purchase_ms_p99)],
            vec!["SOLD_OUT p50 ms".to_owned(), format!("{:.2}", self.sold_out_ms_p50)],
            vec!["SOLD_OUT p99 ms".to_owned(), format!("{:.2}", self.sold_out_ms_p99)],
        ];
        out.push_str(&crate::kernel::text::table(&["", "value"], &rows));
        let yes = |b: bool| if b { "yes" } else { "NO" };
        out.push_str(&format!(
            "\nunits sold: {} (listing says {}), SOLD_OUT refusals: {}, other errors: {:?}\n",
            self.purchases, self.listing_sold, self.sold_out_refusals, self.errors
        ));
        out.push_str(&format!(
            "seller pending and commission equal the sales: {}\nrefused buyers charged nothing, buyers paid once: {}\n",
            yes(self.money_ok),
            yes(self.buyers_ok)
        ));
        if let Some(cpu) = &self.cpu {
            out.push_str(&format!("{}\n", cpu.summary(self.taps_per_s, "tap")));
        }
        out.push_str(&format!("ledger verify: {}\n", if self.ledger_verified { "OK" } else { "FAILED" }));
        out
    }
}

fn authed<T>(msg: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(req)
}

fn usd(amount: &str) -> Option<pb::Money> {
    Some(pb::Money { currency: "USD".into(), amount: amount.into() })
}

/// Minor units of a wire amount ("12.34" -> 1234).
fn minor(m: &Option<pb::Money>) -> i64 {
    m.as_ref().and_then(|m| m.amount.replace('.', "").parse().ok()).unwrap_or(-1)
}

pub async fn run(config: &Config, options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(options.units >= 1 && options.buyers > options.units, "--users must be more than --units");
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let buyer = |i: usize| format!("fs-{run_id}-b{i}");
    let seller = format!("fs-{run_id}-seller");
    let ttl = Duration::from_secs(3600);
    let jwt = config.jwt();
    let service = crate::auth::mint_dev_token(&jwt, "bench", "ledger:write ledger:read finance", ttl)?;
    let admin = crate::auth::mint_dev_token(&jwt, "bench", "accounts:admin", ttl)?;
    let seller_token = crate::auth::mint_dev_token(&jwt, &seller, "payments:write payments:read", ttl)?;

    let channels_n = options.clients.div_ceil(16).max(1);
    let mut channels = Vec::with_capacity(channels_n);
    for _ in 0..channels_n {
        channels
            .push(Channel::from_shared(options.addr.clone())?.connect_timeout(Duration::from_secs(5)).connect().await?);
    }

    eprintln!("flash sale: creating and funding {} buyers ...", options.buyers);
    let mut accounts = pb::accounts_client::AccountsClient::new(channels[0].clone());
    accounts
        .upsert_account(authed(
            pb::UpsertAccountRequest {
                user_id: seller.clone(),
                display_name: "seller".into(),
                tier: pb::Tier::Verified as i32,
            },
            &admin,
        )?)
        .await?;
    accounts
        .set_seller(authed(
            pb::SetSellerRequest {
                user_id: seller.clone(),
                seller: true,
                commission_bps: None,
                reason: "bench".into(),
            },
            &admin,
        )?)
        .await?;
    let mut setup = tokio::task::JoinSet::new();
    for i in 0..options.buyers {
        if setup.len() >= SETUP_CONCURRENCY {
            if let Some(r) = setup.join_next().await {
                r??;
            }
        }
        let channel = channels[i % channels_n].clone();
        let (service, admin, name, run_id) = (service.clone(), admin.clone(), buyer(i), run_id.clone());
        setup.spawn(async move {
            pb::accounts_client::AccountsClient::new(channel.clone())
                .upsert_account(authed(
                    pb::UpsertAccountRequest { user_id: name.clone(), display_name: String::new(), tier: 0 },
                    &admin,
                )?)
                .await?;
            let req = pb::PostEntryRequest {
                idempotency_key: format!("fs-fund-{run_id}-{i}"),
                kind: "bench_funding".into(),
                postings: vec![
                    pb::Posting {
                        account_code: "platform:treasury:USD".into(),
                        direction: pb::Direction::Debit as i32,
                        amount: usd(FUNDING),
                    },
                    pb::Posting {
                        account_code: format!("user:{name}:wallet:USD"),
                        direction: pb::Direction::Credit as i32,
                        amount: usd(FUNDING),
                    },
                ],
                ..Default::default()
            };
            pb::ledger_client::LedgerClient::new(channel).post_entry(authed(req, &service)?).await?;
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(r) = setup.join_next().await {
        r??;
    }
    let mut shopping = pb::shopping_client::ShoppingClient::new(channels[0].clone());
    let listing = shopping
        .create_listing(authed(
            pb::CreateListingRequest {
                idempotency_key: format!("fs-{run_id}"),
                stream_id: format!("bench-{run_id}"),
                title: "Flash sale".into(),
                unit_price: usd(PRICE),
                quantity: options.units as i64,
                per_buyer_max: 1,
                ..Default::default()
            },
            &seller_token,
        )?)
        .await?
        .into_inner();
    let commission_bps = accounts
        .get_account(authed(pb::GetAccountRequest { user_id: seller.clone() }, &admin)?)
        .await?
        .into_inner()
        .commission_bps;

    let tokens: Vec<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = (0..options.buyers)
        .map(|i| {
            let t = crate::auth::mint_dev_token(&jwt, &buyer(i), "payments:write payments:read", ttl)?;
            Ok(format!("Bearer {t}").parse()?)
        })
        .collect::<anyhow::Result<_>>()?;
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    eprintln!("flash sale: {} buyers tap for {} units ...", options.buyers, options.units);
    let cpu_before = CpuSample::take(options.server_pid);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..options.clients {
        let mut shopping = pb::shopping_client::ShoppingClient::new(channels[client % channels_n].clone());
        let (tokens, next, listing_id, buyers) =
            (tokens.clone(), next.clone(), listing.listing_id.clone(), options.buyers);
        tasks.spawn(async move {
            // (buyer, latency us, sold) of each answer; the errors.
            let mut answers: Vec<(usize, u32, bool, Duration)> = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= buyers {
                    break;
                }
                let mut req = Request::new(pb::PurchaseRequest {
                    idempotency_key: "tap".into(),
                    listing_id: listing_id.clone(),
                    quantity: 1,
                    ..Default::default()
                });
                req.metadata_mut().insert("authorization", tokens[i].clone());
                let t0 = Instant::now();
                let result = shopping.purchase(req).await;
                let lat = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                match result {
                    Ok(_) => answers.push((i, lat, true, started.elapsed())),
                    Err(s) => {
                        let reason = s.get_error_details().error_info().map(|e| e.reason.clone()).unwrap_or_default();
                        if s.code() == tonic::Code::FailedPrecondition && reason == "SOLD_OUT" {
                            answers.push((i, lat, false, started.elapsed()));
                        } else {
                            *errors.entry(format!("{:?} {reason}", s.code())).or_default() += 1;
                        }
                    }
                }
            }
            (answers, errors)
        });
    }
    let mut answers = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (a, e) = r?;
        answers.extend(a);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let taps_s = started.elapsed().as_secs_f64();
    let cpu = CpuUse::since(cpu_before.as_ref());

    let sold: Vec<&(usize, u32, bool, Duration)> = answers.iter().filter(|a| a.2).collect();
    let sold_out_s = sold.iter().map(|a| a.3).max().unwrap_or_default().as_secs_f64();
    let mut lat_sold: Vec<u32> = sold.iter().map(|a| a.1).collect();
    let mut lat_out: Vec<u32> = answers.iter().filter(|a| !a.2).map(|a| a.1).collect();
    lat_sold.sort_unstable();
    lat_out.sort_unstable();

    // The outcome, checked through the API.
    let listing_sold = shopping
        .get_listing(authed(pb::GetListingRequest { listing_id: listing.listing_id.clone() }, &seller_token)?)
        .await?
        .into_inner()
        .sold;
    let purchases = sold.len() as u64;
    let price = minor(&usd(PRICE));
    let commission = price * i64::from(commission_bps) / 10_000;
    let balance = shopping
        .get_seller_balance(authed(
            pb::GetSellerBalanceRequest { currency: "USD".into(), seller_id: String::new() },
            &seller_token,
        )?)
        .await?
        .into_inner();
    let money_ok = minor(&balance.pending) == purchases as i64 * (price - commission);
    // Every buyer's wallet: the funding less one unit for a buyer who bought, the
    // funding untouched for one who was refused.
    let sold_to: std::collections::HashSet<usize> = sold.iter().map(|a| a.0).collect();
    let funding = minor(&usd(FUNDING));
    let mut buyers_ok = true;
    let mut checks = tokio::task::JoinSet::new();
    for i in 0..options.buyers {
        if checks.len() >= SETUP_CONCURRENCY {
            if let Some(r) = checks.join_next().await {
                buyers_ok &= r??;
            }
        }
        let channel = channels[i % channels_n].clone();
        let token = tokens[i].clone();
        let expected = if sold_to.contains(&i) { funding - price } else { funding };
        checks.spawn(async move {
            let mut req = Request::new(pb::GetBalanceRequest { currency: "USD".into() });
            req.metadata_mut().insert("authorization", token);
            let b = pb::payments_client::PaymentsClient::new(channel).get_balance(req).await?.into_inner();
            Ok::<bool, anyhow::Error>(minor(&b.available) == expected)
        });
    }
    while let Some(r) = checks.join_next().await {
        buyers_ok &= r??;
    }
    let verified = pb::finance_client::FinanceClient::new(channels[0].clone())
        .verify_ledger(authed(pb::VerifyLedgerRequest {}, &service)?)
        .await?
        .into_inner()
        .ok;
    Ok(Report {
        clients: options.clients,
        buyers: options.buyers,
        units: options.units,
        taps_s,
        taps_per_s: answers.len() as f64 / taps_s,
        sold_out_s,
        purchases,
        purchases_per_s: if sold_out_s > 0.0 { purchases as f64 / sold_out_s } else { 0.0 },
        purchase_ms_p50: percentile(&lat_sold, 0.50),
        purchase_ms_p99: percentile(&lat_sold, 0.99),
        sold_out_ms_p50: percentile(&lat_out, 0.50),
        sold_out_ms_p99: percentile(&lat_out, 0.99),
        sold_out_refusals: lat_out.len() as u64,
        errors,
        listing_sold,
        money_ok,
        buyers_ok,
        ledger_verified: verified,
        cpu,
    })
}
