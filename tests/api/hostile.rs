//! Hostile protobuf input, on both backends: every RPC of every dmpay service gets
//! (1) random bytes, byte-mutated and hand-crafted malformed encodings as its request
//! message, (2) broken gRPC frames, and (3) well-formed messages whose fields are random
//! (unicode, control characters, huge strings, extreme numbers, unknown enum values,
//! missing fields), with a token that has every scope. Every answer must be a clean
//! status: never a panic, a hang, INTERNAL or UNKNOWN; a message that does not decode is
//! INVALID_ARGUMENT, one over DMPAY_GRPC_MESSAGE_SIZE_MAX is RESOURCE_EXHAUSTED.
//!
//! The property runs use a random seed; a failure prints the shrunk input. Set
//! `PROPTEST_RNG_SEED` to replay a seed, `HOSTILE_CASES` for more cases per RPC.

use std::collections::HashMap;
use std::fmt;

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use prost::bytes::Bytes;
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

use crate::backend_tests;
use crate::helpers::*;
use crate::raw::{self, call_raw, is_unclean, post_http, Rpc, ALL_SCOPES, RPCS};

/// Cases per RPC and layer. The whole file stays well under a minute per backend;
/// `HOSTILE_CASES=1000` digs deeper.
const GARBAGE_CASES: u32 = 40;
const FIELD_CASES: u32 = 40;

fn cases(default: u32) -> u32 {
    std::env::var("HOSTILE_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// An encoded request with a readable rendering of what it is.
#[derive(Clone)]
struct Encoded {
    debug: String,
    bytes: Vec<u8>,
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = self.debug.clone();
        if d.len() > 1500 {
            let mut cut = 1500;
            while !d.is_char_boundary(cut) {
                cut -= 1;
            }
            d.truncate(cut);
            d.push_str("...");
        }
        write!(f, "{d} ({} bytes encoded)", self.bytes.len())
    }
}

fn enc<M: Message + fmt::Debug>(m: M) -> Encoded {
    Encoded { bytes: m.encode_to_vec(), debug: format!("{m:?}") }
}

/// Strings a hostile client would send.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => Just(String::new()),
        3 => "[a-z0-9_.:-]{1,24}",
        3 => "\\PC{0,40}",
        2 => proptest::collection::vec(any::<char>(), 0..40).prop_map(String::from_iter),
        1 => proptest::collection::vec(select(vec!['\0', '\u{1}', '\n', '\r', '\t', '\u{1b}', '\u{7f}', '\u{85}']), 1..8)
            .prop_map(String::from_iter),
        2 => select(vec![
            " ", "0", "-1", "null", "NaN", "%s%n%x", "../../etc/passwd", "'; DROP TABLE payments; --",
            "\u{202e}evil", "\u{feff}", "a\u{0}b", "e\u{301}", "ǅ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "user:alice:wallet:USD",
            "SELECT 1", "$1", "\\", "\"", "{}", "pay_", "req_", "pm_", "*", "%", "_",
        ]).prop_map(str::to_owned),
        1 => (select(vec![129usize, 300, 1025, 9000, 70_000, 300_000]), any::<char>())
            .prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
        1 => select(vec![600_000usize, 1_048_000, 1_100_000]).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

/// One of `real` (ids that exist, so calls get deep into the handlers) or hostile text.
fn id(real: &[String]) -> BoxedStrategy<String> {
    if real.is_empty() {
        return text();
    }
    prop_oneof![2 => select(real.to_vec()), 1 => text()].boxed()
}

fn user() -> BoxedStrategy<String> {
    prop_oneof![
        2 => select(vec!["fuzz".to_owned(), "bob".into(), "alice".into(), "svc".into(), "nobody".into(), "a".repeat(128)]),
        1 => "[A-Za-z0-9_.-]{1,140}",
        2 => text(),
    ]
    .boxed()
}

fn currency() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(vec!["USD", "JPY", "KWD", "EUR", "BHD", "", "usd", "XXX", "US", "USDD", " USD", "BTC"]).prop_map(str::to_owned),
        1 => text(),
    ]
    .boxed()
}

fn amount() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(vec![
            "0", "0.00", "0.01", "1", "1.00", "-1.00", "-0", "1e3", "1E3", "1,000.00", " 1.00", "1.00 ", "+1",
            ".5", "5.", "0.001", "99999999999999999999", "9223372036854775807", "92233720368547758.07",
            "92233720368547758.08", "-9223372036854775808", "NaN", "inf", "0x10", "１", "1_000", "",
        ]).prop_map(str::to_owned),
        2 => "-?[0-9]{0,22}(\\.[0-9]{0,5})?",
        1 => text(),
    ]
    .boxed()
}

fn money() -> BoxedStrategy<Option<pb::Money>> {
    proptest::option::weighted(
        0.85,
        (currency(), amount()).prop_map(|(currency, amount)| pb::Money { currency, amount }),
    )
    .boxed()
}

fn time() -> BoxedStrategy<Option<prost_types::Timestamp>> {
    let seconds = prop_oneof![
        select(vec![
            0i64,
            -1,
            1,
            1_700_000_000,
            4_102_444_800,
            253_402_300_800,
            i64::MAX,
            i64::MIN,
            i64::MAX / 1_000_000,
            -62_135_596_800
        ]),
        any::<i64>(),
    ];
    let nanos = prop_oneof![select(vec![0i32, 999_999_999, 1_000_000_000, -1, i32::MAX, i32::MIN]), any::<i32>()];
    proptest::option::weighted(
        0.7,
        (seconds, nanos).prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
    .boxed()
}

fn u32v() -> BoxedStrategy<u32> {
    prop_oneof![select(vec![0u32, 1, 2, 7, 200, 201, 500, 501, 2_592_000, 2_592_001, u32::MAX]), any::<u32>()].boxed()
}

fn i64v() -> BoxedStrategy<i64> {
    prop_oneof![select(vec![0i64, -1, 1, 5, i64::MAX, i64::MIN, i64::MAX - 1]), any::<i64>()].boxed()
}

fn enum_v() -> BoxedStrategy<i32> {
    prop_oneof![3 => -1i32..9, 1 => any::<i32>()].boxed()
}

fn account_code() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(vec![
            "platform:treasury:USD", "platform:fees:USD", "platform:suspense:JPY", "user:fuzz:wallet:USD",
            "user:bob:wallet:USD", "user:fuzz:wallet:XXX", "processor:sandbox:clearing:USD", "x:y", "ext:fuzz:1",
            "user::wallet:USD", ":", "a:", "user:fuzz:wallet:USD:extra",
        ]).prop_map(str::to_owned),
        2 => "[a-z]{1,8}(:[a-z0-9_-]{0,8}){0,5}",
        1 => text(),
    ]
    .boxed()
}

