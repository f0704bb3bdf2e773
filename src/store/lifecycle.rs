//! Stream lifecycle: status, tombstone, archive, restore, delete.
//!
//! State machine (a stream with no row is "absent"):
//!
//! ```text
//!   absent --append--> active --archive--> archived --restore--> active
//!   absent | active | archived --tombstone--> tombstoned   (terminal: never accepts appends)
//!   active | archived --delete--> absent                   (events and snapshot removed)
//!   tombstoned --delete--> tombstoned                      (events removed, tombstone kept)
//! ```
//!
//! Archive, tombstone and restore are idempotent. Every change takes the global head lock, the
//! one the writer holds while it checks stream states, so no append can slip past a state change.

use std::time::SystemTime;

use super::{StreamState, db::PgConn, db::db_err};
use crate::error::{Error, Result};

/// A stream's status.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// The stream.
    pub stream_id: String,
    /// Its version.
    pub version: u64,
    /// Its state.
    pub state: StreamState,
    /// The tombstone's reason.
    pub tombstone_reason: Option<String>,
    /// Creation time.
    pub created_at: SystemTime,
    /// Last change.
    pub updated_at: SystemTime,
}

const GET: &str = "SELECT version, state, tombstone_reason, created_at, updated_at \
     FROM pgstore.streams WHERE stream_id = $1";
const LOCK_HEAD: &str = "SELECT seq FROM pgstore.head FOR UPDATE";
const STATE_FOR_UPDATE: &str = "SELECT state FROM pgstore.streams WHERE stream_id = $1 FOR UPDATE";
const SET_STATE: &str =
    "UPDATE pgstore.streams SET state = $2, updated_at = now() WHERE stream_id = $1";
const TOMBSTONE: &str = "INSERT INTO pgstore.streams (stream_id, version, state, tombstone_reason) \
     VALUES ($1, 0, 3, $2) \
     ON CONFLICT (stream_id) DO UPDATE SET state = 3, tombstone_reason = EXCLUDED.tombstone_reason, \
       updated_at = now() WHERE pgstore.streams.state <> 3";
const DELETE_EVENTS: &str = "DELETE FROM pgstore.events WHERE stream_id = $1";
const DELETE_SNAPSHOT: &str = "DELETE FROM pgstore.snapshots WHERE stream_id = $1";
const DELETE_STREAM: &str = "DELETE FROM pgstore.streams WHERE stream_id = $1";

/// A stream's status; `NotFound` when absent.
pub async fn get(conn: &mut PgConn, stream_id: &str) -> Result<StreamInfo> {
    let stmt = conn.stmt(GET).await.map_err(db_err)?;
    let row = conn
        .client
        .query_opt(&stmt, &[&stream_id])
        .await
        .map_err(db_err)?
        .ok_or_else(|| Error::StreamNotFound {
            stream_id: stream_id.to_owned(),
        })?;
    Ok(StreamInfo {
        stream_id: stream_id.to_owned(),
        version: row.get::<_, i64>(0) as u64,
        state: StreamState::from_code(row.get(1))?,
        tombstone_reason: row.get(2),
        created_at: row.get(3),
        updated_at: row.get(4),
    })
}

/// Tombstones a stream (absent streams too: the id is reserved for good).
pub async fn tombstone(conn: &mut PgConn, stream_id: &str, reason: &str) -> Result<()> {
    let tombstone = conn.stmt(TOMBSTONE).await.map_err(db_err)?;
    let reason = (!reason.is_empty()).then_some(reason);
    locked(conn, async |tx| {
        tx.execute(&tombstone, &[&stream_id, &reason]).await?;
        Ok(Ok(()))
    })
    .await
}

/// Archives an active stream.
pub async fn archive(conn: &mut PgConn, stream_id: &str) -> Result<()> {
    transition(conn, stream_id, "archive", StreamState::Archived).await
}

/// Restores an archived stream.
pub async fn restore(conn: &mut PgConn, stream_id: &str) -> Result<()> {
    transition(conn, stream_id, "restore", StreamState::Active).await
}

async fn transition(
    conn: &mut PgConn,
    stream_id: &str,
    operation: &'static str,
    to: StreamState,
) -> Result<()> {
    let get_state = conn.stmt(STATE_FOR_UPDATE).await.map_err(db_err)?;
    let set_state = conn.stmt(SET_STATE).await.map_err(db_err)?;
    locked(conn, async |tx| {
        let Some(row) = tx.query_opt(&get_state, &[&stream_id]).await? else {
            return Ok(Err(Error::StreamNotFound {
                stream_id: stream_id.to_owned(),
            }));
        };
        let state = match StreamState::from_code(row.get(0)) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e.into())),
        };
        if state == StreamState::Tombstoned {
            return Ok(Err(Error::StreamState {
                stream_id: stream_id.to_owned(),
                state,
                operation,
            }));
        }
        if state != to {
            tx.execute(&set_state, &[&stream_id, &(to as i16)]).await?;
        }
        Ok(Ok(()))
    })
    .await
}

/// Deletes a stream's events and snapshot; returns how many events were removed.
pub async fn delete(conn: &mut PgConn, stream_id: &str) -> Result<u64> {
    let get_state = conn.stmt(STATE_FOR_UPDATE).await.map_err(db_err)?;
    let delete_events = conn.stmt(DELETE_EVENTS).await.map_err(db_err)?;
    let delete_snapshot = conn.stmt(DELETE_SNAPSHOT).await.map_err(db_err)?;
    let delete_stream = conn.stmt(DELETE_STREAM).await.map_err(db_err)?;
    locked(conn, async |tx| {
        let Some(row) = tx.query_opt(&get_state, &[&stream_id]).await? else {
            return Ok(Err(Error::StreamNotFound {
                stream_id: stream_id.to_owned(),
            }));
        };
        let deleted = tx.execute(&delete_events, &[&stream_id]).await?;
        tx.execute(&delete_snapshot, &[&stream_id]).await?;
        if row.get::<_, i16>(0) != StreamState::Tombstoned as i16 {
            tx.execute(&delete_stream, &[&stream_id]).await?;
        }
        Ok(Ok(deleted))
    })
    .await
}

/// Runs `f` in a transaction holding the global head lock. `f` returns a domain result inside a
/// driver result: a domain error rolls back, a driver error too.
async fn locked<T>(
    conn: &mut PgConn,
    f: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<Result<T>, tokio_postgres::Error>,
) -> Result<T> {
    let lock = conn.stmt(LOCK_HEAD).await.map_err(db_err)?;
    let tx = conn.client.transaction().await.map_err(db_err)?;
    tx.query_one(&lock, &[]).await.map_err(db_err)?;
    match f(&tx).await.map_err(db_err)? {
        Ok(v) => {
            tx.commit().await.map_err(db_err)?;
            Ok(v)
        }
        Err(e) => {
            tx.rollback().await.map_err(db_err)?;
            Err(e)
        }
    }
}
