//! Subscriptions: catch up from a position in pages, say so with a caught-up marker, then stay live,
//! woken by the hub (NOTIFY or this instance's own commits) and by a slow poll as a safety net.
//!
//! No event is skipped, duplicated or reordered, at the hand-over or ever: every read starts at the
//! subscriber's own next sequence and returns only events up to the head of the same snapshot, and
//! the log is only ever visible as a prefix (see `store::read`). Wake-ups carry no data; missing one
//! only delays delivery until the next wake-up or poll.
//!
//! Each subscriber writes into its own bounded channel: a slow client makes its own task wait and
//! nobody else's. When the client goes away the send fails or `closed()` fires and the task ends,
//! releasing everything it held.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tonic::Status;

use super::{context::LiveContext, groups};
use crate::error::Error;
use crate::metrics::GaugeGuard;
use crate::proto::{self, subscribe_response::Message};
use crate::store::{db, read};
use crate::wire::{EncodedEvent, Frame};

/// A validated Subscribe request.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The first sequence to deliver.
    pub from: u64,
    /// Event type filter.
    pub event_types: Vec<String>,
    /// Stream id prefix filter.
    pub stream_prefix: String,
    /// Consumer group membership.
    pub group: Option<(String, String)>,
    /// Only events matching this query.
    pub query: Option<crate::store::query::Query>,
}

/// What waits in one subscriber's queue, in bytes, and how the consumer side says it took some;
/// plus the reason the subscriber was cut off, which the stream reports before anything queued.
#[derive(Default)]
pub struct Budget {
    bytes: std::sync::atomic::AtomicUsize,
    room: tokio::sync::Notify,
    cut: std::sync::Mutex<Option<Status>>,
    /// Whether `cut` was set: the stream checks this on every poll, without taking the lock.
    is_cut: std::sync::atomic::AtomicBool,
}

impl Budget {
    /// The consumer took an item of `size` bytes.
    pub fn took(&self, size: usize) {
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        self.room.notify_one();
    }

    /// The reason the subscriber was cut off, once.
    pub fn take_cut(&self) -> Option<Status> {
        if !self.is_cut.load(Ordering::Acquire) {
            return None;
        }
        self.cut.lock().expect("budget").take()
    }

    fn cut_off(&self, status: Status) {
        *self.cut.lock().expect("budget") = Some(status);
        self.is_cut.store(true, Ordering::Release);
    }
}

/// Items are batches of messages, boxed: a channel allocates its slots in blocks, and an idle
/// subscriber should cost a few bytes per slot, not the size of a whole message. A batch (the
/// events one wake-up found for this subscriber) costs one queue operation, one allocation and
/// one update of the budget and gauges, however many events it carries.
pub type Item = Result<Box<[Frame]>, Box<Status>>;
type Tx = mpsc::Sender<Item>;

/// Why a subscriber stops.
enum Stop {
    /// The client went away.
    Gone,
    /// Shutdown or a fatal error: tell the client.
    Fail(Status),
}

/// A subscriber's sending end: a bounded channel plus the bookkeeping of what waits in it.
struct Sink {
    tx: Tx,
    ctx: LiveContext,
    last_sent: tokio::time::Instant,
    budget: Arc<Budget>,
}

impl Sink {
    /// Sends a marker, heartbeat or assignment.
    async fn send(&mut self, msg: Message) -> Result<(), Stop> {
        self.send_frame(Frame::message(&proto::SubscribeResponse {
            message: Some(msg),
        }))
        .await
    }

    async fn send_frame(&mut self, frame: Frame) -> Result<(), Stop> {
        self.send_frames(Box::new([frame])).await
    }