fn posting() -> BoxedStrategy<pb::Posting> {
    (account_code(), enum_v(), money())
        .prop_map(|(account_code, direction, amount)| pb::Posting { account_code, direction, amount })
        .boxed()
}

fn postings() -> BoxedStrategy<Vec<pb::Posting>> {
    prop_oneof![
        4 => proptest::collection::vec(posting(), 0..5),
        1 => (posting(), select(vec![100usize, 101, 1000])).prop_map(|(p, n)| vec![p; n]),
    ]
    .boxed()
}

fn metadata() -> BoxedStrategy<HashMap<String, String>> {
    prop_oneof![
        3 => proptest::collection::hash_map(text(), text(), 0..4),
        1 => (select(vec![64usize, 65, 500]), text()).prop_map(|(n, v)| (0..n).map(|i| (format!("k{i}"), v.clone())).collect()),
    ]
    .boxed()
}

fn card_number() -> BoxedStrategy<String> {
    prop_oneof![
        2 => select(vec![
            "4242424242424242", "4242 4242 4242 4242", "4242-4242-4242-4242", "4242424242424241", "378282246310005",
            "4000000000000002", "4000000000000119", "4100000000000019", "5555555555554444", "0000000000000000",
            "42424242424242424242424242", "4242", "",
        ]).prop_map(str::to_owned),
        2 => "[0-9 -]{0,25}",
        1 => text(),
    ]
    .boxed()
}

fn csv() -> BoxedStrategy<String> {
    let cell = prop_oneof![
        select(vec![
            "capture",
            "refund",
            "chargeback",
            "USD",
            "JPY",
            "10.00",
            "0.30",
            "9.70",
            "-1",
            "2026-01-01T00:00:00Z",
            "",
            "ref-1"
        ])
        .prop_map(str::to_owned),
        text(),
    ];
    let row = proptest::collection::vec(cell, 0..9).prop_map(|cells| cells.join(","));
    prop_oneof![
        1 => text(),
        3 => proptest::collection::vec(row, 0..6).prop_map(|rows| {
            format!("processor_reference,type,amount,fee,net,currency,created_at\n{}", rows.join("\n"))
        }),
    ]
    .boxed()
}

/// Ids the fixture created, so random requests also hit real rows.
#[derive(Clone, Default)]
struct Fixture {
    payments: Vec<String>,
    requests: Vec<String>,
    entries: Vec<String>,
    cards: Vec<String>,
    runs: Vec<String>,
    items: Vec<String>,
    conversations: Vec<String>,
}

