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
    tags: Box<[Range<u32>]>,
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

    /// The event's tags.
    pub fn tags(&self) -> impl Iterator<Item = &str> + Clone {
        self.tags.iter().map(|r| self.str_at(r))
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
        // Tags (field 14) come last: each after the ones before it.
        let mut at = crate::proto::RecordedEvent {
            tags: Vec::new(),
            ..m.clone()
        }
        .encoded_len();
        let tags = m
            .tags
            .iter()
            .map(|t| {
                let start = at + 1 + encoded_len_varint(t.len() as u64);
                at = start + t.len();
                start as u32..at as u32
            })
            .collect();
        EncodedEvent {
            seq: m.global_sequence,
            version: m.version,
            partition_key: m.partition_key,
            bytes: Bytes::from(m.encode_to_vec()),
            stream_id: field(0, &m.stream_id),
            event_type: field(before_type, &m.event_type),
            tags,
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

/// One stored event's columns, as PostgreSQL sends them in binary: text as UTF-8, jsonb as a
/// version byte and the JSON text, timestamptz as microseconds since 2000-01-01.
pub struct Columns<'a> {
    /// Global sequence.
    pub seq: i64,
    /// Stream id (text).
    pub stream_id: &'a [u8],
    /// Stream version.
    pub version: i64,
    /// Event id.
    pub event_id: Uuid,
    /// Event type (text).
    pub event_type: &'a [u8],
    /// Content type (text).
    pub content_type: &'a [u8],
    /// The JSON payload (jsonb), if JSON.
    pub data: Option<&'a [u8]>,
    /// The binary payload (bytea), if not JSON.
    pub data_bytes: Option<&'a [u8]>,
    /// Metadata (jsonb object of strings).
    pub metadata: Option<&'a [u8]>,
    /// The client's or the commit timestamp (timestamptz).
    pub created_at: &'a [u8],
    /// The commit timestamp (timestamptz).
    pub recorded_at: &'a [u8],
    /// Partition key.
    pub partition_key: i64,
    /// Tags.
    pub tags: Vec<&'a str>,
}

/// Encodes the event columns starting at `at` (the order of `store::read`'s `event_columns!`:
/// seq, stream_id, version, event_id, event_type, content_type, data, data_bytes, metadata,
/// created_at, recorded_at, partition_key, tags). `scratch` is where the bytes are written; the event
/// takes them from it (reuse one buffer for a page: the events then share its allocation).
pub fn encode_row(row: &Row, at: usize, scratch: &mut BytesMut) -> Result<EncodedEvent> {
    let columns = Columns {
        seq: int8(row, at)?,
        stream_id: required(row, at + 1)?,
        version: int8(row, at + 2)?,
        event_id: row
            .try_get(at + 3)
            .map_err(|e| Error::Internal(format!("event id: {e}")))?,
        event_type: required(row, at + 4)?,
        content_type: required(row, at + 5)?,
        data: col(row, at + 6)?,
        data_bytes: col(row, at + 7)?,
        metadata: col(row, at + 8)?,
        created_at: required(row, at + 9)?,
        recorded_at: required(row, at + 10)?,
        partition_key: int8(row, at + 11)?,
        tags: row
            .try_get::<_, Option<Vec<&str>>>(at + 12)
            .map_err(|e| Error::Internal(format!("tags: {e}")))?
            .unwrap_or_default(),
    };
    encode_columns(&columns, scratch)
}

/// Encodes one event's columns as a `pgstore.v1.RecordedEvent` (without `partition`).
pub fn encode_columns(c: &Columns<'_>, scratch: &mut BytesMut) -> Result<EncodedEvent> {
    let seq = c.seq as u64;
    let version = c.version as u64;
    let partition_key = c.partition_key as u32;
    let buf = scratch;
    let stream_id = put_str_field(buf, 1, c.stream_id);
    put_varint_field(buf, 2, version);
    put_varint_field(buf, 3, seq);
    put_len_field(
        buf,
        4,
        c.event_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    let event_type = put_str_field(buf, 5, c.event_type);
    match (c.data, c.data_bytes) {
        // A oneof member is written even when empty.
        (Some(json), _) => put_len_field(buf, 6, jsonb_text(json)?),
        (None, Some(data)) => put_len_field(buf, 7, data),
        (None, None) => return Err(Error::Internal("event without payload".into())),
    }
    put_str_field(buf, 8, c.content_type);
    if let Some(metadata) = c.metadata {
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
    put_timestamp_field(buf, 10, c.created_at)?;
    put_timestamp_field(buf, 11, c.recorded_at)?;
    put_varint_field(buf, 12, u64::from(partition_key));
    let tags = c
        .tags
        .iter()
        .map(|t| {
            // Written even when empty (a repeated string's elements always are).
            encode_key(14, WireType::LengthDelimited, buf);
            encode_varint(t.len() as u64, buf);
            let start = buf.len() as u32;
            buf.put_slice(t.as_bytes());
            start..buf.len() as u32
        })
        .collect();
    Ok(EncodedEvent {
        seq,
        version,
        partition_key,
        bytes: buf.split().freeze(),
        stream_id,
        event_type,
        tags,
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

    /// A `ReadResponse` (`events` = 1, `head` = 2).
    pub fn read(events: &[EncodedEvent], head: u64) -> Frame {
        let mut buf = events_buffer(events, 12);
        put_varint_field(&mut buf, 2, head);
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
    mod properties {
        //! wire.rs against prost over generated inputs: every field, empty and extreme values.
        //! A change of the .proto that wire.rs does not follow fails here (the field numbers are
        //! checked against the descriptor the server serves).

        use std::collections::{BTreeMap, HashMap};

        use proptest::prelude::*;
        use prost::Message;

        use super::super::*;
        use crate::proto;

        /// A stored event as generated: what goes into the columns.
        #[derive(Debug, Clone)]
        struct Stored {
            seq: i64,
            stream_id: String,
            version: i64,
            event_id: u128,
            event_type: String,
            content_type: String,
            payload: Result<String, Vec<u8>>,
            metadata: Option<BTreeMap<String, String>>,
            created_micros: i64,
            recorded_micros: i64,
            partition_key: u32,
            tags: Vec<String>,
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![Just(String::new()), ".{0,40}", "\\PC{0,300}"]
        }

        fn position() -> impl Strategy<Value = i64> {
            prop_oneof![Just(0i64), Just(1), Just(i64::MAX), 0..i64::MAX]
        }

        /// Timestamps PostgreSQL can hold for the API's years 0001-9999, and the extremes.
        fn micros() -> impl Strategy<Value = i64> {
            prop_oneof![
                Just(0i64),
                Just(-63_082_281_600_000_000), // 0001-01-01 in PostgreSQL's epoch
                Just(252_455_615_999_999_999), // 9999-12-31 23:59:59.999999
                -63_082_281_600_000_000i64..252_455_615_999_999_999,
            ]
        }

        fn stored() -> impl Strategy<Value = Stored> {
            (
                (position(), text(), position(), any::<u128>()),
                (text(), text()),
                prop_oneof![
                    text().prop_map(Ok),
                    proptest::collection::vec(any::<u8>(), 0..300).prop_map(Err)
                ],
                proptest::option::of(proptest::collection::btree_map(text(), text(), 0..4)),
                (micros(), micros(), any::<u32>()),
                proptest::collection::vec(text(), 0..4),
            )
                .prop_map(
                    |(
                        (seq, stream_id, version, event_id),
                        (event_type, content_type),
                        payload,
                        metadata,
                        (created_micros, recorded_micros, partition_key),
                        tags,
                    )| Stored {
                        seq,
                        stream_id,
                        version,
                        event_id,
                        event_type,
                        content_type,
                        payload,
                        metadata,
                        created_micros,
                        recorded_micros,
                        partition_key,
                        tags,
                    },
                )
        }

        fn jsonb(text: &str) -> Vec<u8> {
            let mut v = vec![1u8];
            v.extend_from_slice(text.as_bytes());
            v
        }

        fn timestamp(micros: i64) -> prost_types::Timestamp {
            prost_types::Timestamp {
                seconds: PG_EPOCH_UNIX_SECS + micros.div_euclid(1_000_000),
                nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
            }
        }

        /// What prost says the event is.
        fn expected(e: &Stored) -> proto::RecordedEvent {
            proto::RecordedEvent {
                stream_id: e.stream_id.clone(),
                version: e.version as u64,
                global_sequence: e.seq as u64,
                event_id: Uuid::from_u128(e.event_id).to_string(),
                event_type: e.event_type.clone(),
                payload: Some(match &e.payload {
                    Ok(json) => proto::recorded_event::Payload::Json(json.clone()),
                    Err(bytes) => proto::recorded_event::Payload::Data(bytes.clone().into()),
                }),
                content_type: e.content_type.clone(),
                metadata: e
                    .metadata
                    .clone()
                    .map(|m| m.into_iter().collect::<HashMap<_, _>>())
                    .unwrap_or_default(),
                timestamp: Some(timestamp(e.created_micros)),
                recorded_at: Some(timestamp(e.recorded_micros)),
                partition_key: e.partition_key,
                tags: e.tags.clone(),
                ..Default::default()
            }
        }

        /// What wire.rs makes of the event's columns.
        fn encoded(e: &Stored) -> EncodedEvent {
            let metadata = e
                .metadata
                .as_ref()
                .map(|m| jsonb(&serde_json::to_string(m).unwrap()));
            let data = e.payload.as_ref().ok().map(|j| jsonb(j));
            let created = e.created_micros.to_be_bytes();
            let recorded = e.recorded_micros.to_be_bytes();
            let columns = Columns {
                seq: e.seq,
                stream_id: e.stream_id.as_bytes(),
                version: e.version,
                event_id: Uuid::from_u128(e.event_id),
                event_type: e.event_type.as_bytes(),
                content_type: e.content_type.as_bytes(),
                data: data.as_deref(),
                data_bytes: e.payload.as_ref().err().map(|b| &b[..]),
                metadata: metadata.as_deref(),
                created_at: &created,
                recorded_at: &recorded,
                partition_key: i64::from(e.partition_key),
                tags: e.tags.iter().map(String::as_str).collect(),
            };
            encode_columns(&columns, &mut BytesMut::new()).unwrap()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn an_encoded_row_decodes_as_the_event(e in stored()) {
                let enc = encoded(&e);
                let want = expected(&e);
                let got = proto::RecordedEvent::decode(&enc.bytes[..]).unwrap();
                prop_assert_eq!(&got, &want);
                prop_assert_eq!(enc.stream_id(), e.stream_id.as_str());
                prop_assert_eq!(enc.event_type(), e.event_type.as_str());
                prop_assert_eq!(enc.tags().collect::<Vec<_>>(), e.tags.iter().map(String::as_str).collect::<Vec<_>>());
                let from_message = EncodedEvent::from_message(&want);
                prop_assert_eq!(from_message.tags().collect::<Vec<_>>(), e.tags.iter().map(String::as_str).collect::<Vec<_>>());
                prop_assert_eq!((enc.seq, enc.version, enc.partition_key), (e.seq as u64, e.version as u64, e.partition_key));
                // Canonical: prost writes the same bytes (metadata order aside).
                if want.metadata.len() <= 1 {
                    prop_assert_eq!(want.encode_to_vec(), enc.bytes.to_vec());
                }
            }

            #[test]
            fn pages_and_subscription_frames_decode_as_their_messages(
                events in proptest::collection::vec(stored(), 0..6),
                next in any::<u64>(),
                head in any::<u64>(),
                partition in prop_oneof![Just(0u32), any::<u32>()],
                end in any::<bool>(),
                state in 0i32..4,
            ) {
                let enc: Vec<EncodedEvent> = events.iter().map(encoded).collect();
                let want: Vec<proto::RecordedEvent> = events.iter().map(expected).collect();

                let page = proto::ReadFromResponse::decode(&Frame::read_from(&enc, next, head).encode_to_vec()[..]).unwrap();
                prop_assert_eq!(&page.events, &want);
                prop_assert_eq!((page.next_sequence, page.head), (next, head));

                let read = proto::ReadResponse::decode(&Frame::read(&enc, head).encode_to_vec()[..]).unwrap();
                prop_assert_eq!(&read.events, &want);
                prop_assert_eq!(read.head, head);

                let frame = Frame::load(&enc, head, next, end, state);
                let bytes = frame.encode_to_vec();
                prop_assert_eq!(bytes.len(), frame.encoded_len());
                let load = proto::LoadResponse::decode(&bytes[..]).unwrap();
                prop_assert_eq!(&load.events, &want);
                prop_assert_eq!((load.stream_version, load.next_version, load.end_of_stream, load.state), (head, next, end, state));

                for (e, w) in enc.iter().zip(&want) {
                    let frame = Frame::event(e, partition);
                    let bytes = frame.encode_to_vec();
                    prop_assert_eq!(bytes.len(), frame.encoded_len());
                    let msg = proto::SubscribeResponse::decode(&bytes[..]).unwrap();
                    let mut w = w.clone();
                    w.partition = partition;
                    prop_assert_eq!(msg.message, Some(proto::subscribe_response::Message::Event(w)));
                }
            }

            #[test]
            fn from_message_keeps_every_field_and_finds_its_strings(e in stored()) {
                let m = expected(&e);
                let enc = EncodedEvent::from_message(&m);
                prop_assert_eq!(proto::RecordedEvent::decode(&enc.bytes[..]).unwrap(), m.clone());
                prop_assert_eq!(enc.stream_id(), m.stream_id.as_str());
                prop_assert_eq!(enc.event_type(), m.event_type.as_str());
            }
        }

        /// The fields wire.rs writes, by message, against the descriptor of the API: a field
        /// added to (or renumbered in) the .proto must be taught to wire.rs first.
        #[test]
        fn wire_knows_every_field_of_the_messages_it_writes() {
            let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
            let fields = |name: &str| -> Vec<i32> {
                let m = set
                    .file
                    .iter()
                    .flat_map(|f| &f.message_type)
                    .find(|m| m.name() == name)
                    .unwrap_or_else(|| panic!("{name} not in the API"));
                let mut n: Vec<i32> = m.field.iter().map(|f| f.number()).collect();
                n.sort_unstable();
                n
            };
            assert_eq!(fields("RecordedEvent"), (1..=14).collect::<Vec<_>>());
            assert_eq!(fields("ReadFromResponse"), vec![1, 2, 3]);
            assert_eq!(fields("ReadResponse"), vec![1, 2]);
            assert_eq!(fields("LoadResponse"), vec![1, 2, 3, 4, 5]);
        }
    }
}
