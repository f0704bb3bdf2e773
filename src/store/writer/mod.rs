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
//! a while ([`commit::FAST_PATH_REST`]), so several instances writing to one database do not pay a wasted
//! round trip per batch.
//!
//! **Pipelined.** One-round-trip batches go out behind each other on the writer's connection, up
//! to [`WriterConfig::pipeline_depth`] in flight (while those in flight are large enough to be
//! worth it, [`commit::PIPELINE_MIN_EVENTS`]), each planned on the memory as the batches
//! before it will leave it; PostgreSQL starts the next the moment the last one committed, instead
//! of waiting a round trip for the writer. A connection's statements run in order, so commits
//! stay in sequence order. Batches land in the order they were sent; when one did not commit,
//! those behind it fail their checks too (they expect the head it would have left), and all of
//! them are committed again, in queue order, the reading way once nothing is in flight.

mod commit;
mod plan;
mod sql;

use std::{sync::Arc, time::Duration};

use futures_util::stream::FuturesOrdered;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{AppendCommand, AppendOutcome, ids::AssignedIds, target::Target};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
pub use commit::FAST_PATH_REST;
use commit::Writer;
use plan::Memory;

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

pub(super) struct Request {
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
    /// Appends waiting in the queue right now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

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
        commit_again: Vec::new(),
        head: head_tx,
        metrics,
        memory: Memory::default(),
        ids,
    };
    let task = tokio::spawn(writer.run(rx, shutdown));
    (Handle { tx, head }, task)
}
