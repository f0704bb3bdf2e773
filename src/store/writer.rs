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
//! 3. One `pgstore.append_batch(...)` statement (migrations 0004 and 0007) takes the rows as arrays, inserts
//!    all events, upserts stream versions, moves the head, records idempotency keys and
//!    `pg_notify`s the new head once; `COMMIT` follows in the same round trip.
//! 4. Answer every caller.
//!
//! A commit costs one WAL flush whether it carries one append or hundreds.
//!
//! **One round trip when the writer remembers.** After each commit the writer remembers the log
//! head and the versions of the streams it saw. When every stream of the next batch is
//! remembered and the batch plans without a conflict or retry, the whole append is ONE statement
//! in its own implicit transaction: `pgstore.append_batch` with the remembered head and versions.
//! That statement takes the global lock and raises `PGS01` unless the memory is exactly right,
//! before it writes anything. If the check fails (another instance wrote, a lifecycle change) or a
//! client event id or idempotency key turns out to be stored already (unique violation), the
//! writer forgets, and commits the batch the two-round-trip way, which reads first. After a failed check the one-round-trip path rests for
//! a while ([`FAST_PATH_REST`]), so several instances writing to one database do not pay a wasted
//! round trip per batch.
//!
//! **Pipelined.** One-round-trip batches go out behind each other on the writer's connection, up
//! to [`WriterConfig::pipeline_depth`] in flight (while those in flight are large enough to be
//! worth it, [`PIPELINE_MIN_EVENTS`]), each planned on the memory as the batches
//! before it will leave it; PostgreSQL starts the next the moment the last one committed, instead
//! of waiting a round trip for the writer. A connection's statements run in order, so commits
//! stay in sequence order. Batches land in the order they were sent; when one did not commit,
//! those behind it fail their checks too (they expect the head it would have left), and all of
//! them are committed again, in queue order, the reading way once nothing is in flight.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use futures_util::{StreamExt, future::BoxFuture, stream::FuturesOrdered};
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
    ids::AssignedIds,
    partition_key,
    target::Target,
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
    /// Most one-round-trip batches in flight at once on the writer's connection.
    pub pipeline_depth: usize,
    /// How long a batch may take to commit before its callers are told the outcome is unknown
    /// and the connection is dropped.
    pub commit_timeout: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue_depth: 4096,
            max_batch_appends: 1000,
            max_batch_events: 10_000,
            pipeline_depth: 2,
            commit_timeout: Duration::from_secs(10),
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
    config: Target,
    channel: String,
    settings: WriterConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    ids: AssignedIds,
) -> (Handle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(settings.queue_depth);
    let (head_tx, head) = watch::channel(0);
    let writer = Writer {
        config,
        channel: channel.into(),
        settings,
        conn: None,
        in_flight: FuturesOrdered::new(),
        in_flight_events: 0,
        redo: Vec::new(),
        head: head_tx,
        metrics,
        memory: Memory::default(),
        ids,
    };
    let task = tokio::spawn(writer.run(rx, shutdown));
    (Handle { tx, head }, task)
}

struct Writer {
    config: Target,
    channel: Arc<str>,
    settings: WriterConfig,
    /// The connection to the primary, shared by the batches in flight on it.
    conn: Option<Arc<PgConn>>,
    /// One-round-trip batches sent and not yet landed, oldest first. Their statements are
    /// pipelined on the one connection, so PostgreSQL runs them in the order they were sent.
    in_flight: FuturesOrdered<BoxFuture<'static, Landed>>,
    /// Events of the batches in flight.
    in_flight_events: u64,
    /// Batches that landed without committing, to commit in turn once nothing is in flight.
    redo: Vec<Vec<Request>>,
    head: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    memory: Memory,
    /// The ids this store assigns to events appended without one.
    ids: AssignedIds,
}

const BEGIN: &str = "BEGIN";
const COMMIT: &str = "COMMIT";
const ROLLBACK: &str = "ROLLBACK";
const LOCK_HEAD: &str = "SELECT seq FROM pgstore.head FOR UPDATE";
const READ_STREAMS: &str =
    "SELECT stream_id, version, state FROM pgstore.streams WHERE stream_id = ANY($1)";
