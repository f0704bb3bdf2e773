//! Read routing: Load, ReadFrom and subscriber reads go to a healthy read replica when replicas
//! are configured, else to the primary.
//!
//! Read-your-writes: a read may carry `min_sequence`. It is served by a replica known to have
//! replayed at least that sequence; if none has, the router waits up to `fence_wait` for one,
//! then reads the primary. Every read reports the head of the snapshot it read, and a replica
//! answer below the fence is thrown away and the primary asked instead, so the fence holds even
//! when a replica's known head was stale.
//!
//! Each replica is probed every `probe_interval` (`SELECT seq FROM pgstore.head`): one that does
//! not answer, or lags the primary's head by more than `max_lag` sequences, is out of rotation
//! until a probe finds it healthy again.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::db::{self, Pool, PooledConn};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Replica settings.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Connections per replica pool.
    pub pool_size: u32,
    /// How often each replica is probed.
    pub probe_interval: Duration,
    /// A replica further behind the primary's head than this (in sequences) is out of rotation.
    pub max_lag: u64,
    /// How long a fenced read waits for a replica to catch up before reading the primary.
    pub fence_wait: Duration,
}

/// One replica and what the prober last learned of it.
pub struct Replica {
    /// `host:port`, for logs and metrics.
    pub name: String,
    pool: Pool,
    /// The head it had replayed at the last probe or read.
    pub head: AtomicU64,
    /// In rotation.
    pub healthy: AtomicBool,
}

impl Replica {
    /// The replica pool's counts.
    pub fn pool_state(&self) -> db::PoolState {
        self.pool.state()
    }
}

/// A read the router can send to a replica: it reports the head of the snapshot it read, which
/// is what the read-your-writes fence is checked against.
pub trait RoutedRead: Sync {
    /// What the read returns.
    type Output: Send;
    /// Runs the read; returns its value and the log head of its snapshot.
    fn run<'a>(
        &'a self,
        conn: &'a mut db::PgConn,
    ) -> impl std::future::Future<Output = Result<(Self::Output, u64)>> + Send + 'a;
}

impl RoutedRead for super::read::ReadQuery {
    type Output = super::read::LogPage;
    async fn run(&self, conn: &mut db::PgConn) -> Result<(Self::Output, u64)> {
        let page = super::read::read_from(conn, self).await?;
        let head = page.head;
        Ok((page, head))
    }
}

impl RoutedRead for super::read::QueryRead {
    type Output = (Vec<crate::wire::EncodedEvent>, u64);
    async fn run(&self, conn: &mut db::PgConn) -> Result<(Self::Output, u64)> {
        let (events, head) = super::read::read_query(conn, self).await?;
        Ok(((events, head), head))
    }
}

impl RoutedRead for super::read::LoadQuery {
    type Output = super::read::StreamPage;
    async fn run(&self, conn: &mut db::PgConn) -> Result<(Self::Output, u64)> {
        let page = super::read::load(conn, self).await?;
        let head = page.head;
        Ok((page, head))
    }
}

/// Where a read was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The primary.
    Primary,
    /// A replica (index into the router's list).
    Replica(usize),
}

/// The read router.
pub struct Router {
    primary: Pool,
    /// The replicas.
    pub replicas: Vec<Arc<Replica>>,
    next: AtomicUsize,
    config: ReplicaConfig,
    /// Where read counts and replica states are reported.
    metrics: Arc<Metrics>,
    /// Replica state changes, for logs.
    transitions: Mutex<()>,
}

impl Router {
    /// A router over the primary pool and one pool per replica.
    pub fn new(
        primary: Pool,
        replicas: Vec<super::target::Target>,
        config: ReplicaConfig,
        connect_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> Router {
        let replicas = replicas
            .into_iter()
            .map(|target| {
                Arc::new(Replica {
                    name: target.name.clone(),
                    pool: db::pool(target, config.pool_size, connect_wait),
                    head: AtomicU64::new(0),
                    // Out of rotation until the first probe answers.
                    healthy: AtomicBool::new(false),
                })
            })
            .collect();
        Router {
            primary,
            replicas,
            next: AtomicUsize::new(0),
            config,
            metrics,
            transitions: Mutex::new(()),
        }
    }

    /// A healthy replica known to have replayed `min_sequence`, round robin.
    fn pick(&self, min_sequence: u64) -> Option<usize> {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| (start + i) % n).find(|&i| {
            let r = &self.replicas[i];
            r.healthy.load(Ordering::Relaxed) && r.head.load(Ordering::Relaxed) >= min_sequence
        })
    }

