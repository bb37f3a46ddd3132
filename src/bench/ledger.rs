//! `dmpay bench ledger`: the posting engine in-process against the naive way most
//! ledgers on a relational database work (one transaction per transfer, row locks), on
//! the same backend and in the same run, so the speed-up is a measured ratio.
//!
//! Loads: `uniform` (random pairs among many accounts) and `hot` (every transfer
//! credits one account, as in a live-stream burst).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;

use crate::bench::cpu::{CpuSample, CpuUse};
use crate::kernel::money::{Currencies, Currency, Money};
use crate::ledger::engine::{Engine, EngineConfig};
use crate::ledger::model::{AccountCode, AccountType, Direction};
use crate::ledger::{Ledger, PostEntryInput, PostingInput};
use crate::store::Db;
use crate::with_db;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub clients: usize,
    pub duration: Duration,
    pub accounts: usize,
    pub engine: EngineConfig,
    pub run_naive: bool,
    pub run_engine: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub mode: &'static str,
    pub load: &'static str,
    pub entries: u64,
    pub errors: u64,
    pub entries_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Engine runs: commands per batch transaction, on average.
    pub batch_mean: Option<f64>,
    /// The machine's cores over the run (Linux): this process is the client (and, in
    /// engine mode, the engine too).
    pub cpu: Option<CpuUse>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: &'static str,
    pub clients: usize,
    pub duration_s: f64,
    pub accounts: usize,
    pub rows: Vec<BenchRow>,
    /// engine uniform / naive uniform.
    pub speedup_uniform: f64,
    /// engine hot / engine uniform.
    pub hot_over_uniform: f64,
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "dmpay bench ledger: {} backend, {} clients, {:.0} s per run, {} accounts\n\n",
            self.backend, self.clients, self.duration_s, self.accounts
        );
        out.push_str(&format!(
            "{:<8} {:<8} {:>10} {:>12} {:>9} {:>9} {:>8} {:>11}\n",
            "mode", "load", "entries", "entries/s", "p50 ms", "p99 ms", "errors", "batch mean"
        ));
        for r in &self.rows {
            out.push_str(&format!(
                "{:<8} {:<8} {:>10} {:>12.0} {:>9.2} {:>9.2} {:>8} {:>11}\n",
                r.mode,
                r.load,
                r.entries,
                r.entries_per_s,
                r.p50_ms,
                r.p99_ms,
                r.errors,
                r.batch_mean.map_or_else(|| "-".to_owned(), |b| format!("{b:.1}"))
            ));
        }
        out.push_str(&format!(
            "\nengine/naive (uniform): {:.2}x    engine hot/uniform: {:.2}\n",
            self.speedup_uniform, self.hot_over_uniform
        ));
        for r in &self.rows {
            if let Some(cpu) = &r.cpu {
                out.push_str(&format!("{} {}: {}\n", r.mode, r.load, cpu.summary(r.entries_per_s, "entry")));
            }
        }
        out
    }
}

/// The `p` quantile of sorted microsecond latencies, in milliseconds.
pub fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted_us[idx.min(sorted_us.len() - 1)]) / 1000.0
}

fn summarize(mode: &'static str, load: &'static str, mut lat_us: Vec<u32>, errors: u64, elapsed: Duration) -> BenchRow {
    lat_us.sort_unstable();
    let entries = lat_us.len() as u64;
    BenchRow {
        mode,
        load,
        entries,
        errors,
        entries_per_s: entries as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&lat_us, 0.50),
        p99_ms: percentile(&lat_us, 0.99),
        batch_mean: None,
        cpu: None,
    }
}

