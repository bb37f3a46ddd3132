//! `dmpay bench payments`: a load generator that talks to a running dmpay over gRPC like
//! real chat clients: one token per simulated user, its own channels, a fresh
//! idempotency key per payment. It funds the users first (through the ledger API), runs
//! one scenario, prints throughput, latency percentiles and errors by status code, and
//! checks the ledger afterwards.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::Request;

use crate::api::pb;
use crate::bench::cpu::{CpuSample, CpuUse};
use crate::bench::ledger::percentile;
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Random sender to random recipient among the users.
    Uniform,
    /// Every viewer pays one seller.
    Livestream,
    /// Half the clients pay the seller, half send at random.
    Mixed,
    /// A live-stream flash sale: many buyers, one listing with few units
    /// (`bench::flashsale`).
    Flashsale,
}

impl Scenario {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "uniform" => Scenario::Uniform,
            "livestream" => Scenario::Livestream,
            "mixed" => Scenario::Mixed,
            "flashsale" => Scenario::Flashsale,
            other => anyhow::bail!("--scenario: uniform, livestream, mixed or flashsale, not {other:?}"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Uniform => "uniform",
            Scenario::Livestream => "livestream",
            Scenario::Mixed => "mixed",
            Scenario::Flashsale => "flashsale",
        }
    }
}

/// What each user's wallet is funded with: 2,000 payments of 1.00, more than a
/// 30-second run at 10,000 payments/s among 1,000 users makes.
const FUNDING: &str = "2000.00";
/// Setup calls (account creation and funding) in flight at once.
const SETUP_CONCURRENCY: usize = 32;

pub struct Options {
    pub addr: String,
    pub clients: usize,
    pub duration: Duration,
    pub scenario: Scenario,
    pub users: usize,
    /// The server's process on this machine, whose CPU the report then shows too.
    pub server_pid: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub clients: usize,
    pub users: usize,
    pub duration_s: f64,
    pub payments: u64,
    pub payments_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub errors: BTreeMap<String, u64>,
    pub ledger_verified: bool,
    /// Livestream and mixed: the seller's balance equals what the seller was paid.
    pub seller_balance_ok: Option<bool>,
    /// The machine's cores over the measured part of the run (Linux), by process.
    pub cpu: Option<CpuUse>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = format!(
            "dmpay bench payments: {} scenario, {} clients, {} users, {:.0} s\n\n",
            self.scenario, self.clients, self.users, self.duration_s
        );
        let rows = vec![
            vec!["payments".to_owned(), self.payments.to_string()],
            vec!["payments/s".to_owned(), format!("{:.0}", self.payments_per_s)],
            vec!["p50 ms".to_owned(), format!("{:.2}", self.latency_ms_p50)],
            vec!["p90 ms".to_owned(), format!("{:.2}", self.latency_ms_p90)],
            vec!["p99 ms".to_owned(), format!("{:.2}", self.latency_ms_p99)],
            vec!["max ms".to_owned(), format!("{:.2}", self.latency_ms_max)],
        ];
        out.push_str(&crate::kernel::text::table(&["", "value"], &rows));
        if self.errors.is_empty() {
            out.push_str("\nerrors: none\n");
        } else {
            let rows: Vec<Vec<String>> = self.errors.iter().map(|(k, v)| vec![k.clone(), v.to_string()]).collect();
            out.push('\n');
            out.push_str(&crate::kernel::text::table(&["error", "count"], &rows));
        }
        if let Some(cpu) = &self.cpu {
            out.push_str(&format!("\n{}\n", cpu.summary(self.payments_per_s, "payment")));
        }
        out.push_str(&format!("\nledger verify: {}\n", if self.ledger_verified { "OK" } else { "FAILED" }));
        if let Some(ok) = self.seller_balance_ok {
            out.push_str(&format!("seller balance equals what was paid: {}\n", if ok { "yes" } else { "NO" }));
        }
        out
    }
}

fn authed<T>(msg: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(req)
}

