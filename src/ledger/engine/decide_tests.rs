//! The money rules of the posting engine, decided in memory: every rule the gRPC tests
//! exercise through a database, here without one, in milliseconds.

use std::collections::{HashMap, HashSet};

use tokio::sync::oneshot;

use super::{number_accepted, AccountState, Decision, Plan};
use crate::kernel::error::Error;
use crate::kernel::money::{Currency, Money};
use crate::ledger::engine::command::{Command, NewEntry, Op, Outcome, Resolution};
use crate::ledger::engine::hook::{Admit, Conn, HookBatch, Ticket};
use crate::ledger::model::{AccountCode, Balance, Direction, Entry, EntryStatus, Posting, KIND_LEN_MAX};

const NOW: i64 = 1_800_000_000_000_000;
const ALICE: i64 = 1;
const BOB: i64 = 2;
const CAROL: i64 = 3;
/// The platform's cash: an asset that may go negative (it funds top-ups).
const CASH: i64 = 4;

fn usd(minor: i64) -> Money {
    Money::from_minor(Currency::from_code("USD").unwrap(), minor)
}

fn code(id: i64) -> AccountCode {
    let name = match id {
        ALICE => "user:alice:wallet:USD",
        BOB => "user:bob:wallet:USD",
        CAROL => "user:carol:wallet:USD",
        _ => "platform:cash:USD",
    };
    AccountCode::parse("code", name).unwrap()
}

fn posting(account_id: i64, direction: Direction, minor: i64) -> Posting {
    Posting { account_id, account_code: code(account_id), direction, amount: usd(minor) }
}

/// `minor` from one wallet to another.
fn transfer(from: i64, to: i64, minor: i64) -> Vec<Posting> {
    vec![posting(from, Direction::Debit, minor), posting(to, Direction::Credit, minor)]
}

/// Wallets are liabilities (credit-normal) that may not go below zero; cash may.
fn books(alice: i64, bob: i64) -> HashMap<i64, AccountState> {
    let wallet = |credits: i64| AccountState {
        credit_normal: true,
        allow_negative: false,
        balance: Balance { posted_credits: credits, ..Default::default() },
        delta: Balance::default(),
    };
    let cash = AccountState {
        credit_normal: false,
        allow_negative: true,
        balance: Balance::default(),
        delta: Balance::default(),
    };
    HashMap::from([(ALICE, wallet(alice)), (BOB, wallet(bob)), (CAROL, wallet(0)), (CASH, cash)])
}

fn available(books: &HashMap<i64, AccountState>, id: i64) -> i64 {
    let a = &books[&id];
    a.balance.available(a.credit_normal).unwrap()
}

fn command(op: Op) -> Command {
    Command::new("api:test".into(), None, op, None, oneshot::channel().0)
}

fn post(postings: Vec<Posting>) -> Command {
    command(Op::Post(NewEntry {
        kind: "transfer".into(),
        description: "d".into(),
        metadata: Default::default(),
        postings,
        pending_timeout_s: None,
        locks: Vec::new(),
    }))
}

fn hold(postings: Vec<Posting>, timeout_s: u32) -> Command {
    command(Op::Post(NewEntry {
        kind: "hold".into(),
        description: "d".into(),
        metadata: Default::default(),
        postings,
        pending_timeout_s: Some(timeout_s),
        locks: Vec::new(),
    }))
}

/// A pending entry as the engine read it from the database.
fn pending_entry(id: &str, postings: Vec<Posting>, expires_at_us: Option<i64>) -> Entry {
    Entry {
        id: id.into(),
        sequence: 7,
        kind: "hold".into(),
        description: "held".into(),
        metadata: Default::default(),
        status: EntryStatus::Pending,
        postings,
        pending_entry_id: None,
        reverses_entry_id: None,
        expires_at_us,
        created_by: "api:test".into(),
        created_at_us: NOW - 1,
    }
}

fn posted_entry(id: &str, postings: Vec<Posting>) -> Entry {
    Entry {
        status: EntryStatus::Posted,
        expires_at_us: None,
        kind: "transfer".into(),
        ..pending_entry(id, postings, None)
    }
}