/// Runs all four measurements and returns the report. `engine_db` is the engine's own
/// pool (`PoolRole::Engine`), as the server has.
pub async fn run(db: Db, engine_db: Db, options: BenchOptions) -> anyhow::Result<BenchReport> {
    let usd = Currency::from_code("USD").ok_or_else(|| anyhow::anyhow!("USD missing"))?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut rows = Vec::new();

    // Naive first, on its own plain tables, so it carries none of the engine's checks.
    if options.run_naive {
        let naive = Naive::setup(&db, &run_id, options.accounts).await?;
        for hot in [false, true] {
            rows.push(naive.run(&options, hot).await?);
        }
        naive.teardown().await?;
    }
    if options.run_engine {
        run_engines(&db, &engine_db, &options, usd, &run_id, &mut rows).await?;
    }

    let rate = |mode: &str, load: &str| {
        rows.iter().find(|r| r.mode == mode && r.load == load).map(|r| r.entries_per_s).unwrap_or(0.0)
    };
    let speedup_uniform = rate("engine", "uniform") / rate("naive", "uniform").max(1e-9);
    let hot_over_uniform = rate("engine", "hot") / rate("engine", "uniform").max(1e-9);
    Ok(BenchReport {
        backend: db.backend(),
        clients: options.clients,
        duration_s: options.duration.as_secs_f64(),
        accounts: options.accounts,
        rows,
        speedup_uniform,
        hot_over_uniform,
    })
}

async fn run_engines(
    db: &Db,
    engine_db: &Db,
    options: &BenchOptions,
    usd: Currency,
    run_id: &str,
    rows: &mut Vec<BenchRow>,
) -> anyhow::Result<()> {
    let (engine, handle) =
        Engine::start(engine_db.clone(), options.engine.clone(), None, crate::kernel::clock::Clock::system())?;
    let ledger = Ledger::new(db.clone(), Currencies::new(vec![usd]), handle);
    ledger.accounts().ensure_system_accounts().await?;
    let mut codes = Vec::with_capacity(options.accounts + 1);
    for i in 0..=options.accounts {
        let code = AccountCode::parse("code", &format!("bench:{run_id}:acct{i}"))?;
        ledger.accounts().create(code.clone(), AccountType::Liability, usd, false).await?;
        codes.push(code);
    }
    // Fund every source account generously, in parallel, through the engine.
    let treasury = AccountCode::system("platform:treasury", usd);
    let mut funding = tokio::task::JoinSet::new();
    for (i, code) in codes.iter().enumerate().skip(1) {
        let ledger = ledger.clone();
        let input =
            transfer_input(&format!("bench-fund-{run_id}-{i}"), &treasury, code, Money::from_minor(usd, 1_000_000_000));
        funding.spawn(async move { ledger.post_entry("bench", input).await });
    }
    while let Some(r) = funding.join_next().await {
        r??;
    }
    let codes = Arc::new(codes);
    for hot in [false, true] {
        rows.push(run_engine(&ledger, &codes, options, hot, usd, run_id).await);
    }
    drop(ledger);
    engine.shutdown().await;
    Ok(())
}

fn transfer_input(key: &str, from: &AccountCode, to: &AccountCode, amount: Money) -> PostEntryInput {
    PostEntryInput {
        idempotency_key: key.to_owned(),
        kind: "bench".into(),
        description: String::new(),
        postings: vec![
            PostingInput { account_code: from.clone(), direction: Direction::Debit, amount },
            PostingInput { account_code: to.clone(), direction: Direction::Credit, amount },
        ],
        metadata: Default::default(),
        pending: false,
        pending_timeout_s: 0,
    }
}

/// Picks (from, to) among `1..=n`; `hot` sends everything to account 0.
fn pick(rng: &mut impl Rng, n: usize, hot: bool) -> (usize, usize) {
    let from = rng.gen_range(1..=n);
    if hot {
        return (from, 0);
    }
    let mut to = rng.gen_range(1..=n);
    if to == from {
        to = if to == n { 1 } else { to + 1 };
    }
    (from, to)
}