/// Well-formed messages with random fields, for one RPC.
fn fields(path: &str, fx: &Fixture) -> BoxedStrategy<Encoded> {
    let key = || prop_oneof![2 => "k-[a-z0-9]{1,6}", 1 => text()].boxed();
    let conv = || id(&fx.conversations);
    let page_token = || {
        prop_oneof![
            text(),
            select(vec!["", "0", "-1", "MTA", "eyJ9", "9223372036854775807", "1:2", "a:b:c"]).prop_map(str::to_owned)
        ]
        .boxed()
    };
    match path {
        "/dmpay.v1.Accounts/UpsertAccount" => (user(), text(), enum_v())
            .prop_map(|(user_id, display_name, tier)| enc(pb::UpsertAccountRequest { user_id, display_name, tier }))
            .boxed(),
        "/dmpay.v1.Accounts/GetAccount" => user().prop_map(|user_id| enc(pb::GetAccountRequest { user_id })).boxed(),
        "/dmpay.v1.Accounts/FreezeAccount" => {
            (user(), text()).prop_map(|(user_id, reason)| enc(pb::FreezeAccountRequest { user_id, reason })).boxed()
        }
        "/dmpay.v1.Accounts/UnfreezeAccount" => {
            (user(), text()).prop_map(|(user_id, reason)| enc(pb::UnfreezeAccountRequest { user_id, reason })).boxed()
        }
        "/dmpay.v1.Ledger/CreateLedgerAccount" => (account_code(), enum_v(), currency(), any::<bool>())
            .prop_map(|(code, r#type, currency, allow_negative)| {
                enc(pb::CreateLedgerAccountRequest { code, r#type, currency, allow_negative })
            })
            .boxed(),
        "/dmpay.v1.Ledger/PostEntry" => (key(), text(), text(), postings(), metadata(), any::<bool>(), u32v())
            .prop_map(|(idempotency_key, kind, description, postings, metadata, pending, pending_timeout_seconds)| {
                enc(pb::PostEntryRequest {
                    idempotency_key,
                    kind,
                    description,
                    postings,
                    metadata,
                    pending,
                    pending_timeout_seconds,
                })
            })
            .boxed(),
        "/dmpay.v1.Ledger/PostPending" => (id(&fx.entries), key(), money())
            .prop_map(|(entry_id, idempotency_key, amount)| {
                enc(pb::PostPendingRequest { entry_id, idempotency_key, amount })
            })
            .boxed(),
        "/dmpay.v1.Ledger/VoidPending" => (id(&fx.entries), key())
            .prop_map(|(entry_id, idempotency_key)| enc(pb::VoidPendingRequest { entry_id, idempotency_key }))
            .boxed(),
        "/dmpay.v1.Ledger/ReverseEntry" => (id(&fx.entries), key(), text())
            .prop_map(|(entry_id, idempotency_key, reason)| {
                enc(pb::ReverseEntryRequest { entry_id, idempotency_key, reason })
            })
            .boxed(),
        "/dmpay.v1.Ledger/GetEntry" => {
            id(&fx.entries).prop_map(|entry_id| enc(pb::GetEntryRequest { entry_id })).boxed()
        }
        "/dmpay.v1.Ledger/ListEntries" => (account_code(), time(), time(), u32v(), page_token())
            .prop_map(|(account_code, from_time, to_time, page_size, page_token)| {
                enc(pb::ListEntriesRequest { account_code, from_time, to_time, page_size, page_token })
            })
            .boxed(),
        "/dmpay.v1.Ledger/GetLedgerBalance" => (account_code(), time())
            .prop_map(|(account_code, as_of)| enc(pb::GetLedgerBalanceRequest { account_code, as_of }))
            .boxed(),
        "/dmpay.v1.PaymentMethods/TokenizeCard" => (card_number(), u32v(), u32v(), text(), text(), text())
            .prop_map(|(card_number, exp_month, exp_year, cvc, holder_name, postal_code)| {
                enc(pb::TokenizeCardRequest { card_number, exp_month, exp_year, cvc, holder_name, postal_code })
            })
            .boxed(),
        "/dmpay.v1.PaymentMethods/LinkPaymentMethod" => (id(&fx.cards), any::<bool>())
            .prop_map(|(token, make_default)| enc(pb::LinkPaymentMethodRequest { token, make_default }))
            .boxed(),
        "/dmpay.v1.PaymentMethods/ListPaymentMethods" => {
            any::<bool>().prop_map(|include_removed| enc(pb::ListPaymentMethodsRequest { include_removed })).boxed()
        }
        "/dmpay.v1.PaymentMethods/SetDefaultPaymentMethod" => {
            id(&fx.cards).prop_map(|token| enc(pb::SetDefaultPaymentMethodRequest { token })).boxed()
        }
        "/dmpay.v1.PaymentMethods/RemovePaymentMethod" => {
            id(&fx.cards).prop_map(|token| enc(pb::RemovePaymentMethodRequest { token })).boxed()
        }
        "/dmpay.v1.Payments/SendPayment" => (key(), user(), money(), text(), conv(), text(), enum_v(), id(&fx.cards))
            .prop_map(
                |(idempotency_key, recipient_id, amount, note, conversation_id, message_id, funding_source, token)| {
                    enc(pb::SendPaymentRequest {
                        idempotency_key,
                        recipient_id,
                        amount,
                        note,
                        conversation_id,
                        message_id,
                        funding_source,
                        payment_method_token: token,
                    })
                },
            )
            .boxed(),
        "/dmpay.v1.Payments/GetPayment" => {
            id(&fx.payments).prop_map(|payment_id| enc(pb::GetPaymentRequest { payment_id })).boxed()
        }
        "/dmpay.v1.Payments/ListPayments" => (conv(), u32v(), page_token())
            .prop_map(|(conversation_id, page_size, page_token)| {
                enc(pb::ListPaymentsRequest { conversation_id, page_size, page_token })
            })
            .boxed(),
        "/dmpay.v1.Payments/GetBalance" => {
            currency().prop_map(|currency| enc(pb::GetBalanceRequest { currency })).boxed()
        }
        "/dmpay.v1.Payments/RequestPayment" => (key(), user(), money(), text(), conv(), text(), u32v())
            .prop_map(|(idempotency_key, payer_id, amount, note, conversation_id, message_id, expires_in_seconds)| {
                enc(pb::RequestPaymentRequest {
                    idempotency_key,
                    payer_id,
                    amount,
                    note,
                    conversation_id,
                    message_id,
                    expires_in_seconds,
                })
            })
            .boxed(),
        "/dmpay.v1.Payments/PayBill" => (id(&fx.requests), key(), enum_v(), id(&fx.cards))
            .prop_map(|(bill_id, idempotency_key, funding_source, payment_method_token)| {
                enc(pb::PayBillRequest { bill_id, idempotency_key, funding_source, payment_method_token })
            })
            .boxed(),
        "/dmpay.v1.Payments/DeclineBill" => {
            id(&fx.requests).prop_map(|bill_id| enc(pb::DeclineBillRequest { bill_id })).boxed()
        }
        "/dmpay.v1.Payments/CancelBill" => {
            id(&fx.requests).prop_map(|bill_id| enc(pb::CancelBillRequest { bill_id })).boxed()
        }
        "/dmpay.v1.Payments/GetBill" => {
            id(&fx.requests).prop_map(|bill_id| enc(pb::GetBillRequest { bill_id })).boxed()
        }
        "/dmpay.v1.Payments/RefundPayment" => (id(&fx.payments), key(), money(), text())
            .prop_map(|(payment_id, idempotency_key, amount, reason)| {
                enc(pb::RefundPaymentRequest { payment_id, idempotency_key, amount, reason })
            })
            .boxed(),
        "/dmpay.v1.Payments/CreatePayout" => (key(), money(), enum_v(), id(&fx.cards))
            .prop_map(|(idempotency_key, amount, speed, payment_method_token)| {
                enc(pb::CreatePayoutRequest { idempotency_key, amount, speed, payment_method_token })
            })
            .boxed(),
        // Payment ids and random text: every one names no payout of the caller's.
        "/dmpay.v1.Payments/GetPayout" => {
            id(&fx.payments).prop_map(|payout_id| enc(pb::GetPayoutRequest { payout_id })).boxed()
        }
        "/dmpay.v1.Payments/ListBills" => (enum_v(), any::<bool>(), u32v(), page_token())
            .prop_map(|(role, open_only, page_size, page_token)| {
                enc(pb::ListBillsRequest { role, open_only, page_size, page_token })
            })
            .boxed(),
        "/dmpay.v1.Payments/ListPayouts" => (u32v(), page_token())
            .prop_map(|(page_size, page_token)| enc(pb::ListPayoutsRequest { page_size, page_token }))
            .boxed(),
        "/dmpay.v1.Payments/WatchPayments" => (conv(), i64v())
            .prop_map(|(conversation_id, after_sequence)| {
                enc(pb::WatchPaymentsRequest { conversation_id, after_sequence, stream_id: String::new() })
            })
            .boxed(),
        "/dmpay.v1.Finance/GetTrialBalance" => (time(), currency())
            .prop_map(|(as_of, currency)| enc(pb::GetTrialBalanceRequest { as_of, currency }))
            .boxed(),
        "/dmpay.v1.Finance/VerifyLedger" => Just(enc(pb::VerifyLedgerRequest {})).boxed(),
        "/dmpay.v1.Finance/ListDisputes" => (any::<bool>(), u32v(), page_token())
            .prop_map(|(open_only, page_size, page_token)| {
                enc(pb::ListDisputesRequest { open_only, page_size, page_token })
            })
            .boxed(),
        "/dmpay.v1.Finance/ListReceivables" => (u32v(), page_token())
            .prop_map(|(page_size, page_token)| enc(pb::ListReceivablesRequest { page_size, page_token }))
            .boxed(),
        "/dmpay.v1.Accounts/SetSeller" => (user(), any::<bool>(), proptest::option::of(any::<i32>()), text())
            .prop_map(|(user_id, seller, commission_bps, reason)| {
                enc(pb::SetSellerRequest { user_id, seller, commission_bps, reason })
            })
            .boxed(),
        "/dmpay.v1.Shopping/CreateListing" => {
            ((key(), user(), text(), text(), money()), (i64v(), any::<bool>(), i64v(), time(), time()))
                .prop_map(
                    |(
                        (idempotency_key, seller_id, stream_id, title, unit_price),
                        (quantity, unlimited, per_buyer_max, starts_at, ends_at),
                    )| {
                        enc(pb::CreateListingRequest {
                            idempotency_key,
                            seller_id,
                            stream_id,
                            title,
                            unit_price,
                            quantity,
                            unlimited,
                            per_buyer_max,
                            starts_at,
                            ends_at,
                        })
                    },
                )
                .boxed()
        }
        "/dmpay.v1.Shopping/AddStock" => (id(&fx.payments), i64v(), key())
            .prop_map(|(listing_id, quantity, idempotency_key)| {
                enc(pb::AddStockRequest { listing_id, quantity, idempotency_key })
            })
            .boxed(),
        "/dmpay.v1.Shopping/CloseListing" => {
            id(&fx.payments).prop_map(|listing_id| enc(pb::CloseListingRequest { listing_id })).boxed()
        }
        "/dmpay.v1.Shopping/GetListing" => {
            id(&fx.payments).prop_map(|listing_id| enc(pb::GetListingRequest { listing_id })).boxed()
        }
        "/dmpay.v1.Shopping/ListListings" => (text(), u32v(), page_token())
            .prop_map(|(stream_id, page_size, page_token)| {
                enc(pb::ListListingsRequest { stream_id, page_size, page_token })
            })
            .boxed(),
        "/dmpay.v1.Shopping/Purchase" => (key(), id(&fx.payments), i64v(), money(), enum_v(), id(&fx.cards))
            .prop_map(|(idempotency_key, listing_id, quantity, unit_price, funding_source, payment_method_token)| {
                enc(pb::PurchaseRequest {
                    idempotency_key,
                    listing_id,
                    quantity,
                    unit_price,
                    tab_id: String::new(),
                    funding_source,
                    payment_method_token,
                })
            })
            .boxed(),
        "/dmpay.v1.Shopping/GetPurchase" => {
            id(&fx.payments).prop_map(|purchase_id| enc(pb::GetPurchaseRequest { purchase_id })).boxed()
        }
        "/dmpay.v1.Shopping/ListSales" => (user(), u32v(), page_token())
            .prop_map(|(seller_id, page_size, page_token)| {
                enc(pb::ListSalesRequest { seller_id, page_size, page_token })
            })
            .boxed(),
        "/dmpay.v1.Shopping/RefundPurchase" => (id(&fx.payments), money(), i64v(), key())
            .prop_map(|(purchase_id, amount, restock_quantity, idempotency_key)| {
                enc(pb::RefundPurchaseRequest { purchase_id, amount, restock_quantity, idempotency_key })
            })
            .boxed(),
        "/dmpay.v1.Shopping/MarkDelivered" => {
            id(&fx.payments).prop_map(|purchase_id| enc(pb::MarkDeliveredRequest { purchase_id })).boxed()
        }
        "/dmpay.v1.Shopping/OpenTab" => (key(), text(), money(), id(&fx.cards))
            .prop_map(|(idempotency_key, stream_id, cap, payment_method_token)| {
                enc(pb::OpenTabRequest { idempotency_key, stream_id, cap, payment_method_token })
            })
            .boxed(),
        "/dmpay.v1.Shopping/GetTab" => id(&fx.payments).prop_map(|tab_id| enc(pb::GetTabRequest { tab_id })).boxed(),
        "/dmpay.v1.Shopping/CloseTab" => {
            id(&fx.payments).prop_map(|tab_id| enc(pb::CloseTabRequest { tab_id })).boxed()
        }
        "/dmpay.v1.Shopping/EndStream" => text().prop_map(|stream_id| enc(pb::EndStreamRequest { stream_id })).boxed(),
        "/dmpay.v1.Shopping/GetSellerBalance" => (currency(), user())
            .prop_map(|(currency, seller_id)| enc(pb::GetSellerBalanceRequest { currency, seller_id }))
            .boxed(),
        "/dmpay.v1.Finance/ExportEntries" => (time(), time(), enum_v())
            .prop_map(|(from_time, to_time, format)| enc(pb::ExportEntriesRequest { from_time, to_time, format }))
            .boxed(),
        "/dmpay.v1.Finance/ImportSettlementReport" => {
            let date = prop_oneof![
                select(vec!["2026-01-01", "", "2026-02-30", "1900-01-01", "9999-12-31", "2026-1-1", "today"])
                    .prop_map(str::to_owned),
                text()
            ];
            let processor = prop_oneof![select(vec!["sandbox", "", "stripe"]).prop_map(str::to_owned), text()];
            (processor, date, csv())
                .prop_map(|(processor, report_date, csv)| {
                    enc(pb::ImportSettlementReportRequest { processor, report_date, csv })
                })
                .boxed()
        }
        "/dmpay.v1.Finance/ListReconciliationItems" => (id(&fx.runs), enum_v(), any::<bool>(), u32v(), page_token())
            .prop_map(|(run_id, status, open, page_size, page_token)| {
                enc(pb::ListReconciliationItemsRequest { run_id, status, open, page_size, page_token })
            })
            .boxed(),
        "/dmpay.v1.Finance/ResolveReconciliationItem" => (id(&fx.items), enum_v(), text())
            .prop_map(|(item_id, resolution, note)| {
                enc(pb::ResolveReconciliationItemRequest { item_id, resolution, note })
            })
            .boxed(),
        "/dmpay.v1.Finance/GetStatement" => (user(), currency(), time(), time())
            .prop_map(|(user_id, currency, from_time, to_time)| {
                enc(pb::GetStatementRequest { user_id, currency, from_time, to_time })
            })
            .boxed(),
        other => panic!("no field strategy for {other}"),
    }
}

/// Whether `bytes` decode as the request message of `path` (the server uses the same
/// prost types, so this is exactly what its decoder will say).
fn decodes(path: &str, bytes: &[u8]) -> bool {
    macro_rules! by_path {
        ($($p:literal => $t:ty),* $(,)?) => {
            match path {
                $($p => <$t as Message>::decode(bytes).is_ok(),)*
                other => panic!("no message type for {other}"),
            }
        };
    }
    by_path! {
        "/dmpay.v1.Accounts/UpsertAccount" => pb::UpsertAccountRequest,
        "/dmpay.v1.Accounts/GetAccount" => pb::GetAccountRequest,
        "/dmpay.v1.Accounts/FreezeAccount" => pb::FreezeAccountRequest,
        "/dmpay.v1.Accounts/UnfreezeAccount" => pb::UnfreezeAccountRequest,
        "/dmpay.v1.Ledger/CreateLedgerAccount" => pb::CreateLedgerAccountRequest,
        "/dmpay.v1.Ledger/PostEntry" => pb::PostEntryRequest,
        "/dmpay.v1.Ledger/PostPending" => pb::PostPendingRequest,
        "/dmpay.v1.Ledger/VoidPending" => pb::VoidPendingRequest,
        "/dmpay.v1.Ledger/ReverseEntry" => pb::ReverseEntryRequest,
        "/dmpay.v1.Ledger/GetEntry" => pb::GetEntryRequest,
        "/dmpay.v1.Ledger/ListEntries" => pb::ListEntriesRequest,
        "/dmpay.v1.Ledger/GetLedgerBalance" => pb::GetLedgerBalanceRequest,
        "/dmpay.v1.PaymentMethods/TokenizeCard" => pb::TokenizeCardRequest,
        "/dmpay.v1.PaymentMethods/LinkPaymentMethod" => pb::LinkPaymentMethodRequest,
        "/dmpay.v1.PaymentMethods/ListPaymentMethods" => pb::ListPaymentMethodsRequest,
        "/dmpay.v1.PaymentMethods/SetDefaultPaymentMethod" => pb::SetDefaultPaymentMethodRequest,
        "/dmpay.v1.PaymentMethods/RemovePaymentMethod" => pb::RemovePaymentMethodRequest,
        "/dmpay.v1.Payments/SendPayment" => pb::SendPaymentRequest,
        "/dmpay.v1.Payments/GetPayment" => pb::GetPaymentRequest,
        "/dmpay.v1.Payments/ListPayments" => pb::ListPaymentsRequest,
        "/dmpay.v1.Payments/GetBalance" => pb::GetBalanceRequest,
        "/dmpay.v1.Payments/RequestPayment" => pb::RequestPaymentRequest,
        "/dmpay.v1.Payments/PayBill" => pb::PayBillRequest,
        "/dmpay.v1.Payments/DeclineBill" => pb::DeclineBillRequest,
        "/dmpay.v1.Payments/CancelBill" => pb::CancelBillRequest,
        "/dmpay.v1.Payments/GetBill" => pb::GetBillRequest,
        "/dmpay.v1.Payments/RefundPayment" => pb::RefundPaymentRequest,
        "/dmpay.v1.Payments/WatchPayments" => pb::WatchPaymentsRequest,
        "/dmpay.v1.Payments/CreatePayout" => pb::CreatePayoutRequest,
        "/dmpay.v1.Payments/GetPayout" => pb::GetPayoutRequest,
        "/dmpay.v1.Payments/ListPayouts" => pb::ListPayoutsRequest,
        "/dmpay.v1.Payments/ListBills" => pb::ListBillsRequest,
        "/dmpay.v1.Finance/GetTrialBalance" => pb::GetTrialBalanceRequest,
        "/dmpay.v1.Finance/VerifyLedger" => pb::VerifyLedgerRequest,
        "/dmpay.v1.Finance/ExportEntries" => pb::ExportEntriesRequest,
        "/dmpay.v1.Finance/ImportSettlementReport" => pb::ImportSettlementReportRequest,
        "/dmpay.v1.Finance/ListReconciliationItems" => pb::ListReconciliationItemsRequest,
        "/dmpay.v1.Finance/ResolveReconciliationItem" => pb::ResolveReconciliationItemRequest,
        "/dmpay.v1.Finance/GetStatement" => pb::GetStatementRequest,
        "/dmpay.v1.Finance/ListDisputes" => pb::ListDisputesRequest,
        "/dmpay.v1.Finance/ListReceivables" => pb::ListReceivablesRequest,
        "/dmpay.v1.Accounts/SetSeller" => pb::SetSellerRequest,
        "/dmpay.v1.Shopping/CreateListing" => pb::CreateListingRequest,
        "/dmpay.v1.Shopping/AddStock" => pb::AddStockRequest,
        "/dmpay.v1.Shopping/CloseListing" => pb::CloseListingRequest,
        "/dmpay.v1.Shopping/GetListing" => pb::GetListingRequest,
        "/dmpay.v1.Shopping/ListListings" => pb::ListListingsRequest,
        "/dmpay.v1.Shopping/Purchase" => pb::PurchaseRequest,
        "/dmpay.v1.Shopping/GetPurchase" => pb::GetPurchaseRequest,
        "/dmpay.v1.Shopping/ListSales" => pb::ListSalesRequest,
        "/dmpay.v1.Shopping/RefundPurchase" => pb::RefundPurchaseRequest,
        "/dmpay.v1.Shopping/MarkDelivered" => pb::MarkDeliveredRequest,
        "/dmpay.v1.Shopping/GetSellerBalance" => pb::GetSellerBalanceRequest,
        "/dmpay.v1.Shopping/OpenTab" => pb::OpenTabRequest,
        "/dmpay.v1.Shopping/GetTab" => pb::GetTabRequest,
        "/dmpay.v1.Shopping/CloseTab" => pb::CloseTabRequest,
        "/dmpay.v1.Shopping/EndStream" => pb::EndStreamRequest,
    }
}

/// Hand-made malformed encodings: every wire-format mistake prost must refuse.
fn crafted() -> Vec<Vec<u8>> {
    let mut deep_groups = vec![0x0bu8; 120]; // 120 nested unknown groups (field 1, SGROUP)
    deep_groups.extend(vec![0x0cu8; 120]);
    let mut deep_money = Vec::new(); // field 3 (Money in most requests) nested 120 deep
    for _ in 0..120 {
        let inner = deep_money;
        deep_money = vec![0x1a];
        let mut len = inner.len();
        while len >= 0x80 {
            deep_money.push((len as u8) | 0x80);
            len >>= 7;
        }
        deep_money.push(len as u8);
        deep_money.extend(inner);
    }
    vec![
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],       // field 1, length 4 GiB
        vec![0x0a, 0x05, 0xff, 0xfe, 0xfd, 0xfc, 0xfb], // field 1, invalid UTF-8
        vec![0x0a, 0x02, 0xc3],                         // field 1, truncated
        vec![0x0a, 0x02, 0xed, 0xa0],                   // UTF-16 surrogate half
        vec![0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], // 11-byte varint
        vec![0x08],                                     // varint missing
        vec![0x0b],                                     // group never closed
        vec![0x0c],                                     // end group without start
        vec![0x0f, 0x00],                               // wire type 7
        vec![0x0e, 0x00],                               // wire type 6
        vec![0x00, 0x00],                               // field number 0
        vec![0xf8, 0xff, 0xff, 0xff, 0xff, 0x01],       // field number beyond 2^29
        vec![0x1a, 0x02, 0x0a, 0xff],                   // nested message truncated
        vec![0x1a, 0x03, 0x0a, 0x01, 0x80],             // nested string not UTF-8
        vec![0x11, 0x01, 0x02],                         // fixed64 truncated
        vec![0x15, 0x01],                               // fixed32 truncated
        vec![0x10, 0x80],                               // varint cut mid-byte
        deep_groups,
        deep_money,
    ]
}

/// Random bytes, byte mutations of valid encodings, and the crafted ones.
fn garbage(valid: BoxedStrategy<Encoded>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..48),
        2 => proptest::collection::vec(any::<u8>(), 0..4096),
        2 => (valid.clone(), any::<Index>(), any::<u8>()).prop_map(|(e, at, b)| {
            let mut bytes = e.bytes;
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= b | 1;
            }
            bytes
        }),
        2 => (valid.clone(), any::<Index>()).prop_map(|(e, at)| {
            let mut bytes = e.bytes;
            if !bytes.is_empty() {
                let keep = at.index(bytes.len());
                bytes.truncate(keep);
            }
            bytes
        }),
        1 => (valid, proptest::collection::vec(any::<u8>(), 1..12)).prop_map(|(e, tail)| {
            let mut bytes = e.bytes;
            bytes.extend(tail);
            bytes
        }),
        2 => select(crafted()),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------

