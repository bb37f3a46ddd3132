//! A client that speaks to every RPC by path with raw bytes for the request message, so
//! tests can send what the generated clients never would: garbage, truncated or
//! oversized messages, and hand-made gRPC frames. Also the table of every dmpay RPC.

use std::time::Duration;

use prost::bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long one hostile call may take before it counts as a hang.
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);

/// One RPC: its full path, whether the server streams its answer, and the scope that
/// admits a caller (`None`: any valid token, e.g. reading one's own account).
#[derive(Debug, Clone, Copy)]
pub struct Rpc {
    pub path: &'static str,
    pub streaming: bool,
    pub scope: Option<&'static str>,
}

const fn rpc(path: &'static str, scope: &'static str) -> Rpc {
    Rpc { path, streaming: false, scope: Some(scope) }
}

/// Every RPC of every dmpay service (`every_rpc_is_listed` checks this against the
/// descriptor the server publishes).
pub const RPCS: &[Rpc] = &[
    rpc("/dmpay.v1.Accounts/UpsertAccount", "accounts:admin"),
    Rpc { path: "/dmpay.v1.Accounts/GetAccount", streaming: false, scope: None },
    rpc("/dmpay.v1.Accounts/FreezeAccount", "accounts:admin"),
    rpc("/dmpay.v1.Accounts/UnfreezeAccount", "accounts:admin"),
    rpc("/dmpay.v1.Accounts/SetSeller", "accounts:admin"),
    rpc("/dmpay.v1.Ledger/CreateLedgerAccount", "ledger:write"),
    rpc("/dmpay.v1.Ledger/PostEntry", "ledger:write"),
    rpc("/dmpay.v1.Ledger/PostPending", "ledger:write"),
    rpc("/dmpay.v1.Ledger/VoidPending", "ledger:write"),
    rpc("/dmpay.v1.Ledger/ReverseEntry", "ledger:write"),
    rpc("/dmpay.v1.Ledger/GetEntry", "ledger:read"),
    rpc("/dmpay.v1.Ledger/ListEntries", "ledger:read"),
    rpc("/dmpay.v1.Ledger/GetLedgerBalance", "ledger:read"),
    rpc("/dmpay.v1.PaymentMethods/TokenizeCard", "methods:write"),
    rpc("/dmpay.v1.PaymentMethods/LinkPaymentMethod", "methods:write"),
    rpc("/dmpay.v1.PaymentMethods/ListPaymentMethods", "methods:write"),
    rpc("/dmpay.v1.PaymentMethods/SetDefaultPaymentMethod", "methods:write"),
    rpc("/dmpay.v1.PaymentMethods/RemovePaymentMethod", "methods:write"),
    rpc("/dmpay.v1.Payments/SendPayment", "payments:write"),
    rpc("/dmpay.v1.Payments/GetPayment", "payments:read"),
    rpc("/dmpay.v1.Payments/ListPayments", "payments:read"),
    rpc("/dmpay.v1.Payments/GetBalance", "payments:read"),
    rpc("/dmpay.v1.Payments/RequestPayment", "payments:write"),
    rpc("/dmpay.v1.Payments/PayBill", "payments:write"),
    rpc("/dmpay.v1.Payments/DeclineBill", "payments:write"),
    rpc("/dmpay.v1.Payments/CancelBill", "payments:write"),
    rpc("/dmpay.v1.Payments/GetBill", "payments:read"),
    rpc("/dmpay.v1.Payments/ListBills", "payments:read"),
    rpc("/dmpay.v1.Payments/RefundPayment", "payments:write"),
    rpc("/dmpay.v1.Payments/CreatePayout", "payments:write"),
    rpc("/dmpay.v1.Payments/GetPayout", "payments:read"),
    rpc("/dmpay.v1.Payments/ListPayouts", "payments:read"),
    Rpc { path: "/dmpay.v1.Payments/WatchPayments", streaming: true, scope: Some("payments:read") },
    rpc("/dmpay.v1.Finance/GetTrialBalance", "finance"),
    rpc("/dmpay.v1.Finance/VerifyLedger", "finance"),
    Rpc { path: "/dmpay.v1.Finance/ExportEntries", streaming: true, scope: Some("finance") },
    rpc("/dmpay.v1.Finance/ImportSettlementReport", "finance"),
    rpc("/dmpay.v1.Finance/ListReconciliationItems", "finance"),
    rpc("/dmpay.v1.Finance/ResolveReconciliationItem", "finance"),
    rpc("/dmpay.v1.Finance/GetStatement", "finance"),
    rpc("/dmpay.v1.Finance/ListDisputes", "finance"),
    rpc("/dmpay.v1.Finance/ListReceivables", "finance"),
    rpc("/dmpay.v1.Shopping/CreateListing", "payments:write"),
    rpc("/dmpay.v1.Shopping/AddStock", "payments:write"),
    rpc("/dmpay.v1.Shopping/CloseListing", "payments:write"),
    rpc("/dmpay.v1.Shopping/GetListing", "payments:read"),
    rpc("/dmpay.v1.Shopping/ListListings", "payments:read"),
    rpc("/dmpay.v1.Shopping/Purchase", "payments:write"),
    rpc("/dmpay.v1.Shopping/GetPurchase", "payments:read"),
    rpc("/dmpay.v1.Shopping/ListSales", "payments:read"),
    rpc("/dmpay.v1.Shopping/RefundPurchase", "payments:write"),
    rpc("/dmpay.v1.Shopping/MarkDelivered", "shopping:admin"),
    rpc("/dmpay.v1.Shopping/GetSellerBalance", "payments:read"),
    rpc("/dmpay.v1.Shopping/OpenTab", "payments:write"),
    rpc("/dmpay.v1.Shopping/GetTab", "payments:read"),
    rpc("/dmpay.v1.Shopping/CloseTab", "payments:write"),
    rpc("/dmpay.v1.Shopping/EndStream", "shopping:admin"),
];