async fn run_engine(
    ledger: &Ledger,
    codes: &Arc<Vec<AccountCode>>,
    options: &BenchOptions,
    hot: bool,
    usd: Currency,
    run_id: &str,
) -> BenchRow {
    let stats = ledger.engine().stats().clone();
    let (batches0, commands0) = (stats.batches.load(Ordering::Relaxed), stats.commands.load(Ordering::Relaxed));
    let cpu_before = CpuSample::take(None);
    let started = Instant::now();
    let deadline = started + options.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..options.clients {
        let ledger = ledger.clone();
        let codes = codes.clone();
        let n = options.accounts;
        let run = run_id.to_owned();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let (from, to) = pick(&mut rand::thread_rng(), n, hot);
                seq += 1;
                let key = format!("b{run}-{client}-{seq}-{}", if hot { 'h' } else { 'u' });
                let input = transfer_input(&key, &codes[from], &codes[to], Money::from_minor(usd, 1));
                let t0 = Instant::now();
                match ledger.post_entry("bench", input).await {
                    Ok(_) => lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        });
    }
    let (lat, errors) = collect(tasks).await;
    let mut row = summarize("engine", if hot { "hot" } else { "uniform" }, lat, errors, started.elapsed());
    row.cpu = CpuUse::since(cpu_before.as_ref());
    let batches = stats.batches.load(Ordering::Relaxed).saturating_sub(batches0);
    let commands = stats.commands.load(Ordering::Relaxed).saturating_sub(commands0);
    row.batch_mean = (batches > 0).then(|| commands as f64 / batches as f64);
    row
}

async fn collect(mut tasks: tokio::task::JoinSet<(Vec<u32>, u64)>) -> (Vec<u32>, u64) {
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(Ok((l, e))) = tasks.join_next().await {
        lat.extend(l);
        errors += e;
    }
    (lat, errors)
}

/// The baseline, as most ledgers on a relational database work: each transfer is one
/// transaction that records its idempotency key, locks both balance rows in id order,
/// checks the balance, inserts the entry and its two postings and updates both
/// balances. It writes the same rows the engine writes (key, entry, two postings, two
/// balance changes) into tables of the same shape, so the ratio compares equal work; it
/// carries none of the engine's database checks (no triggers, no gap-free sequence),
/// which only flatters the baseline.
struct Naive {
    db: Db,
    tables: [String; 4],
    n: usize,
}

impl Naive {
    async fn setup(db: &Db, run_id: &str, n: usize) -> anyhow::Result<Naive> {
        let accounts = format!("bench_naive_accounts_{run_id}");
        let entries = format!("bench_naive_entries_{run_id}");
        let postings = format!("bench_naive_postings_{run_id}");
        let keys = format!("bench_naive_keys_{run_id}");
        let ddl = [
            format!(
                "CREATE TABLE {accounts} (id BIGINT PRIMARY KEY, posted_debits BIGINT NOT NULL, \
                 posted_credits BIGINT NOT NULL, version BIGINT NOT NULL DEFAULT 0, \
                 CHECK (posted_credits - posted_debits >= 0))"
            ),
            format!(
                "CREATE TABLE {entries} (id TEXT PRIMARY KEY, kind TEXT NOT NULL, description TEXT NOT NULL, \
                 metadata TEXT NOT NULL, created_by TEXT NOT NULL, created_at_us BIGINT NOT NULL)"
            ),
            format!("CREATE INDEX {entries}_created ON {entries} (created_at_us)"),
            format!(
                "CREATE TABLE {postings} (entry_id TEXT NOT NULL, idx SMALLINT NOT NULL, account_id BIGINT NOT NULL, \
                 direction TEXT NOT NULL, amount BIGINT NOT NULL CHECK (amount > 0), currency TEXT NOT NULL, \
                 created_at_us BIGINT NOT NULL, PRIMARY KEY (entry_id, idx))"
            ),
            format!("CREATE INDEX {postings}_account ON {postings} (account_id, created_at_us)"),
            format!(
                "CREATE TABLE {keys} (caller TEXT NOT NULL, key TEXT NOT NULL, request_hash TEXT NOT NULL, \
                 result_id TEXT NOT NULL, created_at_us BIGINT NOT NULL, PRIMARY KEY (caller, key))"
            ),
        ];
        for sql in ddl {
            with_db!(db, pool => sqlx::query(&sql).execute(pool).await.map(|_| ()))?;
        }
        let insert = format!("INSERT INTO {accounts} (id, posted_debits, posted_credits) VALUES ($1, 0, $2)");
        for i in 0..=n {
            let balance: i64 = if i == 0 { 0 } else { 1_000_000_000 };
            with_db!(db, pool => sqlx::query(&insert).bind(i as i64).bind(balance).execute(pool).await.map(|_| ()))?;
        }
        Ok(Naive { db: db.clone(), tables: [accounts, entries, postings, keys], n })
    }

