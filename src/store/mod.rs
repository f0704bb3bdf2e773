//! Everything that talks to PostgreSQL: the group-commit writer, reads of streams and of the global
//! log, stream lifecycle, snapshots, checkpoints and migrations.

pub mod checkpoints;
pub mod db;
pub mod ids;
pub mod lifecycle;
pub mod migrate;
pub mod query;
pub mod read;
pub mod readahead;
pub mod retention;
pub mod router;
pub mod snapshots;
pub mod target;
pub mod writer;

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::domain::{
    AppendCommand, AppendCondition, AppendOutcome, ExpectedVersion, NewEvent, PartOutcome, Payload,
    RecordedEvent, StreamAppend, StreamState, is_json_content_type, partition_key,
};
use crate::error::Result;
pub use db::Pool;

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
    /// How long to wait for another instance's migration (`database.migration_wait`).
    pub migration_wait: Duration,
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
        migrate::migrate(&mut conn.client, config.migration_wait).await?;
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
            metrics.clone(),
            shutdown,
            ids::AssignedIds::new(prefix as u64),
        );
        let store = Store {
            inner: Arc::new(Inner {
                pool,
                writer,
                router,
                // Each page read ahead holds a pooled connection while it is read: a quarter
                // of the pool at most, so requests keep the rest.
                readahead: readahead::ReadAhead::new((config.pool_size as usize / 4).max(1)),
            }),
        };
        // Pools and the writer's queue are counted when scraped. Weak: the metrics must not
        // keep the store alive.
        let weak = Arc::downgrade(&store.inner);
        metrics.on_scrape(move |m| {
            if let Some(inner) = weak.upgrade() {
                let pools = std::iter::once(("primary", inner.pool.state())).chain(
                    inner
                        .router
                        .replicas()
                        .iter()
                        .map(|r| (r.name.as_str(), r.pool_state())),
                );
                for (name, s) in pools {
                    m.set_pool(name, s.connections, s.idle, s.waiting);
                }
                m.writer_queue.set(inner.writer.queued() as i64);
            }
        });
        Ok((store, task))
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

    /// The events matching a query and the head they are consistent with, through the router.
    pub async fn read_query(
        &self,
        min_sequence: u64,
        q: &read::QueryRead,
    ) -> Result<(Vec<crate::wire::EncodedEvent>, u64)> {
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
