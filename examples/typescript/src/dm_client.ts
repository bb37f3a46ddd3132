/**
 * One-click payments in a DM, driven from TypeScript over gRPC-Web.
 *
 * The same story as examples/dm_demo.rs and examples/python/dm_client.py, told by a
 * TypeScript chat client against a running dmpay server. It speaks gRPC-Web over
 * HTTP/1.1 (@connectrpc/connect-node's createGrpcWebTransport), the protocol a browser
 * client uses, server streaming included:
 *
 * 1. the platform creates the accounts of alice and bob (Accounts.UpsertAccount,
 *    scope accounts:admin);
 * 2. the treasury tops up alice's wallet with a ledger entry (Ledger.PostEntry,
 *    scope ledger:write);
 * 3. bob watches his payment events in the background (Payments.WatchPayments);
 * 4. alice sends bob money (Payments.SendPayment);
 * 5. bob requests money from alice (Payments.RequestPayment) and alice pays that request
 *    with one tap (Payments.PayBill);
 * 6. the watcher must see both payments settle, the request must be paid, and both
 *    wallets must hold what the story says (Payments.GetBalance).
 *
 * It prints a short log and exits 1 if anything is not as expected, or on any RPC error
 * (with its Connect code and message). User ids and idempotency keys carry a per-run
 * suffix, so it can run again and again against the same server.
 *
 * Run it with examples/typescript/run.sh, which installs the packages, generates the
 * code from proto/ into gen/, mints the tokens with the dmpay binary and sets the
 * environment below:
 *
 *     DMPAY_ADDR=127.0.0.1:50051 examples/typescript/run.sh
 *
 * Environment:
 *     DMPAY_ADDR            the server, host:port or a URL (default 127.0.0.1:50051)
 *     DMPAY_RUN_ID          this run's suffix: users are alice-<id> and bob-<id>
 *     DMPAY_TOKEN_ADMIN     a token with scope accounts:admin
 *     DMPAY_TOKEN_TREASURY  a token with scope ledger:write
 *     DMPAY_TOKEN_ALICE     sub alice-<id>, scopes payments:read payments:write
 *     DMPAY_TOKEN_BOB       sub bob-<id>, scopes payments:read payments:write
 */

import { create } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type CallOptions, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";

import { AccountStatus, Accounts } from "../gen/dmpay/v1/accounts_pb.js";
import { MoneySchema, type Money } from "../gen/dmpay/v1/common_pb.js";
import { Direction, Ledger, PostingSchema } from "../gen/dmpay/v1/ledger_pb.js";
import {
  BillStatus,
  FundingSource,
  PaymentEventType,
  PaymentStatus,
  Payments,
  type Payment,
  type PaymentEvent,
} from "../gen/dmpay/v1/payments_pb.js";

const CURRENCY = "USD";
// Amounts are in cents (bigint), compared exactly: never through floating point.
const TOP_UP = 5000n;
const SENT = 1250n;
const REQUESTED = 725n;
const CALL_TIMEOUT_MS = 10_000;
const SETTLE_TIMEOUT_MS = 15_000;
const CONNECT_TIMEOUT_MS = 10_000;

/** The server answered, but not what the story expects. */
class CheckFailed extends Error {}

function expect(condition: boolean, what: string): asserts condition {
  if (!condition) {
    throw new CheckFailed(what);
  }
}

interface User {
  userId: string;
  displayName: string;
  token: string;
}

/** Call options that authenticate with a bearer token. */
function as(token: string): CallOptions {
  return { headers: { authorization: `Bearer ${token}` }, timeoutMs: CALL_TIMEOUT_MS };
}

function requiredEnv(name: string): string {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set; run this example through examples/typescript/run.sh`);
    process.exit(1);
  }
  return value;
}

/** "12.50" -> 1250n; anything but a plain two-decimal USD amount is a failed check. */
function cents(amount: string): bigint {
  const m = /^(\d+)(?:\.(\d{1,2}))?$/.exec(amount);
  expect(m !== null, `not a USD amount: ${JSON.stringify(amount)}`);
  return BigInt(m[1]) * 100n + BigInt((m[2] ?? "").padEnd(2, "0"));
}

function decimal(c: bigint): string {
  return `${c / 100n}.${(c % 100n).toString().padStart(2, "0")}`;
}

function usd(c: bigint): Money {
  return create(MoneySchema, { currency: CURRENCY, amount: decimal(c) });
}

function money(m: Money | undefined): string {
  return m ? `${m.amount} ${m.currency}` : "(none)";
}

// protoc-gen-es strips the enum's prefix: PaymentStatus[2] is "SETTLED".
const paymentStatus = (s: PaymentStatus) => PaymentStatus[s] ?? `${s}`;
const billStatus = (s: BillStatus) => BillStatus[s] ?? `${s}`;

function describe(event: PaymentEvent): string {
  let line = `#${event.sequence} ${PaymentEventType[event.type] ?? event.type}`;
  const p = event.payment;
  if (p) {
    line += ` ${p.paymentId} ${p.senderId} -> ${p.recipientId} ${money(p.amount)} ${paymentStatus(p.status)}`;
  }
  const b = event.bill;
  if (b) {
    line += ` bill ${b.billId} ${b.payerId} owes ${b.requesterId} ${money(b.amount)} ${billStatus(b.status)}`;
  }
  return line;
}