pub const ALL_SCOPES: &[&str] = &[
    "accounts:admin",
    "ledger:write",
    "ledger:wallet_debit",
    "ledger:read",
    "methods:write",
    "payments:write",
    "payments:read",
    "payments:watch_all",
    "finance",
    "shopping:admin",
];

pub fn find(path: &str) -> Rpc {
    *RPCS.iter().find(|r| r.path == path).unwrap_or_else(|| panic!("no RPC {path}"))
}

/// Every `/package.Service/Method` the server's descriptor set declares for dmpay.v1.
pub fn declared_rpcs() -> Vec<(String, bool)> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(dmpay::api::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut out = Vec::new();
    for file in set.file {
        if file.package() != "dmpay.v1" {
            continue;
        }
        for service in &file.service {
            for method in &service.method {
                out.push((format!("/dmpay.v1.{}/{}", service.name(), method.name()), method.server_streaming()));
            }
        }
    }
    out
}

/// Passes `Bytes` through untouched in both directions.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls `rpc` with `body` as the request message. A streaming answer is read for a
/// few messages (or until it goes quiet: a watch stays open), then dropped. Err is the
/// status; a call that does not finish within `CALL_DEADLINE` is DEADLINE_EXCEEDED
/// with a message saying so.
pub async fn call_raw(channel: &Channel, rpc: Rpc, body: Bytes, token: Option<&str>) -> Result<Vec<Bytes>, Status> {
    let call = async {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.map_err(|e| Status::unknown(format!("client not ready: {e}")))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(rpc.path);
        let mut req = tonic::Request::new(body);
        if let Some(t) = token {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().map_err(|_| Status::unknown("client: token not ASCII"))?,
            );
        }
        if rpc.streaming {
            let mut stream = grpc.server_streaming(req, path, RawCodec).await?.into_inner();
            let mut got = Vec::new();
            while got.len() < 8 {
                match tokio::time::timeout(Duration::from_millis(100), stream.message()).await {
                    Err(_) => break, // open and quiet: a live watch
                    Ok(Ok(Some(m))) => got.push(m),
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => return Err(status),
                }
            }
            Ok(got)
        } else {
            grpc.unary(req, path, RawCodec).await.map(|r| vec![r.into_inner()])
        }
    };
    match tokio::time::timeout(CALL_DEADLINE, call).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!("client: no answer from {} in {CALL_DEADLINE:?}", rpc.path))),
    }
}

