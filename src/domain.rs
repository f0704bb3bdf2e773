//! The domain: streams, versions and events as the store and the API see them, independent of
//! PostgreSQL and of gRPC. Everything else builds on these types.

use std::{fmt, time::SystemTime};

use bytes::Bytes;
use uuid::Uuid;

/// The expected version of a stream for an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream has no events.
    NoStream,
    /// The stream has at least one event.
    StreamExists,
    /// The stream's version is exactly this.
    Exact(u64),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no_stream"),
            ExpectedVersion::StreamExists => f.write_str("stream_exists"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

impl ExpectedVersion {
    /// Whether a stream at `actual` satisfies this expectation.
    pub fn admits(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::StreamExists => actual > 0,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

/// A stream's lifecycle state, as stored (`pgstore.streams.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    /// Accepts appends.
    Active = 1,
    /// Read-only until restored.
    Archived = 2,
    /// Never accepts appends again.
    Tombstoned = 3,
    /// Its events are being removed by DeleteStream: refuses appends, reads as absent.
    Deleting = 4,
}

impl StreamState {
    /// From the stored code; `Err` carries a code this version does not know.
    pub fn from_code(code: i16) -> std::result::Result<Self, UnknownStreamState> {
        match code {
            1 => Ok(StreamState::Active),
            2 => Ok(StreamState::Archived),
            3 => Ok(StreamState::Tombstoned),
            4 => Ok(StreamState::Deleting),
            other => Err(UnknownStreamState(other)),
        }
    }
}

/// A stored stream state code this version of pgstore does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown stream state {0}")]
pub struct UnknownStreamState(pub i16);

impl fmt::Display for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamState::Active => "active",
            StreamState::Archived => "archived",
            StreamState::Tombstoned => "tombstoned",
            StreamState::Deleting => "being deleted",
        })
    }
}

/// An event's payload.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Validated JSON text, stored as jsonb.
    Json(String),
    /// Opaque bytes, stored as bytea.
    Bytes(Bytes),
}

impl Payload {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(s) => s.len(),
            Payload::Bytes(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A validated event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The event id the client chose (nil when it chose none: the writer assigns one).
    pub event_id: Uuid,
    /// The event type.
    pub event_type: String,
    /// The media type of the payload.
    pub content_type: String,
    /// The payload.
    pub payload: Payload,
    /// Metadata as a JSON object text, if any.
    pub metadata: Option<String>,
    /// The client's timestamp, if any.
    pub timestamp: Option<SystemTime>,
    /// The event's tags joined by U+001F (which tags cannot contain), as `append_batch` takes
    /// them; `None` without tags.
    pub tags: Option<String>,
}

/// A validated append: events for one or more streams, written atomically (all or nothing).
#[derive(Debug, Clone)]
pub struct AppendCommand {
    /// The streams written, each once, in the order their events take global sequences.
    pub parts: Vec<StreamAppend>,
    /// Whether the client chose the event ids (then they are checked for retries).
    pub client_event_ids: bool,
    /// The idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// A Dynamic Consistency Boundary condition, if any.
    pub condition: Option<AppendCondition>,
}

/// The events an append writes to one stream.
#[derive(Debug, Clone)]
pub struct StreamAppend {
    /// The stream.
    pub stream_id: String,
    /// The concurrency check.
    pub expected: ExpectedVersion,
    /// The events (at least one).
    pub events: Vec<NewEvent>,
}

impl AppendCommand {
    /// An append to one stream.
    pub fn one(stream_id: String, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        AppendCommand {
            parts: vec![StreamAppend {
                stream_id,
                expected,
                events,
            }],
            client_event_ids: false,
            idempotency_key: None,
            condition: None,
        }
    }

    /// Every event, in the order they take sequences.
    pub fn events(&self) -> impl Iterator<Item = &NewEvent> {
        self.parts.iter().flat_map(|p| p.events.iter())
    }

    /// How many events the append writes.
    pub fn event_count(&self) -> usize {
        self.parts.iter().map(|p| p.events.len()).sum()
    }

    /// Whether the streams written are `streams`, in this order.
    pub fn writes<'a>(&self, streams: impl IntoIterator<Item = &'a str>) -> bool {
        self.parts.iter().map(|p| p.stream_id.as_str()).eq(streams)
    }
}

/// Fail an append if an event matching `query` was committed after `after`.
#[derive(Debug, Clone)]
pub struct AppendCondition {
    /// The events that would conflict.
    pub query: crate::store::query::Query,
    /// Only events with a greater sequence conflict.
    pub after: u64,
}

impl AppendCondition {
    /// The condition as the SQL that checks it takes it (`{"after": seq, "items": [...]}`, in
    /// the jsonb of migration 0014 and the writer's conflict search).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({"after": self.after, "items": self.query.to_value()})
    }
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Each stream's result, in the order of the append's parts.
    pub parts: Vec<PartOutcome>,
    /// Whether this was a retry of a committed append (nothing written).
    pub duplicate: bool,
}

/// What an append did to one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartOutcome {
    /// The stream's version after the append.
    pub version: u64,
    /// The first global sequence written to it.
    pub first_sequence: u64,
    /// The last global sequence written to it.
    pub last_sequence: u64,
}

impl AppendOutcome {
    /// The first global sequence the append wrote.
    pub fn first_sequence(&self) -> u64 {
        self.parts.first().map_or(0, |p| p.first_sequence)
    }

    /// The last global sequence the append wrote.
    pub fn last_sequence(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.last_sequence)
    }

    /// The version of the last stream written (the only one, for an append to one stream).
    pub fn version(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.version)
    }
}

/// A stored event.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    /// The global sequence.
    pub seq: u64,
    /// The stream.
    pub stream_id: String,
    /// The version within the stream.
    pub version: u64,
    /// The event id.
    pub event_id: Uuid,
    /// The event type.
    pub event_type: String,
    /// The media type.
    pub content_type: String,
    /// The payload.
    pub payload: Payload,
    /// Metadata as JSON object text.
    pub metadata: Option<String>,
    /// The client's or the commit timestamp.
    pub created_at: SystemTime,
    /// The commit timestamp.
    pub recorded_at: SystemTime,
    /// FNV-1a hash of the stream id.
    pub partition_key: u32,
}

/// FNV-1a (32-bit) of a stream id: the stable partition key stored on every event. Consumer
/// groups assign stream `s` to partition `partition_key(s) % partition_count`.
pub fn partition_key(stream_id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in stream_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Whether a content type is stored as jsonb: `application/json`, any `+json` type, with or
/// without parameters.
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || (essence.contains('/') && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_values() {
        assert_eq!(partition_key(""), 0x811c_9dc5);
        assert_eq!(partition_key("a"), 0xe40c_292c);
        assert_eq!(partition_key("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/vnd.order+json"));
        assert!(!is_json_content_type("application/octet-stream"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("+json"));
    }

    #[test]
    fn expected_version_rules() {
        assert!(ExpectedVersion::Any.admits(0) && ExpectedVersion::Any.admits(7));
        assert!(ExpectedVersion::NoStream.admits(0) && !ExpectedVersion::NoStream.admits(1));
        assert!(!ExpectedVersion::StreamExists.admits(0));
        assert!(ExpectedVersion::StreamExists.admits(3));
        assert!(ExpectedVersion::Exact(3).admits(3) && !ExpectedVersion::Exact(3).admits(2));
    }
}