/// Client event ids stored already: through the unique index of ids outside this store's own
/// range, and, for ids inside it (`$2`, their sequences), through the primary key.
const FIND_EVENT_IDS: &str = "SELECT event_id, stream_id, version, seq FROM pgstore.events \
     WHERE event_id = ANY($1) AND NOT pgstore.assigned_event_id(event_id) \
     UNION ALL SELECT event_id, stream_id, version, seq FROM pgstore.events \
     WHERE seq = ANY($2) AND event_id = ANY($1)";
const FIND_KEYS: &str = "SELECT key, stream_id, version, first_seq, last_seq \
     FROM pgstore.idempotency_keys WHERE key = ANY($1)";
/// Every write of a batch in one statement (migrations 0004 and 0007).
const APPEND_BATCH: &str = "SELECT pgstore.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
     $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)";

/// The SQLSTATE `pgstore.append_batch` raises when the writer's memory is stale.
const STALE_MEMORY: &str = "PGS01";
/// How long the one-round-trip path rests after the memory proved stale.
pub const FAST_PATH_REST: Duration = Duration::from_secs(1);
/// Fewest events in flight for the next batch to be sent behind them. Smaller batches commit in
/// less than the round trip it would save, and waiting for them gathers the next batch larger:
/// fewer commits, fewer wake-ups of subscribers.
const PIPELINE_MIN_EVENTS: u64 = 64;
/// Most streams remembered (beyond it the memory starts afresh).
const REMEMBERED_STREAMS: usize = 100_000;

/// What the writer knows of the database from its own transactions (and, while batches are in
/// flight, what it will know once they commit).
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

/// The idempotency keys to record, column by column.
#[derive(Default)]
struct Keys<'a> {
    key: Vec<&'a str>,
    stream_id: Vec<&'a str>,
    version: Vec<i64>,
    first: Vec<i64>,
    last: Vec<i64>,
}

/// Phase 3's rows and keys: the events of every append that `results` say are written (a new,
/// successful outcome), at the sequences and versions the outcomes give.
fn lay_out<'a>(
    cmds: &[&'a AppendCommand],
    results: &[Result<AppendOutcome>],
    ids: AssignedIds,
) -> (Rows<'a>, Keys<'a>) {
    let mut rows = Rows::default();
    let mut keys = Keys::default();
    let mut upserted: HashMap<&str, usize> = HashMap::new();
    for (cmd, result) in cmds.iter().zip(results) {
        let Ok(o) = result else { continue };
        if o.duplicate {
            continue;
        }
        let first_version = o.version + 1 - cmd.events.len() as u64;
        let pk = i64::from(partition_key(&cmd.stream_id));
        for (i, e) in cmd.events.iter().enumerate() {
            let seq = o.first_sequence + i as u64;
            rows.seq.push(seq as i64);
            rows.stream_id.push(&cmd.stream_id);
            rows.version.push((first_version + i as u64) as i64);
            rows.event_id.push(if cmd.client_event_ids {
                e.event_id
            } else {
                ids.id(seq)
            });
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
        }
        match upserted.get(cmd.stream_id.as_str()) {
            Some(&i) => rows.upsert_version[i] = o.version as i64,
            None => {
                upserted.insert(&cmd.stream_id, rows.upsert_stream.len());
                rows.upsert_stream.push(&cmd.stream_id);
                rows.upsert_version.push(o.version as i64);
            }
        }
        if let Some(key) = cmd.idempotency_key.as_deref() {
            keys.key.push(key);
            keys.stream_id.push(&cmd.stream_id);
            keys.version.push(o.version as i64);
            keys.first.push(o.first_sequence as i64);
            keys.last.push(o.last_sequence as i64);
        }
    }
    (rows, keys)
}

enum Failure {
    /// Every append in the batch gets this error.
    All(Error),
    /// A data error (a payload the server refused): retry the appends one by one so only the bad
    /// one fails.
    Data(Error),
}

/// A one-round-trip batch on its way to the database.
struct Sent {
    batch: Vec<Request>,
    /// What each append gets once the batch commits.
    results: Vec<Result<AppendOutcome>>,
    /// The head and stream versions the batch was planned from, for `append_batch` to prove.
    check: Check,
    /// The head after the batch.
    new_head: u64,
    events: u64,
}

