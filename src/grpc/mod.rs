//! The `pgstore.v1.EventStore` gRPC service: validates requests, calls the store, converts
//! results. Domain errors become `tonic::Status` in one place ([`crate::error`]).

pub mod auth;
pub mod deadline;
pub mod observe;
pub mod status;
pub mod validate;

use std::{pin::Pin, sync::Arc};

use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::config::Limits;
use crate::error::Error;
use crate::live::{
    Change,
    context::LiveContext,
    locks,
    subscribe::{self, Budget, Subscription},
    watch,
};
use crate::metrics::Metrics;
use crate::proto::{self, event_store_server::EventStore};
use crate::store::{Store, StreamState, checkpoints, db, lifecycle, read, retention, snapshots};
use crate::wire::EncodedEvent;
use crate::wire::Frame;

/// A server-streaming response.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The service.
#[derive(Clone)]
pub struct EventStoreService {
    /// The store all requests go to.
    store: Store,
    /// Input limits.
    limits: Limits,
    /// Live delivery: hub, settings, shutdown signal.
    live: LiveContext,
    /// The NOTIFY channel of projection changes.
    changes_channel: String,
    /// Rows per transaction of a DeleteStream.
    delete_batch_size: u32,
}

/// The largest NOTIFY payload PostgreSQL accepts is 7999 bytes.
pub const MAX_NOTIFY_BYTES: usize = 7999;

/// A subscriber's server stream, fed by its task through a bounded channel: counts what waits
/// in the channel (messages for the buffer gauge, bytes for the subscriber's budget), and
/// reports a cut-off (slow subscriber) before anything still queued.
pub struct BufferedStream {
    rx: mpsc::Receiver<subscribe::Item>,
    /// The rest of the batch being handed to tonic (already taken off the budget).
    pending: std::vec::IntoIter<Frame>,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    done: bool,
}

impl BufferedStream {
    fn new(
        rx: mpsc::Receiver<subscribe::Item>,
        metrics: Arc<Metrics>,
        budget: Arc<Budget>,
    ) -> Self {
        BufferedStream {
            rx,
            pending: Vec::new().into_iter(),
            metrics,
            budget,
            done: false,
        }
    }

    /// Takes a batch off the queue's books.
    fn took(&self, frames: &[Frame]) {
        use prost::Message as _;
        let size: usize = frames.iter().map(|f| f.encoded_len()).sum();
        self.metrics.buffered.dec_by(frames.len() as i64);
        self.metrics.buffered_bytes.dec_by(size as i64);
        self.budget.took(size);
    }

    fn drain(&mut self) {
        self.rx.close();
        self.pending = Vec::new().into_iter();
        while let Ok(item) = self.rx.try_recv() {
            match item {
                Ok(frames) => self.took(&frames),
                Err(_) => {
                    self.metrics.buffered.dec();
                }
            }
        }
    }
}