/// Books with `minor` of alice's already held by a pending entry to bob.
fn books_with_hold(alice: i64, minor: i64) -> HashMap<i64, AccountState> {
    let mut b = books(alice, 0);
    b.get_mut(&ALICE).unwrap().balance.pending_debits = minor;
    b.get_mut(&BOB).unwrap().balance.pending_credits = minor;
    b
}

fn decide(cmds: &[Command], books: &mut HashMap<i64, AccountState>) -> Vec<Decision> {
    decide_with(cmds, books, &HashSet::new(), &HashSet::new())
}

fn decide_with(
    cmds: &[Command],
    books: &mut HashMap<i64, AccountState>,
    resolved: &HashSet<String>,
    reversed: &HashSet<String>,
) -> Vec<Decision> {
    let plan = Plan::new(cmds.iter().collect(), NOW);
    plan.decide(books, resolved, reversed, &HashSet::new(), None)
}

fn reason(d: &Decision) -> &'static str {
    match d {
        Decision::Reject(Error::FailedPrecondition { reason, .. }) => reason.as_str(),
        Decision::Reject(e) => panic!("rejected without a reason: {e:?}"),
        Decision::Accept(_) => "accepted",
        Decision::KeyTaken => "key taken",
        Decision::Answered(_) => "answered",
    }
}

fn draft(d: &Decision) -> &super::Draft {
    match d {
        Decision::Accept(draft) => draft,
        _ => panic!("not accepted: {}", reason(d)),
    }
}

#[test]
fn a_transfer_moves_the_money() {
    let mut b = books(1_000, 0);
    let d = decide(&[post(transfer(ALICE, BOB, 400))], &mut b);
    let entry = draft(&d[0]);
    assert_eq!(entry.status, EntryStatus::Posted);
    assert_eq!(entry.postings.len(), 2);
    assert_eq!((available(&b, ALICE), available(&b, BOB)), (600, 400));
    assert_eq!(b[&ALICE].delta.posted_debits, 400, "the batch's own change, for the balance update");
    assert_eq!(b[&BOB].delta.posted_credits, 400);
}

#[test]
fn no_wallet_goes_below_zero_and_the_message_says_by_how_much() {
    let mut b = books(1_000, 0);
    let before = b[&ALICE];
    let d = decide(&[post(transfer(ALICE, BOB, 1_100))], &mut b);
    assert_eq!(reason(&d[0]), "INSUFFICIENT_FUNDS");
    let Decision::Reject(Error::FailedPrecondition { message, .. }) = &d[0] else { unreachable!() };
    assert!(message.contains("user:alice:wallet:USD") && message.contains("short by 1.00"), "{message}");
    assert_eq!(b[&ALICE].balance, before.balance, "a refused command changes nothing");
    assert_eq!(available(&b, BOB), 0);
}

#[test]
fn commands_of_a_batch_see_the_ones_before_them() {
    let mut b = books(1_000, 0);
    let cmds = [post(transfer(ALICE, BOB, 400)), post(transfer(ALICE, BOB, 400)), post(transfer(ALICE, BOB, 400))];
    let d = decide(&cmds, &mut b);
    assert_eq!(d.iter().map(reason).collect::<Vec<_>>(), ["accepted", "accepted", "INSUFFICIENT_FUNDS"]);
    assert_eq!(available(&b, ALICE), 200);
    // Money received earlier in the batch can be spent later in it.
    let d = decide(&[post(transfer(BOB, CAROL, 800))], &mut b);
    assert_eq!(reason(&d[0]), "accepted");
}

#[test]
fn a_refused_command_leaves_no_partial_effect() {
    let mut b = books(1_000, 0);
    // Alice could pay her leg; Carol, with nothing, cannot pay hers.
    let mut legs = transfer(ALICE, BOB, 500);
    legs.extend(transfer(CAROL, BOB, 100));
    let d = decide(&[post(legs)], &mut b);
    assert_eq!(reason(&d[0]), "INSUFFICIENT_FUNDS");
    assert_eq!((available(&b, ALICE), available(&b, BOB)), (1_000, 0));
    assert_eq!(b[&ALICE].delta, Balance::default());
}