    async fn teardown(&self) -> anyhow::Result<()> {
        for t in self.tables.iter().rev() {
            let sql = format!("DROP TABLE {t}");
            with_db!(&self.db, pool => sqlx::query(&sql).execute(pool).await.map(|_| ()))?;
        }
        Ok(())
    }

    async fn run(&self, options: &BenchOptions, hot: bool) -> anyhow::Result<BenchRow> {
        let cpu_before = CpuSample::take(None);
        let started = Instant::now();
        let deadline = started + options.duration;
        let mut tasks = tokio::task::JoinSet::new();
        let [accounts, entries, postings, keys] = &self.tables;
        let sql = Arc::new([
            format!(
                "INSERT INTO {keys} (caller, key, request_hash, result_id, created_at_us) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (caller, key) DO NOTHING RETURNING key"
            ),
            format!(
                "SELECT id, posted_credits - posted_debits FROM {accounts} WHERE id IN ($1, $2) ORDER BY id{}",
                if matches!(self.db, Db::Postgres(_)) { " FOR UPDATE" } else { "" }
            ),
            format!(
                "INSERT INTO {entries} (id, kind, description, metadata, created_by, created_at_us) \
                 VALUES ($1, 'bench', '', '{{}}', 'bench', $2)"
            ),
            format!(
                "INSERT INTO {postings} (entry_id, idx, account_id, direction, amount, currency, created_at_us) \
                 VALUES ($1, 0, $2, 'D', $4, 'USD', $5), ($1, 1, $3, 'C', $4, 'USD', $5)"
            ),
            format!("UPDATE {accounts} SET posted_debits = posted_debits + $2, version = version + 1 WHERE id = $1"),
            format!("UPDATE {accounts} SET posted_credits = posted_credits + $2, version = version + 1 WHERE id = $1"),
        ]);
        for client in 0..options.clients {
            let db = self.db.clone();
            let sql = sql.clone();
            let n = self.n;
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut seq = 0u64;
                while Instant::now() < deadline {
                    let (from, to) = pick(&mut rand::thread_rng(), n, hot);
                    seq += 1;
                    let key = format!("n-{client}-{seq}-{}", if hot { 'h' } else { 'u' });
                    let t0 = Instant::now();
                    let result = with_db!(&db, pool => {
                        async {
                            let mut tx = match &db {
                                Db::Sqlite(_) => pool.begin_with("BEGIN IMMEDIATE").await?,
                                Db::Postgres(_) => pool.begin().await?,
                            };
                            let now = crate::kernel::clock::system_now_us();
                            let entry_id = uuid::Uuid::now_v7().to_string();
                            let fresh: Option<String> = sqlx::query_scalar(&sql[0])
                                .bind("bench")
                                .bind(&key)
                                .bind("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
                                .bind(&entry_id)
                                .bind(now)
                                .fetch_optional(&mut *tx)
                                .await?;
                            let rows: Vec<(i64, i64)> = sqlx::query_as(&sql[1])
                                .bind(from as i64)
                                .bind(to as i64)
                                .fetch_all(&mut *tx)
                                .await?;
                            let ok = fresh.is_some() && rows.iter().any(|(id, bal)| *id == from as i64 && *bal >= 1);
                            if ok {
                                sqlx::query(&sql[2]).bind(&entry_id).bind(now).execute(&mut *tx).await?;
                                sqlx::query(&sql[3])
                                    .bind(&entry_id)
                                    .bind(from as i64)
                                    .bind(to as i64)
                                    .bind(1i64)
                                    .bind(now)
                                    .execute(&mut *tx)
                                    .await?;
                                sqlx::query(&sql[4]).bind(from as i64).bind(1i64).execute(&mut *tx).await?;
                                sqlx::query(&sql[5]).bind(to as i64).bind(1i64).execute(&mut *tx).await?;
                                tx.commit().await?;
                            } else {
                                tx.rollback().await?;
                            }
                            Ok::<bool, sqlx::Error>(ok)
                        }
                        .await
                    });
                    match result {
                        Ok(true) => lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            });
        }
        let (lat, errors) = collect(tasks).await;
        let mut row = summarize("naive", if hot { "hot" } else { "uniform" }, lat, errors, started.elapsed());
        row.cpu = CpuUse::since(cpu_before.as_ref());
        Ok(row)
    }
}