fn everything(app: &TestApp) -> String {
    app.token("fuzz", &ALL_SCOPES.join(" "))
}

/// Creates rows the random requests can refer to: payments both ways, requests both
/// ways, posted and pending entries, linked and unlinked cards, a reconciliation run.
async fn fixture(app: &TestApp) -> Fixture {
    let t = everything(app);
    let bob = app.token("bob", &ALL_SCOPES.join(" "));
    fund(app, &t, "fuzz", "500.00").await;
    fund(app, &t, "bob", "500.00").await;
    let mut fx = Fixture { conversations: vec!["conv-1".into(), "conv-2".into()], ..Fixture::default() };
    let p = app.send(&t, "fx-1", "bob", "2.00", pb::FundingSource::Balance).await.expect("fixture send");
    fx.payments.push(p.payment_id);
    let p = app.send(&bob, "fx-2", "fuzz", "3.00", pb::FundingSource::Balance).await.expect("fixture send");
    fx.payments.push(p.payment_id);
    for (who, payer, key) in [(&bob, "fuzz", "fx-r1"), (&t, "bob", "fx-r2")] {
        let r = app
            .payments()
            .request_payment(authed(
                pb::RequestPaymentRequest {
                    idempotency_key: key.into(),
                    payer_id: payer.into(),
                    amount: usd("1.50"),
                    conversation_id: "conv-2".into(),
                    ..Default::default()
                },
                who,
            ))
            .await
            .expect("fixture request")
            .into_inner();
        fx.requests.push(r.bill_id);
    }
    let posted = fund(app, &t, "alice", "20.00").await;
    fx.entries.push(posted.entry_id);
    let hold = app
        .ledger()
        .post_entry(authed(
            pb::PostEntryRequest {
                pending: true,
                ..transfer("fx-hold", "user:fuzz:wallet:USD", "user:bob:wallet:USD", "4.00")
            },
            &t,
        ))
        .await
        .expect("fixture hold")
        .into_inner();
    fx.entries.push(hold.entry_id);
    let card = app.add_card(&t, "4242424242424242", true).await.expect("fixture card");
    fx.cards.push(card.token);
    let unlinked = app.tokenize(&t, "5555555555554444").await.expect("fixture token");
    fx.cards.push(unlinked.token);
    let (y, m, d) = dmpay::kernel::dates::ymd(app.clock.now_us());
    let today = format!("{y:04}-{m:02}-{d:02}");
    let run = pb::finance_client::FinanceClient::new(app.channel.clone())
        .import_settlement_report(authed(
            pb::ImportSettlementReportRequest {
                processor: "sandbox".into(),
                report_date: today.clone(),
                csv: format!(
                    "processor_reference,type,amount,fee,net,currency,created_at\n\
                     ref-fx,capture,10.00,0.30,9.70,USD,{today}T12:00:00Z\n"
                ),
            },
            &t,
        ))
        .await;
    if let Ok(run) = run {
        let run = run.into_inner();
        let items = pb::finance_client::FinanceClient::new(app.channel.clone())
            .list_reconciliation_items(authed(
                pb::ListReconciliationItemsRequest { run_id: run.run_id.clone(), ..Default::default() },
                &t,
            ))
            .await
            .expect("fixture items")
            .into_inner();
        fx.items.extend(items.items.into_iter().map(|i| i.item_id));
        fx.runs.push(run.run_id);
    }
    fx
}