/// A sent batch back from the database.
struct Landed {
    sent: Sent,
    /// On error, whether the commit had been asked for; `None` when it did not land within
    /// the commit timeout.
    outcome: Result<(), Option<(tokio_postgres::Error, bool)>>,
}

/// What the writer does next.
enum Next {
    Landed(Landed),
    Request(Option<Request>),
    Close,
}

/// Whether a failed one-round-trip statement wrote nothing because the writer's memory was wrong:
/// the check failed, or a row it meant to insert is there already (an event id or an idempotency
/// key).
fn memory_was_stale(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code() == STALE_MEMORY || *c == SqlState::UNIQUE_VIOLATION)
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let mut closing = false;
        loop {
            let room = self.in_flight.is_empty()
                || (self.in_flight.len() < self.settings.pipeline_depth
                    && self.in_flight_events >= PIPELINE_MIN_EVENTS);
            let next = tokio::select! {
                biased;
                Some(landed) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    Next::Landed(landed)
                }
                r = rx.recv(), if room => Next::Request(r),
                _ = shutdown.cancelled(), if !closing => Next::Close,
            };
            match next {
                Next::Landed(landed) => self.land(landed),
                Next::Request(Some(first)) => {
                    let batch = self.gather(first, &mut rx);
                    self.send(batch).await;
                }
                Next::Request(None) => break,
                Next::Close => {
                    // Commit what is queued already, then stop.
                    closing = true;
                    rx.close();
                }
            }
            if !self.redo.is_empty() {
                self.land_all().await;
                for batch in std::mem::take(&mut self.redo) {
                    self.commit(batch).await;
                }
            }
        }
        self.land_all().await;
        tracing::debug!("writer stopped");
    }

    /// `first` and every append waiting behind it, up to the batch limits.
    fn gather(&self, first: Request, rx: &mut mpsc::Receiver<Request>) -> Vec<Request> {
        let mut events = first.cmd.events.len();
        let mut batch = Vec::with_capacity(16);
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
        batch
    }

    /// Sends a batch the one-round-trip way when the memory plans it cleanly (behind the batches
    /// in flight, planned on them); otherwise lands everything in flight and commits it in turn.
    async fn send(&mut self, batch: Vec<Request>) {
        let planned = {
            let cmds: Vec<&AppendCommand> = batch.iter().map(|r| &r.cmd).collect();
            self.memory.snapshot(&cmds).and_then(|snapshot| {
                let plan = plan(&cmds, &snapshot, self.ids);
                plan.clean().then(|| {
                    // The next batch is planned on this one.
                    self.memory.head = Some(plan.new_head);
                    for (s, v) in &plan.streams {
                        self.memory.set(s, (*v, StreamState::Active));
                    }
                    (plan.results, plan.new_head, Check::of(snapshot))
                })
            })
        };
        let Some((results, new_head, check)) = planned else {
            self.land_all().await;
            self.commit(batch).await;
            return;
        };
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => {
                self.memory.forget();
                for req in batch {
                    let _ = req.reply.send(Err(clone_err(&e)));
                }
                return;
            }
        };
        let events = batch.iter().map(|r| r.cmd.events.len() as u64).sum();
        let sent = Sent {
            batch,
            results,
            check,
            new_head,
            events,
        };
        if !self.in_flight.is_empty() {
            self.metrics
                .batches_pipelined
                .fetch_add(1, Ordering::Relaxed);
        }
        self.in_flight_events += sent.events;
        let channel = self.channel.clone();
        self.in_flight.push_back(Box::pin(send_in_one(
            conn,
            sent,
            channel,
            self.ids,
            self.settings.commit_timeout,
        )));
    }

    /// Answers a landed batch, or keeps it for redoing.
    fn land(&mut self, landed: Landed) {
        let Landed { sent, outcome } = landed;
        self.in_flight_events -= sent.events;
        match outcome {
            Ok(()) => {
                self.published(sent.events, sent.new_head);
                self.metrics
                    .appends
                    .fetch_add(sent.batch.len() as u64, Ordering::Relaxed);
                for (req, res) in sent.batch.into_iter().zip(sent.results) {
                    let _ = req.reply.send(res);
                }
            }
            Err(Some((e, _))) if memory_was_stale(&e) => {
                // The statement was its own transaction and rolled back: nothing was written.
                self.stale();
                self.redo.push(sent.batch);
            }
            Err(None) => {
                let e = self.timed_out();
                for req in sent.batch {
                    let _ = req.reply.send(Err(clone_err(&e)));
                }
            }
            Err(Some((e, commit_sent))) => {
                // Its own transaction ended with the statement: nothing to roll back.
                self.memory.forget();
                if is_connection_error(&e) {
                    self.conn = None;
                }
                tracing::warn!(error = %e, "append batch failed");
                match classify(e, commit_sent) {
                    Failure::Data(_) if sent.batch.len() > 1 => {
                        self.redo.extend(sent.batch.into_iter().map(|r| vec![r]));
                    }
                    Failure::Data(e) | Failure::All(e) => {
                        for req in sent.batch {
                            let _ = req.reply.send(Err(clone_err(&e)));
                        }
                    }
                }
            }
        }
    }

    /// Lands every batch in flight.
    async fn land_all(&mut self) {
        while let Some(landed) = self.in_flight.next().await {
            self.land(landed);
        }
    }

    /// The memory proved stale: forget it, and rest the one-round-trip path.
    fn stale(&mut self) {
        self.metrics.append_rereads.fetch_add(1, Ordering::Relaxed);
        self.memory.forget();
        self.memory.rest_until = Some(std::time::Instant::now() + FAST_PATH_REST);
    }

    /// A batch did not land within the commit timeout: nothing more is known of it. The
    /// connection is given up (the next batch reads afresh on a new one).
    fn timed_out(&mut self) -> Error {
        self.memory.forget();
        self.conn = None;
        self.metrics.commit_timeouts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            timeout = ?self.settings.commit_timeout,
            "append batch not committed within writer.commit_timeout; reconnecting"
        );
        Error::CommitOutcomeUnknown(format!(
            "not committed within writer.commit_timeout ({:?})",
            self.settings.commit_timeout
        ))
    }

    /// Commits a batch with nothing in flight and answers its callers.
    async fn commit(&mut self, batch: Vec<Request>) {
        debug_assert!(self.in_flight.is_empty());
        let cmds: Vec<&AppendCommand> = batch.iter().map(|r| &r.cmd).collect();
        let limit = self.settings.commit_timeout;
        let committed = match tokio::time::timeout(limit, self.try_commit(&cmds)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::All(self.timed_out())),
        };
        match committed {
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

    /// The connection, opened if there is none (or it broke).
    async fn connection(&mut self) -> Result<Arc<PgConn>> {
        if let Some(c) = &self.conn
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        // The connect is bounded by database.connect_timeout (see Target::connect).
        let conn = db::connect(&self.config).await?;
        let conn = Arc::new(conn);
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    async fn try_commit(
        &mut self,
        cmds: &[&AppendCommand],
    ) -> Result<Vec<Result<AppendOutcome>>, Failure> {
        if let Some(snapshot) = self.memory.snapshot(cmds) {
            let plan = plan(cmds, &snapshot, self.ids);
            if plan.clean() {
                match self
                    .commit_in_one(cmds, snapshot, &plan.results, plan.new_head)
                    .await?
                {
                    true => return Ok(plan.results),
                    false => self.stale(),
                }
            }
        }
        self.commit_in_two(cmds).await
    }

    /// The one-round-trip commit from memory. `Ok(false)`: the memory was stale (or an id or key
    /// is stored already) and nothing was written.
    async fn commit_in_one(
        &mut self,
        cmds: &[&AppendCommand],
        snapshot: Snapshot,
        results: &[Result<AppendOutcome>],
        new_head: u64,
    ) -> Result<bool, Failure> {
        let conn = self.connection().await.map_err(Failure::All)?;
        let check = Check::of(snapshot);
        let (rows, keys) = lay_out(cmds, results, self.ids);
        match write_and_commit(&conn, Some(&check), &rows, &keys, new_head, &self.channel).await {
            Ok(()) => {
                self.committed(&rows, new_head, []);
                Ok(true)
            }
            // The failed statement was its own transaction: nothing was written.
            Err((e, _)) if memory_was_stale(&e) => Ok(false),
            Err((e, commit_sent)) => Err(self.failed(&conn, e, commit_sent).await),
        }
    }

    /// The two-round-trip commit: read under the lock, check, write.
    async fn commit_in_two(
        &mut self,
        cmds: &[&AppendCommand],
    ) -> Result<Vec<Result<AppendOutcome>>, Failure> {
        let conn = self.connection().await.map_err(Failure::All)?;
        let snapshot = match read_under_lock(&conn, cmds, self.ids).await {
            Ok(s) => s,
            Err(e) => return Err(Failure::All(self.abandon(&conn, e).await)),
        };
        let plan = plan(cmds, &snapshot, self.ids);
        let (rows, keys) = lay_out(cmds, &plan.results, self.ids);
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
            return Ok(plan.results);
        }
        match write_and_commit(&conn, None, &rows, &keys, plan.new_head, &self.channel).await {
            Ok(()) => {
                self.committed(&rows, plan.new_head, snapshot.streams);
                Ok(plan.results)
            }
            Err((e, commit_sent)) => Err(self.failed(&conn, e, commit_sent).await),
        }
    }

    /// Bookkeeping after a commit in turn: metrics, the head, the memory.
    fn committed(
        &mut self,
        rows: &Rows<'_>,
        new_head: u64,
        seen: impl IntoIterator<Item = (String, (u64, StreamState))>,
    ) {
        self.published(rows.seq.len() as u64, new_head);
        self.memory.remember(new_head, seen);
        for (s, v) in rows.upsert_stream.iter().zip(&rows.upsert_version) {
            self.memory.set(s, (*v as u64, StreamState::Active));
        }
    }

    /// A commit landed: metrics, and the head for local subscribers (it only moves forward).
    fn published(&mut self, events: u64, new_head: u64) {
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .events_written
            .fetch_add(events, Ordering::Relaxed);
        self.head.send_if_modified(|h| {
            let moved = new_head > *h;
            *h = (*h).max(new_head);
            moved
        });
    }

    /// Maps a failed write in a transaction of its own: a data error lets the batch be retried
    /// append by append.
    async fn failed(
        &mut self,
        conn: &PgConn,
        e: tokio_postgres::Error,
        commit_sent: bool,
    ) -> Failure {
        self.memory.forget();
        self.roll_back(conn, &e).await;
        classify(e, commit_sent)
    }

    /// Rolls back after an error (or drops a broken connection) and maps the error.
    async fn abandon(&mut self, conn: &PgConn, e: tokio_postgres::Error) -> Error {
        self.roll_back(conn, &e).await;
        db::db_err(e)
    }

    /// Ends the transaction `e` aborted, or lets go of the connection if that fails too.
    async fn roll_back(&mut self, conn: &PgConn, e: &tokio_postgres::Error) {
        if is_connection_error(e) || conn.client.batch_execute(ROLLBACK).await.is_err() {
            self.conn = None;
        }
        tracing::warn!(error = %e, "append batch failed");
    }
}

