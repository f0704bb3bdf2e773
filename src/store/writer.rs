//! The write path: one writer task per instance with group commit.
//!
//! Appends queue on a bounded channel. The writer takes every append waiting at that moment (up to
//! a batch limit, never waiting artificially) and commits them in ONE transaction:
//!
//! 1. `BEGIN`, lock the head row (`SELECT ... FOR UPDATE`: the global lock that makes sequences
//!    visible in commit order), read the versions and states of the streams involved, and look up
//!    client event ids and idempotency keys already stored: one pipelined round trip.
//! 2. In memory, check every append in queue order against the versions as its batch-mates leave
//!    them: a conflicting append fails alone, a retry gets its original result.
//! 3. One `pgstore.append_batch(...)` statement (migration 0004) takes the rows as arrays, inserts
//!    all events, upserts stream versions, moves the head, records idempotency keys and
//!    `pg_notify`s the new head once; `COMMIT` follows in the same round trip.
//! 4. Answer every caller.
//!
//! A commit costs one WAL flush whether it carries one append or hundreds.
//!
//! **One round trip when the writer remembers.** After each commit the writer remembers the log
//! head and the versions of the streams it saw. When every stream of the next batch is
//! remembered and the batch plans without a conflict or retry, the whole append is ONE statement
//! in its own implicit transaction: `pgstore.append_batch` with the remembered head and versions,
//! which takes the global lock and raises `PGS01` unless the memory is exactly right before it
//! writes anything. If the check fails (another instance wrote, a lifecycle change) or a client
//! event id or idempotency key turns out to be stored already (unique violation), nothing was
//! written; the writer forgets, and commits the batch the two-round-trip way, which reads first.
//! After a failed check the one-round-trip path rests for a while ([`FAST_PATH_REST`]), so several
//! instances writing to one database do not pay a wasted round trip per batch.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use postgres_types::ToSql;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    AppendCommand, AppendOutcome, Payload, StreamState,
    db::{self, JsonRef, PgConn, is_connection_error},
    partition_key,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Group-commit settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Appends that may wait for the writer (back-pressure beyond it).
    pub queue_depth: usize,
    /// Most appends in one transaction.
    pub max_batch_appends: usize,
    /// Most events in one transaction (a single larger append still goes alone).
    pub max_batch_events: usize,
    /// How long to wait when (re)connecting.
    pub connect_timeout: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue_depth: 4096,
            max_batch_appends: 1000,
            max_batch_events: 10_000,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

struct Request {
    cmd: AppendCommand,
    reply: oneshot::Sender<Result<AppendOutcome>>,
}

/// The way into the writer.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
    head: watch::Receiver<u64>,
}

impl Handle {
    /// Queues an append and waits for its commit.
    pub async fn append(&self, cmd: AppendCommand) -> Result<AppendOutcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { cmd, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// The head this instance's writer last committed (0 before its first commit).
    pub fn committed_head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }
}

/// Starts the writer. It runs until `shutdown` is cancelled, then commits what was already queued
/// and stops.
pub fn spawn(
    config: tokio_postgres::Config,
    channel: String,
    settings: WriterConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (Handle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(settings.queue_depth);
    let (head_tx, head) = watch::channel(0);
    let writer = Writer {
        config,
        channel,
        settings,
        conn: None,
        head: head_tx,
        metrics,
        memory: Memory::default(),
    };
    let task = tokio::spawn(writer.run(rx, shutdown));
    (Handle { tx, head }, task)
}

struct Writer {
    config: tokio_postgres::Config,
    channel: String,
    settings: WriterConfig,
    conn: Option<PgConn>,
    head: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    memory: Memory,
}

const BEGIN: &str = "BEGIN";
const COMMIT: &str = "COMMIT";
const ROLLBACK: &str = "ROLLBACK";
const LOCK_HEAD: &str = "SELECT seq FROM pgstore.head FOR UPDATE";
const READ_STREAMS: &str =
    "SELECT stream_id, version, state FROM pgstore.streams WHERE stream_id = ANY($1)";
const FIND_EVENT_IDS: &str =
    "SELECT event_id, stream_id, version, seq FROM pgstore.events WHERE event_id = ANY($1)";
const FIND_KEYS: &str = "SELECT key, stream_id, version, first_seq, last_seq \
     FROM pgstore.idempotency_keys WHERE key = ANY($1)";
/// Every write of a batch in one statement (migration 0004).
const APPEND_BATCH: &str = "SELECT pgstore.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
     $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)";

