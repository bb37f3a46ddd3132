//! How the posting engine gathers its next batch (`Intake`), and which accounts the
//! batches in flight hold (`InFlight`). On SQLite the engine runs one worker, so nothing
//! is in flight while it gathers and nothing is ever set aside.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{mpsc, watch};

use super::command::Command;
use super::config::EngineConfig;

/// Commands in flight touching one account from which the account counts as hot (a
/// seller in a live stream): a batch whose first command touches it gathers until it is
/// free. An account that only a command or two in flight touch (two friends' wallets
/// under uniform sends) does not hold a batch back: the batch starts at once and waits,
/// if at all, only at its lock statement, overlapping the other batch up to it.
const HOT_COMMANDS_MIN: u32 = 4;

/// The queue's receiving end, held by the one worker gathering a batch.
///
/// Concurrent batches that share an account run one after the other: the second waits
/// at its lock statement until the first commits. So while one batch is in flight, the
/// gathering worker sets aside the commands that touch its accounts (`deferred`) and
/// fills its batch with the others, whose locks it then takes at once; the two batches
/// then overlap up to the journal's sequence row, which only the last part of each
/// holds. Set-aside commands go first into the next batch, whatever they touch, so none
/// waits more than one batch longer.
///
/// When the batch's first command touches a busy account anyway, nothing is set aside;
/// when that account is hot (a live stream or a flash sale, where every payment credits
/// the seller: `HOT_COMMANDS_MIN`), the batch keeps gathering until the batches holding
/// it end (`gather_while_busy`). It would wait for their commit at its lock statement in
/// any case; gathering meanwhile makes it as large as the load allows, so the work that
/// runs one batch at a time on a hot account (its lock, the hook's reads and rows, the
/// journal, the commit) is paid once for more commands.
pub(crate) struct Intake {
    rx: mpsc::Receiver<Command>,
    /// At most `batch_size_max` commands.
    deferred: VecDeque<Command>,
}

/// The accounts of the batches in flight, with the number of commands in flight that
/// touch each (a command counts once per posting or lock it has on the account).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    busy: Mutex<HashMap<i64, u32>>,
    /// Told each time a batch ends.
    ended: tokio::sync::Notify,
}

impl InFlight {
    /// A batch with these accounts (repeats allowed) starts.
    pub(crate) fn enter(&self, accounts: &[i64]) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        for id in accounts {
            *busy.entry(*id).or_insert(0) += 1;
        }
    }

    /// The batch that `enter`ed with these accounts has ended.
    pub(crate) fn leave(&self, accounts: &[i64]) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        for id in accounts {
            if let Some(n) = busy.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    busy.remove(id);
                }
            }
        }
        drop(busy);
        self.ended.notify_waiters();
    }

    /// Each busy account, with the number of commands in flight that touch it.
    fn accounts(&self) -> HashMap<i64, u32> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn any_busy(&self, accounts: &[i64]) -> bool {
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        accounts.iter().any(|id| busy.contains_key(id))
    }
}

/// A batch as gathered.
pub(crate) struct Gathered {
    pub commands: Vec<Command>,
    /// The batch's first command touches a hot account: the batch gathered calls until
    /// that account's batch in flight ended (`gather_while_busy`), so it runs after it.
    pub hot: bool,
}

impl Intake {
    pub(crate) fn new(rx: mpsc::Receiver<Command>) -> Self {
        Intake { rx, deferred: VecDeque::new() }
    }

