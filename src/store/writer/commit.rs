//! The commit loop: takes batches from the queue, sends those the memory plans cleanly as
//! one-statement commits pipelined on the writer's one connection, commits the others (and those
//! that came back uncommitted) in turn the reading way, bounds every commit by
//! `writer.commit_timeout`, and answers every caller.

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, future::BoxFuture, stream::FuturesOrdered};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    Request, WriterConfig,
    plan::{Check, Memory, Rows, Snapshot, lay_out, plan},
    sql::{
        Failure, ROLLBACK, classify, condition_failed, conditions_json, memory_was_stale,
        read_under_lock, write_and_commit,
    },
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::{
    AppendCommand, AppendOutcome, StreamState,
    db::{self, PgConn, is_connection_error},
    ids::AssignedIds,
    target::Target,
};

pub(super) struct Writer {
    pub(super) config: Target,
    pub(super) channel: Arc<str>,
    pub(super) settings: WriterConfig,
    /// The connection to the primary, shared by the batches in flight on it.
    pub(super) conn: Option<Arc<PgConn>>,
    /// One-round-trip batches sent and not yet returned, oldest first. Their statements are
    /// pipelined on the one connection, so PostgreSQL runs them in the order they were sent.
    pub(super) in_flight: FuturesOrdered<BoxFuture<'static, Returned>>,
    /// Events of the batches in flight.
    pub(super) in_flight_events: u64,
    /// Batches that returned without committing, to commit in turn once nothing is in flight.
    pub(super) commit_again: Vec<Vec<Request>>,
    pub(super) head: watch::Sender<u64>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) memory: Memory,
    /// The ids this store assigns to events appended without one.
    pub(super) ids: AssignedIds,
}

/// How long the one-round-trip path rests after the memory proved stale.
pub const FAST_PATH_REST: Duration = Duration::from_secs(1);
/// Fewest events in flight for the next batch to be sent behind them. Smaller batches commit in
/// less than the round trip it would save, and waiting for them gathers the next batch larger:
/// fewer commits, fewer wake-ups of subscribers.
const PIPELINE_MIN_EVENTS: u64 = 64;
/// A one-round-trip batch on its way to the database.
pub(super) struct InFlight {
    pub(super) batch: Vec<Request>,
    /// What each append gets once the batch commits.
    pub(super) results: Vec<Result<AppendOutcome>>,
    /// The head and stream versions the batch was planned from, for `append_batch` to prove.
    pub(super) check: Check,
    /// The append conditions `append_batch` checks (those the memory could not).
    pub(super) conditions: Option<String>,
    /// The head after the batch.
    pub(super) new_head: u64,
    pub(super) events: u64,
    /// When the batch was sent.
    pub(super) started: std::time::Instant,
}

/// A sent batch back from the database.
pub(super) struct Returned {
    pub(super) sent: InFlight,
    /// On error, whether the commit had been asked for; `None` when it did not come back within
    /// the commit timeout.
    pub(super) outcome: Result<(), Option<(tokio_postgres::Error, bool)>>,
}

/// What the writer does next.
pub(super) enum Next {
    Returned(Returned),
    Request(Option<Request>),
    Close,
}