/// Runs `cases` property cases of `strategy` against one RPC, from a blocking thread
/// (proptest's runner is synchronous; each case is driven on the test's runtime).
async fn run_property<T: fmt::Debug + Clone + Send + 'static>(
    rpc: Rpc,
    cases: u32,
    strategy: impl FnOnce() -> BoxedStrategy<T> + Send + 'static,
    check: impl Fn(Rpc, T) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), TestCaseError>> + Send>>
        + Send
        + Sync
        + 'static,
) {
    let handle = tokio::runtime::Handle::current();
    // A seed of our own (or PROPTEST_RNG_SEED's), so a failure can name it.
    let seed = match Config::default().rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => rand::random(),
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 300,
            rng_seed: RngSeed::Fixed(seed),
            ..Config::default()
        });
        runner.run(&strategy(), |value| handle.block_on(check(rpc, value))).map_err(|e| e.to_string())
    })
    .await
    .expect("property thread");
    if let Err(e) = outcome {
        panic!("{} (replay with PROPTEST_RNG_SEED={seed}): {e}", rpc.path);
    }
}

fn verdict(rpc: Rpc, input: &dyn fmt::Debug, status: &tonic::Status) -> TestCaseError {
    TestCaseError::fail(format!(
        "{} answered {:?} {:?} to {input:?}",
        rpc.path,
        status.code(),
        status.message().chars().take(300).collect::<String>()
    ))
}

