//! Per-instance metrics on the `prometheus-client` crate, served as OpenMetrics text on
//! `GET /metrics` (when `metrics_listen` is set).
//!
//! Each instance has its own registry rather than a process-global one, so that several pgstore
//! instances can live in one process (as the tests run them) with metrics of their own. The
//! counters and gauges are atomics: recording costs what a `fetch_add` costs. A few values (pool
//! connections, the writer's queue) are read when scraped, by hooks their owners register.
//!
//! docs/operations.md lists every series.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

/// Labels of the per-RPC series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The gRPC service, e.g. `pgstore.v1.EventStore`.
    pub service: String,
    /// The method, e.g. `Append`.
    pub method: String,
    /// The gRPC status code name, e.g. `OK`, `FAILED_PRECONDITION`.
    pub code: &'static str,
}

/// Labels of the replica series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    /// `host:port` of the replica.
    pub replica: String,
}

/// Labels of the pool series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `primary`, or the replica's `host:port`.
    pub pool: String,
}

/// Latency buckets in seconds: 100 µs to ~6.5 s, doubling.
#[derive(Clone)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.0001, 2.0, 17))
    }
}

/// A function run before each scrape, to refresh values read on demand.
type Hook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// The metrics of one instance.
pub struct Metrics {
    registry: Registry,
    hooks: Mutex<Vec<Hook>>,

    /// gRPC calls answered, by service, method and status code.
    pub rpc_requests: Family<RpcLabels, Counter>,
    /// Time to each call's response headers (for unary calls, the whole call; for server
    /// streams, until the stream opened), by service, method and code.
    pub rpc_duration: Family<RpcLabels, Histogram, LatencyBuckets>,

    /// Appends answered OK (including idempotent retries).
    pub appends: Counter,
    /// Events written.
    pub events_written: Counter,
    /// Payload bytes of the events written.
    pub bytes_written: Counter,
    /// Write transactions committed (group commits).
    pub batches: Counter,
    /// Appends per committed batch.
    pub batch_appends: Histogram,
    /// Events per committed batch.
    pub batch_events: Histogram,
    /// Time from sending a batch to its commit returning, in seconds.
    pub commit_duration: Histogram,
    /// Appends waiting in the writer's queue (read when scraped).
    pub writer_queue: Gauge,
    /// One-round-trip commits that found the writer's memory stale (and were redone reading).
    pub append_rereads: Counter,
    /// Batches sent while others were still in flight on the writer's connection.
    pub batches_pipelined: Counter,
    /// Batches not committed within `writer.commit_timeout` (outcome unknown).
    pub commit_timeouts: Counter,
    /// Calls refused because a limit was reached (subscriber slots, slow subscribers cut off).
    pub limit_rejections: Counter,
    /// Idempotency keys deleted after their retention.
    pub idempotency_keys_pruned: Counter,
    /// Events deleted by the retention scavenger.
    pub events_scavenged: Counter,

    /// Whether the LISTEN connection is up (0/1).
    pub listener_connected: Gauge,
    /// LISTEN reconnections after a loss.
    pub listener_reconnects: Counter,
    /// Notifications received.
    pub notifications: Counter,
    /// Open Subscribe streams.
    pub subscribers: Gauge,
    /// Open WatchChanges streams.
    pub watchers: Gauge,
    /// Open Lock streams.
    pub locks: Gauge,
    /// Background tasks serving streams (subscriber, watcher and lock tasks).
    pub stream_tasks: Gauge,
    /// Events delivered to subscribers.
    pub events_delivered: Sharded,
    /// Messages queued in subscriber buffers right now.
    pub buffered: Sharded,
    /// Bytes queued in subscriber buffers right now (each bounded by `live.max_buffered_bytes`).
    pub buffered_bytes: Sharded,
    /// What the registry shows of the three above, set from them when scraped.
    exported_delivered: Counter,
    exported_buffered: Gauge,
    exported_buffered_bytes: Gauge,
    /// Changes relayed to watchers.
    pub changes_relayed: Counter,
    /// Changes dropped for watchers that lagged.
    pub changes_lagged: Counter,

