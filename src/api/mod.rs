//! The gRPC edge: generated types, wire <-> domain conversion and the one error map.
//! This is the only module that knows tonic and protobuf; domain modules never see them.

mod accounts;
pub mod bus;
pub mod connect;
pub mod connections;
mod demo;
pub mod descriptors;
mod finance;
pub mod gate;
mod ledger;
pub mod money;
mod payment_methods;
mod payment_wire;
mod payments;
pub mod rate;
mod shopping;
pub mod status;
pub mod watch;
pub mod wire;

pub use accounts::AccountsApi;
pub use finance::FinanceApi;
pub use ledger::LedgerApi;
pub use payment_methods::PaymentMethodsApi;
pub use payments::PaymentsApi;
pub use shopping::ShoppingApi;
pub use status::to_status;

use tonic::{Request, Status};

use crate::auth::Principal;

/// Generated protobuf and tonic code for package `dmpay.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used)]
    tonic::include_proto!("dmpay.v1");
}

/// Descriptor set served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dmpay_descriptor");

/// Every gRPC path the server serves (`/package.Service/Method`): dmpay's services, from
/// the descriptor set, plus health and reflection. The metrics' `method` label takes
/// only these values.
pub fn known_methods() -> Vec<String> {
    use prost::Message;
    let mut paths = Vec::new();
    if let Ok(set) = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET) {
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
    }
    for fixed in [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        paths.push(fixed.to_owned());
    }
    paths
}

/// Longest id (payment, request, entry, card token, reconciliation run or item) a
/// request may name, in bytes. Every id dmpay issues is under 64; the bound keeps a
/// hostile id out of queries and error messages.
pub use crate::kernel::ids::ID_LEN_MAX;

/// An id from the wire, checked for shape before it reaches a query: at most
/// `ID_LEN_MAX` bytes and no control characters (NUL included, which PostgreSQL refuses
/// in text while SQLite would look it up). An empty id passes: each RPC says what an
/// empty one means. The same bad id is INVALID_ARGUMENT on both backends.
pub fn id<'a>(field: &str, value: &'a str) -> crate::kernel::error::Result<&'a str> {
    crate::kernel::ids::check_shape(field, value)?;
    Ok(value)
}

/// The verified caller of this request. The auth interceptor puts it there; a request
/// without one never reaches a handler, so its absence is a wiring bug.
pub fn principal<T>(req: &Request<T>) -> Result<&Principal, Status> {
    req.extensions().get::<Principal>().ok_or_else(|| Status::unauthenticated("missing credentials"))
}

/// Microseconds since the epoch to a protobuf timestamp.
pub fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: us.div_euclid(1_000_000), nanos: (us.rem_euclid(1_000_000) * 1000) as i32 }
}

/// A protobuf timestamp to microseconds since the epoch, for optional time filters.
pub fn timestamp_us(field: &str, ts: &prost_types::Timestamp) -> crate::kernel::error::Result<i64> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(crate::kernel::error::Error::invalid(field, "nanos must be within 0..1e9"));
    }
    ts.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(ts.nanos / 1000)))
        .filter(|us| *us >= 0)
        .ok_or_else(|| crate::kernel::error::Error::invalid(field, "out of range"))
}