#[test]
fn an_account_allowed_negative_funds_top_ups() {
    let mut b = books(0, 0);
    let d =
        decide(&[post(vec![posting(CASH, Direction::Debit, 5_000), posting(ALICE, Direction::Credit, 5_000)])], &mut b);
    assert_eq!(reason(&d[0]), "accepted");
    assert_eq!(available(&b, ALICE), 5_000);
    // Cash is debit-normal: a credit out of it takes it below zero, which it may.
    let d =
        decide(&[post(vec![posting(ALICE, Direction::Debit, 100), posting(CASH, Direction::Credit, 9_000)])], &mut b);
    // Unbalanced on purpose: decide does not check balance (validation did), only limits.
    assert_eq!(reason(&d[0]), "accepted");
    assert_eq!(b[&CASH].balance.posted(false), Some(5_000 - 9_000));
}

#[test]
fn a_balance_that_would_overflow_is_refused() {
    let mut b = books(0, i64::MAX - 10);
    let d = decide(&[post(vec![posting(CASH, Direction::Debit, 11), posting(BOB, Direction::Credit, 11)])], &mut b);
    assert_eq!(reason(&d[0]), "BALANCE_LIMIT");
    assert_eq!(b[&BOB].balance.posted_credits, i64::MAX - 10);
}

#[test]
fn a_hold_reserves_without_posting_and_expires_on_the_batch_clock() {
    let mut b = books(1_000, 0);
    let d = decide(&[hold(transfer(ALICE, BOB, 600), 30), post(transfer(ALICE, BOB, 500))], &mut b);
    let held = draft(&d[0]);
    assert_eq!(held.status, EntryStatus::Pending);
    assert_eq!(held.expires_at_us, Some(NOW + 30_000_000));
    assert!(held.postings.iter().all(|p| p.pending));
    assert_eq!(reason(&d[1]), "INSUFFICIENT_FUNDS", "the hold took 6.00 of 10.00");
    assert_eq!(b[&ALICE].balance.posted(true), Some(1_000), "nothing posted yet");
    assert_eq!(available(&b, ALICE), 400);
    assert_eq!(available(&b, BOB), 0, "incoming holds are not available");
}

#[test]
fn posting_a_hold_releases_it_and_moves_the_money() {
    let mut b = books_with_hold(1_000, 600);
    let pending = pending_entry("p1", transfer(ALICE, BOB, 600), Some(NOW + 1));
    let d = decide(&[command(Op::Resolve { pending, action: Resolution::Post(None) })], &mut b);
    let posted = draft(&d[0]);
    assert_eq!((posted.status, posted.kind.as_str()), (EntryStatus::Posted, "hold.post"));
    assert_eq!(posted.pending_entry_id.as_deref(), Some("p1"));
    assert_eq!((b[&ALICE].balance.pending_debits, b[&BOB].balance.pending_credits), (0, 0));
    assert_eq!((available(&b, ALICE), available(&b, BOB)), (400, 600));
}

#[test]
fn posting_part_of_a_hold_releases_all_of_it() {
    let mut b = books_with_hold(1_000, 600);
    let pending = pending_entry("p1", transfer(ALICE, BOB, 600), None);
    let d = decide(&[command(Op::Resolve { pending, action: Resolution::Post(Some(250)) })], &mut b);
    let posted = draft(&d[0]);
    assert!(posted.postings.iter().all(|p| p.posting.amount.minor() == 250));
    assert_eq!((available(&b, ALICE), available(&b, BOB)), (750, 250));
    assert_eq!(b[&ALICE].balance.pending_debits, 0);
}

#[test]
fn voiding_a_hold_gives_the_money_back() {
    let mut b = books_with_hold(1_000, 600);
    let pending = pending_entry("p1", transfer(ALICE, BOB, 600), None);
    let d = decide(&[command(Op::Resolve { pending, action: Resolution::Void })], &mut b);
    let voided = draft(&d[0]);
    assert_eq!((voided.status, voided.kind.as_str()), (EntryStatus::Voided, "hold.void"));
    assert!(voided.postings.is_empty());
    assert_eq!((available(&b, ALICE), available(&b, BOB)), (1_000, 0));
}

