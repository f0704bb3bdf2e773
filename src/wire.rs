//! Events encoded once, straight from PostgreSQL rows into protobuf bytes.
//!
//! Reading an event used to mean: decode the row into owned strings, convert that into the
//! generated `RecordedEvent` (a UUID formatted into a new string, metadata parsed), then encode
//! the message, field by field, once per response and once per live subscriber. Here a row's
//! column bytes are written into the protobuf encoding of `pgstore.v1.RecordedEvent` directly
//! (PostgreSQL text is UTF-8 already, jsonb arrives as text), and the result is shared: a page of
//! ReadFrom or Load copies it into its response, and every live subscriber sends the same bytes.
//!
//! [`Frame`] is the response type of the methods that carry events (see `build.rs`): the
//! encoding of the declared message, so clients and reflection see exactly the API as declared.

use std::{collections::HashMap, ops::Range};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_types::{FromSql, Type};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Seconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// A column's bytes as PostgreSQL sent them (binary format), whatever its type.
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// One stored event, encoded as a `pgstore.v1.RecordedEvent` (without `partition`, which depends
/// on who receives it). Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// Global sequence.
    pub seq: u64,
    /// Stream version.
    pub version: u64,
    /// The consumer-group partition key.
    pub partition_key: u32,
    /// The encoded message.
    pub bytes: Bytes,
    stream_id: Range<u32>,
    event_type: Range<u32>,
}

impl EncodedEvent {
    /// The event's stream id.
    pub fn stream_id(&self) -> &str {
        self.str_at(&self.stream_id)
    }

    /// The event's type.
    pub fn event_type(&self) -> &str {
        self.str_at(&self.event_type)
    }

    /// Encodes a generated message (the server encodes rows with [`encode_row`] instead).
    pub fn from_message(m: &crate::proto::RecordedEvent) -> EncodedEvent {
        use prost::Message;
        let field = |offset: usize, s: &str| {
            let start = if s.is_empty() {
                offset
            } else {
                offset + 1 + encoded_len_varint(s.len() as u64)
            };
            start as u32..(start + s.len()) as u32
        };
        let before_type = crate::proto::RecordedEvent {
            stream_id: m.stream_id.clone(),
            version: m.version,
            global_sequence: m.global_sequence,
            event_id: m.event_id.clone(),
            ..Default::default()
        }
        .encoded_len();
        EncodedEvent {
            seq: m.global_sequence,
            version: m.version,
            partition_key: m.partition_key,
            bytes: Bytes::from(m.encode_to_vec()),
            stream_id: field(0, &m.stream_id),
            event_type: field(before_type, &m.event_type),
        }
    }

    fn str_at(&self, r: &Range<u32>) -> &str {
        // Copied from PostgreSQL text (UTF-8) by `encode_row`, so this cannot fail.
        std::str::from_utf8(&self.bytes[r.start as usize..r.end as usize]).unwrap_or_default()
    }
}

fn put_len_field(buf: &mut BytesMut, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

fn put_str_field(buf: &mut BytesMut, tag: u32, value: &[u8]) -> Range<u32> {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
    }
    let start = buf.len() as u32;
    buf.put_slice(value);
    start..buf.len() as u32
}

fn put_varint_field(buf: &mut BytesMut, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

/// A `google.protobuf.Timestamp` from PostgreSQL's binary timestamptz (microseconds since
/// 2000-01-01 UTC).
fn put_timestamp_field(buf: &mut BytesMut, tag: u32, raw: &[u8]) -> Result<()> {
    let micros = i64::from_be_bytes(
        raw.try_into()
            .map_err(|_| Error::Internal("timestamp of unexpected size".into()))?,
    );
    let seconds = PG_EPOCH_UNIX_SECS + micros.div_euclid(1_000_000);
    let nanos = micros.rem_euclid(1_000_000) * 1000;
    let len = if seconds != 0 {
        1 + encoded_len_varint(seconds as u64)
    } else {
        0
    } + if nanos != 0 {
        1 + encoded_len_varint(nanos as u64)
    } else {
        0
    };
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    put_varint_field(buf, 1, seconds as u64);
    put_varint_field(buf, 2, nanos as u64);
    Ok(())
}

/// jsonb in binary format is a version byte (1) and the JSON text.
fn jsonb_text(raw: &[u8]) -> Result<&[u8]> {
    match raw.split_first() {
        Some((1, text)) => Ok(text),
        _ => Err(Error::Internal("unknown jsonb format version".into())),
    }
}

fn col<'a>(row: &'a Row, i: usize) -> Result<Option<&'a [u8]>> {
    row.try_get::<_, Option<Raw<'a>>>(i)
        .map(|r| r.map(|r| r.0))
        .map_err(|e| Error::Internal(format!("reading column {i}: {e}")))
}

