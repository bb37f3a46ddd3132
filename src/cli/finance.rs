//! `dmpay finance ...`: talks to a running server over gRPC and prints readable tables
//! (amounts right-aligned, totals last). Exit status tells scripts whether the books
//! are in order.

use std::time::{Duration, UNIX_EPOCH};

use tonic::transport::Channel;
use tonic::Request;

use crate::api::pb;
use crate::config::Config;

/// Where the server is and who is asking.
pub struct Connection {
    pub addr: String,
    pub token: Option<String>,
}

impl Connection {
    async fn channel(&self) -> anyhow::Result<Channel> {
        super::client::connect(&self.addr).await
    }

    /// The given token, or in development a short-lived `finance` token minted with the
    /// dev secret.
    fn token(&self, config: &Config) -> anyhow::Result<String> {
        match &self.token {
            Some(t) => Ok(t.clone()),
            None => crate::auth::mint_dev_token(&config.jwt(), "finance-cli", "finance", Duration::from_secs(300))
                .map_err(|e| anyhow::anyhow!("{e}; pass --token or set DMPAY_TOKEN")),
        }
    }

    fn request<T>(&self, config: &Config, msg: T) -> anyhow::Result<Request<T>> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert("authorization", format!("Bearer {}", self.token(config)?).parse()?);
        Ok(req)
    }
}

use crate::kernel::text::table;

fn amount(m: &Option<pb::Money>) -> String {
    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
}

/// `YYYY-MM-DD` or an RFC 3339 time. A bare date means the end of that UTC day for
/// `--as-of` (the books as they closed) and its start for range bounds.
fn parse_time(flag: &str, raw: &str, end_of_day: bool) -> anyhow::Result<prost_types::Timestamp> {
    if let Some((y, m, d)) = crate::kernel::dates::parse_date(raw) {
        let start = crate::kernel::dates::day_start_us(y, m, d);
        return Ok(crate::api::timestamp(if end_of_day { start + 86_400_000_000 - 1 } else { start }));
    }
    let t = humantime::parse_rfc3339_weak(raw)
        .map_err(|_| anyhow::anyhow!("{flag}: expected YYYY-MM-DD or an RFC 3339 time"))?;
    let since = t.duration_since(UNIX_EPOCH)?;
    Ok(prost_types::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 })
}

pub fn parse_as_of(raw: &str) -> anyhow::Result<prost_types::Timestamp> {
    parse_time("--as-of", raw, true)
}

/// Prints the trial balance; Ok(false) when it does not balance.
pub async fn trial_balance(
    config: &Config,
    conn: &Connection,
    as_of: Option<&str>,
    currency: Option<&str>,
) -> anyhow::Result<bool> {
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let msg = pb::GetTrialBalanceRequest {
        as_of: as_of.map(parse_as_of).transpose()?,
        currency: currency.unwrap_or_default().to_owned(),
    };
    let tb = client.get_trial_balance(conn.request(config, msg)?).await?.into_inner();
    let as_of_us = tb.as_of.map(|t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000).unwrap_or(0);
    println!("Trial balance as of {}\n", crate::kernel::dates::rfc3339(as_of_us));
    let mut rows: Vec<Vec<String>> = tb
        .rows
        .iter()
        .map(|r| {
            let kind = pb::AccountType::try_from(r.account_type)
                .map(|t| t.as_str_name().trim_start_matches("ACCOUNT_TYPE_").to_lowercase())
                .unwrap_or_default();
            vec![
                r.account_code.clone(),
                kind,
                r.currency.clone(),
                amount(&r.debits),
                amount(&r.credits),
                amount(&r.balance),
            ]
        })
        .collect();
    for t in &tb.totals {
        rows.push(vec![
            "TOTAL".into(),
            String::new(),
            t.currency.clone(),
            amount(&t.debits),
            amount(&t.credits),
            String::new(),
        ]);
    }
    print!("{}", table(&["account", "type", "currency", "debits", "credits", "balance"], &rows));
    println!("\n{}", if tb.balanced { "balanced: debits equal credits in every currency" } else { "NOT BALANCED" });
    Ok(tb.balanced)
}

