//! PostgreSQL connections: the pool manager, per-connection statement cache, and the mapping of
//! driver errors to domain errors.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use bytes::{BufMut, BytesMut};
use postgres_types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Statement, error::SqlState};

use super::target::Target;
use crate::error::Error;

/// A pool of primary (or replica) connections, counting the callers waiting for one.
#[derive(Clone)]
pub struct Pool {
    inner: bb8::Pool<Manager>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// A pool's connections as last counted, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Open connections (idle or in use).
    pub connections: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// Callers waiting for a connection right now.
    pub waiting: i64,
}

impl Pool {
    /// The counts now.
    pub fn state(&self) -> PoolState {
        let s = self.inner.state();
        PoolState {
            connections: s.connections,
            idle: s.idle_connections,
            waiting: self
                .waiting
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(0),
        }
    }
}

/// Counts a caller as waiting until dropped (also when its request is cancelled mid-wait).
struct Waiting<'a>(&'a std::sync::atomic::AtomicI64);

impl<'a> Waiting<'a> {
    fn new(counter: &'a std::sync::atomic::AtomicI64) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A pooled connection.
pub type PooledConn<'a> = bb8::PooledConnection<'a, Manager>;

/// A connection with its own cache of prepared statements, so hot queries are parsed and planned
/// once per connection and then cost one round trip each.
pub struct PgConn {
    /// The driver's client.
    pub client: Client,
    /// Statements prepared on this connection, by their SQL text. (Locked only to look up or
    /// add one: statements in flight on one connection may share it.)
    cache: Mutex<HashMap<&'static str, Statement>>,
}

impl PgConn {
    /// The prepared statement for `sql`, preparing it on first use.
    pub async fn stmt(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.cache.lock().expect("statement cache").get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.cache
            .lock()
            .expect("statement cache")
            .insert(sql, s.clone());
        Ok(s)
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Opens a connection and drives it on its own task. The error names the server and the cause.
pub async fn connect(target: &Target) -> Result<PgConn, Error> {
    let (client, connection) = target
        .connect()
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(PgConn {
        client,
        cache: Mutex::new(HashMap::new()),
    })
}

/// The bb8 manager for [`PgConn`].
pub struct Manager {
    target: Target,
}

impl bb8::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = Error;

    async fn connect(&self) -> Result<PgConn, Error> {
        connect(&self.target).await
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), Error> {
        conn.client
            .simple_query("")
            .await
            .map(|_| ())
            .map_err(db_err)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.is_closed()
    }
}

/// Builds a pool. Connection failures surface at once (no retry loop) so requests fail fast with
/// UNAVAILABLE while the database is down; `wait` bounds how long a request waits for a busy pool.
pub fn pool(target: Target, size: u32, wait: Duration) -> Pool {
    let inner = bb8::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .test_on_check_out(false)
        .retry_connection(false)
        .connection_timeout(wait)
        .idle_timeout(Some(Duration::from_secs(300)))
        .build_unchecked(Manager { target });
    Pool {
        inner,
        waiting: Default::default(),
    }
}

/// A live connection from the pool: connections that died while idle (database restart) are
/// discarded instead of being handed out.
pub async fn get(pool: &Pool) -> Result<PooledConn<'_>, Error> {
    for _ in 0..=pool.inner.state().connections {
        let conn = {
            let _waiting = Waiting::new(&pool.waiting);
            pool.inner.get().await.map_err(run_err)?
        };
        if !conn.is_closed() {
            return Ok(conn);
        }
        // Dropping a broken connection removes it from the pool (has_broken).
    }
    Err(Error::Unavailable("no live database connection".into()))
}

fn run_err(e: bb8::RunError<Error>) -> Error {
    match e {
        bb8::RunError::User(e) => e,
        bb8::RunError::TimedOut => {
            Error::Unavailable("timed out waiting for a database connection".into())
        }
    }
}

/// Whether the error means the connection or the server went away (as opposed to a statement
/// error on a healthy connection).
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        }
        // No SQLSTATE: an I/O, protocol or connect error, unless it is a value the driver could
        // not convert (a bug, not an outage: retrying would not help).
        None => {
            let text = e.to_string();
            !(text.starts_with("error serializing") || text.starts_with("error deserializing"))
        }
    }
}

/// Maps a driver error to the domain: lost connections and a server that cannot take the
/// session are UNAVAILABLE, serialization failures and deadlocks are retryable conflicts
/// (ABORTED), a statement cut off by `statement_timeout` is a timeout.
pub fn db_err(e: tokio_postgres::Error) -> Error {
    let code = e.code().cloned();
    match code {
        Some(c)
            if c == SqlState::T_R_SERIALIZATION_FAILURE || c == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            Error::Conflict(db_message(&e))
        }
        Some(c) if c == SqlState::QUERY_CANCELED => {
            Error::Timeout(format!("{} (database.statement_timeout)", db_message(&e)))
        }
        Some(c) if c.code().starts_with("28") || c == SqlState::INVALID_CATALOG_NAME => {
            Error::Unavailable(format!(
                "the database refused the session: {}",
                db_message(&e)
            ))
        }
        Some(c) if c == SqlState::INSUFFICIENT_PRIVILEGE => Error::Internal(format!(
            "pgstore's database role lacks a privilege: {}",
            db_message(&e)
        )),
        // A table, column or function this pgstore expects is missing: the database (typically a
        // replica still replaying a migration) is behind the schema. Retryable, and the router
        // takes a replica answering this out of rotation.
        Some(c)
            if c == SqlState::UNDEFINED_TABLE
                || c == SqlState::UNDEFINED_COLUMN
                || c == SqlState::UNDEFINED_FUNCTION =>
        {
            Error::Unavailable(format!(
                "the database schema is behind this pgstore (a replica still replaying a \
                 migration, or `pgstore migrate` not run): {}",
                db_message(&e)
            ))
        }
        _ if is_connection_error(&e) => Error::Unavailable(crate::error::chain(&e)),
        _ => Error::Internal(db_message(&e)),
    }
}

/// The server's message and SQLSTATE, or the driver's error chain.
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => crate::error::chain(e),
    }
}

/// JSON text read from `json`/`jsonb` columns as text, without a round trip through a parsed
/// value.
#[derive(Debug, Clone)]
pub struct JsonText(pub String);

/// Borrowed JSON text sent to `json`/`jsonb` columns: the server parses it once; nothing is
/// copied on the way.
#[derive(Debug, Clone, Copy)]
pub struct JsonRef<'a>(pub &'a str);

impl ToSql for JsonRef<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for JsonText {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let raw = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, rest)) => rest,
                _ => return Err("unsupported jsonb format version".into()),
            }
        } else {
            raw
        };
        Ok(JsonText(std::str::from_utf8(raw)?.to_owned()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}