fn required(row: &Row, i: usize) -> Result<&[u8]> {
    col(row, i)?.ok_or_else(|| Error::Internal(format!("column {i} is NULL")))
}

fn int8(row: &Row, i: usize) -> Result<i64> {
    Ok(i64::from_be_bytes(required(row, i)?.try_into().map_err(
        |_| Error::Internal(format!("column {i} is not a bigint")),
    )?))
}

/// Encodes the event columns starting at `at` (the order of `store::read`'s `event_columns!`:
/// seq, stream_id, version, event_id, event_type, content_type, data, data_bytes, metadata,
/// created_at, recorded_at, partition_key). `scratch` is where the bytes are written; the event
/// takes them from it (reuse one buffer for a page: the events then share its allocation).
pub fn encode_row(row: &Row, at: usize, scratch: &mut BytesMut) -> Result<EncodedEvent> {
    let seq = int8(row, at)? as u64;
    let version = int8(row, at + 2)? as u64;
    let partition_key = int8(row, at + 11)? as u32;
    let event_id: Uuid = row
        .try_get(at + 3)
        .map_err(|e| Error::Internal(format!("event id: {e}")))?;

    let buf = scratch;
    let stream_id = put_str_field(buf, 1, required(row, at + 1)?);
    put_varint_field(buf, 2, version);
    put_varint_field(buf, 3, seq);
    put_len_field(
        buf,
        4,
        event_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    let event_type = put_str_field(buf, 5, required(row, at + 4)?);
    match (col(row, at + 6)?, col(row, at + 7)?) {
        // A oneof member is written even when empty.
        (Some(json), _) => put_len_field(buf, 6, jsonb_text(json)?),
        (None, Some(data)) => put_len_field(buf, 7, data),
        (None, None) => return Err(Error::Internal("event without payload".into())),
    }
    put_str_field(buf, 8, required(row, at + 5)?);
    if let Some(metadata) = col(row, at + 8)? {
        // Metadata is a JSON object of strings (anything else is not shown, as before it was
        // validated on the way in).
        if let Ok(map) = serde_json::from_slice::<HashMap<String, String>>(jsonb_text(metadata)?) {
            for (k, v) in &map {
                let entry_len = if k.is_empty() {
                    0
                } else {
                    1 + encoded_len_varint(k.len() as u64) + k.len()
                } + if v.is_empty() {
                    0
                } else {
                    1 + encoded_len_varint(v.len() as u64) + v.len()
                };
                encode_key(9, WireType::LengthDelimited, buf);
                encode_varint(entry_len as u64, buf);
                put_str_field(buf, 1, k.as_bytes());
                put_str_field(buf, 2, v.as_bytes());
            }
        }
    }
    put_timestamp_field(buf, 10, required(row, at + 9)?)?;
    put_timestamp_field(buf, 11, required(row, at + 10)?)?;
    put_varint_field(buf, 12, u64::from(partition_key));
    Ok(EncodedEvent {
        seq,
        version,
        partition_key,
        bytes: buf.split().freeze(),
        stream_id,
        event_type,
    })
}

/// A response encoded ahead of time: what the generated server sends for `LoadResponse`,
/// `ReadFromResponse` and `SubscribeResponse` (see `build.rs`). Encode-only: the server never
/// decodes these messages (a decoded `Frame` is empty).
#[derive(Debug, Clone)]
pub enum Frame {
    /// A whole message.
    Whole(Bytes),
    /// `SubscribeResponse { event }` for one receiver: the shared event bytes plus the receiver's
    /// `partition`.
    Event {
        /// The encoded `RecordedEvent`.
        event: Bytes,
        /// Its consumer-group partition for this receiver (0: not in a group).
        partition: u32,
    },
}

impl Default for Frame {
    fn default() -> Self {
        Frame::Whole(Bytes::new())
    }
}

/// `SubscribeResponse.event`.
const SUBSCRIBE_EVENT_TAG: u32 = 1;
/// `RecordedEvent.partition`.
const PARTITION_TAG: u32 = 13;

impl Frame {
    /// Any generated message, encoded now.
    pub fn message<M: prost::Message>(m: &M) -> Frame {
        Frame::Whole(Bytes::from(m.encode_to_vec()))
    }

    /// A `ReadFromResponse` (`events` = 1, `next_sequence` = 2, `head` = 3).
    pub fn read_from(events: &[EncodedEvent], next_sequence: u64, head: u64) -> Frame {
        let mut buf = events_buffer(events, 24);
        put_varint_field(&mut buf, 2, next_sequence);
        put_varint_field(&mut buf, 3, head);
        Frame::Whole(buf.freeze())
    }

    /// A `LoadResponse` (`events` = 1, `stream_version` = 2, `next_version` = 3,
    /// `end_of_stream` = 4, `state` = 5).
    pub fn load(
        events: &[EncodedEvent],
        stream_version: u64,
        next_version: u64,
        end_of_stream: bool,
        state: i32,
    ) -> Frame {
        let mut buf = events_buffer(events, 32);
        put_varint_field(&mut buf, 2, stream_version);
        put_varint_field(&mut buf, 3, next_version);
        put_varint_field(&mut buf, 4, u64::from(end_of_stream));
        put_varint_field(&mut buf, 5, state as u64);
        Frame::Whole(buf.freeze())
    }

    /// A `SubscribeResponse` carrying one event.
    pub fn event(e: &EncodedEvent, partition: u32) -> Frame {
        Frame::Event {
            event: e.bytes.clone(),
            partition,
        }
    }

    fn partition_len(partition: u32) -> usize {
        if partition == 0 {
            0
        } else {
            1 + encoded_len_varint(u64::from(partition))
        }
    }
}

/// `repeated RecordedEvent events = 1`, with room for `extra` more bytes.
fn events_buffer(events: &[EncodedEvent], extra: usize) -> BytesMut {
    let size: usize = events
        .iter()
        .map(|e| 1 + encoded_len_varint(e.bytes.len() as u64) + e.bytes.len())
        .sum();
    let mut buf = BytesMut::with_capacity(size + extra);
    for e in events {
        put_len_field(&mut buf, 1, &e.bytes);
    }
    buf
}

impl prost::Message for Frame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Frame::Whole(b) => buf.put_slice(b),
            Frame::Event { event, partition } => {
                let len = event.len() + Frame::partition_len(*partition);
                encode_key(SUBSCRIBE_EVENT_TAG, WireType::LengthDelimited, buf);
                encode_varint(len as u64, buf);
                buf.put_slice(event);
                if *partition != 0 {
                    encode_key(PARTITION_TAG, WireType::Varint, buf);
                    encode_varint(u64::from(*partition), buf);
                }
            }
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> std::result::Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        match self {
            Frame::Whole(b) => b.len(),
            Frame::Event { event, partition } => {
                let len = event.len() + Frame::partition_len(*partition);
                1 + encoded_len_varint(len as u64) + len
            }
        }
    }

    fn clear(&mut self) {
        *self = Frame::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use prost::Message;

    fn event(seq: u64) -> (proto::RecordedEvent, EncodedEvent) {
        let p = proto::RecordedEvent {
            stream_id: "order-1".into(),
            version: 3,
            global_sequence: seq,
            event_id: Uuid::nil().to_string(),
            event_type: "Placed".into(),
            payload: Some(proto::recorded_event::Payload::Json("{}".into())),
            content_type: "application/json".into(),
            partition_key: 77,
            ..Default::default()
        };
        let e = EncodedEvent::from_message(&p);
        (p, e)
    }

    #[test]
    fn frames_decode_as_the_declared_messages() {
        let (p, e) = event(5);
        assert_eq!((e.stream_id(), e.event_type()), ("order-1", "Placed"));
        for partition in [0, 1, 300] {
            let bytes = Frame::event(&e, partition).encode_to_vec();
            assert_eq!(bytes.len(), Frame::event(&e, partition).encoded_len());
            let got = proto::SubscribeResponse::decode(&bytes[..]).unwrap();
            let want = proto::RecordedEvent {
                partition,
                ..p.clone()
            };
            assert_eq!(
                got.message,
                Some(proto::subscribe_response::Message::Event(want))
            );
        }
        let (p2, e2) = event(6);
        let bytes = Frame::read_from(&[e.clone(), e2.clone()], 7, 9).encode_to_vec();
        let got = proto::ReadFromResponse::decode(&bytes[..]).unwrap();
        assert_eq!(
            got,
            proto::ReadFromResponse {
                events: vec![p.clone(), p2.clone()],
                next_sequence: 7,
                head: 9,
            }
        );
        let bytes = Frame::load(&[e2], 3, 0, true, 2).encode_to_vec();
        let got = proto::LoadResponse::decode(&bytes[..]).unwrap();
        assert_eq!(
            got,
            proto::LoadResponse {
                events: vec![p2],
                stream_version: 3,
                next_version: 0,
                end_of_stream: true,
                state: 2,
            }
        );
        let hb = proto::SubscribeResponse {
            message: Some(proto::subscribe_response::Message::Heartbeat(
                proto::Heartbeat { head: 4 },
            )),
        };
        assert_eq!(Frame::message(&hb).encode_to_vec(), hb.encode_to_vec());
    }
}