impl Stream for BufferedStream {
    type Item = Result<Frame, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(status) = self.budget.take_cut() {
            self.done = true;
            self.drain();
            return Poll::Ready(Some(Err(status)));
        }
        if let Some(frame) = self.pending.next() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(frames))) => {
                self.took(&frames);
                let mut frames = frames.into_vec().into_iter();
                let first = frames.next();
                self.pending = frames;
                Poll::Ready(first.map(Ok))
            }
            Poll::Ready(Some(Err(s))) => {
                self.metrics.buffered.dec();
                Poll::Ready(Some(Err(*s)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(self.budget.take_cut().map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for BufferedStream {
    fn drop(&mut self) {
        self.drain();
    }
}

/// Cuts a page so that its encoded events stay within `limit` bytes, keeping at least one
/// event; returns the index of the first event left out, if any.
pub fn cap_page(events: &mut Vec<EncodedEvent>, limit: usize) -> Option<usize> {
    let mut total = 0usize;
    for (i, e) in events.iter().enumerate() {
        // The field key and length prefix of each event in the repeated field.
        total += e.bytes.len() + 6;
        if total > limit && i > 0 {
            events.truncate(i);
            return Some(i);
        }
    }
    None
}

impl EventStoreService {
    /// A service over `store`.
    pub fn new(
        store: Store,
        limits: Limits,
        live: LiveContext,
        changes_channel: String,
        delete_batch_size: u32,
    ) -> Self {
        EventStoreService {
            store,
            limits,
            live,
            changes_channel,
            delete_batch_size,
        }
    }

    /// Validates a Subscribe request and resolves where it starts.
    async fn subscription(&self, r: proto::SubscribeRequest) -> Result<Subscription, Error> {
        use proto::subscribe_request::Start;
        validate::event_types(&r.event_types, &self.limits)?;
        if r.stream_prefix.len() > self.limits.max_stream_id_bytes {
            return Err(Error::invalid(
                "stream_prefix",
                "longer than a stream id may be",
            ));
        }
        let group = match (r.group.is_empty(), r.member.is_empty()) {
            (true, true) => None,
            (false, false) => {
                validate::name("group", &r.group, self.limits.max_stream_id_bytes)?;
                validate::name("member", &r.member, self.limits.max_stream_id_bytes)?;
                if r.group.contains('/') {
                    return Err(Error::invalid("group", "must not contain '/'"));
                }
                if r.start.is_some() {
                    return Err(Error::invalid(
                        "start",
                        "a group member starts each partition after its checkpoint; leave start empty",
                    ));
                }
                Some((r.group, r.member))
            }
            _ => return Err(Error::invalid("group", "group and member go together")),
        };
        let from = match r.start {
            None => 1,
            Some(Start::FromSequence(s)) => {
                validate::position("from_sequence", s)?;
                s.max(1)
            }
            Some(Start::ConsumerId(id)) => {
                validate::name("consumer_id", &id, self.limits.max_stream_id_bytes)?;
                let cp = checkpoints::load(&mut *self.conn().await?, &id).await?;
                cp.map_or(1, |(seq, _)| seq + 1)
            }
            Some(Start::FromEnd(true)) => {
                read::latest_sequence(&mut *self.conn().await?).await? + 1
            }
            Some(Start::FromEnd(false)) => {
                return Err(Error::invalid("from_end", "must be true when set"));
            }
        };
        let query = validate::query("query", r.query, &self.limits)?.filter(|q| !q.matches_all());
        Ok(Subscription {
            from,
            event_types: r.event_types,
            stream_prefix: r.stream_prefix,
            group,
            query,
        })
    }

    async fn conn(&self) -> Result<db::PooledConn<'_>, Error> {
        db::get(self.store.pool()).await
    }
}

fn state(s: StreamState) -> i32 {
    (match s {
        StreamState::Active => proto::StreamState::Active,
        StreamState::Archived => proto::StreamState::Archived,
        StreamState::Tombstoned => proto::StreamState::Tombstoned,
        // Reads never show a stream being deleted (it reads as absent).
        StreamState::Deleting => proto::StreamState::Unspecified,
    }) as i32
}

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl EventStore for EventStoreService {
    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id, events = req.get_ref().events.len()))]
    async fn append(
        &self,
        req: Request<proto::AppendRequest>,
    ) -> Result<Response<proto::AppendResponse>, Status> {
        let cmd = validate::append(req.into_inner(), &self.limits)?;
        let out = self.store.append(cmd).await?;
        Ok(Response::new(proto::AppendResponse {
            version: out.version(),
            first_sequence: out.first_sequence(),
            last_sequence: out.last_sequence(),
            duplicate: out.duplicate,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(parts = req.get_ref().parts.len()))]
    async fn multi_stream_append(
        &self,
        req: Request<proto::MultiStreamAppendRequest>,
    ) -> Result<Response<proto::MultiStreamAppendResponse>, Status> {
        let cmd = validate::multi_stream_append(req.into_inner(), &self.limits)?;
        let streams: Vec<String> = cmd.parts.iter().map(|p| p.stream_id.clone()).collect();
        let out = self
            .store
            .append(cmd)
            .await
            .map_err(status::multi_stream_append_status)?;
        Ok(Response::new(proto::MultiStreamAppendResponse {
            first_sequence: out.first_sequence(),
            last_sequence: out.last_sequence(),
            duplicate: out.duplicate,
            parts: streams
                .into_iter()
                .zip(out.parts)
                .map(|(stream_id, p)| proto::AppendPartResult {
                    stream_id,
                    version: p.version,
                    first_sequence: p.first_sequence,
                    last_sequence: p.last_sequence,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn load(&self, req: Request<proto::LoadRequest>) -> Result<Response<Frame>, Status> {
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        validate::position("from_version", r.from_version)?;
        validate::position("min_sequence", r.min_sequence)?;
        validate::event_types(&r.event_types, &self.limits)?;
        let q = read::LoadQuery {
            stream_id: r.stream_id,
            from_version: r.from_version,
            max_count: validate::page_size(r.max_count, &self.limits),
            event_types: r.event_types,
            backwards: r.backwards,
        };
        let mut page = self.store.router().read(r.min_sequence, &q).await?;
        if !page.found {
            return Err(Error::StreamNotFound {
                stream_id: q.stream_id,
            }
            .into());
        }
        // Past the byte cap the page stops early: the client continues from the first event
        // left out (forwards or backwards alike).
        let mut next_version = page.next_version;
        let first_left = page.events.get(1).map(|_| ()).and_then(|_| {
            let versions: Vec<u64> = page.events.iter().map(|e| e.version).collect();
            cap_page(&mut page.events, self.limits.max_response_bytes).map(|i| versions[i])
        });
        if first_left.is_some() {
            next_version = first_left;
        }
        Ok(Response::new(Frame::load(
            &page.events,
            page.stream_version,
            next_version.unwrap_or(0),
            next_version.is_none(),
            state(page.state),
        )))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn read(&self, req: Request<proto::ReadRequest>) -> Result<Response<Frame>, Status> {
        let r = req.into_inner();
        validate::position("from_sequence", r.from_sequence)?;
        validate::position("min_sequence", r.min_sequence)?;
        let q = read::QueryRead {
            query: validate::query("query", r.query, &self.limits)?.unwrap_or_default(),
            from_sequence: r.from_sequence,
            limit: validate::page_size(r.limit, &self.limits),
        };
        let (mut events, mut head) = self.store.read_query(r.min_sequence, &q).await?;
        // An answer cut short (by `limit` or by the response size) is consistent up to its last
        // event: every matching event up to there is in it.
        let capped = cap_page(&mut events, self.limits.max_response_bytes).is_some();
        if capped || events.len() >= q.limit as usize {
            head = events.last().map_or(head, |e| e.seq);
        }
        Ok(Response::new(Frame::read(&events, head)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(from = req.get_ref().from_sequence))]
    async fn read_from(
        &self,
        req: Request<proto::ReadFromRequest>,
    ) -> Result<Response<Frame>, Status> {
        let r = req.into_inner();
        validate::position("from_sequence", r.from_sequence)?;
        validate::position("min_sequence", r.min_sequence)?;
        validate::event_types(&r.event_types, &self.limits)?;
        if r.stream_prefix.len() > self.limits.max_stream_id_bytes {
            return Err(Error::invalid("stream_prefix", "longer than a stream id may be").into());
        }
        let q = read::ReadQuery {
            from_sequence: r.from_sequence,
            limit: validate::page_size(r.limit, &self.limits),
            event_types: r.event_types,
            stream_prefix: r.stream_prefix,
            partitions: None,
            window: self.limits.max_scan_window,
            query: validate::query("query", r.query, &self.limits)?,
        };
        let mut page = self.store.read_log_paging(r.min_sequence, &q).await?;
        let mut next_sequence = page.next_sequence;
        if cap_page(&mut page.events, self.limits.max_response_bytes).is_some() {
            // Continue right after the last event sent.
            next_sequence = page.events.last().map_or(next_sequence, |e| e.seq + 1);
        }
        Ok(Response::new(Frame::read_from(
            &page.events,
            next_sequence,
            page.head,
        )))
    }

    async fn latest_sequence(
        &self,
        req: Request<proto::LatestSequenceRequest>,
    ) -> Result<Response<proto::LatestSequenceResponse>, Status> {
        validate::position("min_sequence", req.get_ref().min_sequence)?;
        let sequence = read::latest_sequence(&mut *self.conn().await?).await?;
        Ok(Response::new(proto::LatestSequenceResponse { sequence }))
    }

    type SubscribeStream = ResponseStream<Frame>;

    #[tracing::instrument(level = "debug", skip_all, fields(group = %req.get_ref().group, member = %req.get_ref().member))]
    async fn subscribe(
        &self,
        req: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        if self.live.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown.into());
        }
        let read_only = auth::is_read_only(req.extensions());
        let r = req.into_inner();
        if read_only && !r.group.is_empty() {
            return Err(Error::PermissionDenied(
                "a read-only token cannot join a consumer group (members write leases and checkpoints); use a full token".into(),
            )
            .into());
        }
        let slot = self.live.take_slot()?;
        let sub = self.subscription(r).await?;
        let (tx, rx) = mpsc::channel(self.live.config.buffer);
        let budget = Arc::new(Budget::default());
        let live = self.live.clone();
        let task_budget = budget.clone();
        tokio::spawn(async move {
            subscribe::run(live, sub, tx, task_budget).await;
            drop(slot);
        });
        Ok(Response::new(Box::pin(BufferedStream::new(
            rx,
            self.live.hub.metrics.clone(),
            budget,
        ))))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(consumer_id = %req.get_ref().consumer_id))]
    async fn save_checkpoint(
        &self,
        req: Request<proto::SaveCheckpointRequest>,
    ) -> Result<Response<proto::SaveCheckpointResponse>, Status> {
        let r = req.into_inner();
        validate::name(
            "consumer_id",
            &r.consumer_id,
            self.limits.max_stream_id_bytes,
        )?;
        validate::position("sequence", r.sequence)?;
        checkpoints::save(&mut *self.conn().await?, &r.consumer_id, r.sequence).await?;
        Ok(Response::new(proto::SaveCheckpointResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(consumer_id = %req.get_ref().consumer_id))]
    async fn load_checkpoint(
        &self,
        req: Request<proto::LoadCheckpointRequest>,
    ) -> Result<Response<proto::LoadCheckpointResponse>, Status> {
        let r = req.into_inner();
        validate::name(
            "consumer_id",
            &r.consumer_id,
            self.limits.max_stream_id_bytes,
        )?;
        let found = checkpoints::load(&mut *self.conn().await?, &r.consumer_id).await?;
        Ok(Response::new(match found {
            Some((sequence, at)) => proto::LoadCheckpointResponse {
                sequence,
                found: true,
                updated_at: Some(at.into()),
            },
            None => proto::LoadCheckpointResponse::default(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn save_snapshot(
        &self,
        req: Request<proto::SaveSnapshotRequest>,
    ) -> Result<Response<proto::SaveSnapshotResponse>, Status> {
        let s = req
            .into_inner()
            .snapshot
            .ok_or_else(|| Error::invalid("snapshot", "is required"))?;
        validate::name(
            "snapshot.stream_id",
            &s.stream_id,
            self.limits.max_stream_id_bytes,
        )?;
        validate::position("snapshot.stream_version", s.stream_version)?;
        if s.schema_version > i32::MAX as u32 {
            return Err(Error::invalid("snapshot.schema_version", "larger than 2^31-1").into());
        }
        if s.state.len() > self.limits.max_append_bytes {
            return Err(Error::TooLarge {
                what: "snapshot state".into(),
                limit: self.limits.max_append_bytes,
                actual: s.state.len(),
            }
            .into());
        }
        let content_type = if s.content_type.is_empty() {
            validate::DEFAULT_CONTENT_TYPE.to_owned()
        } else {
            s.content_type
        };
        if content_type.len() > validate::MAX_CONTENT_TYPE_BYTES {
            return Err(Error::invalid("snapshot.content_type", "too long").into());
        }
        let snap = snapshots::Snapshot {
            stream_id: s.stream_id,
            stream_version: s.stream_version,
            schema_version: s.schema_version,
            content_type,
            state: s.state,
            created_at: std::time::SystemTime::now(),
        };
        snapshots::save(&mut *self.conn().await?, &snap).await?;
        Ok(Response::new(proto::SaveSnapshotResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn load_snapshot(
        &self,
        req: Request<proto::LoadSnapshotRequest>,
    ) -> Result<Response<proto::LoadSnapshotResponse>, Status> {
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        validate::position("min_sequence", r.min_sequence)?;
        let snap = snapshots::load(&mut *self.conn().await?, &r.stream_id).await?;
        Ok(Response::new(proto::LoadSnapshotResponse {
            snapshot: snap.map(|s| proto::Snapshot {
                stream_id: s.stream_id,
                stream_version: s.stream_version,
                schema_version: s.schema_version,
                content_type: s.content_type,
                state: s.state,
                created_at: Some(s.created_at.into()),
            }),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn invalidate_snapshot(
        &self,
        req: Request<proto::InvalidateSnapshotRequest>,
    ) -> Result<Response<proto::InvalidateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let target = match (r.all, r.stream_id.is_empty()) {
            (true, true) => None,
            (true, false) => {
                return Err(Error::invalid("stream_id", "must be empty when `all` is set").into());
            }
            (false, _) => {
                validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
                Some(r.stream_id.as_str())
            }
        };
        let deleted = snapshots::invalidate(&mut *self.conn().await?, target).await?;
        Ok(Response::new(proto::InvalidateSnapshotResponse { deleted }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn get_stream(
        &self,
        req: Request<proto::GetStreamRequest>,
    ) -> Result<Response<proto::GetStreamResponse>, Status> {
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        validate::position("min_sequence", r.min_sequence)?;
        let info = lifecycle::get(&mut *self.conn().await?, &r.stream_id).await?;
        Ok(Response::new(proto::GetStreamResponse {
            stream_id: info.stream_id,
            version: info.version,
            state: state(info.state),
            tombstone_reason: info.tombstone_reason.unwrap_or_default(),
            created_at: Some(info.created_at.into()),
            updated_at: Some(info.updated_at.into()),
            max_count: info.retention.max_count,
            max_age: info.retention.max_age.map(duration),
            truncate_before: info.retention.truncate_before,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn set_stream_metadata(
        &self,
        req: Request<proto::SetStreamMetadataRequest>,
    ) -> Result<Response<proto::SetStreamMetadataResponse>, Status> {
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        let rule = validate::retention(&r)?;
        retention::set(&mut *self.conn().await?, &r.stream_id, &rule).await?;
        // Pages read ahead before the rule may hold events it hides.
        self.store.forget_read_ahead();
        Ok(Response::new(proto::SetStreamMetadataResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn tombstone_stream(
        &self,
        req: Request<proto::TombstoneStreamRequest>,
    ) -> Result<Response<proto::TombstoneStreamResponse>, Status> {
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        if r.reason.len() > self.limits.max_metadata_bytes || r.reason.contains('\0') {
            return Err(Error::invalid("reason", "too long or contains NUL").into());
        }
        lifecycle::tombstone(&mut *self.conn().await?, &r.stream_id, &r.reason).await?;
        Ok(Response::new(proto::TombstoneStreamResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn archive_stream(
        &self,
        req: Request<proto::ArchiveStreamRequest>,
    ) -> Result<Response<proto::ArchiveStreamResponse>, Status> {
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        lifecycle::archive(&mut *self.conn().await?, &r.stream_id).await?;
        Ok(Response::new(proto::ArchiveStreamResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn restore_stream(
        &self,
        req: Request<proto::RestoreStreamRequest>,
    ) -> Result<Response<proto::RestoreStreamResponse>, Status> {
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        lifecycle::restore(&mut *self.conn().await?, &r.stream_id).await?;
        Ok(Response::new(proto::RestoreStreamResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn delete_stream(
        &self,
        req: Request<proto::DeleteStreamRequest>,
    ) -> Result<Response<proto::DeleteStreamResponse>, Status> {
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        let state = lifecycle::mark_for_delete(&mut *self.conn().await?, &r.stream_id).await?;
        // The events are removed by a task of its own: a caller that gives up (or the request
        // deadline) does not leave the delete half done.
        let (store, batch, stream_id) = (self.store.clone(), self.delete_batch_size, r.stream_id);
        let removal = tokio::spawn(async move {
            let mut conn = db::get(store.pool()).await?;
            let tombstoned = state == StreamState::Tombstoned;
            let n = lifecycle::remove_events(&mut conn, &stream_id, batch, tombstoned).await;
            store.forget_read_ahead();
            n
        });
        let deleted_events = removal
            .await
            .map_err(|e| Error::Internal(format!("delete task: {e}")))??;
        // Pages read ahead before the delete may hold its events.
        self.store.forget_read_ahead();
        Ok(Response::new(proto::DeleteStreamResponse {
            deleted_events,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn publish_change(
        &self,
        req: Request<proto::PublishChangeRequest>,
    ) -> Result<Response<proto::PublishChangeResponse>, Status> {
        let c = req
            .into_inner()
            .change
            .ok_or_else(|| Error::invalid("change", "is required"))?;
        validate::name(
            "change.projection",
            &c.projection,
            self.limits.max_stream_id_bytes,
        )?;
        if c.key.contains('\0') || c.payload.contains('\0') {
            return Err(Error::invalid("change", "must not contain NUL characters").into());
        }
        validate::position("change.sequence", c.sequence)?;
        let notice = serde_json::to_string(&Change {
            projection: c.projection,
            key: c.key,
            payload: c.payload,
            sequence: c.sequence,
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        if notice.len() > MAX_NOTIFY_BYTES {
            return Err(Error::TooLarge {
                what:
                    "change notice (projection, key and payload as JSON; PostgreSQL NOTIFY limit)"
                        .into(),
                limit: MAX_NOTIFY_BYTES,
                actual: notice.len(),
            }
            .into());
        }
        let conn = self.conn().await?;
        conn.client
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&self.changes_channel, &notice],
            )
            .await
            .map_err(db::db_err)?;
        Ok(Response::new(proto::PublishChangeResponse {}))
    }

    type WatchChangesStream = ResponseStream<proto::WatchChangesResponse>;

    async fn watch_changes(
        &self,
        req: Request<proto::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        if self.live.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown.into());
        }
        let r = req.into_inner();
        for p in &r.projections {
            validate::name("projections", p, self.limits.max_stream_id_bytes)?;
        }
        let slot = self.live.take_slot()?;
        let (tx, rx) = mpsc::channel(self.live.config.buffer);
        let live = self.live.clone();
        tokio::spawn(async move {
            watch::run(live, r.projections, tx).await;
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type LockStream = ResponseStream<proto::LockResponse>;

    #[tracing::instrument(level = "debug", skip_all, fields(stream_id = %req.get_ref().stream_id))]
    async fn lock(
        &self,
        req: Request<proto::LockRequest>,
    ) -> Result<Response<Self::LockStream>, Status> {
        if self.live.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown.into());
        }
        let r = req.into_inner();
        validate::name("stream_id", &r.stream_id, self.limits.max_stream_id_bytes)?;
        let slot = self.live.take_slot()?;
        let (tx, rx) = mpsc::channel(4);
        let live = self.live.clone();
        tokio::spawn(async move {
            let config = live.config.locks.clone();
            locks::run(live, config, r.stream_id, r.try_only, tx).await;
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_rpc_is_in_the_api_guides_table() {
        let api = include_str!("../../proto/pgstore/v1/eventstore.proto");
        let guide = include_str!("../../docs/api.md");
        let rpcs: Vec<&str> = api
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap_or_default())
            .collect();
        assert!(rpcs.len() > 10);
        let table: Vec<&str> = guide.lines().filter(|l| l.starts_with("| `")).collect();
        for rpc in rpcs {
            let name = format!("`{rpc}`");
            assert!(
                table
                    .iter()
                    .any(|row| row.split('|').nth(1).is_some_and(|c| c.contains(&name))),
                "docs/api.md's RPC table has no row for {rpc}"
            );
        }
    }
}