/// Layer 1: bytes that are mostly not a valid request. Whatever does not decode is
/// INVALID_ARGUMENT; whatever happens to decode gets any clean answer.
async fn garbage_to_every_rpc(app: TestApp) {
    raw::panics::watch();
    let fx = fixture(&app).await;
    let token = everything(&app);
    for rpc in RPCS {
        let channel = app.channel.clone();
        let token = token.clone();
        let fx = fx.clone();
        let path = rpc.path;
        let size_max = app.config.grpc_message_size_max;
        run_property(
            *rpc,
            cases(GARBAGE_CASES),
            move || garbage(fields(path, &fx)),
            move |rpc, bytes: Vec<u8>| {
                let channel = channel.clone();
                let token = token.clone();
                Box::pin(async move {
                    let decodes = decodes(rpc.path, &bytes);
                    let too_large = bytes.len() > size_max;
                    let result = call_raw(&channel, rpc, Bytes::from(bytes.clone()), Some(&token)).await;
                    match result {
                        Ok(_) if decodes && !too_large => Ok(()),
                        Ok(_) => Err(TestCaseError::fail(format!("{} accepted undecodable {bytes:?}", rpc.path))),
                        Err(s) if too_large && s.code() == Code::ResourceExhausted => Ok(()),
                        Err(s) if !too_large && !decodes && s.code() == Code::InvalidArgument => Ok(()),
                        Err(s) if !too_large && decodes && !is_unclean(s.code()) => Ok(()),
                        Err(s) => Err(verdict(rpc, &bytes, &s)),
                    }
                })
            },
        )
        .await;
    }
    assert_eq!(raw::panics::count(), 0, "the server panicked (see the output above)");
    assert_server_answers(&app.channel, &token).await;
}

