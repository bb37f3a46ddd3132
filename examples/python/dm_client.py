"""One-click payments in a DM, driven from Python over gRPC.

The same story as examples/dm_demo.rs, told by a Python chat client against a running
dmpay server:

1. the platform creates the accounts of alice and bob (Accounts.UpsertAccount,
   scope accounts:admin);
2. the treasury tops up alice's wallet with a ledger entry (Ledger.PostEntry,
   scope ledger:write);
3. bob watches his payment events in a background thread (Payments.WatchPayments);
4. alice sends bob money (Payments.SendPayment);
5. bob requests money from alice (Payments.RequestPayment) and alice pays that request
   with one tap (Payments.PayBill);
6. the watcher must see both payments settle, the request must be paid, and both
   wallets must hold what the story says (Payments.GetBalance).

It prints a short log and exits 1 if anything is not as expected, or on any gRPC error
(with its code and details). User ids and idempotency keys carry a per-run suffix, so it
can run again and again against the same server.

Run it with examples/python/run.sh, which makes a virtualenv, generates the stubs from
proto/, mints the tokens with the dmpay binary and sets the environment below:

    DMPAY_ADDR=127.0.0.1:50051 examples/python/run.sh

Environment:
    DMPAY_ADDR            the server, host:port (default 127.0.0.1:50051)
    DMPAY_RUN_ID          this run's suffix: users are alice-<id> and bob-<id>
    DMPAY_TOKEN_ADMIN     a token with scope accounts:admin
    DMPAY_TOKEN_TREASURY  a token with scope ledger:write
    DMPAY_TOKEN_ALICE     sub alice-<id>, scopes payments:read payments:write
    DMPAY_TOKEN_BOB       sub bob-<id>, scopes payments:read payments:write
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from dmpay.v1 import (
    accounts_pb2,
    accounts_pb2_grpc,
    common_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
    payments_pb2,
    payments_pb2_grpc,
)

CURRENCY = "USD"
TOP_UP = Decimal("50.00")
SENT = Decimal("12.50")
REQUESTED = Decimal("7.25")
CALL_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 15.0

PaymentEvent = payments_pb2.PaymentEvent
SETTLED_EVENT = payments_pb2.PAYMENT_EVENT_TYPE_PAYMENT_SETTLED


class CheckFailed(Exception):
    """The server answered, but not what the story expects."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


@dataclass(frozen=True)
class User:
    user_id: str
    display_name: str
    token: str

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        """Call metadata that authenticates as this user."""
        return bearer(self.token)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.exit(f"{name} is not set; run this example through examples/python/run.sh")
    return value


def usd(amount: Decimal) -> common_pb2.Money:
    return common_pb2.Money(currency=CURRENCY, amount=f"{amount:.2f}")


def money(m: common_pb2.Money) -> str:
    return f"{m.amount} {m.currency}"


def enum_name(enum, value: int, prefix: str) -> str:
    """PAYMENT_STATUS_SETTLED -> SETTLED."""
    return enum.Name(value).removeprefix(prefix)


def payment_status(value: int) -> str:
    return enum_name(payments_pb2.PaymentStatus, value, "PAYMENT_STATUS_")


def describe(event: PaymentEvent) -> str:
    kind = enum_name(payments_pb2.PaymentEventType, event.type, "PAYMENT_EVENT_TYPE_")
    line = f"#{event.sequence} {kind}"
    if event.HasField("payment"):
        p = event.payment
        line += (
            f" {p.payment_id} {p.sender_id} -> {p.recipient_id} {money(p.amount)}"
            f" {payment_status(p.status)}"
        )
    if event.HasField("bill"):
        b = event.bill
        status = enum_name(payments_pb2.BillStatus, b.status, "BILL_STATUS_")
        line += f" bill {b.bill_id} {b.payer_id} owes {b.requester_id} {money(b.amount)} {status}"
    return line


