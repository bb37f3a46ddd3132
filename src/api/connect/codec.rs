//! How the Connect layer's messages travel: JSON or protobuf bodies, and the
//! length-prefixed envelopes of streams (the same layout as gRPC's frames).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::Status;

use super::errors::error_json;

/// How a request's messages are encoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Codec {
    Json,
    Proto,
}

/// A message of `desc` from the request's encoding, as protobuf bytes.
pub(super) fn to_proto(desc: &MessageDescriptor, codec: Codec, bytes: &[u8]) -> Result<Bytes, Status> {
    match codec {
        Codec::Proto => Ok(Bytes::copy_from_slice(bytes)),
        Codec::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let msg = DynamicMessage::deserialize(desc.clone(), &mut de)
                .and_then(|m| de.end().map(|()| m))
                .map_err(|e| Status::invalid_argument(format!("the request is not a JSON {}: {e}", desc.name())))?;
            Ok(Bytes::from(msg.encode_to_vec()))
        }
    }
}

/// A message of `desc` in the client's encoding.
pub(super) fn from_proto(desc: &MessageDescriptor, codec: Codec, bytes: Bytes) -> Result<Bytes, Status> {
    match codec {
        Codec::Proto => Ok(bytes),
        Codec::Json => {
            let msg = DynamicMessage::decode(desc.clone(), bytes)
                .map_err(|e| Status::internal(format!("an answer did not decode: {e}")))?;
            to_json(&msg).map(Bytes::from)
        }
    }
}

/// A message as JSON in the proto3 mapping, with the fields' proto names.
pub(crate) fn to_json(msg: &DynamicMessage) -> Result<Vec<u8>, Status> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    msg.serialize_with_options(&mut ser, &SerializeOptions::new().use_proto_field_name(true))
        .map_err(|e| Status::internal(format!("an answer did not encode as JSON: {e}")))?;
    Ok(out)
}

/// A length-prefixed message (gRPC's frame and Connect's envelope share the layout).
pub(super) fn envelope(flags: u8, message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.len());
    buf.put_u8(flags);
    buf.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    buf.put_slice(message);
    buf.freeze()
}

/// Splits whole gRPC frames off the front of `buf`.
pub(super) fn next_frame(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

/// Connect's end-of-stream envelope (flag 2): `{}`, or `{"error": ...}`.
pub(super) fn end_of_stream(status: Option<&Status>) -> Bytes {
    let body = match status {
        Some(s) => serde_json::json!({ "error": error_json(s) }),
        None => serde_json::json!({}),
    };
    envelope(2, body.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_only_when_whole() {
        let mut buf = BytesMut::new();
        let e = envelope(0, b"hello");
        buf.extend_from_slice(&e[..4]);
        assert_eq!(next_frame(&mut buf), None);
        buf.extend_from_slice(&e[4..]);
        buf.extend_from_slice(&envelope(0, b"")[..]);
        assert_eq!(next_frame(&mut buf).as_deref(), Some(&b"hello"[..]));
        assert_eq!(next_frame(&mut buf).as_deref(), Some(&b""[..]));
        assert!(buf.is_empty());
    }
}
