//! Everything that talks to PostgreSQL: the group-commit writer, reads of streams and of the global
//! log, stream lifecycle, snapshots, checkpoints and migrations.

pub mod checkpoints;
pub mod db;
pub mod ids;
pub mod lifecycle;
pub mod migrate;
pub mod read;
pub mod readahead;
pub mod router;
pub mod snapshots;
pub mod target;
pub mod writer;

use std::{fmt, sync::Arc, time::Duration, time::SystemTime};

use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
pub use db::Pool;

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
}

impl StreamState {
    /// From the stored code.
    pub fn from_code(code: i16) -> Result<Self> {
        match code {
            1 => Ok(StreamState::Active),
            2 => Ok(StreamState::Archived),
            3 => Ok(StreamState::Tombstoned),
            other => Err(Error::Internal(format!("unknown stream state {other}"))),
        }
    }
}

impl fmt::Display for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamState::Active => "active",
            StreamState::Archived => "archived",
            StreamState::Tombstoned => "tombstoned",
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
}

/// A validated append.
#[derive(Debug, Clone)]
pub struct AppendCommand {
    /// The stream.
    pub stream_id: String,
    /// The concurrency check.
    pub expected: ExpectedVersion,
    /// The events (at least one).
    pub events: Vec<NewEvent>,
    /// Whether the client chose the event ids (then they are checked for retries).
    pub client_event_ids: bool,
    /// The idempotency key, if any.
    pub idempotency_key: Option<String>,
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The stream's version after the append.
    pub version: u64,
    /// The first global sequence written.
    pub first_sequence: u64,
    /// The last global sequence written.
    pub last_sequence: u64,
    /// Whether this was a retry of a committed append (nothing written).
    pub duplicate: bool,
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

/// What the store needs to run.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The primary.
    pub primary: target::Target,
    /// Pool size for the primary.
    pub pool_size: u32,
    /// How long a request waits for a pooled connection.
    pub pool_wait: Duration,
    /// The NOTIFY channel that carries the log head after every commit.
    pub events_channel: String,
    /// Group-commit settings.
    pub writer: writer::WriterConfig,
    /// Read replicas.
    pub replicas: Vec<target::Target>,
    /// Replica routing settings.
    pub replica: router::ReplicaConfig,
}

/// The store: cheap to clone, shared by every request handler.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    writer: writer::Handle,
    router: Arc<router::Router>,
    readahead: readahead::ReadAhead,
}

impl Store {
    /// Migrates the database, opens the pool and starts the writer. The writer stops when
    /// `shutdown` is cancelled, after finishing the appends it was given.
    pub async fn open(
        config: StoreConfig,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: CancellationToken,
    ) -> Result<(Store, JoinHandle<()>)> {
        let mut conn = db::connect(&config.primary).await?;
        migrate::migrate(&mut conn.client).await?;
        let prefix: i64 = conn
            .client
            .query_one("SELECT id_prefix FROM pgstore.store", &[])
            .await
            .map_err(db::db_err)?
            .get(0);
        drop(conn);
        let pool = db::pool(config.primary.clone(), config.pool_size, config.pool_wait);
        let router = Arc::new(router::Router::new(
            pool.clone(),
            config.replicas.clone(),
            config.replica.clone(),
            config.pool_wait,
            metrics.clone(),
        ));
        let (writer, task) = writer::spawn(
            config.primary.clone(),
            config.events_channel.clone(),
            config.writer.clone(),
            metrics,
            shutdown,
            ids::AssignedIds::new(prefix as u64),
        );
        Ok((
            Store {
                inner: Arc::new(Inner {
                    pool,
                    writer,
                    router,
                    // Each page read ahead holds a pooled connection while it is read: a quarter
                    // of the pool at most, so requests keep the rest.
                    readahead: readahead::ReadAhead::new((config.pool_size as usize / 4).max(1)),
                }),
            },
            task,
        ))
    }

    /// The primary's pool.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The read router (replicas, read-your-writes).
    pub fn router(&self) -> &Arc<router::Router> {
        &self.inner.router
    }

    /// Reads the global log through the router: from a replica when one can serve it.
    pub async fn read_log(&self, min_sequence: u64, q: &read::ReadQuery) -> Result<read::LogPage> {
        self.router().read(min_sequence, q).await
    }

    /// Reads a page of the global log for a client paging through it: like [`Store::read_log`],
    /// with the next page read ahead while the client takes this one (see [`readahead`]).
    pub async fn read_log_paging(
        &self,
        min_sequence: u64,
        q: &read::ReadQuery,
    ) -> Result<read::LogPage> {
        self.inner.readahead.read(self, min_sequence, q).await
    }

    /// Forgets the pages read ahead: after anything that removes events (DeleteStream).
    pub fn forget_read_ahead(&self) {
        self.inner.readahead.clear();
    }

    /// Appends through the group-commit writer.
    pub async fn append(&self, cmd: AppendCommand) -> Result<AppendOutcome> {
        self.inner.writer.append(cmd).await
    }

    /// The head this instance's writer last committed.
    pub fn committed_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.writer.committed_head()
    }

    /// Deletes idempotency keys recorded more than `age` ago, at most `batch` of them; returns how
    /// many. A retry with a deleted key is a new append.
    pub async fn prune_idempotency_keys(
        &self,
        age: std::time::Duration,
        batch: i64,
    ) -> Result<u64> {
        let conn = db::get(self.pool()).await?;
        conn.client
            .execute(
                "DELETE FROM pgstore.idempotency_keys WHERE key IN (\
                 SELECT key FROM pgstore.idempotency_keys \
                 WHERE created_at < now() - make_interval(secs => $1) \
                 ORDER BY created_at LIMIT $2)",
                &[&age.as_secs_f64(), &batch],
            )
            .await
            .map_err(db::db_err)
    }

    /// Checks that the primary answers.
    pub async fn ping(&self) -> Result<()> {
        let conn = db::get(self.pool()).await?;
        conn.client
            .simple_query("SELECT 1")
            .await
            .map_err(db::db_err)?;
        Ok(())
    }
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