/// Layer 2: well-formed messages, random field values.
async fn random_fields(app: &TestApp, service: &str) {
    raw::panics::watch();
    let fx = fixture(app).await;
    let token = everything(app);
    for rpc in RPCS.iter().filter(|r| r.path.starts_with(&format!("/dmpay.v1.{service}/"))) {
        let channel = app.channel.clone();
        let token = token.clone();
        let size_max = app.config.grpc_message_size_max;
        let fx = fx.clone();
        let path = rpc.path;
        run_property(
            *rpc,
            cases(FIELD_CASES),
            move || fields(path, &fx),
            move |rpc, msg: Encoded| {
                let channel = channel.clone();
                let token = token.clone();
                Box::pin(async move {
                    let result = call_raw(&channel, rpc, Bytes::from(msg.bytes.clone()), Some(&token)).await;
                    match result {
                        Ok(_) => Ok(()),
                        // Over the limit: refused as too large, whatever else is wrong.
                        Err(s) if msg.bytes.len() > size_max => {
                            if s.code() == Code::ResourceExhausted {
                                Ok(())
                            } else {
                                Err(verdict(rpc, &msg, &s))
                            }
                        }
                        Err(s) if !is_unclean(s.code()) => Ok(()),
                        Err(s) => Err(verdict(rpc, &msg, &s)),
                    }
                })
            },
        )
        .await;
    }
    assert_eq!(raw::panics::count(), 0, "the server panicked (see the output above)");
    assert_server_answers(&app.channel, &token).await;
    // The books still balance after all of it.
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
}

async fn assert_server_answers(channel: &Channel, token: &str) {
    let mut c = pb::accounts_client::AccountsClient::new(channel.clone());
    c.get_account(authed(pb::GetAccountRequest { user_id: "fuzz".into() }, token))
        .await
        .expect("the server still answers");
}

async fn random_fields_accounts(app: TestApp) {
    random_fields(&app, "Accounts").await;
}
async fn random_fields_ledger(app: TestApp) {
    random_fields(&app, "Ledger").await;
}
async fn random_fields_payment_methods(app: TestApp) {
    random_fields(&app, "PaymentMethods").await;
}
async fn random_fields_payments(app: TestApp) {
    random_fields(&app, "Payments").await;
}
async fn random_fields_finance(app: TestApp) {
    random_fields(&app, "Finance").await;
}

/// Broken gRPC framing around the message, for every RPC: what tonic's own decoder
/// refuses must reach the client as INVALID_ARGUMENT (RESOURCE_EXHAUSTED for a declared
/// length over the limit), never INTERNAL.
async fn broken_frames_to_every_rpc(app: TestApp) {
    raw::panics::watch();
    let token = everything(&app);
    let over = u32::try_from(app.config.grpc_message_size_max + 1).unwrap();
    let cases: Vec<(&str, Vec<u8>, Option<Code>)> = vec![
        ("empty body", vec![], Some(Code::InvalidArgument)),
        ("half a header", vec![0, 0, 0], Some(Code::InvalidArgument)),
        ("body shorter than declared", raw::frame(0, 100, b"0123456789"), Some(Code::InvalidArgument)),
        ("compressed flag, no grpc-encoding", raw::frame(1, 2, &[0x08, 0x01]), Some(Code::InvalidArgument)),
        ("flag 2", raw::frame(2, 2, &[0x08, 0x01]), Some(Code::InvalidArgument)),
        ("flag 0x7f", raw::frame(0x7f, 0, &[]), Some(Code::InvalidArgument)),
        ("declared length over the limit", raw::frame(0, over, b"xx"), Some(Code::ResourceExhausted)),
        ("declared length 2 GiB", raw::frame(0, 0x7f7f_7f7f, b""), Some(Code::ResourceExhausted)),
        ("garbage in a good frame", raw::frame(0, 3, &[0x0a, 0x7f, 0x41]), Some(Code::InvalidArgument)),
        ("two messages", [raw::frame(0, 0, &[]), raw::frame(0, 0, &[])].concat(), None),
        ("trailing bytes after a message", [raw::frame(0, 0, &[]), vec![0, 0]].concat(), None),
    ];
    for rpc in RPCS {
        for (name, body, expected) in &cases {
            let status = post_http(&app.channel, *rpc, body.clone(), &token).await;
            match expected {
                Some(code) => assert_eq!(
                    status.code(),
                    *code,
                    "{} with {name}: {:?} {}",
                    rpc.path,
                    status.code(),
                    status.message()
                ),
                None => {
                    assert!(
                        !is_unclean(status.code()),
                        "{} with {name}: {:?} {}",
                        rpc.path,
                        status.code(),
                        status.message()
                    )
                }
            }
        }
    }
    assert_eq!(raw::panics::count(), 0, "the server panicked (see the output above)");
    assert_server_answers(&app.channel, &token).await;
}