class Watcher(threading.Thread):
    """Follows one user's WatchPayments stream, printing each event as it arrives.

    It asks for every event after sequence 0, so the server replays what happened before
    the stream opened: no event is missed however the threads are scheduled.
    """

    _END = None  # queued when the stream ends

    def __init__(self, payments: payments_pb2_grpc.PaymentsStub, user: User) -> None:
        super().__init__(name=f"watch-{user.user_id}", daemon=True)
        self.user = user
        self.error: grpc.RpcError | None = None
        self._events: queue.Queue[PaymentEvent | None] = queue.Queue()
        self._stream = payments.WatchPayments(
            payments_pb2.WatchPaymentsRequest(after_sequence=0), metadata=user.auth
        )

    def run(self) -> None:
        try:
            for event in self._stream:
                print(f"  [watch {self.user.user_id}] {describe(event)}")
                self._events.put(event)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err
        finally:
            self._events.put(self._END)

    def stop(self) -> None:
        self._stream.cancel()
        self.join(timeout=CALL_TIMEOUT_S)

    def wait_settled(self, payment_ids: set[str], timeout: float) -> dict[str, payments_pb2.Payment]:
        """Waits until each payment has a PAYMENT_SETTLED event; returns them by id."""
        deadline = time.monotonic() + timeout
        settled: dict[str, payments_pb2.Payment] = {}
        while payment_ids - settled.keys():
            try:
                event = self._events.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                missing = ", ".join(sorted(payment_ids - settled.keys()))
                raise CheckFailed(f"no PAYMENT_SETTLED event within {timeout:.0f}s for {missing}")
            if event is self._END:
                if self.error is not None:
                    raise self.error
                raise CheckFailed("the watch stream ended before the payments settled")
            if event.type == SETTLED_EVENT and event.payment.payment_id in payment_ids:
                settled[event.payment.payment_id] = event.payment
        return settled


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    addr = os.environ.get("DMPAY_ADDR", "127.0.0.1:50051")
    run_id = required_env("DMPAY_RUN_ID")
    admin = required_env("DMPAY_TOKEN_ADMIN")
    treasury = required_env("DMPAY_TOKEN_TREASURY")
    alice = User(f"alice-{run_id}", "Alice", required_env("DMPAY_TOKEN_ALICE"))
    bob = User(f"bob-{run_id}", "Bob", required_env("DMPAY_TOKEN_BOB"))
    conversation = f"dm-{alice.user_id}-{bob.user_id}"

    with grpc.insecure_channel(addr) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            raise CheckFailed(f"no dmpay server answers at {addr}") from None
        print(f"dmpay at {addr}, run {run_id}")
        # grpcio-reflection speaks reflection v1alpha, which the server serves beside v1.
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        expect("dmpay.v1.Payments" in services, f"reflection lists dmpay.v1.Payments: {services}")
        print(f"reflection (v1alpha) lists {len(services)} services, e.g. dmpay.v1.Payments")
        accounts = accounts_pb2_grpc.AccountsStub(channel)
        ledger = ledger_pb2_grpc.LedgerStub(channel)
        payments = payments_pb2_grpc.PaymentsStub(channel)

        # The platform creates its users' accounts at sign-up; a payment to a user
        # without one is refused.
        for user in (alice, bob):
            account = accounts.UpsertAccount(
                accounts_pb2.UpsertAccountRequest(user_id=user.user_id, display_name=user.display_name),
                metadata=bearer(admin),
                timeout=CALL_TIMEOUT_S,
            )
            status = enum_name(accounts_pb2.AccountStatus, account.status, "ACCOUNT_STATUS_")
            print(f"account {account.user_id} ({account.display_name}): {status}")

        # Money comes into a wallet from a platform account, as a balanced ledger entry.
        entry = ledger.PostEntry(
            ledger_pb2.PostEntryRequest(
                idempotency_key=f"pyex-{run_id}-topup",
                kind="deposit",
                description=f"top-up of {alice.user_id}",
                postings=[
                    ledger_pb2.Posting(
                        account_code=f"platform:treasury:{CURRENCY}",
                        direction=ledger_pb2.DIRECTION_DEBIT,
                        amount=usd(TOP_UP),
                    ),
                    ledger_pb2.Posting(
                        account_code=f"user:{alice.user_id}:wallet:{CURRENCY}",
                        direction=ledger_pb2.DIRECTION_CREDIT,
                        amount=usd(TOP_UP),
                    ),
                ],
            ),
            metadata=bearer(treasury),
            timeout=CALL_TIMEOUT_S,
        )
        print(f"treasury tops up {alice.user_id}: +{usd(TOP_UP).amount} {CURRENCY} (entry {entry.entry_id})")

        watcher = Watcher(payments, bob)
        watcher.start()
        print(f"{bob.user_id} watches his payment events")
        try:
            sent = payments.SendPayment(
                payments_pb2.SendPaymentRequest(
                    idempotency_key=f"pyex-{run_id}-send",
                    recipient_id=bob.user_id,
                    amount=usd(SENT),
                    note="lunch",
                    conversation_id=conversation,
                    funding_source=payments_pb2.FUNDING_SOURCE_BALANCE,
                ),
                metadata=alice.auth,
                timeout=CALL_TIMEOUT_S,
            )
            print(
                f"{alice.user_id} sends {bob.user_id} {money(sent.amount)} ({sent.note!r}):"
                f" {sent.payment_id} {payment_status(sent.status)}"
            )

            bill = payments.RequestPayment(
                payments_pb2.RequestPaymentRequest(
                    idempotency_key=f"pyex-{run_id}-request",
                    payer_id=alice.user_id,
                    amount=usd(REQUESTED),
                    note="movie tickets",
                    conversation_id=conversation,
                ),
                metadata=bob.auth,
                timeout=CALL_TIMEOUT_S,
            )
            print(f"{bob.user_id} asks {alice.user_id} for {money(bill.amount)} ({bill.note!r}): {bill.bill_id}")

            paid = payments.PayBill(
                payments_pb2.PayBillRequest(
                    bill_id=bill.bill_id,
                    idempotency_key=f"pyex-{run_id}-pay",
                    funding_source=payments_pb2.FUNDING_SOURCE_BALANCE,
                ),
                metadata=alice.auth,
                timeout=CALL_TIMEOUT_S,
            )
            print(
                f"{alice.user_id} pays {bill.bill_id}: {paid.payment_id} {money(paid.amount)}"
                f" {payment_status(paid.status)}"
            )

            settled = watcher.wait_settled({sent.payment_id, paid.payment_id}, SETTLE_TIMEOUT_S)
        finally:
            watcher.stop()
        print(f"{bob.user_id}'s watcher saw both payments settle")

        for payment, amount, sender, recipient in (
            (settled[sent.payment_id], SENT, alice, bob),
            (settled[paid.payment_id], REQUESTED, alice, bob),
        ):
            expect(
                payment.status == payments_pb2.PAYMENT_STATUS_SETTLED,
                f"{payment.payment_id} is {payment_status(payment.status)}, not SETTLED",
            )
            expect(Decimal(payment.amount.amount) == amount, f"{payment.payment_id} moved {money(payment.amount)}")
            expect(
                (payment.sender_id, payment.recipient_id) == (sender.user_id, recipient.user_id),
                f"{payment.payment_id} went {payment.sender_id} -> {payment.recipient_id}",
            )
        expect(settled[paid.payment_id].bill_id == bill.bill_id, f"{paid.payment_id} does not name {bill.bill_id}")

        bill = payments.GetBill(
            payments_pb2.GetBillRequest(bill_id=bill.bill_id), metadata=bob.auth, timeout=CALL_TIMEOUT_S
        )
        bill_status = enum_name(payments_pb2.BillStatus, bill.status, "BILL_STATUS_")
        expect(bill.status == payments_pb2.BILL_STATUS_PAID, f"{bill.bill_id} is {bill_status}, not PAID")
        expect(bill.payment_id == paid.payment_id, f"{bill.bill_id} names payment {bill.payment_id!r}")
        print(f"request {bill.bill_id}: {bill_status} by {bill.payment_id}")

        for user, want in ((alice, TOP_UP - SENT - REQUESTED), (bob, SENT + REQUESTED)):
            balance = payments.GetBalance(
                payments_pb2.GetBalanceRequest(currency=CURRENCY), metadata=user.auth, timeout=CALL_TIMEOUT_S
            )
            print(
                f"balance of {user.user_id}: {money(balance.available)} available"
                f" ({money(balance.posted)} posted, {money(balance.pending)} pending)"
            )
            expect(
                Decimal(balance.available.amount) == want and Decimal(balance.posted.amount) == want,
                f"{user.user_id} should hold {want} {CURRENCY}",
            )
    print("OK: both payments settled and the balances add up")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as err:
        print(f"FAILED: gRPC {err.code().name}: {err.details()}", file=sys.stderr)
        sys.exit(1)
    except CheckFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        sys.exit(1)