    /// Queues a batch of messages (not empty) as one item.
    async fn send_frames(&mut self, frames: Box<[Frame]>) -> Result<(), Stop> {
        use prost::Message as _;
        let size: usize = frames.iter().map(|f| f.encoded_len()).sum();
        let count = frames.len() as i64;
        let limit = self.ctx.config.max_buffered_bytes;
        let stall = self.ctx.config.stall_timeout;
        // Over the byte budget: wait for the client to take something (a single frame larger
        // than the budget still goes alone once the queue is empty).
        let queued = self.budget.bytes.load(Ordering::Relaxed);
        if queued > 0 && queued + size > limit {
            let deadline = tokio::time::Instant::now() + stall;
            loop {
                let queued = self.budget.bytes.load(Ordering::Relaxed);
                if queued == 0 || queued + size <= limit {
                    break;
                }
                tokio::select! {
                    _ = self.budget.room.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => return Err(self.too_slow()),
                    _ = self.tx.closed() => return Err(Stop::Gone),
                    _ = self.ctx.shutdown.cancelled() => return Err(shutting_down()),
                }
            }
        }
        let m = &self.ctx.hub.metrics;
        m.buffered.inc_by(count);
        m.buffered_bytes.inc_by(size as i64);
        self.budget.bytes.fetch_add(size, Ordering::Relaxed);
        let undo = |m: &crate::metrics::Metrics| {
            m.buffered.dec_by(count);
            m.buffered_bytes.dec_by(size as i64);
            self.budget.bytes.fetch_sub(size, Ordering::Relaxed);
        };
        // Room in the buffer (the usual case): no waiting, nothing to register.
        let sent = match self.tx.try_send(Ok(frames)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(item)) => tokio::select! {
                r = self.tx.send(item) => r.is_ok(),
                _ = tokio::time::sleep(stall) => {
                    undo(m);
                    return Err(self.too_slow());
                }
                _ = self.ctx.shutdown.cancelled() => {
                    undo(m);
                    return Err(shutting_down());
                }
            },
        };
        if !sent {
            undo(m);
            return Err(Stop::Gone);
        }
        self.last_sent = tokio::time::Instant::now();
        Ok(())
    }

    /// The client has not taken anything for `live.stall_timeout`: cut it off. The stream
    /// reports this before anything still queued.
    fn too_slow(&self) -> Stop {
        self.ctx.hub.metrics.limit_rejections.inc();
        let c = &self.ctx.config;
        let status = Status::from(Error::LimitReached {
            setting: "live.max_buffered_bytes",
            limit: c.max_buffered_bytes.to_string(),
            message: format!(
                "subscriber too slow: its queue stayed full (live.max_buffered_bytes or live.buffer) \
                 for live.stall_timeout ({:?}); resubscribe from the last sequence you processed",
                c.stall_timeout
            ),
        });
        self.budget.cut_off(status);
        Stop::Gone
    }
}

fn shutting_down() -> Stop {
    Stop::Fail(Status::unavailable(
        "server is shutting down; resubscribe (from your last processed sequence) elsewhere",
    ))
}

/// Runs one subscription until the client leaves or the server stops. The caller spawns it.
pub async fn run(ctx: LiveContext, sub: Subscription, tx: Tx, budget: Arc<Budget>) {
    let metrics = ctx.hub.metrics.clone();
    let _subscribers = GaugeGuard::new(&metrics, |m| &m.subscribers);
    ctx.hub.subscriber_arrived.notify_one();
    let _task = GaugeGuard::new(&metrics, |m| &m.stream_tasks);
    let mut sink = Sink {
        tx: tx.clone(),
        ctx: ctx.clone(),
        last_sent: tokio::time::Instant::now(),
        budget,
    };
    let result = match sub.group.clone() {
        None => {
            let mut pos = Positions::Single(sub.from);
            deliver(&ctx, &sub, &mut sink, &mut pos, None).await
        }
        Some((group, member)) => run_group(&ctx, &sub, &mut sink, group, member).await,
    };
    if let Err(Stop::Fail(status)) = result {
        metrics.buffered.inc();
        if tx.try_send(Err(Box::new(status))).is_err() {
            metrics.buffered.dec();
        }
    }
}

/// Next sequence to deliver: one for a plain subscription, one per owned partition in a group.
enum Positions {
    Single(u64),
    Partitions {
        count: u32,
        next: BTreeMap<u32, u64>,
    },
}

impl Positions {
    fn from(&self) -> Option<u64> {
        match self {
            Positions::Single(p) => Some(*p),
            Positions::Partitions { next, .. } => next.values().min().copied(),
        }
    }
}

/// A consumer-group member: leases partitions in a background task and delivers the events of
/// the partitions it owns, each from its own checkpoint.
async fn run_group(
    ctx: &LiveContext,
    sub: &Subscription,
    sink: &mut Sink,
    group: String,
    member: String,
) -> Result<(), Stop> {
    let stop = CancellationToken::new();
    let (owned_tx, mut owned_rx) = watch::channel::<Option<Vec<u32>>>(None);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let manager = tokio::spawn(groups::run_member(
        ctx.store.clone(),
        ctx.config.groups.clone(),
        group.clone(),
        member,
        owned_tx,
        ready_tx,
        stop.clone(),
    ));
    let _stop_manager = stop.clone().drop_guard();
    let count = match ready_rx.await {
        Ok(Ok(count)) => count,
        Ok(Err(e)) => return Err(fail(e)),
        Err(_) => return Err(Stop::Fail(Status::internal("group manager ended"))),
    };
    // Deliver nothing before the first assignment.
    tokio::select! {
        r = owned_rx.wait_for(Option::is_some) => if r.is_err() {
            return Err(Stop::Fail(Status::internal("group manager ended")));
        },
        _ = sink.tx.closed() => return Err(Stop::Gone),
        _ = ctx.shutdown.cancelled() => return Err(shutting_down()),
    }
    let mut pos = Positions::Partitions {
        count,
        next: BTreeMap::new(),
    };
    let result = deliver(ctx, sub, sink, &mut pos, Some((&group, &mut owned_rx))).await;
    stop.cancel();
    let _ = manager.await;
    result
}