/// Codes a hostile request may never produce: a crash or hang (UNKNOWN, CANCELLED,
/// DEADLINE_EXCEEDED, UNAVAILABLE from a dropped connection), an unhandled internal
/// failure (INTERNAL, DATA_LOSS), a routing failure (UNIMPLEMENTED) or a lost token.
pub fn is_unclean(code: Code) -> bool {
    matches!(
        code,
        Code::Internal
            | Code::Unknown
            | Code::Unimplemented
            | Code::DataLoss
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Unavailable
            | Code::Unauthenticated
    )
}

/// A gRPC frame around `message`: flag byte, big-endian length, bytes.
pub fn frame(flag: u8, declared_len: u32, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(flag);
    out.extend_from_slice(&declared_len.to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Posts `body` (already framed, or not) as the HTTP/2 request body of `rpc` and returns
/// the gRPC status: from the headers of a trailers-only answer, or from the trailers.
/// The body must be ASCII (it travels as a `String`, the one body type tonic lets a
/// test build without more crates).
pub async fn post_http(channel: &Channel, rpc: Rpc, body: Vec<u8>, token: &str) -> Status {
    use tonic::codegen::http;
    use tonic::codegen::{Body as _, Service as _};
    let body = String::from_utf8(body).expect("ASCII frames only");
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://dmpay{}", rpc.path))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(tonic::body::Body::new(body))
        .expect("request");
    let exchange = async {
        let mut ch = channel.clone();
        std::future::poll_fn(|cx| ch.poll_ready(cx)).await.map_err(|e| Status::unknown(format!("transport: {e}")))?;
        let resp = ch.call(req).await.map_err(|e| Status::unknown(format!("transport: {e}")))?;
        if let Some(status) = Status::from_header_map(resp.headers()) {
            return Ok::<Status, Status>(status);
        }
        let mut body = resp.into_body();
        loop {
            let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
            let frame = if rpc.streaming {
                match tokio::time::timeout(Duration::from_millis(500), next).await {
                    Ok(f) => f,
                    // A live stream that went quiet: it is serving, which is an answer.
                    Err(_) => return Ok(Status::ok("stream open")),
                }
            } else {
                next.await
            };
            match frame {
                None => return Ok(Status::unknown("no status in the response")),
                Some(Err(e)) => return Err(Status::unknown(format!("body: {e}"))),
                Some(Ok(f)) => {
                    if let Ok(trailers) = f.into_trailers() {
                        return Ok(Status::from_header_map(&trailers)
                            .unwrap_or_else(|| Status::unknown("trailers without grpc-status")));
                    }
                }
            }
        }
    };
    match tokio::time::timeout(CALL_DEADLINE, exchange).await {
        Ok(Ok(s)) | Ok(Err(s)) => s,
        Err(_) => Status::deadline_exceeded("client: no answer"),
    }
}

/// Counts panics anywhere in this process (the server runs in it), so a panic in a
/// handler or a task it spawned fails the test even when the client saw a status.
pub mod panics {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Once;

    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: Once = Once::new();

    pub fn watch() {
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICS.fetch_add(1, Ordering::SeqCst);
                previous(info);
            }));
        });
    }

    pub fn count() -> usize {
        PANICS.load(Ordering::SeqCst)
    }
}