#[test]
fn an_expired_hold_can_only_expire() {
    let pending = pending_entry("p1", transfer(ALICE, BOB, 600), Some(NOW));
    for action in [Resolution::Post(None), Resolution::Void] {
        let mut b = books_with_hold(1_000, 600);
        let d = decide(&[command(Op::Resolve { pending: pending.clone(), action })], &mut b);
        assert_eq!(reason(&d[0]), "ENTRY_EXPIRED", "{action:?}");
        assert_eq!(b[&ALICE].balance.pending_debits, 600);
    }
    let mut b = books_with_hold(1_000, 600);
    let d = decide(&[command(Op::Resolve { pending, action: Resolution::Expire })], &mut b);
    assert_eq!((draft(&d[0]).status, draft(&d[0]).kind.as_str()), (EntryStatus::Expired, "hold.expire"));
    assert_eq!(available(&b, ALICE), 1_000);
}

#[test]
fn a_hold_is_resolved_once() {
    let pending = pending_entry("p1", transfer(ALICE, BOB, 600), None);
    let resolve = |action| command(Op::Resolve { pending: pending.clone(), action });
    // Twice in one batch: the second finds it no longer pending.
    let mut b = books_with_hold(1_000, 600);
    let d = decide(&[resolve(Resolution::Post(None)), resolve(Resolution::Void)], &mut b);
    assert_eq!(d.iter().map(reason).collect::<Vec<_>>(), ["accepted", "ENTRY_NOT_PENDING"]);
    // Resolved by an earlier batch (the transaction found its resolution row).
    let mut b = books_with_hold(1_000, 600);
    let d = decide_with(&[resolve(Resolution::Void)], &mut b, &HashSet::from(["p1".to_string()]), &HashSet::new());
    assert_eq!(reason(&d[0]), "ENTRY_NOT_PENDING");
    assert_eq!(b[&ALICE].balance.pending_debits, 600);
}

#[test]
fn a_reversal_mirrors_the_entry_once() {
    let original = posted_entry("e1", transfer(ALICE, BOB, 300));
    let reverse = || command(Op::Reverse { original: original.clone(), description: "mistake".into() });
    let mut b = books(700, 300);
    let d = decide(&[reverse(), reverse()], &mut b);
    let r = draft(&d[0]);
    assert_eq!(
        (r.kind.as_str(), r.reverses_entry_id.as_deref(), r.description.as_str()),
        ("transfer.reversal", Some("e1"), "mistake")
    );
    assert_eq!(r.postings[0].posting.direction, Direction::Credit, "alice's debit becomes a credit");
    assert_eq!(reason(&d[1]), "ALREADY_REVERSED");
    assert_eq!((available(&b, ALICE), available(&b, BOB)), (1_000, 0));
    // Reversed by an earlier batch.
    let mut b = books(700, 300);
    let d = decide_with(&[reverse()], &mut b, &HashSet::new(), &HashSet::from(["e1".to_string()]));
    assert_eq!(reason(&d[0]), "ALREADY_REVERSED");
}

#[test]
fn a_reversal_cannot_take_back_money_already_spent() {
    let original = posted_entry("e1", transfer(ALICE, BOB, 300));
    let mut b = books(700, 100);
    let d = decide(&[command(Op::Reverse { original, description: "late".into() })], &mut b);
    assert_eq!(reason(&d[0]), "INSUFFICIENT_FUNDS");
}

#[test]
fn a_key_another_process_took_is_left_for_the_lookup() {
    let mut b = books(1_000, 0);
    let cmds = [post(transfer(ALICE, BOB, 100)), post(transfer(ALICE, BOB, 100))];
    let plan = Plan::new(cmds.iter().collect(), NOW);
    let d = plan.decide(&mut b, &HashSet::new(), &HashSet::new(), &HashSet::from([0]), None);
    assert_eq!(d.iter().map(reason).collect::<Vec<_>>(), ["key taken", "accepted"]);
    assert_eq!(available(&b, ALICE), 900, "the taken command moved nothing");
}

#[test]
fn accepted_entries_are_numbered_in_decision_order_without_gaps() {
    let mut b = books(500, 0);
    let cmds = [post(transfer(ALICE, BOB, 400)), post(transfer(ALICE, BOB, 400)), post(transfer(BOB, CAROL, 100))];
    let mut d = decide(&cmds, &mut b);
    number_accepted(&mut d, 41);
    assert_eq!(draft(&d[0]).sequence, 41);
    assert_eq!(reason(&d[1]), "INSUFFICIENT_FUNDS");
    assert_eq!(draft(&d[2]).sequence, 42);
    assert_eq!(super::accepted(&d).len(), 2);
}