impl Writer {
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
    ) {
        let mut closing = false;
        loop {
            let room = self.in_flight.is_empty()
                || (self.in_flight.len() < self.settings.pipeline_depth
                    && self.in_flight_events >= PIPELINE_MIN_EVENTS);
            let next = tokio::select! {
                biased;
                Some(returned) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    Next::Returned(returned)
                }
                r = rx.recv(), if room => Next::Request(r),
                _ = shutdown.cancelled(), if !closing => Next::Close,
            };
            match next {
                Next::Returned(returned) => self.settle(returned),
                Next::Request(Some(first)) => {
                    let batch = self.gather(first, &mut rx);
                    self.send_or_commit(batch).await;
                }
                Next::Request(None) => break,
                Next::Close => {
                    // Commit what is queued already, then stop.
                    closing = true;
                    rx.close();
                }
            }
            if !self.commit_again.is_empty() {
                self.settle_in_flight().await;
                for batch in std::mem::take(&mut self.commit_again) {
                    self.commit(batch).await;
                }
            }
        }
        self.settle_in_flight().await;
        tracing::debug!("writer stopped");
    }

    /// `first` and every append waiting behind it, up to the batch limits.
    fn gather(&self, first: Request, rx: &mut mpsc::Receiver<Request>) -> Vec<Request> {
        let mut events = first.cmd.event_count();
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < self.settings.max_batch_appends
            && events < self.settings.max_batch_events
        {
            match rx.try_recv() {
                Ok(r) => {
                    events += r.cmd.event_count();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        batch
    }

    /// Sends a batch the one-round-trip way when the memory plans it cleanly (behind the batches
    /// in flight, planned on them); otherwise lands everything in flight and commits it in turn.
    async fn send_or_commit(&mut self, batch: Vec<Request>) {
        let planned = {
            let cmds: Vec<&AppendCommand> = batch.iter().map(|r| &r.cmd).collect();
            self.memory.note_conditions(&cmds);
            self.memory.snapshot(&cmds).and_then(|snapshot| {
                let plan = plan(&cmds, &snapshot, self.ids);
                plan.clean().then(|| {
                    // The next batch is planned on this one.
                    let first = snapshot.head + 1;
                    self.memory.head = Some(plan.new_head);
                    for (s, v) in &plan.streams {
                        self.memory.set(s, (*v, StreamState::Active));
                    }
                    self.memory.wrote(first, planned_events(&cmds));
                    let conditions = conditions_json(&cmds, &plan.results, &snapshot.checked);
                    (plan.results, plan.new_head, Check::of(snapshot), conditions)
                })
            })
        };
        let Some((results, new_head, check, conditions)) = planned else {
            self.settle_in_flight().await;
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
        let events = batch.iter().map(|r| r.cmd.event_count() as u64).sum();
        let sent = InFlight {
            batch,
            results,
            check,
            conditions,
            new_head,
            events,
            started: std::time::Instant::now(),
        };
        if !self.in_flight.is_empty() {
            self.metrics.batches_pipelined.inc();
        }
        self.in_flight_events += sent.events;
        let channel = self.channel.clone();
        self.in_flight.push_back(Box::pin(pipelined_commit(
            conn,
            sent,
            channel,
            self.ids,
            self.settings.commit_timeout,
        )));
    }

    /// Answers the callers of a batch back from the database, or keeps it to commit again.
    fn settle(&mut self, returned: Returned) {
        let Returned { sent, outcome } = returned;
        self.in_flight_events -= sent.events;
        match outcome {
            Ok(()) => {
                self.metrics
                    .commit_duration
                    .observe(sent.started.elapsed().as_secs_f64());
                self.published(sent.events, sent.new_head);
                self.answered(&sent.batch, &sent.results);
                for (req, res) in sent.batch.into_iter().zip(sent.results) {
                    let _ = req.reply.send(res);
                }
            }
            Err(Some((e, _))) if memory_was_stale(&e) => {
                // The statement was its own transaction and rolled back: nothing was written.
                self.stale();
                self.commit_again.push(sent.batch);
            }
            Err(Some((e, _))) if condition_failed(&e) => {
                // Nothing was written, and the memory had counted the batch: forget it (the
                // batches behind this one fail their check and come back too). The batch is
                // committed again the reading way, where the condition fails its append alone.
                self.memory.forget();
                self.commit_again.push(sent.batch);
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
                        self.commit_again
                            .extend(sent.batch.into_iter().map(|r| vec![r]));
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

    /// Waits for every batch in flight and settles it.
    async fn settle_in_flight(&mut self) {
        while let Some(returned) = self.in_flight.next().await {
            self.settle(returned);
        }
    }

    /// The memory proved stale: forget it, and rest the one-round-trip path.
    fn stale(&mut self) {
        self.metrics.append_rereads.inc();
        self.memory.forget();
        self.memory.rest_until = Some(std::time::Instant::now() + FAST_PATH_REST);
    }

    /// A batch did not come back within the commit timeout: nothing more is known of it. The
    /// connection is given up (the next batch reads afresh on a new one).
    fn timed_out(&mut self) -> Error {
        self.memory.forget();
        self.conn = None;
        self.metrics.commit_timeouts.inc();
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
        let started = std::time::Instant::now();
        let committed = match tokio::time::timeout(limit, self.try_commit(&cmds)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::All(self.timed_out())),
        };
        match committed {
            Ok(results) => {
                self.metrics
                    .commit_duration
                    .observe(started.elapsed().as_secs_f64());
                self.answered(&batch, &results);
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
        self.memory.note_conditions(cmds);
        if let Some(snapshot) = self.memory.snapshot(cmds) {
            let plan = plan(cmds, &snapshot, self.ids);
            if plan.clean() {
                match self
                    .commit_from_memory(cmds, snapshot, &plan.results, plan.new_head)
                    .await?
                {
                    true => return Ok(plan.results),
                    false => self.stale(),
                }
            }
        }
        self.commit_after_reading(cmds).await
    }

    /// The one-round-trip commit from memory. `Ok(false)`: the memory was stale (or an id or key
    /// is stored already) and nothing was written.
    async fn commit_from_memory(
        &mut self,
        cmds: &[&AppendCommand],
        snapshot: Snapshot,
        results: &[Result<AppendOutcome>],
        new_head: u64,
    ) -> Result<bool, Failure> {
        let conn = self.connection().await.map_err(Failure::All)?;
        let conditions = conditions_json(cmds, results, &snapshot.checked);
        let check = Check::of(snapshot);
        let (rows, keys) = lay_out(cmds, results, self.ids);
        match write_and_commit(
            &conn,
            Some(&check),
            &rows,
            &keys,
            new_head,
            &self.channel,
            conditions.as_deref(),
        )
        .await
        {
            Ok(()) => {
                self.committed(&rows, new_head, []);
                Ok(true)
            }
            // The failed statement was its own transaction: nothing was written.
            Err((e, _)) if memory_was_stale(&e) => Ok(false),
            Err((e, _)) if condition_failed(&e) => {
                self.memory.forget();
                Ok(false)
            }
            Err((e, commit_sent)) => Err(self.failed(&conn, e, commit_sent).await),
        }
    }

    /// The two-round-trip commit: read under the lock, check, write.
    async fn commit_after_reading(
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
        match write_and_commit(
            &conn,
            None,
            &rows,
            &keys,
            plan.new_head,
            &self.channel,
            None,
        )
        .await
        {
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
        if let Some(&first) = rows.seq.first() {
            self.memory.wrote(
                first as u64,
                rows.event_type
                    .iter()
                    .copied()
                    .zip(rows.tags.iter().copied()),
            );
        }
        for (s, v) in rows.upsert_stream.iter().zip(&rows.upsert_version) {
            self.memory.set(s, (*v as u64, StreamState::Active));
        }
    }

    /// The metrics of a committed batch's answers: appends answered OK, per batch, and the
    /// payload bytes they wrote (idempotent retries write nothing).
    fn answered(&self, batch: &[Request], results: &[Result<AppendOutcome>]) {
        let mut ok = 0;
        let mut bytes = 0;
        for (req, res) in batch.iter().zip(results) {
            if let Ok(outcome) = res {
                ok += 1;
                if !outcome.duplicate {
                    bytes += req
                        .cmd
                        .events()
                        .map(|e| e.payload.len() as u64)
                        .sum::<u64>();
                }
            }
        }
        self.metrics.appends.inc_by(ok);
        self.metrics.batch_appends.observe(batch.len() as f64);
        self.metrics.bytes_written.inc_by(bytes);
    }

    /// A commit returned: metrics, and the head for local subscribers (it only moves forward).
    fn published(&mut self, events: u64, new_head: u64) {
        self.metrics.batches.inc();
        self.metrics.events_written.inc_by(events);
        self.metrics.batch_events.observe(events as f64);
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

/// A one-round-trip batch's statement, pipelined behind those in flight.
async fn pipelined_commit(
    conn: Arc<PgConn>,
    sent: InFlight,
    channel: Arc<str>,
    ids: AssignedIds,
    limit: Duration,
) -> Returned {
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
            sent.conditions.as_deref(),
        );
        match tokio::time::timeout(limit, written).await {
            Ok(r) => r.map_err(Some),
            Err(_) => Err(None),
        }
    };
    Returned { sent, outcome }
}

/// The events of a batch planned clean (every append written), in sequence order.
fn planned_events<'a>(
    cmds: &[&'a AppendCommand],
) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
    cmds.iter()
        .flat_map(|c| c.events())
        .map(|e| (e.event_type.as_str(), e.tags.as_deref()))
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
