//! How a batch's commands are sorted out by idempotency key before the transaction, and
//! how a key committed earlier is answered; no database.

use tokio::sync::oneshot;

use super::{replay, roles, Role};
use crate::kernel::error::Error;
use crate::ledger::engine::backend::KeyRecord;
use crate::ledger::engine::command::{Command, Idem, NewEntry, Op, Outcome};

fn cmd(caller: &str, key: Option<(&str, &str)>) -> Command {
    let idem = key.map(|(key, hash)| Idem { key: key.into(), operation: "post_entry", request_hash: hash.into() });
    let op = Op::Post(NewEntry {
        kind: "t".into(),
        description: String::new(),
        metadata: Default::default(),
        postings: Vec::new(),
        pending_timeout_s: None,
        locks: Vec::new(),
    });
    Command::new(caller.into(), idem, op, None, oneshot::channel().0)
}

#[test]
fn commands_without_keys_all_lead() {
    let batch = [cmd("a", None), cmd("a", None)];
    assert_eq!(roles(&batch), [Role::Lead, Role::Lead]);
}

#[test]
fn a_repeat_of_the_same_request_follows_its_leader() {
    let batch = [cmd("a", Some(("k", "h1"))), cmd("b", None), cmd("a", Some(("k", "h1"))), cmd("a", Some(("k", "h1")))];
    assert_eq!(roles(&batch), [Role::Lead, Role::Lead, Role::Follow(0), Role::Follow(0)]);
}

#[test]
fn the_same_key_with_another_request_is_refused() {
    let batch = [cmd("a", Some(("k", "h1"))), cmd("a", Some(("k", "h2"))), cmd("a", Some(("k", "h1")))];
    assert_eq!(roles(&batch), [Role::Lead, Role::KeyReused, Role::Follow(0)]);
}

#[test]
fn keys_are_per_caller() {
    let batch = [cmd("a", Some(("k", "h1"))), cmd("b", Some(("k", "h2"))), cmd("b", Some(("k2", "h2")))];
    assert_eq!(roles(&batch), [Role::Lead, Role::Lead, Role::Lead]);
}

fn record(operation: &str, hash: &str) -> KeyRecord {
    KeyRecord {
        caller: "a".into(),
        key: "k".into(),
        operation: operation.into(),
        request_hash: hash.into(),
        result_id: "entry-1".into(),
    }
}

#[test]
fn a_key_committed_earlier_replays_only_the_same_request() {
    let idem = Idem { key: "k".into(), operation: "post_entry", request_hash: "h1".into() };
    assert!(matches!(replay(&idem, &record("post_entry", "h1")), Ok(Outcome::Replayed(id)) if id == "entry-1"));
    assert!(matches!(replay(&idem, &record("post_entry", "h2")), Err(Error::AlreadyExists(_))));
    // The same body under another operation (a tombstone, say) is another request.
    assert!(matches!(replay(&idem, &record("refund_tombstone", "h1")), Err(Error::AlreadyExists(_))));
}