/// The catch-up-then-live loop.
async fn deliver(
    ctx: &LiveContext,
    sub: &Subscription,
    sink: &mut Sink,
    pos: &mut Positions,
    mut group: Option<(&str, &mut watch::Receiver<Option<Vec<u32>>>)>,
) -> Result<(), Stop> {
    let hub = &ctx.hub;
    let mut head_rx = hub.watch_head();
    let mut tail_rx = hub.tail.watch();
    let mut epoch_rx = hub.watch_epoch();
    let mut caught_up = false;
    let mut must_read = true;
    let mut served = Served::Database;
    // A group member starts with its first assignment.
    let mut reassign_needed = group.is_some();
    let mut retry_delay = Duration::from_millis(50);
    // One timer for the safety poll and the heartbeat, re-armed only when it fires: nothing to
    // set up or tear down per event.
    let (poll, heartbeat) = (ctx.config.poll_interval, ctx.config.heartbeat);
    let mut next_poll = tokio::time::Instant::now() + poll;
    let timer = tokio::time::sleep_until(next_poll.min(sink.last_sent + heartbeat));
    tokio::pin!(timer);
    let closed_tx = sink.tx.clone();
    let closed = closed_tx.closed();
    tokio::pin!(closed);
    let cancelled = ctx.shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        // Mark the current wake-up values seen before reading, so a commit during the read wakes
        // us again (without taking the watches' locks: only their versions are looked at).
        head_rx.mark_unchanged();
        tail_rx.mark_unchanged();
        // A listener (re)connection (notifications may have been missed) bumps the epoch, then
        // wakes the head's and the tail's waiters: checked after marking those, it is never
        // missed, and nobody waits on it separately.
        if epoch_rx.has_changed().unwrap_or(false) {
            epoch_rx.mark_unchanged();
            must_read = true;
        }
        if reassign_needed && let Some((group_name, owned_rx)) = group.as_mut() {
            reassign_needed = false;
            let owned = owned_rx.borrow_and_update().clone().unwrap_or_default();
            // Boxed, like catch_up: an idle subscriber's future should not carry their state.
            Box::pin(reassign(ctx, group_name, pos, &owned))
                .await
                .map_err(fail)?;
            if let Positions::Partitions { count, .. } = pos {
                sink.send(Message::Assignment(proto::PartitionAssignment {
                    partitions: owned,
                    partition_count: *count,
                }))
                .await?;
            }
            must_read = true;
        }
        if must_read || pos.from().is_some_and(|p| hub.head() >= p) {
            // Boxed so the (large) read state is allocated only while reading, not kept inline in
            // every idle subscriber's future.
            let owned = group.as_ref().map(|(_, rx)| &**rx);
            match Box::pin(catch_up(ctx, sub, sink, pos, owned)).await {
                Ok(from) => {
                    served = from;
                    retry_delay = Duration::from_millis(50);
                    must_read = false;
                    if !caught_up {
                        caught_up = true;
                        let sequence = pos.from().map_or(hub.head(), |p| p - 1);
                        sink.send(Message::CaughtUp(proto::CaughtUp { sequence }))
                            .await?;
                    }
                }
                Err(ReadError::Stop(s)) => return Err(s),
                Err(ReadError::Reassign) => {
                    // The member's partitions changed (or its leases could not be renewed):
                    // nothing more is sent before the new assignment is applied.
                    reassign_needed = true;
                    continue;
                }
                Err(ReadError::Db(e)) => {
                    // The database is away (restart, failover): keep the stream, retry.
                    tracing::debug!(error = %e, "subscriber read failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(retry_delay) => {}
                        _ = &mut closed => return Err(Stop::Gone),
                        _ = &mut cancelled => return Err(shutting_down()),
                    }
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let owned_changed = async {
            match group.as_mut() {
                Some((_, rx)) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending().await,
            }
        };
        // Served from the tail, only its growth is worth a wake-up: the head moves first (the
        // tail is read after it), and waking on both would poll every subscriber twice per commit.
        let head_moved = async {
            if served == Served::Tail {
                std::future::pending::<()>().await
            }
            let _ = head_rx.changed().await;
        };
        tokio::select! {
            _ = head_moved => {}
            _ = tail_rx.changed() => {}
            _ = owned_changed => reassign_needed = true,
            () = &mut timer => {
                let now = tokio::time::Instant::now();
                if now >= next_poll {
                    must_read = true;
                    next_poll = now + poll;
                }
                if now >= sink.last_sent + heartbeat {
                    sink.send(Message::Heartbeat(proto::Heartbeat { head: hub.head() })).await?;
                }
                timer.as_mut().reset(next_poll.min(sink.last_sent + heartbeat));
            }
            _ = &mut closed => return Err(Stop::Gone),
            _ = &mut cancelled => return Err(shutting_down()),
        }
    }
}

/// Where a catch-up ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Served {
    /// The shared tail covers the subscriber: it waits for the tail to grow.
    Tail,
    /// The database: it waits for the head to move.
    Database,
}

enum ReadError {
    Stop(Stop),
    Db(Error),
    /// A group member's ownership changed mid-read.
    Reassign,
}

/// Whether a group member's ownership changed since it was last applied: then it must not
/// deliver another event before applying it.
fn ownership_changed(owned: Option<&watch::Receiver<Option<Vec<u32>>>>) -> bool {
    owned.is_some_and(|rx| rx.has_changed().unwrap_or(true))
}

/// Whether an event passes the subscription's type and prefix filters (the database applies them
/// itself; events from the shared tail are filtered here).
fn wanted(sub: &Subscription, e: &EncodedEvent) -> bool {
    (sub.event_types.is_empty() || sub.event_types.iter().any(|t| t == e.event_type()))
        && e.stream_id().starts_with(&sub.stream_prefix)
        && sub
            .query
            .as_ref()
            .is_none_or(|q| q.matches(e.event_type(), e.tags()))
}

/// Whether the positions want the event at `seq` (with `partition_key`); if so, moves them past
/// it and returns the event's partition (0 outside consumer groups). Decided before the event is
/// copied or converted, so skipped events cost nothing.
fn admit(pos: &mut Positions, seq: u64, partition_key: u32) -> Option<u32> {
    match pos {
        Positions::Single(p) => {
            if seq < *p {
                return None;
            }
            *p = seq + 1;
            Some(0)
        }
        Positions::Partitions { count, next } => {
            let partition = partition_key % *count;
            match next.get_mut(&partition) {
                Some(p) if seq >= *p => {
                    *p = seq + 1;
                    Some(partition)
                }
                // Already delivered (behind this partition's checkpoint), or not ours.
                _ => None,
            }
        }
    }
}

/// Sends one admitted event (its shared bytes).
async fn send_event(
    ctx: &LiveContext,
    sink: &mut Sink,
    event: &EncodedEvent,
    partition: u32,
) -> Result<(), Stop> {
    sink.send_frame(Frame::event(event, partition)).await?;
    ctx.hub.metrics.events_delivered.inc();
    Ok(())
}

/// Sends admitted events as one batch (nothing for an empty one).
async fn send_events(ctx: &LiveContext, sink: &mut Sink, batch: Vec<Frame>) -> Result<(), Stop> {
    if batch.is_empty() {
        return Ok(());
    }
    let n = batch.len() as i64;
    sink.send_frames(batch.into_boxed_slice()).await?;
    ctx.hub.metrics.events_delivered.inc_by(n);
    Ok(())
}

/// Everything below `end` has been looked at: move every position there.
fn scanned_to(pos: &mut Positions, end: u64) {
    match pos {
        Positions::Single(p) => *p = (*p).max(end),
        Positions::Partitions { next, .. } => {
            for p in next.values_mut() {
                *p = (*p).max(end);
            }
        }
    }
}

/// Delivers what is new: from the shared in-memory tail when it covers the subscriber's position,
/// else from the database in pages until a page comes back short (the subscriber reached the
/// head). While a full page is being sent, the next one is already being read.
async fn catch_up(
    ctx: &LiveContext,
    sub: &Subscription,
    sink: &mut Sink,
    pos: &mut Positions,
    owned: Option<&watch::Receiver<Option<Vec<u32>>>>,
) -> Result<Served, ReadError> {
    // The next page, read while this one is sent: (where it starts, the read).
    let mut ahead: Option<(u64, AbortOnDropHandle<crate::Result<read::LogPage>>)> = None;
    loop {
        let Some(from) = pos.from() else {
            return Ok(Served::Database); // a group member owning no partition
        };
        // The slice's events for this subscriber go as one batch, picked under the tail's read
        // lock (each taken event costs a reference to its shared bytes, nothing more).
        let sliced = ctx
            .hub
            .tail
            .with_slice(from, ctx.config.page_size as usize, |events| {
                let mut batch = Vec::new();
                for e in events {
                    if ownership_changed(owned) {
                        return (batch, true);
                    }
                    if wanted(sub, e)
                        && let Some(partition) = admit(pos, e.seq, e.partition_key)
                    {
                        batch.push(Frame::event(e, partition));
                    }
                }
                (batch, false)
            });
        if let Some(((batch, reassign), end, more)) = sliced {
            // What was admitted is sent (the positions moved past it); after an ownership
            // change, nothing more before the new assignment.
            send_events(ctx, sink, batch)
                .await
                .map_err(ReadError::Stop)?;
            if reassign {
                return Err(ReadError::Reassign);
            }
            scanned_to(pos, end);
            if more {
                continue;
            }
            return Ok(Served::Tail);
        }
        let partitions = match pos {
            Positions::Single(_) => None,
            Positions::Partitions { count, next } => Some(read::Partitions {
                count: *count,
                owned: next.keys().copied().collect(),
            }),
        };
        let q = read::ReadQuery {
            from_sequence: from,
            limit: ctx.config.page_size,
            event_types: sub.event_types.clone(),
            stream_prefix: sub.stream_prefix.clone(),
            partitions,
            window: ctx.config.max_scan_window,
            query: sub.query.clone(),
        };
        let page = match ahead.take() {
            Some((start, read)) if start == from => read
                .await
                .map_err(|e| ReadError::Db(Error::Internal(e.to_string())))?
                .map_err(ReadError::Db)?,
            _ => read_page(ctx, q.clone()).await.map_err(ReadError::Db)?,
        };
        ctx.hub.advance(page.head);
        // More to read: the page was full, or its filter window ended before the head.
        let full = page.next_sequence <= page.head;
        if full {
            let next = read::ReadQuery {
                from_sequence: page.next_sequence,
                ..q
            };
            ahead = Some((
                page.next_sequence,
                AbortOnDropHandle::new(tokio::spawn(read_page(ctx, next))),
            ));
        }
        for e in &page.events {
            if ownership_changed(owned) {
                return Err(ReadError::Reassign);
            }
            if let Some(partition) = admit(pos, e.seq, e.partition_key) {
                send_event(ctx, sink, e, partition)
                    .await
                    .map_err(ReadError::Stop)?;
            }
        }
        // Everything below next_sequence has been scanned for every owned partition.
        scanned_to(pos, page.next_sequence);
        if !full {
            return Ok(Served::Database);
        }
    }
}

/// One catch-up page, from a replica when one has replayed far enough, else from the primary.
/// Any snapshot holds a prefix of the log, so a replica's page never skips an event; the fence
/// (the page's last sequence, at most the known head) makes every page move forward instead of
/// re-reading a replica that is behind.
fn read_page(
    ctx: &LiveContext,
    q: read::ReadQuery,
) -> impl std::future::Future<Output = crate::Result<read::LogPage>> + Send + 'static {
    let fence = q
        .from_sequence
        .saturating_add(u64::from(q.limit).saturating_sub(1))
        .min(ctx.hub.head());
    let store = ctx.store.clone();
    async move { store.read_log(fence, &q).await }
}

/// Applies a new set of owned partitions: new ones start after their checkpoint.
async fn reassign(
    ctx: &LiveContext,
    group: &str,
    pos: &mut Positions,
    owned: &[u32],
) -> Result<(), Error> {
    let Positions::Partitions { next, .. } = pos else {
        return Ok(());
    };
    next.retain(|p, _| owned.contains(p));
    let mut conn = db::get(ctx.store.pool()).await?;
    for p in owned {
        if !next.contains_key(p) {
            let id = groups::checkpoint_id(group, *p);
            let cp = crate::store::checkpoints::load(&mut conn, &id).await?;
            next.insert(*p, cp.map_or(1, |(seq, _)| seq + 1));
        }
    }
    Ok(())
}

fn fail(e: Error) -> Stop {
    Stop::Fail(Status::from(e))
}
