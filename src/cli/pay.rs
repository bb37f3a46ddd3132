//! `dmpay pay ...`, `dmpay cards ...`, `dmpay accounts ...`: a chat client's calls from
//! the shell, against a running server (see `client` for the address and the token).
//! Each prints one readable line per result; ids are printed whole so they can be
//! pasted into the next command.

use tonic::transport::Channel;

use super::args::{AccountsCommand, CardsCommand, ClientArgs, PayCommand};
use super::client::{authed, connect, refused, token};
use crate::api::pb;
use crate::config::Config;

/// What a user's own commands may do.
const USER_SCOPES: &str = "payments:read payments:write methods:write";
/// The subject and scope of a development token for `dmpay accounts`.
const ADMIN_SUB: &str = "cli-admin";
const ADMIN_SCOPES: &str = "accounts:admin";

/// Events `dmpay pay watch --count` may wait for: a bound on a scripted watch.
const WATCH_COUNT_MAX: usize = 10_000;

fn money(currency: &str, amount: &str) -> Option<pb::Money> {
    Some(pb::Money { currency: currency.to_ascii_uppercase(), amount: amount.to_owned() })
}

fn show(m: &Option<pb::Money>) -> String {
    m.as_ref().map(|m| format!("{} {}", m.amount, m.currency)).unwrap_or_else(|| "-".into())
}

/// An enum's name without its prefix: `PAYMENT_STATUS_SETTLED` -> `settled`.
fn name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