/// A NUL character in an id the caller looks something up by. PostgreSQL cannot hold
/// one in a text parameter and failed the query: INTERNAL, until `status::to_status`
/// learnt that this is the caller's INVALID_ARGUMENT. SQLite answers NOT_FOUND.
async fn nul_in_ids_is_the_callers_fault(app: TestApp) {
    let token = everything(&app);
    let id = "pay_\0x".to_owned();
    let money = usd("1.00");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("/dmpay.v1.Payments/GetPayment", pb::GetPaymentRequest { payment_id: id.clone() }.encode_to_vec()),
        (
            "/dmpay.v1.Payments/RefundPayment",
            pb::RefundPaymentRequest { payment_id: id.clone(), idempotency_key: "k".into(), ..Default::default() }
                .encode_to_vec(),
        ),
        ("/dmpay.v1.Payments/GetBill", pb::GetBillRequest { bill_id: id.clone() }.encode_to_vec()),
        ("/dmpay.v1.Payments/DeclineBill", pb::DeclineBillRequest { bill_id: id.clone() }.encode_to_vec()),
        ("/dmpay.v1.Payments/CancelBill", pb::CancelBillRequest { bill_id: id.clone() }.encode_to_vec()),
        (
            "/dmpay.v1.Payments/PayBill",
            pb::PayBillRequest { bill_id: id.clone(), idempotency_key: "k".into(), ..Default::default() }
                .encode_to_vec(),
        ),
        (
            "/dmpay.v1.Payments/SendPayment",
            pb::SendPaymentRequest {
                idempotency_key: "k".into(),
                recipient_id: "bob".into(),
                amount: money.clone(),
                funding_source: 2,
                payment_method_token: id.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/dmpay.v1.Payments/ListPayments",
            pb::ListPaymentsRequest { page_token: id.clone(), ..Default::default() }.encode_to_vec(),
        ),
        ("/dmpay.v1.Ledger/GetEntry", pb::GetEntryRequest { entry_id: id.clone() }.encode_to_vec()),
        (
            "/dmpay.v1.Ledger/ReverseEntry",
            pb::ReverseEntryRequest { entry_id: id.clone(), idempotency_key: "k".into(), reason: "r".into() }
                .encode_to_vec(),
        ),
        (
            "/dmpay.v1.Ledger/VoidPending",
            pb::VoidPendingRequest { entry_id: id.clone(), idempotency_key: "k".into() }.encode_to_vec(),
        ),
        (
            "/dmpay.v1.Ledger/PostPending",
            pb::PostPendingRequest { entry_id: id.clone(), idempotency_key: "k".into(), amount: None }.encode_to_vec(),
        ),
        (
            "/dmpay.v1.Ledger/ListEntries",
            pb::ListEntriesRequest {
                account_code: "platform:fees:USD".into(),
                page_token: id.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/dmpay.v1.PaymentMethods/LinkPaymentMethod",
            pb::LinkPaymentMethodRequest { token: id.clone(), make_default: true }.encode_to_vec(),
        ),
        (
            "/dmpay.v1.PaymentMethods/SetDefaultPaymentMethod",
            pb::SetDefaultPaymentMethodRequest { token: id.clone() }.encode_to_vec(),
        ),
        (
            "/dmpay.v1.PaymentMethods/RemovePaymentMethod",
            pb::RemovePaymentMethodRequest { token: id.clone() }.encode_to_vec(),
        ),
        (
            "/dmpay.v1.Finance/ListReconciliationItems",
            pb::ListReconciliationItemsRequest { run_id: id.clone(), ..Default::default() }.encode_to_vec(),
        ),
        (
            "/dmpay.v1.Finance/ResolveReconciliationItem",
            pb::ResolveReconciliationItemRequest {
                item_id: id.clone(),
                resolution: pb::ReconciliationResolution::Explained as i32,
                note: "n".into(),
            }
            .encode_to_vec(),
        ),
    ];
    for (path, body) in cases {
        let answer = call_raw(&app.channel, raw::find(path), Bytes::from(body), Some(&token)).await;
        if path.contains("/List") && !path.ends_with("/ListReconciliationItems") {
            // A list with a cursor that names nothing may answer an empty page.
            if let Err(err) = answer {
                assert!(
                    matches!(err.code(), Code::InvalidArgument | Code::NotFound),
                    "{path} with a NUL in its cursor: {:?} {}",
                    err.code(),
                    err.message()
                );
            }
        } else {
            // An id is checked at the edge: the same answer on both backends, naming
            // the field.
            let err = answer.expect_err(path);
            assert_eq!(err.code(), Code::InvalidArgument, "{path} with a NUL in its id: {}", err.message());
            assert!(err.message().contains("control characters"), "{path}: {}", err.message());
        }
    }
}

/// Hostile writes land in the same posting-engine batches as honest ones: none of them
/// may fail an honest neighbour (a command that breaks its batch's transaction would).
async fn hostile_neighbours_never_fail_honest_calls(app: TestApp) {
    app.users(CAST).await;
    raw::panics::watch();
    let fx = fixture(&app).await;
    let token = everything(&app);
    fund(&app, &token, "honest", "300.00").await;
    // Samples of random writes, drawn up front.
    let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
    let mut hostile = Vec::new();
    for path in [
        "/dmpay.v1.Ledger/PostEntry",
        "/dmpay.v1.Ledger/PostPending",
        "/dmpay.v1.Ledger/VoidPending",
        "/dmpay.v1.Ledger/ReverseEntry",
        "/dmpay.v1.Payments/SendPayment",
        "/dmpay.v1.Payments/RequestPayment",
        "/dmpay.v1.Payments/PayBill",
        "/dmpay.v1.Payments/RefundPayment",
    ] {
        let strategy = fields(path, &fx);
        for _ in 0..cases(25) {
            let e = strategy.new_tree(&mut runner).expect("sample").current();
            hostile.push((raw::find(path), e));
        }
    }
    let honest_token = app.token("honest", &ALL_SCOPES.join(" "));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (rpc, e)) in hostile.into_iter().enumerate() {
        let channel = app.channel.clone();
        let token = token.clone();
        let honest_token = honest_token.clone();
        tasks.spawn(async move {
            let r = call_raw(&channel, rpc, Bytes::from(e.bytes.clone()), Some(&token)).await;
            if let Err(s) = r {
                assert!(!is_unclean(s.code()), "{} answered {:?} {} to {e:?}", rpc.path, s.code(), s.message());
            }
            // Every other hostile call has an honest neighbour: a wallet send and a
            // ledger transfer, each of which must succeed.
            if i % 2 == 0 {
                let mut p = pb::payments_client::PaymentsClient::new(channel.clone());
                p.send_payment(authed(
                    pb::SendPaymentRequest {
                        idempotency_key: format!("honest-{i}"),
                        recipient_id: "neighbour".into(),
                        amount: usd("0.01"),
                        funding_source: pb::FundingSource::Balance as i32,
                        ..Default::default()
                    },
                    &honest_token,
                ))
                .await
                .unwrap_or_else(|s| panic!("honest send {i} failed beside {}: {s:?}", rpc.path));
                let mut l = pb::ledger_client::LedgerClient::new(channel);
                l.post_entry(authed(
                    transfer(&format!("honest-t-{i}"), "user:honest:wallet:USD", "user:neighbour:wallet:USD", "0.01"),
                    &honest_token,
                ))
                .await
                .unwrap_or_else(|s| panic!("honest transfer {i} failed beside {}: {s:?}", rpc.path));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task");
    }
    assert_eq!(raw::panics::count(), 0, "the server panicked (see the output above)");
    let report = app.verify().await;
    assert!(report.ok(), "{:?}", report.problems);
}

#[test]
fn every_rpc_is_listed() {
    let declared = raw::declared_rpcs();
    let mut listed: Vec<(String, bool)> = RPCS.iter().map(|r| (r.path.to_owned(), r.streaming)).collect();
    let mut declared_sorted = declared.clone();
    declared_sorted.sort();
    listed.sort();
    assert_eq!(listed, declared_sorted, "tests/api/raw.rs RPCS must list every RPC of proto/dmpay/v1");
    // And every one has a field strategy and a message type.
    let fx = Fixture::default();
    for (path, _) in declared {
        let _ = fields(&path, &fx);
        let _ = decodes(&path, &[]);
    }
}

backend_tests!(
    garbage_to_every_rpc,
    broken_frames_to_every_rpc,
    random_fields_accounts,
    random_fields_ledger,
    random_fields_payment_methods,
    random_fields_payments,
    random_fields_finance,
    nul_in_ids_is_the_callers_fault,
    hostile_neighbours_never_fail_honest_calls,
);
