//! Request validation: every field checked once at the edge, turned into domain values.
//! Violations are INVALID_ARGUMENT (malformed) or RESOURCE_EXHAUSTED (over a limit).

use std::{
    collections::HashSet,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use uuid::Uuid;

use crate::config::Limits;
use crate::error::{Error, Result};
use crate::proto;
use crate::store::query::{Query, QueryItem};
use crate::store::retention::Retention;
use crate::store::{
    AppendCommand, AppendCondition, ExpectedVersion, NewEvent, Payload, StreamAppend,
    is_json_content_type,
};

/// The stream of an Append that names none but carries a condition or tagged events.
pub const DCB_STREAM: &str = "$dcb";

/// The content type used when an event names none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 128;
/// Earliest and latest timestamps accepted (years 0001 to 9999, as google.protobuf.Timestamp).
const MIN_TIMESTAMP_SECS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECS: i64 = 253_402_300_799;

/// A name-like field (stream id, consumer id, idempotency key, event type): 1 to `max` bytes of
/// UTF-8 without control characters.
pub fn name(field: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes, longer than the limit of {max}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A version or sequence: PostgreSQL stores them as bigint.
pub fn position(field: &str, value: u64) -> Result<()> {
    if value > i64::MAX as u64 {
        return Err(Error::invalid(
            field,
            format!("{value} is larger than the largest position {}", i64::MAX),
        ));
    }
    Ok(())
}

/// A page size: 0 means the default, larger than the maximum is capped.
pub fn page_size(requested: u32, limits: &Limits) -> u32 {
    match requested {
        0 => limits.default_page_size,
        n => n.min(limits.max_page_size),
    }
}

/// An event type filter.
pub fn event_types(types: &[String], limits: &Limits) -> Result<()> {
    for t in types {
        name("event_types", t, limits.max_event_type_bytes)?;
    }
    Ok(())
}

/// JSON text that PostgreSQL's jsonb will accept.
pub fn json(field: &str, text: &str) -> Result<()> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| Error::invalid(field, format!("not valid JSON: {e}")))?;
    // jsonb cannot hold U+0000 nor lone surrogates; only escapes can put them in JSON text, and
    // the fast syntax check above does not decode escapes. Decode fully when one is present.
    if has_risky_escape(text) {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid(field, format!("not valid JSON: {e}")))?;
        if contains_nul(&value) {
            return Err(Error::invalid(
                field,
                "JSON strings must not contain \\u0000 (PostgreSQL jsonb cannot store it)",
            ));
        }
    }
    Ok(())
}

/// Whether the text holds a `\\u0000` or a `\\uD800`-`\\uDFFF` escape (or something that looks
/// like one, e.g. after an escaped backslash: decoding then settles it).
fn has_risky_escape(text: &str) -> bool {
    text.match_indices("\\u").any(|(i, _)| {
        let rest = &text.as_bytes()[i + 2..];
        rest.starts_with(b"0000") || matches!(rest.first(), Some(b'd' | b'D'))
    })
}