fn parse_bound(flag: &str, raw: &str) -> anyhow::Result<prost_types::Timestamp> {
    parse_time(flag, raw, false)
}

/// Streams the export to a file or standard output, with progress on standard error.
pub async fn export(
    config: &Config,
    conn: &Connection,
    from: Option<&str>,
    to: Option<&str>,
    format: &str,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let msg = pb::ExportEntriesRequest {
        from_time: from.map(|f| parse_bound("--from", f)).transpose()?,
        to_time: to.map(|t| parse_bound("--to", t)).transpose()?,
        format: if format == "jsonl" { pb::ExportFormat::Jsonl } else { pb::ExportFormat::Csv } as i32,
    };
    let mut stream = client.export_entries(conn.request(config, msg)?).await?.into_inner();
    let mut sink: Box<dyn Write> = match out {
        // Every posting of the range: readable by its owner only.
        Some(path) => Box::new(std::io::BufWriter::new(crate::store::create_private_file(path)?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut rows = 0i64;
    let started = std::time::Instant::now();
    let mut drawn = started;
    // The rate over the whole run so far and over the last redraw's window: a slowing
    // export shows as the second falling below the first.
    let mut drawn_rows = 0i64;
    // Redrawn only on a terminal: a log file gets the last line alone, without the
    // escape that clears a line.
    let live = out.is_some() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    while let Some(chunk) = stream.message().await? {
        sink.write_all(&chunk.data)?;
        rows += chunk.rows;
        // Redrawn in place at most five times a second.
        if live && drawn.elapsed() >= PROGRESS_EVERY {
            let window = drawn.elapsed().as_secs_f64();
            eprint!(
                "\r\x1b[Kexported {rows} postings, {:.0}/s ({:.0}/s now)",
                rate(rows, started.elapsed()),
                (rows - drawn_rows) as f64 / window
            );
            drawn = std::time::Instant::now();
            drawn_rows = rows;
        }
    }
    sink.flush()?;
    if out.is_some() {
        let took = started.elapsed();
        let clear = if live { "\r\x1b[K" } else { "" };
        eprintln!("{clear}exported {rows} postings in {:.1} s, {:.0}/s", took.as_secs_f64(), rate(rows, took));
    }
    Ok(())
}

/// How often the export's progress line is redrawn.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

fn rate(rows: i64, took: std::time::Duration) -> f64 {
    rows as f64 / took.as_secs_f64().max(1e-9)
}

/// A wire enum's value as the CLI prints and takes it: the name without the enum's
/// prefix, in lower case (`RECONCILIATION_ITEM_STATUS_AMOUNT_MISMATCH`: `amount_mismatch`).
fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase()
}

fn item_status(raw: i32) -> String {
    pb::ReconciliationItemStatus::try_from(raw)
        .map(|s| short_name(s.as_str_name(), "RECONCILIATION_ITEM_STATUS_"))
        .unwrap_or_else(|_| raw.to_string())
}

fn resolution(raw: i32) -> String {
    pb::ReconciliationResolution::try_from(raw)
        .map(|s| short_name(s.as_str_name(), "RECONCILIATION_RESOLUTION_"))
        .unwrap_or_else(|_| raw.to_string())
}

fn item_rows(items: &[pb::ReconciliationItem]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|i| {
            vec![
                i.item_id.clone(),
                item_status(i.status),
                i.processor_reference.clone(),
                amount(&i.report_amount),
                amount(&i.ledger_amount),
                match (i.resolution == 0, i.superseded) {
                    (false, _) => format!("{} by {}", resolution(i.resolution), i.resolved_by),
                    (true, true) => "superseded".to_owned(),
                    (true, false) => String::new(),
                },
            ]
        })
        .collect()
}

const ITEM_HEADERS: [&str; 6] = ["item", "status", "reference", "report", "ledger", "resolution"];

fn is_open(i: &pb::ReconciliationItem) -> bool {
    i.status != pb::ReconciliationItemStatus::Matched as i32 && i.resolution == 0 && !i.superseded
}

async fn all_items(
    config: &Config,
    conn: &Connection,
    client: &mut pb::finance_client::FinanceClient<Channel>,
    run: &str,
    status: Option<&str>,
) -> anyhow::Result<Vec<pb::ReconciliationItem>> {
    // `open` is its own flag on the wire; every other name is a status.
    let (status, open) = match status {
        None => (0, false),
        Some("open") => (0, true),
        Some(name) => {
            let full = format!("RECONCILIATION_ITEM_STATUS_{}", name.to_ascii_uppercase());
            let s = pb::ReconciliationItemStatus::from_str_name(&full)
                .ok_or_else(|| anyhow::anyhow!("unknown status {name}"))?;
            (s as i32, false)
        }
    };
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let msg = pb::ListReconciliationItemsRequest {
            run_id: run.to_owned(),
            status,
            open,
            page_size: 1000,
            page_token: token.clone(),
        };
        let page = client.list_reconciliation_items(conn.request(config, msg)?).await?.into_inner();
        out.extend(page.items);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// Imports a report and prints the run; Ok(false) when items stay open.
pub async fn reconcile(
    config: &Config,
    conn: &Connection,
    processor: &str,
    file: &std::path::Path,
    date: Option<&str>,
) -> anyhow::Result<bool> {
    let csv = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let date = match date {
        Some(d) => d.to_owned(),
        None => csv
            .lines()
            .nth(1)
            .and_then(|l| l.rsplit(',').next())
            .and_then(|t| t.get(..10))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("the report has no rows; pass --date"))?,
    };
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let msg = pb::ImportSettlementReportRequest { processor: processor.to_owned(), report_date: date.clone(), csv };
    let run = client.import_settlement_report(conn.request(config, msg)?).await?.into_inner();
    let what = match (run.created, run.superseded_run_id.is_empty()) {
        (false, _) => " (this report was imported before: the same run)".to_owned(),
        (true, false) => format!(" (supersedes {}: the day's books now follow this report)", run.superseded_run_id),
        (true, true) => String::new(),
    };
    println!("Reconciliation {} of {} for {}{what}\n", run.run_id, run.processor, run.report_date);
    if !run.current {
        println!("A later report of this day superseded this one: the books follow it, and these items are closed.\n");
    }
    let counts = [
        ("report rows", run.rows),
        ("matched", run.matched),
        ("amount mismatch", run.amount_mismatch),
        ("missing in ledger", run.missing_in_ledger),
        ("missing in report", run.missing_in_report),
        ("duplicates", run.duplicates),
    ];
    print!(
        "{}",
        table(&["", "count"], &counts.iter().map(|(k, v)| vec![(*k).to_owned(), v.to_string()]).collect::<Vec<_>>())
    );
    if run.bookings.is_empty() {
        println!("\nbooked: nothing (the day's books already match this report)");
    } else {
        println!("\nbooked:");
        let rows: Vec<Vec<String>> = run
            .bookings
            .iter()
            .map(|b| {
                let amount = b.amount.as_ref().map(|m| format!("{} {}", m.amount, m.currency)).unwrap_or_default();
                let kind = pb::ReconciliationBookingKind::try_from(b.kind)
                    .map(|k| short_name(k.as_str_name(), "RECONCILIATION_BOOKING_KIND_"))
                    .unwrap_or_else(|_| b.kind.to_string());
                vec![b.entry_id.clone(), kind, amount, b.description.clone()]
            })
            .collect();
        print!("{}", table(&["entry", "kind", "amount", "description"], &rows));
    }
    if run.carried_resolutions > 0 {
        println!("\n{} resolution(s) carried over from the superseded run", run.carried_resolutions);
    }
    let items = all_items(config, conn, &mut client, &run.run_id, Some("open")).await?;
    if items.is_empty() {
        println!("\nreconciled: every row matched or resolved");
        return Ok(run.current);
    }
    println!("\n{} open item(s):", items.len());
    print!("{}", table(&ITEM_HEADERS, &item_rows(&items)));
    Ok(false)
}

/// Prints a run's items; Ok(false) when any is open.
pub async fn items(config: &Config, conn: &Connection, run: &str, status: Option<&str>) -> anyhow::Result<bool> {
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let items = all_items(config, conn, &mut client, run, status).await?;
    print!("{}", table(&ITEM_HEADERS, &item_rows(&items)));
    Ok(!items.iter().any(is_open))
}

pub async fn resolve(
    config: &Config,
    conn: &Connection,
    item: &str,
    resolution: pb::ReconciliationResolution,
    note: &str,
) -> anyhow::Result<bool> {
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let msg = pb::ResolveReconciliationItemRequest {
        item_id: item.to_owned(),
        resolution: resolution as i32,
        note: note.to_owned(),
    };
    let done = client.resolve_reconciliation_item(conn.request(config, msg)?).await?.into_inner();
    print!("{}", table(&ITEM_HEADERS, &item_rows(std::slice::from_ref(&done))));
    Ok(true)
}

pub async fn statement(
    config: &Config,
    conn: &Connection,
    user: &str,
    currency: &str,
    from: Option<&str>,
    to: Option<&str>,
) -> anyhow::Result<()> {
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let msg = pb::GetStatementRequest {
        user_id: user.to_owned(),
        currency: currency.to_owned(),
        from_time: from.map(|f| parse_bound("--from", f)).transpose()?,
        to_time: to.map(|t| parse_bound("--to", t)).transpose()?,
    };
    let st = client.get_statement(conn.request(config, msg)?).await?.into_inner();
    println!("Statement of {} in {}\n", st.user_id, st.currency);
    let mut rows = vec![vec![
        "opening balance".to_owned(),
        String::new(),
        String::new(),
        String::new(),
        amount(&st.opening_balance),
    ]];
    for m in &st.movements {
        let at = m
            .time
            .map(|t| crate::kernel::dates::rfc3339(t.seconds * 1_000_000 + i64::from(t.nanos) / 1000))
            .unwrap_or_default();
        rows.push(vec![at, m.kind.clone(), m.counterparty.clone(), m.note.clone(), amount(&m.amount)]);
    }
    rows.push(vec![
        "closing balance".to_owned(),
        String::new(),
        String::new(),
        String::new(),
        amount(&st.closing_balance),
    ]);
    print!("{}", table(&["time", "kind", "counterparty", "note", "amount"], &rows));
    Ok(())
}

/// Prints the verification; Ok(false) when anything is off.
pub async fn verify(config: &Config, conn: &Connection) -> anyhow::Result<bool> {
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let report = client.verify_ledger(conn.request(config, pb::VerifyLedgerRequest {})?).await?.into_inner();
    println!("accounts checked: {}\nentries checked:  {}", report.accounts_checked, report.entries_checked);
    if report.ok {
        println!("ledger OK: every balance matches its postings, every entry balances, no sequence gaps");
    } else {
        let rows: Vec<Vec<String>> = report
            .problems
            .iter()
            .map(|p| vec![p.kind.clone(), p.account_code.clone(), p.entry_id.clone(), p.detail.clone()])
            .collect();
        print!("{}", table(&["problem", "account", "entry", "detail"], &rows));
    }
    Ok(report.ok)
}

/// Pages read by a listing command, at most: 100 pages of 200 disputes or 500 debts.
const LIST_PAGES_MAX: usize = 100;

fn money_text(m: &Option<pb::Money>) -> String {
    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
}

/// `dmpay finance disputes`: the disputes and what the open ones put at risk.
pub async fn disputes(config: &Config, conn: &Connection, open_only: bool) -> anyhow::Result<()> {
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let (mut rows, mut at_risk, mut token) = (Vec::new(), Vec::new(), String::new());
    for _ in 0..LIST_PAGES_MAX {
        let msg = pb::ListDisputesRequest { open_only, page_size: 200, page_token: token.clone() };
        let page = client.list_disputes(conn.request(config, msg)?).await?.into_inner();
        at_risk = page.at_risk;
        for d in page.disputes {
            let status = pb::DisputeStatus::try_from(d.status).map(|s| s.as_str_name()).unwrap_or("?");
            rows.push(vec![
                d.dispute_id,
                d.processor_reference,
                d.payment_id,
                status.trim_start_matches("DISPUTE_STATUS_").to_lowercase(),
                d.amount.as_ref().map(|m| m.currency.clone()).unwrap_or_default(),
                money_text(&d.amount),
                money_text(&d.fee),
                d.recovered_from,
                money_text(&d.from_wallet),
                money_text(&d.to_receivable),
            ]);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    print!(
        "{}",
        table(
            &[
                "dispute",
                "processor reference",
                "payment",
                "status",
                "currency",
                "amount",
                "fee",
                "recovered from",
                "from wallet",
                "owed",
            ],
            &rows
        )
    );
    println!();
    let risk: Vec<Vec<String>> = at_risk
        .iter()
        .map(|r| vec![r.currency.clone(), r.open_disputes.to_string(), money_text(&r.amount_at_risk)])
        .collect();
    print!("{}", table(&["currency", "open disputes", "amount at risk"], &risk));
    Ok(())
}

/// `dmpay finance receivables`: what users owe the platform.
pub async fn receivables(config: &Config, conn: &Connection) -> anyhow::Result<()> {
    let mut client = pb::finance_client::FinanceClient::new(conn.channel().await?);
    let (mut rows, mut token) = (Vec::new(), String::new());
    for _ in 0..LIST_PAGES_MAX {
        let msg = pb::ListReceivablesRequest { page_size: 500, page_token: token.clone() };
        let page = client.list_receivables(conn.request(config, msg)?).await?.into_inner();
        for r in page.receivables {
            let currency = r.owed.as_ref().map(|m| m.currency.clone()).unwrap_or_default();
            rows.push(vec![r.user_id, currency, money_text(&r.owed)]);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    print!("{}", table(&["user", "currency", "owed"], &rows));
    Ok(())
}

/// `dmpay finance ...`: true when what was checked is right (exit 0), false when it is
/// not (exit 1).
pub(super) async fn run(
    config: Config,
    conn: Connection,
    command: super::args::FinanceCommand,
) -> anyhow::Result<bool> {
    use super::args::FinanceCommand;
    match command {
        FinanceCommand::TrialBalance { as_of, currency } => {
            trial_balance(&config, &conn, as_of.as_deref(), currency.as_deref()).await
        }
        FinanceCommand::Verify => verify(&config, &conn).await,
        FinanceCommand::Reconcile { processor, file, date } => {
            reconcile(&config, &conn, &processor, &file, date.as_deref()).await
        }
        FinanceCommand::Items { run, status } => items(&config, &conn, &run, status.as_deref()).await,
        FinanceCommand::Resolve { item, suspense, explained: _, note } => {
            resolve(
                &config,
                &conn,
                &item,
                if suspense { pb::ReconciliationResolution::Suspense } else { pb::ReconciliationResolution::Explained },
                &note,
            )
            .await
        }
        FinanceCommand::Disputes { open } => disputes(&config, &conn, open).await.map(|()| true),
        FinanceCommand::Receivables => receivables(&config, &conn).await.map(|()| true),
        FinanceCommand::Statement { user, currency, from, to } => {
            statement(&config, &conn, &user, &currency, from.as_deref(), to.as_deref()).await.map(|()| true)
        }
        FinanceCommand::Export { from, to, format, out } => {
            export(&config, &conn, from.as_deref(), to.as_deref(), &format, out.as_deref()).await.map(|()| true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_of_dates_mean_the_end_of_the_day() {
        let t = parse_as_of("2026-11-24").unwrap();
        assert_eq!(
            crate::kernel::dates::rfc3339(t.seconds * 1_000_000 + i64::from(t.nanos) / 1000),
            "2026-11-24T23:59:59.999999Z"
        );
        assert!(parse_as_of("yesterday").is_err());
    }
}