/**
 * Follows one user's WatchPayments stream (a gRPC-Web server stream), printing each
 * event as it arrives and keeping the payments that settled.
 *
 * It asks for every event after sequence 0, so the server replays what happened before
 * the stream opened: no event is missed however the calls interleave.
 */
class Watcher {
  private readonly abort = new AbortController();
  private readonly settled = new Map<string, Payment>();
  private ended = false;
  private error: unknown;
  private wake: () => void = () => {};
  private readonly done: Promise<void>;

  constructor(payments: Client<typeof Payments>, private readonly user: User) {
    // No timeout: the stream stays open until stop().
    const stream = payments.watchPayments(
      { afterSequence: 0n },
      { headers: as(user.token).headers, signal: this.abort.signal },
    );
    this.done = (async () => {
      try {
        for await (const event of stream) {
          console.log(`  [watch ${user.userId}] ${describe(event)}`);
          if (event.type === PaymentEventType.PAYMENT_SETTLED && event.payment) {
            this.settled.set(event.payment.paymentId, event.payment);
          }
          this.wake();
        }
      } catch (err) {
        if (!(this.abort.signal.aborted && ConnectError.from(err).code === Code.Canceled)) {
          this.error = err;
        }
      } finally {
        this.ended = true;
        this.wake();
      }
    })();
  }