/// The SQLSTATE `pgstore.append_batch` raises when the writer's memory is stale.
const STALE_MEMORY: &str = "PGS01";
/// How long the one-round-trip path rests after the memory proved stale.
pub const FAST_PATH_REST: Duration = Duration::from_secs(1);
/// Most streams remembered (beyond it the memory starts afresh).
const REMEMBERED_STREAMS: usize = 100_000;

/// What the writer knows of the database from its own transactions.
#[derive(Default)]
struct Memory {
    /// The log head after the last transaction, if known.
    head: Option<u64>,
    /// Stream versions and states as last seen or written.
    streams: HashMap<String, (u64, StreamState)>,
    /// No one-round-trip attempt before this.
    rest_until: Option<std::time::Instant>,
}

impl Memory {
    fn forget(&mut self) {
        self.head = None;
        self.streams.clear();
    }

    fn remember(
        &mut self,
        head: u64,
        streams: impl IntoIterator<Item = (String, (u64, StreamState))>,
    ) {
        if self.streams.len() > REMEMBERED_STREAMS {
            self.streams.clear();
        }
        self.head = Some(head);
        self.streams.extend(streams);
    }

    /// A stream as just written (a stream already remembered costs no allocation).
    fn set(&mut self, stream: &str, version: (u64, StreamState)) {
        match self.streams.get_mut(stream) {
            Some(v) => *v = version,
            None => {
                self.streams.insert(stream.to_owned(), version);
            }
        }
    }

    /// A snapshot to plan `cmds` from without reading, if every stream is remembered.
    fn snapshot(&self, cmds: &[&AppendCommand]) -> Option<Snapshot> {
        let head = self.head?;
        if self
            .rest_until
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return None;
        }
        let mut streams = HashMap::new();
        for c in cmds {
            let s = self.streams.get(c.stream_id.as_str())?;
            streams.insert(c.stream_id.clone(), *s);
        }
        Some(Snapshot {
            head,
            streams,
            event_ids: HashMap::new(),
            keys: HashMap::new(),
        })
    }
}

/// Where an already-stored event or keyed append sits.
#[derive(Clone)]
struct Stored {
    stream_id: String,
    version: u64,
    seq: u64,
}

/// What phase 1 read under the lock.
struct Snapshot {
    head: u64,
    streams: HashMap<String, (u64, StreamState)>,
    event_ids: HashMap<Uuid, Stored>,
    keys: HashMap<String, AppendOutcomeWithStream>,
}

#[derive(Clone)]
struct AppendOutcomeWithStream {
    stream_id: String,
    outcome: AppendOutcome,
}

/// The rows of one transaction, column by column.
/// Columns borrow from the appends: payloads are not copied on their way to the database.
#[derive(Default)]
struct Rows<'a> {
    seq: Vec<i64>,
    stream_id: Vec<&'a str>,
    version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<&'a str>,
    content_type: Vec<&'a str>,
    data: Vec<Option<JsonRef<'a>>>,
    data_bytes: Vec<Option<&'a [u8]>>,
    metadata: Vec<Option<JsonRef<'a>>>,
    created_at: Vec<Option<SystemTime>>,
    partition_key: Vec<i64>,
    /// Each stream written, once, with its final version.
    upsert_stream: Vec<&'a str>,
    upsert_version: Vec<i64>,
}

