//! Per-instance metrics: counters and gauges kept in atomics, rendered in the Prometheus text
//! format on `GET /metrics` (when `metrics_listen` is set).
//!
//! Kept in-house rather than through a global recorder so that several pgstore instances can live
//! in one process (as the tests run them) with metrics of their own.

use std::sync::{
    Arc,
    atomic::{AtomicI64, AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

/// The metrics of one instance.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Appends answered OK (including idempotent retries).
    pub appends: AtomicU64,
    /// Events written.
    pub events_written: AtomicU64,
    /// Write transactions committed (group commits).
    pub batches: AtomicU64,
    /// One-round-trip commits that found the writer's memory stale (and were redone reading).
    pub append_rereads: AtomicU64,
    /// Batches sent while others were still in flight on the writer's connection.
    pub batches_pipelined: AtomicU64,
    /// Batches not committed within `writer.commit_timeout` (outcome unknown).
    pub commit_timeouts: AtomicU64,
    /// Calls refused because a limit was reached (subscriber slots, slow subscribers cut off).
    pub limit_rejections: AtomicU64,
    /// Idempotency keys deleted after their retention.
    pub idempotency_keys_pruned: AtomicU64,
    /// Whether the LISTEN connection is up (0/1).
    pub listener_connected: AtomicI64,
    /// LISTEN reconnections after a loss.
    pub listener_reconnects: AtomicU64,
    /// Notifications received.
    pub notifications: AtomicU64,
    /// Open Subscribe streams.
    pub subscribers: AtomicI64,
    /// Open WatchChanges streams.
    pub watchers: AtomicI64,
    /// Open Lock streams.
    pub locks: AtomicI64,
    /// Background tasks serving streams (subscriber, watcher and lock tasks).
    pub stream_tasks: AtomicI64,
    /// Events delivered to subscribers.
    pub events_delivered: AtomicU64,
    /// Messages queued in subscriber buffers right now (bounded by subscribers x buffer).
    pub buffered: AtomicI64,
    /// Changes relayed to watchers.
    pub changes_relayed: AtomicU64,
    /// Changes dropped for watchers that lagged.
    pub changes_lagged: AtomicU64,
    /// Reads served by a replica.
    pub replica_reads: AtomicU64,
    /// Reads served by the primary.
    pub primary_reads: AtomicU64,
    /// The replicas as last probed.
    pub replicas: std::sync::Mutex<Vec<ReplicaState>>,
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
pub struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &AtomicI64,
}

impl GaugeGuard {
    /// Raises `gauge` until the guard is dropped.
    pub fn new(metrics: &Arc<Metrics>, gauge: fn(&Metrics) -> &AtomicI64) -> Self {
        gauge(metrics).fetch_add(1, Ordering::Relaxed);
        GaugeGuard {
            metrics: metrics.clone(),
            gauge,
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed) as i64;
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, i64); 21] = [
            (
                "pgstore_commit_timeouts_total",
                "counter",
                "Append batches not committed within writer.commit_timeout (outcome unknown).",
                c(&self.commit_timeouts),
            ),
            (
                "pgstore_limit_rejections_total",
                "counter",
                "Calls refused or cut off because a configured limit was reached.",
                c(&self.limit_rejections),
            ),
            (
                "pgstore_replica_reads_total",
                "counter",
                "Reads served by replicas.",
                c(&self.replica_reads),
            ),
            (
                "pgstore_primary_reads_total",
                "counter",
                "Routed reads served by the primary.",
                c(&self.primary_reads),
            ),
            (
                "pgstore_appends_total",
                "counter",
                "Appends answered OK.",
                c(&self.appends),
            ),
            (
                "pgstore_events_written_total",
                "counter",
                "Events written.",
                c(&self.events_written),
            ),
            (
                "pgstore_write_batches_total",
                "counter",
                "Group commits.",
                c(&self.batches),
            ),
            (
                "pgstore_write_rereads_total",
                "counter",
                "One-round-trip commits redone with a read first (another writer moved the log).",
                c(&self.append_rereads),
            ),
            (
                "pgstore_write_batches_pipelined_total",
                "counter",
                "Group commits sent while others were still in flight (writer.pipeline_depth).",
                c(&self.batches_pipelined),
            ),
            (
                "pgstore_idempotency_keys_pruned_total",
                "counter",
                "Idempotency keys deleted after writer.idempotency_key_retention.",
                c(&self.idempotency_keys_pruned),
            ),
            (
                "pgstore_listener_connected",
                "gauge",
                "1 while the LISTEN connection is up.",
                g(&self.listener_connected),
            ),
            (
                "pgstore_listener_reconnects_total",
                "counter",
                "LISTEN reconnections.",
                c(&self.listener_reconnects),
            ),
            (
                "pgstore_notifications_total",
                "counter",
                "Notifications received.",
                c(&self.notifications),
            ),
            (
                "pgstore_subscribers",
                "gauge",
                "Open Subscribe streams.",
                g(&self.subscribers),
            ),
            (
                "pgstore_watchers",
                "gauge",
                "Open WatchChanges streams.",
                g(&self.watchers),
            ),
            (
                "pgstore_locks",
                "gauge",
                "Open Lock streams.",
                g(&self.locks),
            ),
            (
                "pgstore_stream_tasks",
                "gauge",
                "Tasks serving streams.",
                g(&self.stream_tasks),
            ),
            (
                "pgstore_events_delivered_total",
                "counter",
                "Events delivered to subscribers.",
                c(&self.events_delivered),
            ),
            (
                "pgstore_subscriber_buffered",
                "gauge",
                "Messages waiting in subscriber buffers.",
                g(&self.buffered),
            ),
            (
                "pgstore_changes_relayed_total",
                "counter",
                "Changes relayed to watchers.",
                c(&self.changes_relayed),
            ),
            (
                "pgstore_changes_lagged_total",
                "counter",
                "Changes dropped for lagging watchers.",
                c(&self.changes_lagged),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        let replicas = self.replicas.lock().expect("metrics").clone();
        if !replicas.is_empty() {
            out.push_str("# HELP pgstore_replica_healthy 1 while the replica is in rotation.\n");
            out.push_str("# TYPE pgstore_replica_healthy gauge\n");
            for r in &replicas {
                let up = u8::from(r.healthy);
                out.push_str(&format!(
                    "pgstore_replica_healthy{{replica=\"{}\"}} {up}\n",
                    r.name
                ));
            }
            out.push_str(
                "# HELP pgstore_replica_lag Sequences the replica is behind the primary.\n",
            );
            out.push_str("# TYPE pgstore_replica_lag gauge\n");
            for r in &replicas {
                out.push_str(&format!(
                    "pgstore_replica_lag{{replica=\"{}\"}} {}\n",
                    r.name, r.lag
                ));
            }
        }
        out
    }
}

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
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                ("200 OK", metrics.render())
            } else if request.starts_with("GET /healthz") {
                ("200 OK", "ok\n".to_string())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