    /// The next batch: the commands set aside last time, then what the queue holds, up
    /// to `batch_size_max`, waiting at most `commit_wait` for more once one is in hand.
    /// `None` once the queue is closed and drained.
    pub(crate) async fn gather(
        &mut self,
        config: &EngineConfig,
        in_flight: &InFlight,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Gathered> {
        if *stop.borrow() {
            self.rx.close();
        }
        let max = config.batch_size_max.max(1);
        let mut batch = Vec::with_capacity(max.min(1024));
        while batch.len() < max {
            match self.deferred.pop_front() {
                Some(cmd) => batch.push(cmd),
                None => break,
            }
        }
        if batch.is_empty() {
            let first = tokio::select! {
                cmd = self.rx.recv() => cmd,
                _ = stop.changed() => {
                    self.rx.close();
                    self.rx.recv().await
                }
            };
            batch.push(first?);
        }
        // A snapshot: a batch that ends meanwhile only makes this one more careful.
        let busy = in_flight.accounts();
        let touches_busy = |cmd: &Command| cmd.account_ids().any(|id| busy.contains_key(&id));
        let spread = !busy.is_empty() && !batch.iter().any(touches_busy);
        let hot: Vec<i64> = batch
            .first()
            .map(|c| c.account_ids().filter(|id| busy.get(id).is_some_and(|n| *n >= HOT_COMMANDS_MIN)).collect())
            .unwrap_or_default();
        if !hot.is_empty() {
            self.gather_while_busy(&mut batch, max, &hot, in_flight, config.batch_timeout, stop).await;
        }
        let deadline = tokio::time::Instant::now() + config.commit_wait;
        while batch.len() < max {
            let cmd = match self.rx.try_recv() {
                Ok(cmd) => cmd,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if config.commit_wait.is_zero() {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(cmd)) => cmd,
                        _ => break,
                    }
                }
            };
            if spread && self.deferred.len() < max && touches_busy(&cmd) {
                self.deferred.push_back(cmd);
            } else {
                batch.push(cmd);
            }
        }
        Some(Gathered { commands: batch, hot: !hot.is_empty() })
    }

    /// Adds what the queue brings to `batch` until no batch in flight holds any of the
    /// `hot` accounts, the batch is full, `wait_max` has passed, or the engine stops. A
    /// batch in flight ends within its own timeout, which `wait_max` is; the bound is
    /// there so that no slip in this bookkeeping can hold the engine.
    async fn gather_while_busy(
        &mut self,
        batch: &mut Vec<Command>,
        max: usize,
        hot: &[i64],
        in_flight: &InFlight,
        wait_max: std::time::Duration,
        stop: &mut watch::Receiver<bool>,
    ) {
        let deadline = tokio::time::Instant::now() + wait_max;
        while batch.len() < max && !*stop.borrow() {
            // Registered before the check, so a batch that ends between the two still
            // wakes this wait.
            let ended = in_flight.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !in_flight.any_busy(hot) {
                return;
            }
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => batch.push(cmd),
                    None => return,
                },
                _ = &mut ended => {}
                _ = tokio::time::sleep_until(deadline) => return,
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::kernel::error::Result;
    use crate::kernel::money::{Currency, Money};
    use crate::ledger::engine::{NewEntry, Op, Outcome};
    use crate::ledger::model::{AccountCode, Direction, Metadata, Posting};

    /// A transfer between two accounts, and the receiver its answer would go to.
    fn transfer(from: i64, to: i64) -> (Command, oneshot::Receiver<Result<Outcome>>) {
        let usd = Currency::from_code("USD").expect("USD");
        let posting = |account_id: i64, direction| Posting {
            account_id,
            account_code: AccountCode::parse("code", &format!("acct-{account_id}")).expect("code"),
            direction,
            amount: Money::from_minor(usd, 100),
        };
        let (reply, rx) = oneshot::channel();
        let op = Op::Post(NewEntry {
            kind: "transfer".into(),
            description: String::new(),
            metadata: Metadata::new(),
            postings: vec![posting(from, Direction::Debit), posting(to, Direction::Credit)],
            pending_timeout_s: None,
            locks: Vec::new(),
        });
        (Command::new("test".into(), None, op, None, reply), rx)
    }

    fn pairs(batch: &[Command]) -> Vec<Vec<i64>> {
        batch.iter().map(|c| c.account_ids().collect()).collect()
    }

    async fn setup(cmds: &[(i64, i64)], busy: &[i64]) -> (Intake, InFlight, Vec<oneshot::Receiver<Result<Outcome>>>) {
        let (tx, rx) = mpsc::channel(64);
        let mut answers = Vec::new();
        for (from, to) in cmds {
            let (cmd, answer) = transfer(*from, *to);
            tx.send(cmd).await.expect("queue");
            answers.push(answer);
        }
        let in_flight = InFlight::default();
        in_flight.enter(busy);
        (Intake::new(rx), in_flight, answers)
    }

    /// One call queued and the queue kept open (its sender returned), so `gather` waits
    /// on it instead of finding it closed; `busy` are the accounts of the calls in flight.
    async fn setup_open(
        call: (i64, i64),
        busy: &[i64],
    ) -> (Intake, InFlight, mpsc::Sender<Command>, oneshot::Receiver<Result<Outcome>>) {
        let (tx, rx) = mpsc::channel(64);
        let (cmd, answer) = transfer(call.0, call.1);
        tx.send(cmd).await.expect("queue");
        let in_flight = InFlight::default();
        in_flight.enter(busy);
        (Intake::new(rx), in_flight, tx, answer)
    }

    fn config() -> EngineConfig {
        EngineConfig { commit_wait: Duration::ZERO, ..EngineConfig::default() }
    }

    #[tokio::test]
    async fn calls_touching_a_busy_wallet_wait_for_the_next_batch_and_lead_it() {
        let (mut intake, busy, _answers) = setup(&[(3, 4), (1, 5), (6, 7), (8, 2)], &[1, 2]).await;
        let (_stop_tx, mut stop) = watch::channel(false);
        let first = intake.gather(&config(), &busy, &mut stop).await.expect("a batch").commands;
        assert_eq!(pairs(&first), vec![vec![3, 4], vec![6, 7]], "the batch takes only the calls on idle wallets");
        // The in-flight batch ends; the set-aside calls go first, in their order.
        busy.leave(&[1, 2]);
        let second = intake.gather(&config(), &busy, &mut stop).await.expect("a batch").commands;
        assert_eq!(pairs(&second), vec![vec![1, 5], vec![8, 2]]);
    }

    #[tokio::test]
    async fn set_aside_calls_are_never_set_aside_twice() {
        let (mut intake, busy, _answers) = setup(&[(3, 4), (1, 5)], &[1]).await;
        let (_stop_tx, mut stop) = watch::channel(false);
        let first = intake.gather(&config(), &busy, &mut stop).await.expect("a batch").commands;
        assert_eq!(pairs(&first), vec![vec![3, 4]]);
        // Account 1 is still busy (another batch took it): the call goes anyway.
        let second = intake.gather(&config(), &busy, &mut stop).await.expect("a batch").commands;
        assert_eq!(pairs(&second), vec![vec![1, 5]]);
    }

    #[tokio::test]
    async fn a_batch_that_waits_anyway_sets_nothing_aside() {
        // A live stream: every payment credits the busy seller (9), including the first.
        let (mut intake, busy, _answers) = setup(&[(1, 9), (2, 9), (3, 4)], &[9]).await;
        let (_stop_tx, mut stop) = watch::channel(false);
        let batch = intake.gather(&config(), &busy, &mut stop).await.expect("a batch").commands;
        assert_eq!(pairs(&batch), vec![vec![1, 9], vec![2, 9], vec![3, 4]]);
        assert!(intake.deferred.is_empty());
    }

    #[tokio::test]
    async fn a_batch_behind_a_busy_account_gathers_until_that_batch_ends() {
        // A flash sale: the seller (9) is in a batch in flight; the next batch would wait
        // for it at its lock, so it keeps taking the taps that arrive meanwhile.
        let (tx, rx) = mpsc::channel(64);
        let mut answers = Vec::new();
        let mut send = |from: i64, to: i64| {
            let (cmd, answer) = transfer(from, to);
            answers.push(answer);
            tx.try_send(cmd).expect("queue");
        };
        send(1, 9);
        let in_flight = std::sync::Arc::new(InFlight::default());
        in_flight.enter(&[9, 9, 9, 9, 7]);
        let mut intake = Intake::new(rx);
        let (_stop_tx, mut stop) = watch::channel(false);
        let gathering = {
            let in_flight = in_flight.clone();
            tokio::spawn(async move { intake.gather(&config(), &in_flight, &mut stop).await })
        };
        send(2, 9);
        send(3, 4);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!gathering.is_finished(), "the batch waits while the seller's batch is in flight");
        // Another batch ending does not end the wait; the seller's does.
        in_flight.leave(&[7]);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!gathering.is_finished());
        in_flight.leave(&[9, 9, 9, 9]);
        let batch = gathering.await.expect("gather").expect("a batch");
        assert!(batch.hot, "the seller's account is hot");
        assert_eq!(pairs(&batch.commands), vec![vec![1, 9], vec![2, 9], vec![3, 4]]);
        drop(answers);
    }

    #[tokio::test]
    async fn a_batch_behind_a_busy_account_waits_at_most_the_batch_timeout() {
        let (mut intake, in_flight, tx, _answer) = setup_open((1, 9), &[9; HOT_COMMANDS_MIN as usize]).await;
        let (_stop_tx, mut stop) = watch::channel(false);
        let config = EngineConfig { batch_timeout: Duration::from_millis(20), ..config() };
        let batch = intake.gather(&config, &in_flight, &mut stop).await.expect("a batch").commands;
        assert_eq!(pairs(&batch), vec![vec![1, 9]], "the batch goes while the account is still busy");
        drop(tx);
    }

    #[tokio::test]
    async fn a_wallet_one_command_in_flight_touches_holds_no_batch_back() {
        // Uniform sends: the first call shares a wallet (1) with one call in flight; the
        // batch goes at once, with what is queued, and waits at most at its lock.
        let (mut intake, in_flight, tx, _answer) = setup_open((1, 5), &[1, 2]).await;
        let (_stop_tx, mut stop) = watch::channel(false);
        let config = EngineConfig { batch_timeout: Duration::from_secs(3600), ..config() };
        // Bounded only so that a regression fails instead of waiting out the hour.
        let batch = tokio::time::timeout(Duration::from_secs(10), intake.gather(&config, &in_flight, &mut stop))
            .await
            .expect("the batch goes without waiting for the one in flight")
            .expect("a batch");
        assert!(!batch.hot, "a wallet one command in flight touches is not hot");
        assert_eq!(pairs(&batch.commands), vec![vec![1, 5]]);
        drop(tx);
    }

    #[tokio::test]
    async fn nothing_is_set_aside_when_no_batch_is_in_flight() {
        let (mut intake, busy, _answers) = setup(&[(1, 2), (2, 3), (3, 4)], &[]).await;
        let (_stop_tx, mut stop) = watch::channel(false);
        let batch = intake.gather(&config(), &busy, &mut stop).await.expect("a batch").commands;
        assert_eq!(batch.len(), 3);
    }

    #[tokio::test]
    async fn set_aside_calls_are_drained_at_shutdown() {
        let (mut intake, busy, _answers) = setup(&[(3, 4), (1, 5)], &[1]).await;
        let (stop_tx, mut stop) = watch::channel(false);
        let first = intake.gather(&config(), &busy, &mut stop).await.expect("a batch").commands;
        assert_eq!(first.len(), 1);
        stop_tx.send(true).expect("stop");
        let second = intake.gather(&config(), &busy, &mut stop).await.expect("the set-aside call").commands;
        assert_eq!(pairs(&second), vec![vec![1, 5]]);
        assert!(intake.gather(&config(), &busy, &mut stop).await.is_none(), "then the engine stops");
    }
}