enum Failure {
    /// Every append in the batch gets this error.
    All(Error),
    /// A data error (a payload the server refused): retry the appends one by one so only the bad
    /// one fails.
    Data(Error),
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(self.settings.max_batch_appends);
        loop {
            let first = tokio::select! {
                biased;
                r = rx.recv() => r,
                _ = shutdown.cancelled() => { rx.close(); rx.recv().await }
            };
            let Some(first) = first else { break };
            let mut events = first.cmd.events.len();
            batch.push(first);
            while batch.len() < self.settings.max_batch_appends
                && events < self.settings.max_batch_events
            {
                match rx.try_recv() {
                    Ok(r) => {
                        events += r.cmd.events.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(std::mem::take(&mut batch)).await;
        }
        tracing::debug!("writer stopped");
    }

    /// Commits a batch and answers its callers.
    async fn commit(&mut self, batch: Vec<Request>) {
        let cmds: Vec<&AppendCommand> = batch.iter().map(|r| &r.cmd).collect();
        match self.try_commit(&cmds).await {
            Ok(results) => {
                let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
                self.metrics.appends.fetch_add(ok, Ordering::Relaxed);
                for (req, res) in batch.into_iter().zip(results) {
                    let _ = req.reply.send(res);
                }
            }
            Err(Failure::Data(_)) if batch.len() > 1 => {
                for req in batch {
                    Box::pin(self.commit(vec![req])).await;
                }
            }
            Err(Failure::Data(e) | Failure::All(e)) => {
                for req in batch {
                    let _ = req.reply.send(Err(clone_err(&e)));
                }
            }
        }
    }

    async fn connection(&mut self) -> Result<&mut PgConn> {
        if self.conn.as_ref().is_some_and(|c| c.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let conn =
                tokio::time::timeout(self.settings.connect_timeout, db::connect(&self.config))
                    .await
                    .map_err(|_| Error::Unavailable("timed out connecting to the primary".into()))?
                    .map_err(db::db_err)?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    async fn try_commit(
        &mut self,
        cmds: &[&AppendCommand],
    ) -> Result<Vec<Result<AppendOutcome>>, Failure> {
        if let Some(snapshot) = self.memory.snapshot(cmds) {
            let (rows, keys, results, new_head) = plan(cmds, &snapshot);
            let clean = results
                .iter()
                .all(|r| r.as_ref().is_ok_and(|o| !o.duplicate));
            if clean && !rows.seq.is_empty() {
                match self
                    .commit_in_one(&snapshot, &rows, &keys, new_head)
                    .await?
                {
                    true => return Ok(results),
                    false => {
                        self.metrics.append_rereads.fetch_add(1, Ordering::Relaxed);
                        self.memory.forget();
                        self.memory.rest_until = Some(std::time::Instant::now() + FAST_PATH_REST);
                    }
                }
            }
        }
        self.commit_in_two(cmds).await
    }

    /// The one-round-trip commit from memory. `Ok(false)`: the memory was stale (or an id or key
    /// is stored already) and nothing was written.
    async fn commit_in_one(
        &mut self,
        snapshot: &Snapshot,
        rows: &Rows<'_>,
        keys: &Keys<'_>,
        new_head: u64,
    ) -> Result<bool, Failure> {
        let channel = self.channel.clone();
        let conn = self.connection().await.map_err(Failure::All)?;
        let (stream_ids, versions): (Vec<&str>, Vec<i64>) = snapshot
            .streams
            .iter()
            .map(|(s, (v, _))| (s.as_str(), *v as i64))
            .unzip();
        let check = Check {
            head: snapshot.head as i64,
            stream_ids,
            versions,
        };
        match write_and_commit(conn, Some(&check), rows, keys, new_head, &channel).await {
            Ok(()) => {
                self.committed(rows, new_head, []);
                Ok(true)
            }
            Err((e, _))
                if e.code().is_some_and(|c| {
                    c.code() == STALE_MEMORY || *c == SqlState::UNIQUE_VIOLATION
                }) =>
            {
                // The failed statement aborted the transaction and COMMIT ended it: nothing
                // was written.
                Ok(false)
            }
            Err((e, commit_sent)) => Err(self.failed(e, commit_sent).await),
        }
    }

    /// The two-round-trip commit: read under the lock, check, write.
    async fn commit_in_two(
        &mut self,
        cmds: &[&AppendCommand],
    ) -> Result<Vec<Result<AppendOutcome>>, Failure> {
        let channel = self.channel.clone();
        let conn = self.connection().await.map_err(Failure::All)?;
        let read = read_under_lock(conn, cmds).await;
        let snapshot = match read {
            Ok(s) => s,
            Err(e) => return Err(Failure::All(self.abandon(e).await)),
        };
        let (rows, keys, results, new_head) = plan(cmds, &snapshot);
        let conn = self.conn.as_mut().expect("connected above");
        if rows.seq.is_empty() {
            // Nothing to write: every append failed its checks or was a retry.
            let rollback = conn.stmt(ROLLBACK).await;
            if let Err(e) = match rollback {
                Ok(s) => conn.client.execute(&s, &[]).await.map(|_| ()),
                Err(e) => Err(e),
            } {
                self.conn = None;
                self.memory.forget();
                tracing::warn!(error = %e, "rollback failed");
            } else {
                self.memory.remember(snapshot.head, snapshot.streams);
            }
            return Ok(results);
        }
        match write_and_commit(conn, None, &rows, &keys, new_head, &channel).await {
            Ok(()) => {
                self.committed(&rows, new_head, snapshot.streams);
                Ok(results)
            }
            Err((e, commit_sent)) => Err(self.failed(e, commit_sent).await),
        }
    }

    /// Bookkeeping after a commit: metrics, the head, the memory.
    fn committed(
        &mut self,
        rows: &Rows<'_>,
        new_head: u64,
        seen: impl IntoIterator<Item = (String, (u64, StreamState))>,
    ) {
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .events_written
            .fetch_add(rows.seq.len() as u64, Ordering::Relaxed);
        self.head.send_replace(new_head);
        self.memory.remember(new_head, seen);
        for (s, v) in rows.upsert_stream.iter().zip(&rows.upsert_version) {
            self.memory.set(s, (*v as u64, StreamState::Active));
        }
    }

    /// Maps a failed write: a data error lets the batch be retried append by append.
    async fn failed(&mut self, e: tokio_postgres::Error, commit_sent: bool) -> Failure {
        self.memory.forget();
        let data_error = e
            .code()
            .is_some_and(|c| c.code().starts_with("22") || *c == SqlState::CHECK_VIOLATION);
        let connection_lost = is_connection_error(&e);
        let err = self.abandon(e).await;
        if connection_lost && commit_sent {
            Failure::All(Error::CommitOutcomeUnknown)
        } else if data_error {
            Failure::Data(Error::invalid("events", err.to_string()))
        } else {
            Failure::All(err)
        }
    }

    /// Rolls back after an error (or drops a broken connection) and maps the error.
    async fn abandon(&mut self, e: tokio_postgres::Error) -> Error {
        if is_connection_error(&e) {
            self.conn = None;
        } else if let Some(conn) = self.conn.as_mut()
            && conn.client.batch_execute(ROLLBACK).await.is_err()
        {
            self.conn = None;
        }
        tracing::warn!(error = %e, "append batch failed");
        db::db_err(e)
    }
}

/// Phase 1: begin, take the global lock and read what the checks need, in one round trip.
async fn read_under_lock(
    conn: &mut PgConn,
    cmds: &[&AppendCommand],
) -> Result<Snapshot, tokio_postgres::Error> {
    let begin = conn.stmt(BEGIN).await?;
    let lock = conn.stmt(LOCK_HEAD).await?;
    let streams_stmt = conn.stmt(READ_STREAMS).await?;
    let ids_stmt = conn.stmt(FIND_EVENT_IDS).await?;
    let keys_stmt = conn.stmt(FIND_KEYS).await?;

    let mut stream_ids: Vec<&str> = cmds.iter().map(|c| c.stream_id.as_str()).collect();
    stream_ids.sort_unstable();
    stream_ids.dedup();
    let event_ids: Vec<Uuid> = cmds
        .iter()
        .filter(|c| c.client_event_ids)
        .flat_map(|c| c.events.iter().map(|e| e.event_id))
        .collect();
    let keys: Vec<&str> = cmds
        .iter()
        .filter_map(|c| c.idempotency_key.as_deref())
        .collect();

    let client = &conn.client;
    let stream_ids = &stream_ids;
    let event_ids = &event_ids;
    let keys = &keys;
    let find_ids = async {
        if event_ids.is_empty() {
            Ok(Vec::new())
        } else {
            client.query(&ids_stmt, &[event_ids]).await
        }
    };
    let find_keys = async {
        if keys.is_empty() {
            Ok(Vec::new())
        } else {
            client.query(&keys_stmt, &[keys]).await
        }
    };
    let stream_params: [&(dyn ToSql + Sync); 1] = [stream_ids];
    // `join!`, not `try_join!`: every statement's answer is awaited, and the error reported is
    // the first in pipeline order (later ones only say the transaction was aborted).
    let (begun, head_row, stream_rows, id_rows, key_rows) = tokio::join!(
        client.execute(&begin, &[]),
        client.query_one(&lock, &[]),
        client.query(&streams_stmt, &stream_params),
        find_ids,
        find_keys,
    );
    begun?;
    let (head_row, stream_rows, id_rows, key_rows) = (head_row?, stream_rows?, id_rows?, key_rows?);

    let head: i64 = head_row.get(0);
    let mut streams = HashMap::with_capacity(stream_rows.len());
    for r in stream_rows {
        let state = StreamState::from_code(r.get(2)).unwrap_or(StreamState::Active);
        streams.insert(r.get::<_, String>(0), (r.get::<_, i64>(1) as u64, state));
    }
    let event_ids = id_rows
        .into_iter()
        .map(|r| {
            (
                r.get::<_, Uuid>(0),
                Stored {
                    stream_id: r.get(1),
                    version: r.get::<_, i64>(2) as u64,
                    seq: r.get::<_, i64>(3) as u64,
                },
            )
        })
        .collect();
    let keys = key_rows
        .into_iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                AppendOutcomeWithStream {
                    stream_id: r.get(1),
                    outcome: AppendOutcome {
                        version: r.get::<_, i64>(2) as u64,
                        first_sequence: r.get::<_, i64>(3) as u64,
                        last_sequence: r.get::<_, i64>(4) as u64,
                        duplicate: true,
                    },
                },
            )
        })
        .collect();
    Ok(Snapshot {
        head: head as u64,
        streams,
        event_ids,
        keys,
    })
}

/// The idempotency keys to record, column by column.
#[derive(Default)]
struct Keys<'a> {
    key: Vec<&'a str>,
    stream_id: Vec<&'a str>,
    version: Vec<i64>,
    first: Vec<i64>,
    last: Vec<i64>,
}

