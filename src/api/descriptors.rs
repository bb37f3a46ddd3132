//! The API's descriptors, for the tools that read them: server reflection (v1 and
//! v1alpha), the protoset file (`dmpay protoset`), and the JSON mapping of the Connect
//! protocol (`connect`), which needs the messages' shapes at run time.
//!
//! One set holds dmpay's files with their imports (the well-known types), the
//! `google.rpc` error details a status carries (`BadRequest`, `ErrorInfo`, `RetryInfo`)
//! and the health service, so a tool can decode every message the server sends.

use std::sync::OnceLock;

use prost::Message;
use prost_reflect::DescriptorPool;
use prost_types::FileDescriptorSet;

/// The encoded sets, dmpay's first (a file in several keeps its first copy).
pub fn encoded_sets() -> [&'static [u8]; 3] {
    [super::FILE_DESCRIPTOR_SET, tonic_types::pb::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET]
}

/// Server reflection over every set, for either version (grpcurl before 1.9 and
/// Python's grpcio-reflection speak v1alpha; the error details and health files let
/// tools decode `BadRequest` and call health).
pub fn reflection() -> tonic_reflection::server::Builder<'static> {
    encoded_sets()
        .into_iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, set| b.register_encoded_file_descriptor_set(set))
}

/// Every file of `encoded_sets`, each once, in one set: the protoset.
pub fn merged() -> FileDescriptorSet {
    let mut seen = std::collections::HashSet::new();
    let mut out = FileDescriptorSet { file: Vec::new() };
    for encoded in encoded_sets() {
        // The sets are compiled into the binary; one that does not decode is a build bug
        // that the unit test below catches, so skipping it here cannot hide anything.
        let Ok(set) = FileDescriptorSet::decode(encoded) else { continue };
        for file in set.file {
            if seen.insert(file.name().to_owned()) {
                out.file.push(file);
            }
        }
    }
    out
}

/// The merged set, encoded (what `make protoset` writes).
pub fn protoset() -> Vec<u8> {
    merged().encode_to_vec()
}

/// The pool the JSON mapping reads the messages' shapes from, built once.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::from_file_descriptor_set(merged()).unwrap_or_else(|e| {
            // Only a build whose descriptors are inconsistent gets here (the unit test
            // below builds the same pool); the mapping then knows no method and answers
            // UNIMPLEMENTED rather than stopping the server.
            tracing::error!(error = %e, "the API's descriptors do not form a pool; JSON calls are off");
            DescriptorPool::new()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_decodes_and_forms_one_pool() {
        for encoded in encoded_sets() {
            FileDescriptorSet::decode(encoded).expect("a compiled-in set decodes");
        }
        let pool = DescriptorPool::from_file_descriptor_set(merged()).expect("one consistent pool");
        for name in ["dmpay.v1.Payments", "dmpay.v1.Shopping", "grpc.health.v1.Health"] {
            assert!(pool.get_service_by_name(name).is_some(), "{name}");
        }
        for name in ["google.rpc.BadRequest", "google.rpc.ErrorInfo", "google.protobuf.Timestamp"] {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
    }
}