    /// The replicas.
    pub fn replicas(&self) -> &[Arc<Replica>] {
        &self.replicas
    }

    /// A connection for a read that must reflect `min_sequence`, and where it comes from.
    pub async fn conn(&self, min_sequence: u64) -> Result<(PooledConn<'_>, Source)> {
        if !self.replicas.is_empty() {
            let mut waited = Duration::ZERO;
            let step = Duration::from_millis(5);
            loop {
                if let Some(i) = self.pick(min_sequence) {
                    match db::get(&self.replicas[i].pool).await {
                        Ok(conn) => return Ok((conn, Source::Replica(i))),
                        Err(e) => self.mark(i, false, &e.to_string()),
                    }
                    continue;
                }
                // Nobody is there yet: can a healthy replica catch up within the wait?
                let any_healthy = self
                    .replicas
                    .iter()
                    .any(|r| r.healthy.load(Ordering::Relaxed));
                if !any_healthy || waited >= self.config.fence_wait {
                    break;
                }
                tokio::time::sleep(step).await;
                waited += step;
                self.refresh_heads().await;
            }
        }
        Ok((db::get(&self.primary).await?, Source::Primary))
    }

    /// Runs a read with read-your-writes: a replica answer whose snapshot head is below
    /// `min_sequence` is replaced by the primary's.
    pub async fn read<R: RoutedRead>(&self, min_sequence: u64, read: &R) -> Result<R::Output> {
        let (mut conn, source) = self.conn(min_sequence).await?;
        if let Source::Replica(i) = source {
            match read.run(&mut conn).await {
                Ok((value, head)) if head >= min_sequence => {
                    self.replicas[i].head.fetch_max(head, Ordering::Relaxed);
                    self.metrics.replica_reads.inc();
                    return Ok(value);
                }
                Ok(_) => {}
                Err(Error::Unavailable(why)) => self.mark(i, false, &why),
                Err(e) => return Err(e),
            }
            drop(conn);
            conn = db::get(&self.primary).await?;
        }
        self.metrics.primary_reads.inc();
        read.run(&mut conn).await.map(|(value, _)| value)
    }

    /// Asks every healthy replica for its head now (used while a fenced read waits).
    async fn refresh_heads(&self) {
        for r in &self.replicas {
            if r.healthy.load(Ordering::Relaxed)
                && let Ok(head) = probe(r).await
            {
                r.head.fetch_max(head, Ordering::Relaxed);
            }
        }
    }

    fn mark(&self, i: usize, healthy: bool, why: &str) {
        let r = &self.replicas[i];
        let _g = self.transitions.lock().expect("transitions");
        if r.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            if healthy {
                tracing::info!(replica = %r.name, "replica back in rotation");
            } else {
                tracing::warn!(replica = %r.name, reason = why, "replica out of rotation");
            }
        }
    }

    /// Probes every replica until `stop`; `primary_head` gives the primary's head for lag.
    pub async fn probe_loop(
        self: Arc<Self>,
        primary_head: impl Fn() -> u64 + Send,
        stop: CancellationToken,
    ) {
        if self.replicas.is_empty() {
            return;
        }
        loop {
            let mut states = Vec::with_capacity(self.replicas.len());
            for (i, r) in self.replicas.iter().enumerate() {
                let probed = tokio::time::timeout(
                    self.config.probe_interval.max(Duration::from_secs(1)),
                    probe(r),
                )
                .await;
                match probed {
                    Ok(Ok(head)) => {
                        r.head.store(head, Ordering::Relaxed);
                        let lag = primary_head().saturating_sub(head);
                        if lag > self.config.max_lag {
                            self.mark(i, false, &format!("lags {lag} sequences"));
                        } else {
                            self.mark(i, true, "");
                        }
                    }
                    Ok(Err(e)) => self.mark(i, false, &e.to_string()),
                    Err(_) => self.mark(i, false, "probe timed out"),
                }
                let head = r.head.load(Ordering::Relaxed);
                states.push(crate::metrics::ReplicaState {
                    name: r.name.clone(),
                    healthy: r.healthy.load(Ordering::Relaxed),
                    head,
                    lag: primary_head().saturating_sub(head),
                });
            }
            self.metrics.set_replicas(&states);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.config.probe_interval) => {}
            }
        }
    }
}

async fn probe(r: &Replica) -> Result<u64> {
    let conn = db::get(&r.pool).await?;
    let row = conn
        .client
        .query_one("SELECT seq FROM pgstore.head", &[])
        .await
        .map_err(db::db_err)?;
    Ok(row.get::<_, i64>(0) as u64)
}