/// Phase 2 in memory: checks each append in order and lays out the rows to write.
fn plan<'a>(
    cmds: &[&'a AppendCommand],
    snap: &Snapshot,
) -> (Rows<'a>, Keys<'a>, Vec<Result<AppendOutcome>>, u64) {
    let mut rows = Rows::default();
    let mut keys = Keys::default();
    let mut results = Vec::with_capacity(cmds.len());
    let mut streams: HashMap<&str, (u64, StreamState)> = HashMap::new();
    let mut batch_ids: HashMap<Uuid, Stored> = HashMap::new();
    let mut batch_keys: HashMap<&str, AppendOutcomeWithStream> = HashMap::new();
    let mut touched: Vec<&str> = Vec::new();
    let mut next_seq = snap.head + 1;

    for cmd in cmds {
        // A retry by idempotency key.
        if let Some(key) = cmd.idempotency_key.as_deref() {
            let prior = batch_keys.get(key).or_else(|| snap.keys.get(key));
            if let Some(prior) = prior {
                results.push(if prior.stream_id == cmd.stream_id {
                    Ok(AppendOutcome {
                        duplicate: true,
                        ..prior.outcome
                    })
                } else {
                    Err(Error::IdempotencyKeyConflict {
                        key: key.to_owned(),
                        stream_id: prior.stream_id.clone(),
                    })
                });
                continue;
            }
        }
        // A retry by event ids.
        if cmd.client_event_ids
            && let Some(r) = retry_by_event_ids(cmd, &snap.event_ids, &batch_ids)
        {
            results.push(r);
            continue;
        }
        let (version, state) = *streams.entry(cmd.stream_id.as_str()).or_insert_with(|| {
            snap.streams
                .get(cmd.stream_id.as_str())
                .copied()
                .unwrap_or((0, StreamState::Active))
        });
        if state != StreamState::Active {
            results.push(Err(Error::StreamState {
                stream_id: cmd.stream_id.clone(),
                state,
                operation: "append",
            }));
            continue;
        }
        if !cmd.expected.admits(version) {
            results.push(Err(Error::WrongExpectedVersion {
                stream_id: cmd.stream_id.clone(),
                expected: cmd.expected,
                actual: version,
            }));
            continue;
        }
        let first = next_seq;
        let pk = i64::from(partition_key(&cmd.stream_id));
        for (i, e) in cmd.events.iter().enumerate() {
            let v = version + 1 + i as u64;
            rows.seq.push(next_seq as i64);
            rows.stream_id.push(&cmd.stream_id);
            rows.version.push(v as i64);
            rows.event_id.push(e.event_id);
            rows.event_type.push(&e.event_type);
            rows.content_type.push(&e.content_type);
            match &e.payload {
                Payload::Json(s) => {
                    rows.data.push(Some(JsonRef(s)));
                    rows.data_bytes.push(None);
                }
                Payload::Bytes(b) => {
                    rows.data.push(None);
                    rows.data_bytes.push(Some(b));
                }
            }
            rows.metadata.push(e.metadata.as_deref().map(JsonRef));
            rows.created_at.push(e.timestamp);
            rows.partition_key.push(pk);
            if cmd.client_event_ids {
                batch_ids.insert(
                    e.event_id,
                    Stored {
                        stream_id: cmd.stream_id.clone(),
                        version: v,
                        seq: next_seq,
                    },
                );
            }
            next_seq += 1;
        }
        let new_version = version + cmd.events.len() as u64;
        streams.insert(cmd.stream_id.as_str(), (new_version, state));
        if !touched.contains(&cmd.stream_id.as_str()) {
            touched.push(cmd.stream_id.as_str());
        }
        let outcome = AppendOutcome {
            version: new_version,
            first_sequence: first,
            last_sequence: next_seq - 1,
            duplicate: false,
        };
        if let Some(key) = cmd.idempotency_key.as_deref() {
            keys.key.push(key);
            keys.stream_id.push(&cmd.stream_id);
            keys.version.push(new_version as i64);
            keys.first.push(first as i64);
            keys.last.push(outcome.last_sequence as i64);
            batch_keys.insert(
                key,
                AppendOutcomeWithStream {
                    stream_id: cmd.stream_id.clone(),
                    outcome,
                },
            );
        }
        results.push(Ok(outcome));
    }
    for s in touched {
        rows.upsert_stream.push(s);
        rows.upsert_version.push(streams[s].0 as i64);
    }
    (rows, keys, results, next_seq - 1)
}