pub async fn run(config: &Config, options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(options.users >= 2, "--users must be at least 2");
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let user = |i: usize| format!("bench-{run_id}-u{i}");
    let seller = format!("bench-{run_id}-seller");
    let ttl = options.duration + Duration::from_secs(600);
    let service = crate::auth::mint_dev_token(&config.jwt(), "bench", "ledger:write ledger:read finance", ttl)?;
    let tokens: Vec<String> = (0..options.users)
        .map(|i| crate::auth::mint_dev_token(&config.jwt(), &user(i), "payments:write payments:read", ttl))
        .collect::<anyhow::Result<_>>()?;

    // Channels: a few HTTP/2 connections shared by the clients, as a chat backend would.
    let channels_n = options.clients.div_ceil(16).max(1);
    let mut channels = Vec::with_capacity(channels_n);
    for _ in 0..channels_n {
        channels
            .push(Channel::from_shared(options.addr.clone())?.connect_timeout(Duration::from_secs(5)).connect().await?);
    }

    // Create every user (verified, so the tier's daily limit does not cut a long run
    // short) and fund their wallets through the ledger API, so sends settle from balance.
    eprintln!("creating and funding {} users ...", options.users);
    let admin = crate::auth::mint_dev_token(&config.jwt(), "bench", "accounts:admin", ttl)?;
    let mut ledger = pb::ledger_client::LedgerClient::new(channels[0].clone());
    let mut setup = tokio::task::JoinSet::new();
    for i in 0..options.users {
        // At most SETUP_CONCURRENCY calls in flight.
        if setup.len() >= SETUP_CONCURRENCY {
            if let Some(r) = setup.join_next().await {
                r??;
            }
        }
        let channel = channels[i % channels_n].clone();
        let (service, admin, name, run_id) = (service.clone(), admin.clone(), user(i), run_id.clone());
        setup.spawn(async move {
            let mut accounts = pb::accounts_client::AccountsClient::new(channel.clone());
            accounts
                .upsert_account(authed(
                    pb::UpsertAccountRequest {
                        user_id: name.clone(),
                        display_name: name.clone(),
                        tier: pb::Tier::Verified as i32,
                    },
                    &admin,
                )?)
                .await?;
            let usd = |a: &str| Some(pb::Money { currency: "USD".into(), amount: a.into() });
            let req = pb::PostEntryRequest {
                idempotency_key: format!("bench-fund-{run_id}-{i}"),
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
    // The seller is a platform user too: a payment to a name without an account is
    // refused.
    pb::accounts_client::AccountsClient::new(channels[0].clone())
        .upsert_account(authed(
            pb::UpsertAccountRequest {
                user_id: seller.clone(),
                display_name: "seller".into(),
                tier: pb::Tier::Verified as i32,
            },
            &admin,
        )?)
        .await?;

    // The authorization header of each user and each recipient id, made once: the load
    // generator shares the machine with the server, so it should cost little per call.
    let tokens: Vec<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        tokens.iter().map(|t| format!("Bearer {t}").parse()).collect::<Result<_, _>>()?;
    let tokens = Arc::new(tokens);
    let names: Arc<Vec<String>> = Arc::new((0..options.users).map(user).collect());
    let done = Arc::new(AtomicU64::new(0));
    let cpu_before = CpuSample::take(options.server_pid);
    let started = Instant::now();
    let deadline = started + options.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..options.clients {
        let channel = channels[client % channels_n].clone();
        let tokens = tokens.clone();
        let names = names.clone();
        let done = done.clone();
        let seller = seller.clone();
        let users = options.users;
        let scenario = options.scenario;
        let conversation = format!("bench-{run_id}");
        tasks.spawn(async move {
            let mut payments = pb::payments_client::PaymentsClient::new(channel);
            let mut lat = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut paid_seller = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let (from, to, to_seller) = {
                    let mut rng = rand::thread_rng();
                    let from = rng.gen_range(0..users);
                    let livestream = match scenario {
                        Scenario::Livestream | Scenario::Flashsale => true,
                        Scenario::Uniform => false,
                        Scenario::Mixed => client % 2 == 0,
                    };
                    if livestream {
                        (from, seller.clone(), true)
                    } else {
                        let mut to = rng.gen_range(0..users);
                        if to == from {
                            to = (to + 1) % users;
                        }
                        (from, names[to].clone(), false)
                    }
                };
                n += 1;
                let req = pb::SendPaymentRequest {
                    idempotency_key: format!("b-{client}-{n}"),
                    recipient_id: to,
                    amount: Some(pb::Money { currency: "USD".into(), amount: "1.00".into() }),
                    conversation_id: conversation.clone(),
                    funding_source: pb::FundingSource::Balance as i32,
                    ..Default::default()
                };
                let mut req = Request::new(req);
                req.metadata_mut().insert("authorization", tokens[from].clone());
                let t0 = Instant::now();
                match payments.send_payment(req).await {
                    Ok(_) => {
                        lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        done.fetch_add(1, Ordering::Relaxed);
                        if to_seller {
                            paid_seller += 100;
                        }
                    }
                    Err(status) => *errors.entry(format!("{:?}", status.code())).or_default() += 1,
                }
            }
            (lat, errors, paid_seller)
        });
    }
    // Progress, once a second, on standard error.
    let progress = {
        let done = done.clone();
        let total = options.duration;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let elapsed = started.elapsed();
                let frac = (elapsed.as_secs_f64() / total.as_secs_f64()).min(1.0);
                let bar = "#".repeat((frac * 30.0) as usize);
                let n = done.load(Ordering::Relaxed);
                eprint!(
                    "\r[{bar:<30}] {:>4.0}s {n} payments, {:.0}/s ",
                    elapsed.as_secs_f64(),
                    n as f64 / elapsed.as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
        })
    };
    let mut lat = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut paid_seller = 0u64;
    while let Some(r) = tasks.join_next().await {
        let (l, e, p) = r?;
        lat.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
        paid_seller += p;
    }
    let elapsed = started.elapsed();
    let cpu = CpuUse::since(cpu_before.as_ref());
    progress.abort();
    eprintln!();
    lat.sort_unstable();

    // The ledger afterwards.
    let mut finance = pb::finance_client::FinanceClient::new(channels[0].clone());
    let verified = finance.verify_ledger(authed(pb::VerifyLedgerRequest {}, &service)?).await?.into_inner().ok;
    let seller_balance_ok = if options.scenario == Scenario::Uniform {
        None
    } else {
        let balance = ledger
            .get_ledger_balance(authed(
                pb::GetLedgerBalanceRequest { account_code: format!("user:{seller}:wallet:USD"), as_of: None },
                &service,
            )?)
            .await;
        let posted = match balance {
            Ok(b) => {
                b.into_inner().posted.map(|m| m.amount.replace('.', "")).unwrap_or_default().parse::<u64>().unwrap_or(0)
            }
            Err(_) => 0,
        };
        Some(posted == paid_seller)
    };
    let payments = lat.len() as u64;
    Ok(Report {
        scenario: options.scenario.name(),
        clients: options.clients,
        users: options.users,
        duration_s: elapsed.as_secs_f64(),
        payments,
        payments_per_s: payments as f64 / elapsed.as_secs_f64(),
        latency_ms_p50: percentile(&lat, 0.50),
        latency_ms_p90: percentile(&lat, 0.90),
        latency_ms_p99: percentile(&lat, 0.99),
        latency_ms_max: lat.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
        errors,
        ledger_verified: verified,
        seller_balance_ok,
        cpu,
    })
}