#[test]
fn the_plan_locks_accounts_in_one_order_and_knows_its_keys() {
    let keyed = |caller: &str, key: &str, postings| {
        let mut c = post(postings);
        c.caller = caller.into();
        c.idem = Some(crate::ledger::engine::command::Idem {
            key: key.into(),
            operation: "post_entry",
            request_hash: "h".into(),
        });
        c
    };
    let cmds = [
        keyed("b", "k1", transfer(CASH, ALICE, 1)),
        post(transfer(BOB, ALICE, 1)),
        keyed("a", "k2", transfer(CAROL, BOB, 1)),
    ];
    let plan = Plan::new(cmds.iter().collect(), NOW);
    assert_eq!(plan.account_ids, [ALICE, BOB, CAROL, CASH], "ascending, each once: every batch locks in this order");
    assert_eq!(plan.keyed, [2, 0], "keys in (caller, key) order");
    let ids: HashSet<&String> = plan.entry_ids.iter().collect();
    assert_eq!(ids.len(), 3, "an entry id per command, known before deciding");
    assert_eq!(plan.now_us, NOW);
}

#[test]
fn derived_kinds_stay_within_the_kind_limit() {
    let mut original = posted_entry("e1", transfer(ALICE, BOB, 1));
    original.kind = "k".repeat(KIND_LEN_MAX);
    let mut b = books(0, 1);
    let d = decide(&[command(Op::Reverse { original, description: String::new() })], &mut b);
    assert_eq!(draft(&d[0]).kind.len(), KIND_LEN_MAX);
}

/// A batch hook that answers command 0 itself and records what it was told.
#[derive(Default)]
struct Recorder {
    decided: Vec<(usize, std::result::Result<(), &'static str>)>,
}

#[async_trait::async_trait]
impl HookBatch for Recorder {
    fn admit(&mut self, cmd: usize) -> Admit {
        if cmd == 0 {
            Admit::Answer(Box::new(Ok(Outcome::Replayed("earlier".into()))))
        } else {
            Admit::Proceed
        }
    }
    fn decided(&mut self, cmd: usize, result: std::result::Result<(), &Error>) {
        let result = result.map_err(|e| match e {
            Error::FailedPrecondition { reason, .. } => reason.as_str(),
            _ => "other",
        });
        self.decided.push((cmd, result));
    }
    async fn write_rows(&mut self, _: &mut Conn<'_>, _: i64) -> std::result::Result<(), sqlx::Error> {
        Ok(())
    }
    async fn write_numbered(&mut self, _: &mut Conn<'_>, _: i64) -> std::result::Result<(), sqlx::Error> {
        Ok(())
    }
}

#[test]
fn the_hook_answers_its_own_commands_and_hears_every_decision() {
    let attached = |postings| {
        let mut c = post(postings);
        c.ticket = Some(Ticket(7));
        c
    };
    let cmds = [
        attached(transfer(ALICE, BOB, 900)),
        attached(transfer(ALICE, BOB, 600)),
        attached(transfer(ALICE, BOB, 600)),
        post(transfer(ALICE, BOB, 100)),
    ];
    let mut b = books(1_000, 0);
    let mut hook = Recorder::default();
    let plan = Plan::new(cmds.iter().collect(), NOW);
    let d = plan.decide(&mut b, &HashSet::new(), &HashSet::new(), &HashSet::new(), Some(&mut hook));
    assert_eq!(d.iter().map(reason).collect::<Vec<_>>(), ["answered", "accepted", "INSUFFICIENT_FUNDS", "accepted"]);
    assert!(matches!(&d[0], Decision::Answered(Ok(Outcome::Replayed(id))) if id == "earlier"));
    assert_eq!(hook.decided, [(1, Ok(())), (2, Err("INSUFFICIENT_FUNDS"))], "only attached commands, in order");
    assert_eq!(available(&b, ALICE), 300, "the answered command moved nothing");
}