/// Whether an append whose client event ids are (partly) stored already is a retry of a committed
/// append (then its original result), a conflict, or new (`None`).
fn retry_by_event_ids(
    cmd: &AppendCommand,
    stored: &HashMap<Uuid, Stored>,
    batch: &HashMap<Uuid, Stored>,
) -> Option<Result<AppendOutcome>> {
    let found: Vec<Option<&Stored>> = cmd
        .events
        .iter()
        .map(|e| batch.get(&e.event_id).or_else(|| stored.get(&e.event_id)))
        .collect();
    let first_found = found.iter().position(Option::is_some)?;
    let all_found = found.iter().all(Option::is_some);
    if all_found {
        let first = found[0].expect("all found");
        let same_append = found.iter().enumerate().all(|(i, s)| {
            let s = s.expect("all found");
            s.stream_id == cmd.stream_id
                && s.version == first.version + i as u64
                && s.seq == first.seq + i as u64
        });
        if same_append {
            let last = found[found.len() - 1].expect("all found");
            return Some(Ok(AppendOutcome {
                version: last.version,
                first_sequence: first.seq,
                last_sequence: last.seq,
                duplicate: true,
            }));
        }
    }
    let s = found[first_found].expect("position found it");
    Some(Err(Error::EventIdConflict {
        event_id: cmd.events[first_found].event_id,
        stream_id: s.stream_id.clone(),
        version: s.version,
    }))
}