/// Whether PostgreSQL refused the data (a payload it could not take).
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || *c == SqlState::CHECK_VIOLATION)
}

/// What the callers of a failed batch get: a lost connection after COMMIT was asked for leaves
/// the outcome unknown; a data error lets the batch be retried append by append.
fn classify(e: tokio_postgres::Error, commit_sent: bool) -> Failure {
    if is_connection_error(&e) && commit_sent {
        Failure::All(Error::CommitOutcomeUnknown(format!(
            "the connection to the primary was lost after COMMIT was sent: {}",
            crate::error::chain(&e)
        )))
    } else if is_data_error(&e) {
        Failure::Data(Error::invalid("events", db::db_err(e).to_string()))
    } else {
        Failure::All(db::db_err(e))
    }
}

/// A one-round-trip batch's statement, pipelined behind those in flight.
async fn send_in_one(
    conn: Arc<PgConn>,
    sent: Sent,
    channel: Arc<str>,
    ids: AssignedIds,
    limit: Duration,
) -> Landed {
    let outcome = {
        let cmds: Vec<&AppendCommand> = sent.batch.iter().map(|r| &r.cmd).collect();
        let (rows, keys) = lay_out(&cmds, &sent.results, ids);
        let written = write_and_commit(
            &conn,
            Some(&sent.check),
            &rows,
            &keys,
            sent.new_head,
            &channel,
        );
        match tokio::time::timeout(limit, written).await {
            Ok(r) => r.map_err(Some),
            Err(_) => Err(None),
        }
    };
    Landed { sent, outcome }
}