fn payment_status(p: &pb::Payment) -> String {
    let s = pb::PaymentStatus::try_from(p.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
    name(s, "PAYMENT_STATUS_")
}

fn bill_status(b: &pb::Bill) -> String {
    let s = pb::BillStatus::try_from(b.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
    name(s, "BILL_STATUS_")
}

fn payment_line(p: &pb::Payment) -> String {
    let mut line =
        format!("{}  {} -> {}  {}  {}", p.payment_id, p.sender_id, p.recipient_id, show(&p.amount), payment_status(p));
    if p.refunded_amount.as_ref().is_some_and(|m| m.amount != "0.00" && m.amount != "0") {
        line.push_str(&format!("  (refunded {})", show(&p.refunded_amount)));
    }
    if !p.note.is_empty() {
        line.push_str(&format!("  \"{}\"", p.note));
    }
    if !p.failure_reason.is_empty() {
        line.push_str(&format!("  [{}]", p.failure_reason));
    }
    line
}

fn bill_line(b: &pb::Bill) -> String {
    let mut line =
        format!("{}  {} asks {}  {}  {}", b.bill_id, b.requester_id, b.payer_id, show(&b.amount), bill_status(b));
    if !b.note.is_empty() {
        line.push_str(&format!("  \"{}\"", b.note));
    }
    if !b.payment_id.is_empty() {
        line.push_str(&format!("  paid by {}", b.payment_id));
    }
    line
}

/// One line per item, or `none` when there is none.
fn print_all<T>(items: &[T], none: &str, line: impl Fn(&T) -> String) {
    if items.is_empty() {
        println!("{none}");
    }
    for item in items {
        println!("{}", line(item));
    }
}

fn funding(raw: &str) -> pb::FundingSource {
    match raw {
        "balance" => pb::FundingSource::Balance,
        "card" => pb::FundingSource::Card,
        _ => pb::FundingSource::Auto,
    }
}

/// The idempotency key: the given one (a retry), or a new one, printed so that a retry
/// after a lost answer can reuse it.
fn key_or_new(key: Option<String>) -> String {
    key.unwrap_or_else(|| {
        let k = format!("cli-{}", uuid::Uuid::new_v4().simple());
        eprintln!("(to retry this call safely: --key {k})");
        k
    })
}

struct Session {
    channel: Channel,
    token: String,
}

impl Session {
    async fn open(config: &Config, c: &ClientArgs, sub: Option<&str>, scope: &str) -> anyhow::Result<Session> {
        let token = token(config, c.token.as_deref(), sub, scope)?;
        Ok(Session { channel: connect(&c.addr).await?, token })
    }

    fn payments(&self) -> pb::payments_client::PaymentsClient<Channel> {
        pb::payments_client::PaymentsClient::new(self.channel.clone())
    }
}

/// `dmpay pay ...`.
pub async fn pay(config: &Config, c: ClientArgs, command: PayCommand) -> anyhow::Result<()> {
    let s = Session::open(config, &c, c.user.as_deref(), USER_SCOPES).await?;
    let mut api = s.payments();
    let t = s.token.as_str();
    match command {
        PayCommand::Send { to, amount, currency, note, funding: f, card, conversation, key } => {
            let msg = pb::SendPaymentRequest {
                idempotency_key: key_or_new(key),
                recipient_id: to,
                amount: money(&currency, &amount),
                note,
                conversation_id: conversation.unwrap_or_default(),
                message_id: String::new(),
                funding_source: funding(&f) as i32,
                payment_method_token: card.unwrap_or_default(),
            };
            let p = api.send_payment(authed(msg, t)?).await.map_err(refused)?.into_inner();
            println!("{}", payment_line(&p));
        }
        PayCommand::Request { from, amount, currency, note, conversation, key } => {
            let msg = pb::RequestPaymentRequest {
                idempotency_key: key_or_new(key),
                payer_id: from,
                amount: money(&currency, &amount),
                note,
                conversation_id: conversation.unwrap_or_default(),
                message_id: String::new(),
                expires_in_seconds: 0,
            };
            let b = api.request_payment(authed(msg, t)?).await.map_err(refused)?.into_inner();
            println!("{}", bill_line(&b));
        }
        PayCommand::Requests { asked, open, limit } => {
            let role = if asked { pb::BillRole::Requester } else { pb::BillRole::Payer };
            let msg = pb::ListBillsRequest {
                role: role as i32,
                open_only: open,
                page_size: limit,
                page_token: String::new(),
            };
            let page = api.list_bills(authed(msg, t)?).await.map_err(refused)?.into_inner();
            print_all(&page.bills, "no requests", bill_line);
        }
        PayCommand::Accept { request, funding: f, card, key } => {
            let msg = pb::PayBillRequest {
                bill_id: request,
                idempotency_key: key_or_new(key),
                funding_source: funding(&f) as i32,
                payment_method_token: card.unwrap_or_default(),
            };
            let p = api.pay_bill(authed(msg, t)?).await.map_err(refused)?.into_inner();
            println!("{}", payment_line(&p));
        }
        PayCommand::Decline { request } => {
            let b = api.decline_bill(authed(pb::DeclineBillRequest { bill_id: request }, t)?).await.map_err(refused)?;
            println!("{}", bill_line(b.get_ref()));
        }
        PayCommand::Refund { payment, amount, currency, reason, key } => {
            let msg = pb::RefundPaymentRequest {
                payment_id: payment,
                idempotency_key: key_or_new(key),
                amount: amount.and_then(|a| money(&currency, &a)),
                reason,
            };
            let p = api.refund_payment(authed(msg, t)?).await.map_err(refused)?.into_inner();
            println!("{}", payment_line(&p));
        }
        PayCommand::Balance { currency } => {
            let msg = pb::GetBalanceRequest { currency: currency.to_ascii_uppercase() };
            let b = api.get_balance(authed(msg, t)?).await.map_err(refused)?.into_inner();
            println!("{} available  ({} posted, {} pending)", show(&b.available), show(&b.posted), show(&b.pending));
        }
        PayCommand::List { conversation, limit } => {
            let msg = pb::ListPaymentsRequest {
                conversation_id: conversation.unwrap_or_default(),
                page_size: limit,
                page_token: String::new(),
            };
            let page = api.list_payments(authed(msg, t)?).await.map_err(refused)?.into_inner();
            print_all(&page.payments, "no payments", payment_line);
        }
        PayCommand::Get { payment } => {
            let p =
                api.get_payment(authed(pb::GetPaymentRequest { payment_id: payment }, t)?).await.map_err(refused)?;
            println!("{}", payment_line(p.get_ref()));
        }
        PayCommand::Watch { conversation, after, count } => {
            let msg = pb::WatchPaymentsRequest {
                conversation_id: conversation.unwrap_or_default(),
                after_sequence: after,
                stream_id: String::new(),
            };
            let mut stream = api.watch_payments(authed(msg, t)?).await.map_err(refused)?.into_inner();
            let limit = count.map_or(usize::MAX, |c| c.min(WATCH_COUNT_MAX));
            let mut seen = 0;
            while seen < limit {
                let Some(event) = stream.message().await.map_err(refused)? else { break };
                seen += 1;
                println!("{}", event_line(&event));
            }
        }
    }
    Ok(())
}

fn event_line(e: &pb::PaymentEvent) -> String {
    let kind = pb::PaymentEventType::try_from(e.r#type).map(|k| k.as_str_name()).unwrap_or("UNKNOWN");
    let what = if let Some(b) = &e.bill {
        bill_line(b)
    } else if let Some(p) = &e.payment {
        payment_line(p)
    } else if let Some(p) = &e.payout {
        format!("{}  {}", p.payout_id, show(&p.amount))
    } else if let Some(p) = &e.purchase {
        format!("{}  {} bought {} x{}  {}", p.purchase_id, p.buyer_id, p.listing_id, p.quantity, show(&p.amount))
    } else {
        String::new()
    };
    format!("#{}  {}  {}", e.sequence, name(kind, "PAYMENT_EVENT_TYPE_"), what)
}

/// `dmpay cards ...`.
pub async fn cards(config: &Config, c: ClientArgs, command: CardsCommand) -> anyhow::Result<()> {
    let s = Session::open(config, &c, c.user.as_deref(), USER_SCOPES).await?;
    let mut api = pb::payment_methods_client::PaymentMethodsClient::new(s.channel.clone());
    let t = s.token.as_str();
    let line = |m: &pb::PaymentMethod| {
        let brand = pb::CardBrand::try_from(m.brand).map(|b| b.as_str_name()).unwrap_or("UNKNOWN");
        let status = pb::PaymentMethodStatus::try_from(m.status).map(|b| b.as_str_name()).unwrap_or("UNKNOWN");
        format!(
            "{}  {} ending {}  {:02}/{}  {}{}",
            m.token,
            name(brand, "CARD_BRAND_"),
            m.last4,
            m.exp_month,
            m.exp_year,
            name(status, "PAYMENT_METHOD_STATUS_"),
            if m.is_default { "  default" } else { "" }
        )
    };
    match command {
        CardsCommand::Add { number, exp, cvc, name: holder, postal_code, default } => {
            let (month, year) = parse_expiry(&exp)?;
            let msg = pb::TokenizeCardRequest {
                card_number: number,
                exp_month: month,
                exp_year: year,
                cvc,
                holder_name: holder,
                postal_code,
            };
            let pm = api.tokenize_card(authed(msg, t)?).await.map_err(refused)?.into_inner();
            let link = pb::LinkPaymentMethodRequest { token: pm.token, make_default: default };
            let pm = api.link_payment_method(authed(link, t)?).await.map_err(refused)?.into_inner();
            println!("{}", line(&pm));
        }
        CardsCommand::List { all } => {
            let msg = pb::ListPaymentMethodsRequest { include_removed: all };
            let list = api.list_payment_methods(authed(msg, t)?).await.map_err(refused)?.into_inner();
            print_all(&list.payment_methods, "no cards", line);
        }
        CardsCommand::Remove { card } => {
            let msg = pb::RemovePaymentMethodRequest { token: card };
            let pm = api.remove_payment_method(authed(msg, t)?).await.map_err(refused)?.into_inner();
            println!("{}", line(&pm));
        }
        CardsCommand::Default { card } => {
            let msg = pb::SetDefaultPaymentMethodRequest { token: card };
            let pm = api.set_default_payment_method(authed(msg, t)?).await.map_err(refused)?.into_inner();
            println!("{}", line(&pm));
        }
    }
    Ok(())
}

/// `MM/YY` or `MM/YYYY`.
fn parse_expiry(raw: &str) -> anyhow::Result<(u32, u32)> {
    let bad = || anyhow::anyhow!("--exp {raw:?}: expected MM/YY or MM/YYYY, e.g. 12/34");
    let (m, y) = raw.split_once('/').ok_or_else(bad)?;
    let month: u32 = m.trim().parse().map_err(|_| bad())?;
    let year: u32 = y.trim().parse().map_err(|_| bad())?;
    let year = if y.trim().len() == 2 { 2000 + year } else { year };
    Ok((month, year))
}

/// `dmpay accounts ...`, as the platform's account service would call them.
pub async fn accounts(config: &Config, c: ClientArgs, command: AccountsCommand) -> anyhow::Result<()> {
    let s = Session::open(config, &c, Some(c.user.as_deref().unwrap_or(ADMIN_SUB)), ADMIN_SCOPES).await?;
    let mut api = pb::accounts_client::AccountsClient::new(s.channel.clone());
    let t = s.token.as_str();
    let a = match command {
        AccountsCommand::Upsert { user, name: display, tier } => {
            let tier = match tier.as_str() {
                "verified" => pb::Tier::Verified,
                _ => pb::Tier::Unverified,
            };
            let msg = pb::UpsertAccountRequest { user_id: user, display_name: display, tier: tier as i32 };
            api.upsert_account(authed(msg, t)?).await.map_err(refused)?.into_inner()
        }
        AccountsCommand::Get { user } => {
            api.get_account(authed(pb::GetAccountRequest { user_id: user }, t)?).await.map_err(refused)?.into_inner()
        }
    };
    let tier = pb::Tier::try_from(a.tier).map(|x| x.as_str_name()).unwrap_or("UNKNOWN");
    let status = pb::AccountStatus::try_from(a.status).map(|x| x.as_str_name()).unwrap_or("UNKNOWN");
    println!(
        "{}  \"{}\"  {}  {}{}",
        a.user_id,
        a.display_name,
        name(tier, "TIER_"),
        name(status, "ACCOUNT_STATUS_"),
        if a.seller { "  seller" } else { "" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_takes_two_or_four_digit_years() {
        assert_eq!(parse_expiry("12/34").unwrap(), (12, 2034));
        assert_eq!(parse_expiry("01/2031").unwrap(), (1, 2031));
        assert!(parse_expiry("1234").is_err());
    }
}