fn contains_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(contains_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// A timestamp within the range every client and PostgreSQL agree on.
pub fn timestamp(field: &str, ts: &prost_types::Timestamp) -> Result<SystemTime> {
    if !(MIN_TIMESTAMP_SECS..=MAX_TIMESTAMP_SECS).contains(&ts.seconds)
        || !(0..1_000_000_000).contains(&ts.nanos)
    {
        return Err(Error::invalid(
            field,
            "must be between 0001-01-01 and 9999-12-31 with nanos in 0..1e9",
        ));
    }
    SystemTime::try_from(*ts).map_err(|e| Error::invalid(field, e.to_string()))
}

/// Tags, validated: at most `limits.max_tags`, each 1 to `limits.max_tag_bytes` bytes without
/// control characters; duplicates dropped (a tag set), first occurrence kept.
pub fn tags(field: &str, tags: Vec<String>, limits: &Limits) -> Result<Vec<String>> {
    if tags.len() > limits.max_tags {
        return Err(Error::invalid(
            field,
            format!("at most {} tags (limits.max_tags)", limits.max_tags),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(tags.len());
    for (i, t) in tags.into_iter().enumerate() {
        if t.is_empty() || t.len() > limits.max_tag_bytes {
            return Err(Error::invalid(
                format!("{field}[{i}]"),
                format!(
                    "must be 1 to {} bytes (limits.max_tag_bytes)",
                    limits.max_tag_bytes
                ),
            ));
        }
        if t.chars().any(char::is_control) {
            return Err(Error::invalid(
                format!("{field}[{i}]"),
                "must not contain control characters",
            ));
        }
        if seen.insert(t.clone()) {
            out.push(t);
        }
    }
    Ok(out)
}

/// A query, validated: at most `limits.max_tags` items, each with at most that many types and
/// tags, every one well formed.
pub fn query(field: &str, q: Option<proto::Query>, limits: &Limits) -> Result<Option<Query>> {
    let Some(q) = q else { return Ok(None) };
    if q.items.len() > limits.max_tags {
        return Err(Error::invalid(
            format!("{field}.items"),
            format!("at most {} items (limits.max_tags)", limits.max_tags),
        ));
    }
    let mut items = Vec::with_capacity(q.items.len());
    for (i, item) in q.items.into_iter().enumerate() {
        let at = format!("{field}.items[{i}]");
        event_types(&item.types, limits).map_err(|e| under(e, || format!("{at}.types")))?;
        if item.types.len() > limits.max_tags {
            return Err(Error::invalid(
                format!("{at}.types"),
                format!("at most {} types (limits.max_tags)", limits.max_tags),
            ));
        }
        let tags = tags(&format!("{at}.tags"), item.tags, limits)?;
        items.push(QueryItem {
            types: item.types,
            tags,
        });
    }
    Ok(Some(Query { items }))
}

/// Longest `max_age` accepted: about 9,999 years (stored in microseconds, it stays far inside
/// PostgreSQL's interval range).
const MAX_AGE_SECS: i64 = 9_999 * 365 * 24 * 3600;

/// A SetStreamMetadataRequest's rule.
pub fn retention(r: &proto::SetStreamMetadataRequest) -> Result<Retention> {
    if r.max_count == Some(0) {
        return Err(Error::invalid(
            "max_count",
            "must be at least 1 (absent: no limit)",
        ));
    }
    let max_age = match &r.max_age {
        None => None,
        Some(d) => {
            if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
                return Err(Error::invalid("max_age", "must be positive"));
            }
            if d.seconds > MAX_AGE_SECS {
                return Err(Error::invalid("max_age", "must be at most 9999 years"));
            }
            let age = Duration::new(d.seconds as u64, d.nanos as u32);
            if age < Duration::from_micros(1) {
                return Err(Error::invalid(
                    "max_age",
                    "must be at least 1 microsecond (absent: no limit)",
                ));
            }
            Some(age)
        }
    };
    for (field, value) in [
        ("max_count", r.max_count),
        ("truncate_before", r.truncate_before),
    ] {
        if value.is_some_and(|v| v > i64::MAX as u64) {
            return Err(Error::invalid(field, "must be at most 2^63 - 1"));
        }
    }
    Ok(Retention {
        max_count: r.max_count,
        max_age,
        truncate_before: r.truncate_before,
    })
}

/// An AppendRequest, validated into a command.
pub fn append(mut req: proto::AppendRequest, limits: &Limits) -> Result<AppendCommand> {
    use proto::append_request::ExpectedVersion as Ev;
    // A Dynamic Consistency Boundary append (a condition, or tagged events) need not name a
    // stream: its events go to the default one.
    if req.stream_id.is_empty()
        && (req.condition.is_some() || req.events.iter().any(|e| !e.tags.is_empty()))
    {
        req.stream_id = DCB_STREAM.to_owned();
    }
    name("stream_id", &req.stream_id, limits.max_stream_id_bytes)?;
    let expected = expected_version(
        "expected_version",
        req.expected_version.map(|e| match e {
            Ev::Any(b) => Expected::Any(b),
            Ev::NoStream(b) => Expected::NoStream(b),
            Ev::StreamExists(b) => Expected::StreamExists(b),
            Ev::Exact(v) => Expected::Exact(v),
        }),
    )?;
    if req.events.is_empty() {
        return Err(Error::invalid("events", "at least one event is required"));
    }
    event_count(req.events.len(), limits)?;
    let idempotency_key = idempotency_key(req.idempotency_key, limits)?;
    let condition = condition(req.condition, limits)?;
    let mut seen = EventsSeen::default();
    let events = seen.take("", req.events, limits)?;
    seen.finish(limits)?;
    Ok(AppendCommand {
        parts: vec![StreamAppend {
            stream_id: req.stream_id,
            expected,
            events,
        }],
        client_event_ids: seen.client_ids != 0,
        idempotency_key,
        condition,
    })
}

/// A MultiStreamAppendRequest, validated into a command: at least one part, each stream once,
/// every part with events; the limits on an append's events and bytes hold for the whole call.
pub fn multi_stream_append(
    req: proto::MultiStreamAppendRequest,
    limits: &Limits,
) -> Result<AppendCommand> {
    use proto::append_part::ExpectedVersion as Ev;
    if req.parts.is_empty() {
        return Err(Error::invalid("parts", "at least one part is required"));
    }
    event_count(req.parts.iter().map(|p| p.events.len()).sum(), limits)?;
    let mut streams = HashSet::new();
    for (p, part) in req.parts.iter().enumerate() {
        name(
            &format!("parts[{p}].stream_id"),
            &part.stream_id,
            limits.max_stream_id_bytes,
        )?;
        if !streams.insert(part.stream_id.as_str()) {
            return Err(Error::invalid(
                format!("parts[{p}].stream_id"),
                format!(
                    "stream {:?} is in an earlier part: give each stream one part",
                    part.stream_id
                ),
            ));
        }
        if part.events.is_empty() {
            return Err(Error::invalid(
                format!("parts[{p}].events"),
                "at least one event is required",
            ));
        }
    }
    let idempotency_key = idempotency_key(req.idempotency_key, limits)?;
    let condition = condition(req.condition, limits)?;
    let mut seen = EventsSeen::default();
    let mut parts = Vec::with_capacity(req.parts.len());
    for (p, part) in req.parts.into_iter().enumerate() {
        let expected = expected_version(
            &format!("parts[{p}].expected_version"),
            part.expected_version.map(|e| match e {
                Ev::Any(b) => Expected::Any(b),
                Ev::NoStream(b) => Expected::NoStream(b),
                Ev::StreamExists(b) => Expected::StreamExists(b),
                Ev::Exact(v) => Expected::Exact(v),
            }),
        )?;
        let events = seen.take(&format!("parts[{p}]."), part.events, limits)?;
        parts.push(StreamAppend {
            stream_id: part.stream_id,
            expected,
            events,
        });
    }
    seen.finish(limits)?;
    Ok(AppendCommand {
        parts,
        client_event_ids: seen.client_ids != 0,
        idempotency_key,
        condition,
    })
}

/// An expected-version oneof, whichever message it came in.
enum Expected {
    Any(bool),
    NoStream(bool),
    StreamExists(bool),
    Exact(u64),
}

fn expected_version(field: &str, e: Option<Expected>) -> Result<ExpectedVersion> {
    Ok(match e {
        None | Some(Expected::Any(true)) => ExpectedVersion::Any,
        Some(Expected::NoStream(true)) => ExpectedVersion::NoStream,
        Some(Expected::StreamExists(true)) => ExpectedVersion::StreamExists,
        Some(Expected::Exact(v)) => {
            position(&format!("{field}.exact"), v)?;
            ExpectedVersion::Exact(v)
        }
        Some(Expected::Any(false) | Expected::NoStream(false) | Expected::StreamExists(false)) => {
            return Err(Error::invalid(
                field,
                "any, no_stream and stream_exists must be true when set",
            ));
        }
    })
}

fn event_count(n: usize, limits: &Limits) -> Result<()> {
    if n > limits.max_events_per_append {
        return Err(Error::TooLarge {
            what: "events per append (count)".into(),
            limit: limits.max_events_per_append,
            actual: n,
        });
    }
    Ok(())
}

fn idempotency_key(key: String, limits: &Limits) -> Result<Option<String>> {
    if key.is_empty() {
        return Ok(None);
    }
    name("idempotency_key", &key, limits.max_stream_id_bytes)?;
    Ok(Some(key))
}

fn condition(
    c: Option<proto::AppendCondition>,
    limits: &Limits,
) -> Result<Option<AppendCondition>> {
    let Some(c) = c else { return Ok(None) };
    position("condition.after_sequence", c.after_sequence)?;
    Ok(Some(AppendCondition {
        query: query(
            "condition.fail_if_events_match",
            c.fail_if_events_match,
            limits,
        )?
        .unwrap_or_default(),
        after: c.after_sequence,
    }))
}

/// What the events of one append have in common: ids chosen for all or none, each id once, the
/// payload bytes within `limits.max_append_bytes`.
#[derive(Default)]
struct EventsSeen {
    count: usize,
    client_ids: usize,
    ids: HashSet<Uuid>,
    bytes: usize,
}

impl EventsSeen {
    /// The events of a part (`at`: its field path prefix, empty for an Append's events).
    fn take(
        &mut self,
        at: &str,
        list: Vec<proto::EventData>,
        limits: &Limits,
    ) -> Result<Vec<NewEvent>> {
        let mut events = Vec::with_capacity(list.len());
        for (i, e) in list.into_iter().enumerate() {
            let (ev, client_id) = event(i, e, limits).map_err(|e| under_prefix(e, at))?;
            if client_id {
                self.client_ids += 1;
                if !self.ids.insert(ev.event_id) {
                    return Err(Error::invalid(
                        format!("{at}events[{i}].event_id"),
                        format!("{} appears twice in this append", ev.event_id),
                    ));
                }
            }
            self.bytes += ev.payload.len() + ev.metadata.as_ref().map_or(0, String::len);
            events.push(ev);
        }
        self.count += events.len();
        Ok(events)
    }

    fn finish(&self, limits: &Limits) -> Result<()> {
        if self.bytes > limits.max_append_bytes {
            return Err(Error::TooLarge {
                what: "append (payloads and metadata)".into(),
                limit: limits.max_append_bytes,
                actual: self.bytes,
            });
        }
        if self.client_ids != 0 && self.client_ids != self.count {
            return Err(Error::invalid(
                "events.event_id",
                "give an event id for every event of an append, or for none",
            ));
        }
        Ok(())
    }
}

/// An event's error, under its part's field path.
fn under_prefix(e: Error, at: &str) -> Error {
    if at.is_empty() {
        return e;
    }
    match e {
        Error::InvalidArgument { field, reason } => Error::InvalidArgument {
            field: format!("{at}{field}"),
            reason,
        },
        other => other,
    }
}

/// An error found under a short field name, put under its full path.
fn under(e: Error, path: impl FnOnce() -> String) -> Error {
    match e {
        Error::InvalidArgument { reason, .. } => Error::InvalidArgument {
            field: path(),
            reason,
        },
        other => other,
    }
}

/// One event; the flag says whether the client chose its id.
fn event(i: usize, e: proto::EventData, limits: &Limits) -> Result<(NewEvent, bool)> {
    use proto::event_data::Payload as P;
    let field = |f: &str| format!("events[{i}].{f}");
    let (event_id, client_id) = if e.event_id.is_empty() {
        // The writer assigns it from the event's sequence (store::ids).
        (Uuid::nil(), false)
    } else {
        let id = Uuid::parse_str(&e.event_id)
            .map_err(|err| Error::invalid(field("event_id"), format!("not a UUID: {err}")))?;
        if id.is_nil() {
            return Err(Error::invalid(
                field("event_id"),
                "must not be the nil UUID",
            ));
        }
        (id, true)
    };
    // Field paths are formatted only for an error: this runs for every event.
    name("event_type", &e.event_type, limits.max_event_type_bytes)
        .map_err(|err| under(err, || field("event_type")))?;
    let content_type = if e.content_type.is_empty() {
        DEFAULT_CONTENT_TYPE.to_owned()
    } else {
        let ct = &e.content_type;
        if ct.len() > MAX_CONTENT_TYPE_BYTES
            || !ct.contains('/')
            || !ct.bytes().all(|b| (0x20..0x7f).contains(&b))
        {
            return Err(Error::invalid(
                field("content_type"),
                format!(
                    "must be a media type like application/json (printable ASCII, at most {MAX_CONTENT_TYPE_BYTES} bytes)"
                ),
            ));
        }
        ct.clone()
    };
    let size = match &e.payload {
        Some(P::Json(s)) => s.len(),
        Some(P::Data(b)) => b.len(),
        None => 0,
    };
    if size > limits.max_event_bytes {
        return Err(Error::TooLarge {
            what: format!("events[{i}] payload"),
            limit: limits.max_event_bytes,
            actual: size,
        });
    }
    let payload = if is_json_content_type(&content_type) {
        let text = match e.payload {
            Some(P::Json(s)) => s,
            Some(P::Data(b)) => String::from_utf8(b.to_vec())
                .map_err(|_| Error::invalid(field("data"), "JSON content must be UTF-8 text"))?,
            None => {
                return Err(Error::invalid(
                    field("json"),
                    "a JSON content type needs a JSON payload",
                ));
            }
        };
        json("json", &text).map_err(|err| under(err, || field("json")))?;
        Payload::Json(text)
    } else {
        Payload::Bytes(match e.payload {
            Some(P::Json(s)) => Bytes::from(s),
            Some(P::Data(b)) => b,
            None => Bytes::new(),
        })
    };
    let metadata = if e.metadata.is_empty() {
        None
    } else {
        if e.metadata
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0'))
        {
            return Err(Error::invalid(
                field("metadata"),
                "must not contain NUL characters",
            ));
        }
        let text = serde_json::to_string(&e.metadata)
            .map_err(|err| Error::Internal(format!("metadata encoding: {err}")))?;
        if text.len() > limits.max_metadata_bytes {
            return Err(Error::TooLarge {
                what: format!("events[{i}] metadata"),
                limit: limits.max_metadata_bytes,
                actual: text.len(),
            });
        }
        Some(text)
    };
    let timestamp = e
        .timestamp
        .as_ref()
        .map(|ts| timestamp(&field("timestamp"), ts))
        .transpose()?;
    let tags = tags(&field("tags"), e.tags, limits)?;
    Ok((
        NewEvent {
            event_id,
            event_type: e.event_type,
            content_type,
            payload,
            metadata,
            timestamp,
            tags: (!tags.is_empty())
                .then(|| tags.join(crate::store::query::TAG_SEPARATOR.encode_utf8(&mut [0; 4]))),
        },
        client_id,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_validation_matches_jsonb() {
        assert!(json("f", r#"{"a":[1,2,{"b":null}]}"#).is_ok());
        assert!(json("f", "42").is_ok());
        assert!(
            json("f", r#"{"a":"\\u0000"}"#).is_ok(),
            "an escaped backslash is fine"
        );
        assert!(json("f", r#"{"a":"\u0000"}"#).is_err());
        assert!(json("f", r#"{"a":1"#).is_err());
        assert!(json("f", "").is_err());
        assert!(json("f", "{} {}").is_err());
        assert!(json("f", r#""\ud800""#).is_err(), "lone surrogate");
    }

    #[test]
    fn names() {
        assert!(name("s", "order-1", 10).is_ok());
        assert!(name("s", "", 10).is_err());
        assert!(name("s", "01234567890", 10).is_err());
        assert!(name("s", "a\nb", 10).is_err());
    }
}