/// Phase 1: begin, take the global lock and read what the checks need, in one round trip.
async fn read_under_lock(
    conn: &PgConn,
    cmds: &[&AppendCommand],
    ids: AssignedIds,
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
            let seqs: Vec<i64> = event_ids
                .iter()
                .filter_map(|id| ids.seq(id))
                .map(|s| s as i64)
                .collect();
            client.query(&ids_stmt, &[event_ids, &seqs]).await
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

/// What one planning pass decided.
struct Plan<'a> {
    /// Each append's result, in queue order.
    results: Vec<Result<AppendOutcome>>,
    /// The head after the batch.
    new_head: u64,
    /// Each stream written, with its version after the batch.
    streams: Vec<(&'a str, u64)>,
}

impl Plan<'_> {
    /// Whether every append is written as new: the batch can go the one-round-trip way.
    fn clean(&self) -> bool {
        !self.results.is_empty()
            && self
                .results
                .iter()
                .all(|r| r.as_ref().is_ok_and(|o| !o.duplicate))
    }
}

/// Phase 2 in memory: checks each append in order against the snapshot and its batch-mates.
fn plan<'a>(cmds: &[&'a AppendCommand], snap: &Snapshot, ids: AssignedIds) -> Plan<'a> {
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
        // An id of this store's own form that no stored event has would be given again to the
        // event at its sequence.
        if cmd.client_event_ids
            && let Some((i, e)) = cmd
                .events
                .iter()
                .enumerate()
                .find(|(_, e)| ids.seq(&e.event_id).is_some())
        {
            results.push(Err(Error::invalid(
                format!("events[{i}].event_id"),
                format!(
                    "{} is of the form this store gives the events it assigns ids to, \
                     and no stored event has it",
                    e.event_id
                ),
            )));
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
        let n = cmd.events.len() as u64;
        if cmd.client_event_ids {
            for (i, e) in cmd.events.iter().enumerate() {
                batch_ids.insert(
                    e.event_id,
                    Stored {
                        stream_id: cmd.stream_id.clone(),
                        version: version + 1 + i as u64,
                        seq: first + i as u64,
                    },
                );
            }
        }
        next_seq += n;
        let new_version = version + n;
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
    let streams = touched.into_iter().map(|s| (s, streams[s].0)).collect();
    Plan {
        results,
        new_head: next_seq - 1,
        streams,
    }
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

/// What `pgstore.append_batch` is to prove, in a one-round-trip commit: the head and the stream
/// versions the batch was planned from.
struct Check {
    head: i64,
    stream_ids: Vec<String>,
    versions: Vec<i64>,
}

impl Check {
    fn of(snapshot: Snapshot) -> Check {
        let (stream_ids, versions) = snapshot
            .streams
            .into_iter()
            .map(|(s, (v, _))| (s, v as i64))
            .unzip();
        Check {
            head: snapshot.head as i64,
            stream_ids,
            versions,
        }
    }
}

/// Phase 3: write everything and notify with one `pgstore.append_batch` statement, then
/// commit. With `check`, that statement is the whole append: its own implicit transaction, which proves the writer's memory before it commits
/// (one round trip, one message each way). Without, it runs in the transaction phase 1 began,
/// and `COMMIT` is pipelined after it. On error, says whether the commit had been asked for (then
/// the outcome is unknown if the connection dropped).
async fn write_and_commit(
    conn: &PgConn,
    check: Option<&Check>,
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
        Error::CommitOutcomeUnknown(s) => Error::CommitOutcomeUnknown(s.clone()),
        Error::Timeout(s) => Error::Timeout(s.clone()),
        Error::Conflict(s) => Error::Conflict(s.clone()),
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

    const IDS: AssignedIds = AssignedIds::new(0x1234_5678_9abc);

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
        let cmds = [&c1, &c2, &c3, &c4];
        let Plan {
            results,
            new_head,
            streams,
        } = plan(&cmds, &snap, IDS);
        let (rows, _) = lay_out(&cmds, &results, IDS);
        assert_eq!(new_head, 14);
        assert_eq!(streams, vec![("a", 5), ("b", 1)]);
        assert_eq!(rows.upsert_stream, vec!["a", "b"]);
        assert_eq!(rows.upsert_version, vec![5, 1]);
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
