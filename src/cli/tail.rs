//! `pgstore tail`: prints events as they are committed, from a subscription.

use std::io::Write;

use base64::Engine;
use tokio_stream::StreamExt;

use crate::client::{Connect, status_line};
use crate::proto::{
    RecordedEvent, SubscribeRequest, event_store_client::EventStoreClient, recorded_event,
    subscribe_request::Start, subscribe_response::Message,
};

/// What to print.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Only this stream.
    pub stream: Option<String>,
    /// Only streams whose id starts with this.
    pub prefix: Option<String>,
    /// Only these event types (all when empty).
    pub types: Vec<String>,
    /// Where to start.
    pub start: StartAt,
}

/// Where a tail starts.
#[derive(Debug, Clone, Copy)]
pub enum StartAt {
    /// The start of the log.
    Start,
    /// Events committed after the tail starts.
    End,
    /// This global sequence (inclusive).
    Sequence(u64),
}

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// One readable line per event.
    Text,
}

/// Prints matching events to `out` until `stop` completes (Ok), the output is closed (Ok), or
/// the server ends the subscription or cannot be reached (Err with a one-line reason).
pub async fn run(
    connect: &Connect,
    filter: &Filter,
    format: Format,
    out: &mut (dyn Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let mut client = EventStoreClient::new(connect.channel().await?);
    let prefix = filter
        .stream
        .clone()
        .or_else(|| filter.prefix.clone())
        .unwrap_or_default();
    let request = SubscribeRequest {
        start: Some(match filter.start {
            StartAt::Start => Start::FromSequence(1),
            StartAt::End => Start::FromEnd(true),
            StartAt::Sequence(n) => Start::FromSequence(n),
        }),
        event_types: filter.types.clone(),
        stream_prefix: prefix,
        ..Default::default()
    };
    let mut stream = client
        .subscribe(request)
        .await
        .map_err(|s| format!("{}: {}", connect.uri(), status_line(&s)))?
        .into_inner();
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            _ = &mut stop => return Ok(()),
            m = stream.next() => m,
        };
        let message = match message {
            None => return Err(format!("{}: the server ended the stream", connect.uri())),
            Some(Err(s)) => return Err(format!("{}: {}", connect.uri(), status_line(&s))),
            Some(Ok(m)) => m,
        };
        let line = match message.message {
            Some(Message::Event(e)) => {
                if filter.stream.as_ref().is_some_and(|s| *s != e.stream_id) {
                    continue;
                }
                match format {
                    Format::Json => json_line(&e),
                    Format::Text => text_line(&e),
                }
            }
            Some(Message::CaughtUp(c)) if format == Format::Text => {
                format!("-- caught up at sequence {}; live from here", c.sequence)
            }
            _ => continue,
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (`pgstore tail | head`): not an error.
            return Ok(());
        }
    }
}

fn payload(e: &RecordedEvent) -> (&'static str, serde_json::Value) {
    match &e.payload {
        Some(recorded_event::Payload::Json(text)) => (
            "data",
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone())),
        ),
        Some(recorded_event::Payload::Data(bytes)) => (
            "data_base64",
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
        None => ("data", serde_json::Value::Null),
    }
}

/// The event as one JSON object: the payload as JSON under `data` for JSON content types, as
/// base64 under `data_base64` otherwise.
pub fn json_line(e: &RecordedEvent) -> String {
    let mut m = serde_json::Map::new();
    m.insert("global_sequence".into(), e.global_sequence.into());
    m.insert("stream_id".into(), e.stream_id.clone().into());
    m.insert("version".into(), e.version.into());
    m.insert("event_type".into(), e.event_type.clone().into());
    m.insert("event_id".into(), e.event_id.clone().into());
    m.insert("content_type".into(), e.content_type.clone().into());
    if let Some(t) = &e.recorded_at {
        m.insert("recorded_at".into(), t.to_string().into());
    }
    if let Some(t) = &e.timestamp {
        m.insert("timestamp".into(), t.to_string().into());
    }
    if !e.metadata.is_empty() {
        let meta: std::collections::BTreeMap<_, _> = e.metadata.iter().collect();
        m.insert(
            "metadata".into(),
            serde_json::to_value(meta).expect("strings serialize"),
        );
    }
    let (key, value) = payload(e);
    m.insert(key.into(), value);
    serde_json::Value::Object(m).to_string()
}

/// The event on one readable line: `#sequence stream@version type payload`.
pub fn text_line(e: &RecordedEvent) -> String {
    let (_, value) = payload(e);
    format!(
        "#{} {}@{} {} {}",
        e.global_sequence, e.stream_id, e.version, e.event_type, value
    )
}