  /** Waits until each payment has a PAYMENT_SETTLED event; returns them by id. */
  async waitSettled(paymentIds: string[], timeoutMs: number): Promise<Map<string, Payment>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const missing = paymentIds.filter((id) => !this.settled.has(id));
      if (missing.length === 0) {
        return new Map(paymentIds.map((id) => [id, this.settled.get(id)!]));
      }
      if (this.ended) {
        if (this.error !== undefined) {
          throw this.error;
        }
        throw new CheckFailed("the watch stream ended before the payments settled");
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new CheckFailed(
          `no PAYMENT_SETTLED event within ${timeoutMs / 1000}s for ${missing.sort().join(", ")}`,
        );
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  async stop(): Promise<void> {
    this.abort.abort();
    await this.done;
  }
}

/** Retries a first call while nothing answers at the address (the server may be starting). */
async function whenReachable<T>(addr: string, call: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + CONNECT_TIMEOUT_MS;
  for (;;) {
    try {
      return await call();
    } catch (err) {
      const code = ConnectError.from(err).code;
      if (code !== Code.Unavailable) {
        throw err;
      }
      if (Date.now() >= deadline) {
        throw new CheckFailed(`no dmpay server answers at ${addr}: ${ConnectError.from(err).rawMessage}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
}

async function main(): Promise<void> {
  const addr = process.env.DMPAY_ADDR || "127.0.0.1:50051";
  const baseUrl = /^https?:\/\//.test(addr) ? addr : `http://${addr}`;
  const runId = requiredEnv("DMPAY_RUN_ID");
  const admin = requiredEnv("DMPAY_TOKEN_ADMIN");
  const treasury = requiredEnv("DMPAY_TOKEN_TREASURY");
  const alice: User = { userId: `alice-${runId}`, displayName: "Alice", token: requiredEnv("DMPAY_TOKEN_ALICE") };
  const bob: User = { userId: `bob-${runId}`, displayName: "Bob", token: requiredEnv("DMPAY_TOKEN_BOB") };
  const conversation = `dm-${alice.userId}-${bob.userId}`;

  const transport = createGrpcWebTransport({ baseUrl, httpVersion: "1.1" });
  const accounts = createClient(Accounts, transport);
  const ledger = createClient(Ledger, transport);
  const payments = createClient(Payments, transport);
  console.log(`dmpay at ${baseUrl} (gRPC-Web over HTTP/1.1), run ${runId}`);

  // The platform creates its users' accounts at sign-up; a payment to a user without
  // one is refused. An upsert, so the first one may be retried while the server starts.
  for (const [i, user] of [alice, bob].entries()) {
    const upsert = () =>
      accounts.upsertAccount({ userId: user.userId, displayName: user.displayName }, as(admin));
    const account = i === 0 ? await whenReachable(baseUrl, upsert) : await upsert();
    console.log(`account ${account.userId} (${account.displayName}): ${AccountStatus[account.status]}`);
  }

  // Money comes into a wallet from a platform account, as a balanced ledger entry.
  const entry = await ledger.postEntry(
    {
      idempotencyKey: `tsex-${runId}-topup`,
      kind: "deposit",
      description: `top-up of ${alice.userId}`,
      postings: [
        create(PostingSchema, {
          accountCode: `platform:treasury:${CURRENCY}`,
          direction: Direction.DEBIT,
          amount: usd(TOP_UP),
        }),
        create(PostingSchema, {
          accountCode: `user:${alice.userId}:wallet:${CURRENCY}`,
          direction: Direction.CREDIT,
          amount: usd(TOP_UP),
        }),
      ],
    },
    as(treasury),
  );
  console.log(`treasury tops up ${alice.userId}: +${decimal(TOP_UP)} ${CURRENCY} (entry ${entry.entryId})`);

  const watcher = new Watcher(payments, bob);
  console.log(`${bob.userId} watches his payment events`);
  let sent: Payment;
  let paid: Payment;
  let billId: string;
  let settled: Map<string, Payment>;
  try {
    sent = await payments.sendPayment(
      {
        idempotencyKey: `tsex-${runId}-send`,
        recipientId: bob.userId,
        amount: usd(SENT),
        note: "lunch",
        conversationId: conversation,
        fundingSource: FundingSource.BALANCE,
      },
      as(alice.token),
    );
    console.log(
      `${alice.userId} sends ${bob.userId} ${money(sent.amount)} (${JSON.stringify(sent.note)}):` +
        ` ${sent.paymentId} ${paymentStatus(sent.status)}`,
    );

    const bill = await payments.requestPayment(
      {
        idempotencyKey: `tsex-${runId}-request`,
        payerId: alice.userId,
        amount: usd(REQUESTED),
        note: "movie tickets",
        conversationId: conversation,
      },
      as(bob.token),
    );
    billId = bill.billId;
    console.log(
      `${bob.userId} asks ${alice.userId} for ${money(bill.amount)} (${JSON.stringify(bill.note)}): ${billId}`,
    );

    paid = await payments.payBill(
      { billId, idempotencyKey: `tsex-${runId}-pay`, fundingSource: FundingSource.BALANCE },
      as(alice.token),
    );
    console.log(
      `${alice.userId} pays ${billId}: ${paid.paymentId} ${money(paid.amount)} ${paymentStatus(paid.status)}`,
    );

    settled = await watcher.waitSettled([sent.paymentId, paid.paymentId], SETTLE_TIMEOUT_MS);
  } finally {
    await watcher.stop();
  }
  console.log(`${bob.userId}'s watcher saw both payments settle`);

  for (const [payment, amount] of [
    [settled.get(sent.paymentId)!, SENT],
    [settled.get(paid.paymentId)!, REQUESTED],
  ] as const) {
    expect(
      payment.status === PaymentStatus.SETTLED,
      `${payment.paymentId} is ${paymentStatus(payment.status)}, not SETTLED`,
    );
    expect(
      payment.amount?.currency === CURRENCY && cents(payment.amount.amount) === amount,
      `${payment.paymentId} moved ${money(payment.amount)}`,
    );
    expect(
      payment.senderId === alice.userId && payment.recipientId === bob.userId,
      `${payment.paymentId} went ${payment.senderId} -> ${payment.recipientId}`,
    );
  }
  expect(settled.get(paid.paymentId)!.billId === billId, `${paid.paymentId} does not name ${billId}`);

  const bill = await payments.getBill({ billId }, as(bob.token));
  expect(bill.status === BillStatus.PAID, `${bill.billId} is ${billStatus(bill.status)}, not PAID`);
  expect(bill.paymentId === paid.paymentId, `${bill.billId} names payment ${JSON.stringify(bill.paymentId)}`);
  console.log(`request ${bill.billId}: ${billStatus(bill.status)} by ${bill.paymentId}`);

  for (const [user, want] of [
    [alice, TOP_UP - SENT - REQUESTED],
    [bob, SENT + REQUESTED],
  ] as const) {
    const balance = await payments.getBalance({ currency: CURRENCY }, as(user.token));
    console.log(
      `balance of ${user.userId}: ${money(balance.available)} available` +
        ` (${money(balance.posted)} posted, ${money(balance.pending)} pending)`,
    );
    expect(
      cents(balance.available?.amount ?? "") === want && cents(balance.posted?.amount ?? "") === want,
      `${user.userId} should hold ${decimal(want)} ${CURRENCY}`,
    );
  }
  console.log("OK: both payments settled and the balances add up");
}

/** The reason of a google.rpc.ErrorInfo detail (field 1), which dmpay's refusals carry. */
function errorInfoReasons(err: ConnectError): string[] {
  const reasons: string[] = [];
  for (const detail of err.details) {
    if (!("type" in detail) || detail.type !== "google.rpc.ErrorInfo") {
      continue;
    }
    const reader = new BinaryReader(detail.value);
    while (reader.pos < reader.len) {
      const [field, wireType] = reader.tag();
      if (field === 1 && wireType === WireType.LengthDelimited) {
        reasons.push(reader.string());
      } else {
        reader.skip(wireType);
      }
    }
  }
  return reasons;
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    if (err instanceof CheckFailed) {
      console.error(`FAILED: ${err.message}`);
    } else {
      const ce = ConnectError.from(err);
      const reasons = errorInfoReasons(ce);
      console.error(
        `FAILED: Connect ${Code[ce.code]}: ${ce.rawMessage}` + (reasons.length ? ` [${reasons.join(", ")}]` : ""),
      );
    }
    process.exit(1);
  },
);