    /// Reads served by a replica.
    pub replica_reads: Counter,
    /// Reads served by the primary.
    pub primary_reads: Counter,
    /// 1 while the replica is in rotation.
    pub replica_healthy: Family<ReplicaLabels, Gauge>,
    /// Sequences the replica is behind the primary.
    pub replica_lag: Family<ReplicaLabels, Gauge>,

    /// Open connections per pool (read when scraped).
    pub pool_connections: Family<PoolLabels, Gauge>,
    /// Idle connections per pool (read when scraped).
    pub pool_idle: Family<PoolLabels, Gauge>,
    /// Callers waiting for a connection per pool (read when scraped).
    pub pool_waiting: Family<PoolLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A replica as last probed.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    /// `host:port`.
    pub name: String,
    /// In rotation.
    pub healthy: bool,
    /// Replayed head.
    pub head: u64,
    /// Sequences behind the primary's head.
    pub lag: u64,
}

/// Increments a gauge now and decrements it when dropped.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Raises `gauge` until the guard is dropped.
    pub fn new(metrics: &Arc<Metrics>, gauge: fn(&Metrics) -> &Gauge) -> Self {
        let gauge = gauge(metrics).clone();
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// A fresh set of metrics with its own registry.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pgstore");
        let sizes = || Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let m = Metrics {
            registry: Registry::default(),
            hooks: Mutex::new(Vec::new()),
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(LatencyBuckets),
            appends: Counter::default(),
            events_written: Counter::default(),
            bytes_written: Counter::default(),
            batches: Counter::default(),
            batch_appends: sizes(),
            batch_events: sizes(),
            commit_duration: LatencyBuckets.new_metric(),
            writer_queue: Gauge::default(),
            append_rereads: Counter::default(),
            batches_pipelined: Counter::default(),
            commit_timeouts: Counter::default(),
            limit_rejections: Counter::default(),
            idempotency_keys_pruned: Counter::default(),
            events_scavenged: Counter::default(),
            listener_connected: Gauge::default(),
            listener_reconnects: Counter::default(),
            notifications: Counter::default(),
            subscribers: Gauge::default(),
            watchers: Gauge::default(),
            locks: Gauge::default(),
            stream_tasks: Gauge::default(),
            events_delivered: Sharded::default(),
            buffered: Sharded::default(),
            buffered_bytes: Sharded::default(),
            exported_delivered: Counter::default(),
            exported_buffered: Gauge::default(),
            exported_buffered_bytes: Gauge::default(),
            changes_relayed: Counter::default(),
            changes_lagged: Counter::default(),
            replica_reads: Counter::default(),
            primary_reads: Counter::default(),
            replica_healthy: Family::default(),
            replica_lag: Family::default(),
            pool_connections: Family::default(),
            pool_idle: Family::default(),
            pool_waiting: Family::default(),
        };
        let r = &mut registry;
        r.register(
            "grpc_requests",
            "gRPC calls answered, by service, method and status code",
            m.rpc_requests.clone(),
        );
        r.register_with_unit(
            "grpc_request_duration",
            "Time to a call's response headers: the whole call when unary, until the stream \
             opened when streaming",
            Unit::Seconds,
            m.rpc_duration.clone(),
        );
        r.register("appends", "Appends answered OK", m.appends.clone());
        r.register("events_written", "Events written", m.events_written.clone());
        r.register_with_unit(
            "events_written",
            "Payload bytes of the events written",
            Unit::Bytes,
            m.bytes_written.clone(),
        );
        r.register("write_batches", "Group commits", m.batches.clone());
        r.register(
            "write_batch_appends",
            "Appends per group commit",
            m.batch_appends.clone(),
        );
        r.register(
            "write_batch_events",
            "Events per group commit",
            m.batch_events.clone(),
        );
        r.register_with_unit(
            "write_commit_duration",
            "Time from sending a group commit to its return",
            Unit::Seconds,
            m.commit_duration.clone(),
        );
        r.register(
            "writer_queue_depth",
            "Appends waiting in the writer's queue (writer.queue_depth)",
            m.writer_queue.clone(),
        );
        r.register(
            "write_rereads",
            "One-round-trip commits redone with a read first (another writer moved the log)",
            m.append_rereads.clone(),
        );
        r.register(
            "write_batches_pipelined",
            "Group commits sent while others were still in flight (writer.pipeline_depth)",
            m.batches_pipelined.clone(),
        );
        r.register(
            "commit_timeouts",
            "Group commits not committed within writer.commit_timeout (outcome unknown)",
            m.commit_timeouts.clone(),
        );
        r.register(
            "limit_rejections",
            "Calls refused or cut off because a configured limit was reached",
            m.limit_rejections.clone(),
        );
        r.register(
            "idempotency_keys_pruned",
            "Idempotency keys deleted after writer.idempotency_key_retention",
            m.idempotency_keys_pruned.clone(),
        );
        r.register(
            "events_scavenged",
            "Events deleted by the scavenger after their stream's retention expired them",
            m.events_scavenged.clone(),
        );
        r.register(
            "listener_connected",
            "1 while the LISTEN connection is up",
            m.listener_connected.clone(),
        );
        r.register(
            "listener_reconnects",
            "LISTEN reconnections",
            m.listener_reconnects.clone(),
        );
        r.register(
            "notifications",
            "Notifications received",
            m.notifications.clone(),
        );
        r.register(
            "subscribers",
            "Open Subscribe streams",
            m.subscribers.clone(),
        );
        r.register("watchers", "Open WatchChanges streams", m.watchers.clone());
        r.register("locks", "Open Lock streams", m.locks.clone());
        r.register(
            "stream_tasks",
            "Tasks serving streams",
            m.stream_tasks.clone(),
        );
        r.register(
            "events_delivered",
            "Events delivered to subscribers",
            m.exported_delivered.clone(),
        );
        r.register(
            "subscriber_buffered",
            "Messages waiting in subscriber buffers",
            m.exported_buffered.clone(),
        );
        r.register_with_unit(
            "subscriber_buffered",
            "Bytes waiting in subscriber buffers",
            Unit::Bytes,
            m.exported_buffered_bytes.clone(),
        );
        r.register(
            "changes_relayed",
            "Changes relayed to watchers",
            m.changes_relayed.clone(),
        );
        r.register(
            "changes_lagged",
            "Changes dropped for lagging watchers",
            m.changes_lagged.clone(),
        );
        r.register(
            "replica_reads",
            "Reads served by replicas",
            m.replica_reads.clone(),
        );
        r.register(
            "primary_reads",
            "Routed reads served by the primary",
            m.primary_reads.clone(),
        );
        r.register(
            "replica_healthy",
            "1 while the replica is in rotation",
            m.replica_healthy.clone(),
        );
        r.register(
            "replica_lag",
            "Sequences the replica is behind the primary",
            m.replica_lag.clone(),
        );
        r.register(
            "pool_connections",
            "Open database connections per pool",
            m.pool_connections.clone(),
        );
        r.register(
            "pool_idle",
            "Idle database connections per pool",
            m.pool_idle.clone(),
        );
        r.register(
            "pool_waiting",
            "Callers waiting for a database connection per pool",
            m.pool_waiting.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Runs `hook` before every scrape (to refresh values that are read on demand).
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.hooks
            .lock()
            .expect("metrics hooks")
            .push(Box::new(hook));
    }

    /// The call counter and latency histogram of one service, method and code (handles that
    /// share their values with the registry's series).
    pub fn rpc_series(
        &self,
        service: &str,
        method: &str,
        code: tonic::Code,
    ) -> (Counter, Histogram) {
        let labels = RpcLabels {
            service: service.to_owned(),
            method: method.to_owned(),
            code: code_name(code),
        };
        (
            self.rpc_requests.get_or_create_owned(&labels),
            self.rpc_duration.get_or_create_owned(&labels),
        )
    }

    /// Records the replicas as just probed.
    pub fn set_replicas(&self, replicas: &[ReplicaState]) {
        for r in replicas {
            let labels = ReplicaLabels {
                replica: r.name.clone(),
            };
            self.replica_healthy
                .get_or_create(&labels)
                .set(i64::from(r.healthy));
            self.replica_lag
                .get_or_create(&labels)
                .set(i64::try_from(r.lag).unwrap_or(i64::MAX));
        }
    }

    /// Records a pool's counts: open connections, idle ones, callers waiting for one.
    pub fn set_pool(&self, pool: &str, connections: u32, idle: u32, waiting: i64) {
        let labels = PoolLabels {
            pool: pool.to_owned(),
        };
        self.pool_connections
            .get_or_create(&labels)
            .set(i64::from(connections));
        self.pool_idle.get_or_create(&labels).set(i64::from(idle));
        self.pool_waiting.get_or_create(&labels).set(waiting);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        // Under the hooks' lock: two scrapes at once must not both add the same delta below.
        let hooks = self.hooks.lock().expect("metrics hooks");
        for hook in hooks.iter() {
            hook(self);
        }
        let delivered = self.events_delivered.get().max(0) as u64;
        self.exported_delivered
            .inc_by(delivered.saturating_sub(self.exported_delivered.get()));
        self.exported_buffered.set(self.buffered.get());
        self.exported_buffered_bytes.set(self.buffered_bytes.get());
        drop(hooks);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The canonical name of a gRPC code (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The content type of the exposition.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` (and `GET /healthz`) until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, content_type, body) = if request.starts_with("GET /metrics") {
                ("200 OK", CONTENT_TYPE, metrics.render())
            } else if request.starts_with("GET /healthz") {
                ("200 OK", "text/plain", "ok\n".to_string())
            } else {
                ("404 Not Found", "text/plain", "not found\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Shards of a count updated on the live delivery path, once per subscriber per wake-up, by
/// every worker thread at once: one cache line each, so that threads do not take turns owning
/// one line (a single shared atomic cost more than the rest of a delivery's bookkeeping). Summed
/// when read.
const SHARDS: usize = 16;

/// A count kept in per-thread shards (see [`SHARDS`]), read as their sum.
pub struct Sharded {
    shards: [Padded; SHARDS],
}

#[repr(align(128))]
#[derive(Default)]
struct Padded(std::sync::atomic::AtomicI64);

impl Default for Sharded {
    fn default() -> Self {
        Sharded {
            shards: std::array::from_fn(|_| Padded::default()),
        }
    }
}

impl std::fmt::Debug for Sharded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sharded({})", self.get())
    }
}

thread_local! {
    /// This thread's shard.
    static SHARD: usize = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS
    };
}

impl Sharded {
    fn shard(&self) -> &std::sync::atomic::AtomicI64 {
        &self.shards[SHARD.with(|s| *s)].0
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: i64) {
        self.shard()
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Subtracts `n`.
    pub fn dec_by(&self, n: i64) {
        self.inc_by(-n);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.inc_by(-1);
    }

    /// The sum of the shards.
    pub fn get(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.0.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_counts_sum_across_threads_and_scrapes_show_them() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.events_delivered.inc_by(2);
                        m.buffered.inc();
                        // Taken off on another thread than the one that added it, as a
                        // subscriber's queue is drained by the connection's task.
                        if t % 2 == 0 {
                            m.buffered.dec();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.events_delivered.get(), 8000);
        assert_eq!(m.buffered.get(), 2000);
        m.buffered.dec_by(2000);
        let text = m.render();
        assert!(
            text.contains("pgstore_events_delivered_total 8000"),
            "{text}"
        );
        assert!(text.contains("pgstore_subscriber_buffered 0"), "{text}");
        // A second scrape adds nothing that was not delivered since.
        assert!(m.render().contains("pgstore_events_delivered_total 8000"));
    }
}