/// What `pgstore.append_batch` is to prove before it writes, in a one-round-trip commit.
struct Check<'a> {
    head: i64,
    stream_ids: Vec<&'a str>,
    versions: Vec<i64>,
}

/// Phase 3: write everything and notify with one `pgstore.append_batch` statement, then commit.
/// With `check`, that statement is the whole append: its own implicit transaction, which first
/// checks the writer's memory (one round trip, one message each way). Without, it runs in the
/// transaction phase 1 began, and `COMMIT` is pipelined after it. On error, says whether the
/// commit had been asked for (then the outcome is unknown if the connection dropped).
async fn write_and_commit(
    conn: &mut PgConn,
    check: Option<&Check<'_>>,
    rows: &Rows<'_>,
    keys: &Keys<'_>,
    new_head: u64,
    channel: &str,
) -> Result<(), (tokio_postgres::Error, bool)> {
    let prepared = async {
        Ok::<_, tokio_postgres::Error>((conn.stmt(APPEND_BATCH).await?, conn.stmt(COMMIT).await?))
    };
    let (append, commit) = prepared.await.map_err(|e| (e, false))?;
    let head = new_head as i64;
    let (check_head, check_streams, check_versions) = match check {
        Some(c) => (Some(c.head), Some(&c.stream_ids), Some(&c.versions)),
        None => (None, None, None),
    };
    let params: [&(dyn ToSql + Sync); 23] = [
        &check_head,
        &check_streams,
        &check_versions,
        &rows.seq,
        &rows.stream_id,
        &rows.version,
        &rows.event_id,
        &rows.event_type,
        &rows.content_type,
        &rows.data,
        &rows.data_bytes,
        &rows.metadata,
        &rows.created_at,
        &rows.partition_key,
        &rows.upsert_stream,
        &rows.upsert_version,
        &keys.key,
        &keys.stream_id,
        &keys.version,
        &keys.first,
        &keys.last,
        &head,
        &channel,
    ];
    let client = &conn.client;
    let result = if check.is_some() {
        client.execute(&append, &params).await.map(|_| ())
    } else {
        let (appended, committed) = tokio::join!(
            client.execute(&append, &params),
            client.execute(&commit, &[])
        );
        // The first error in pipeline order is the cause.
        appended.and(committed).map(|_| ())
    };
    result.map_err(|e| (e, true))
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::Unavailable(s) => Error::Unavailable(s.clone()),
        Error::CommitOutcomeUnknown => Error::CommitOutcomeUnknown,
        Error::ShuttingDown => Error::ShuttingDown,
        Error::InvalidArgument { field, reason } => Error::InvalidArgument {
            field: field.clone(),
            reason: reason.clone(),
        },
        other => Error::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ExpectedVersion, NewEvent};

    fn cmd(stream: &str, expected: ExpectedVersion, n: usize) -> AppendCommand {
        AppendCommand {
            stream_id: stream.into(),
            expected,
            events: (0..n)
                .map(|_| NewEvent {
                    event_id: Uuid::new_v4(),
                    event_type: "t".into(),
                    content_type: "application/json".into(),
                    payload: Payload::Json("{}".into()),
                    metadata: None,
                    timestamp: None,
                })
                .collect(),
            client_event_ids: false,
            idempotency_key: None,
        }
    }

    #[test]
    fn a_conflicting_append_fails_alone_and_batch_mates_see_each_other() {
        let snap = Snapshot {
            head: 10,
            streams: HashMap::from([("a".to_string(), (2, StreamState::Active))]),
            event_ids: HashMap::new(),
            keys: HashMap::new(),
        };
        let c1 = cmd("a", ExpectedVersion::Exact(2), 2);
        let c2 = cmd("a", ExpectedVersion::Exact(2), 1); // stale after c1
        let c3 = cmd("a", ExpectedVersion::Exact(4), 1);
        let c4 = cmd("b", ExpectedVersion::NoStream, 1);
        let (rows, _, results, head) = plan(&[&c1, &c2, &c3, &c4], &snap);
        assert_eq!(head, 14);
        assert_eq!(rows.seq, vec![11, 12, 13, 14]);
        assert_eq!(rows.version, vec![3, 4, 5, 1]);
        assert!(matches!(
            results[0],
            Ok(AppendOutcome {
                version: 4,
                first_sequence: 11,
                last_sequence: 12,
                ..
            })
        ));
        assert!(matches!(
            results[1],
            Err(Error::WrongExpectedVersion { actual: 4, .. })
        ));
        assert!(matches!(results[2], Ok(AppendOutcome { version: 5, .. })));
        assert!(matches!(
            results[3],
            Ok(AppendOutcome {
                version: 1,
                first_sequence: 14,
                ..
            })
        ));
    }
}
