//! Stream lifecycle: status, tombstone, archive, restore, delete.
//!
//! State machine (a stream with no row is "absent"):
//!
//! ```text
//!   absent --append--> active --archive--> archived --restore--> active
//!   absent | active | archived --tombstone--> tombstoned   (terminal: never accepts appends)
//!   active | archived --delete--> deleting --> absent      (events and snapshot removed)
//!   tombstoned --delete--> tombstoned                      (events removed, tombstone kept)
//! ```
//!
//! Archive, tombstone and restore are idempotent. Every change of state takes the global head
//! lock, the one the writer holds while it checks stream states, so no append can slip past a
//! state change.
//!
//! A delete holds that lock only to change states, never while rows are deleted (that would stall
//! every append for as long as a large stream takes to delete): it marks the stream `deleting`
//! (appends are refused, reads see no stream), deletes its events in batches of
//! `database.delete_batch_size` versions, each its own short transaction followed by a pause as
//! long as the batch took, then drops the stream's row.
//! A delete cut short (the instance died) is finished by the next DeleteStream of that stream or
//! by [`finish_abandoned_deletes`]. A delete is [`mark_for_delete`] then [`remove_events`].

use std::time::SystemTime;

use super::{StreamState, db::PgConn, db::db_err, retention::Retention};
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
    /// Its retention rule.
    pub retention: Retention,
}

const GET: &str = "SELECT s.version, s.state, s.tombstone_reason, s.created_at, s.updated_at, \
       m.max_count, extract(epoch FROM m.max_age)::float8, m.truncate_before \
     FROM pgstore.streams s LEFT JOIN pgstore.stream_metadata m ON m.stream_id = s.stream_id \
     WHERE s.stream_id = $1 AND s.state <> 4";
const LOCK_HEAD: &str = "SELECT seq FROM pgstore.head FOR UPDATE";
const STATE_FOR_UPDATE: &str =
    "SELECT state FROM pgstore.streams WHERE stream_id = $1 AND state <> 4 FOR UPDATE";
/// Delete's view: a stream left `deleting` by a delete cut short is found, to be finished.
const DELETE_STATE_FOR_UPDATE: &str =
    "SELECT state FROM pgstore.streams WHERE stream_id = $1 FOR UPDATE";
const SET_STATE: &str =
    "UPDATE pgstore.streams SET state = $2, updated_at = now() WHERE stream_id = $1";
const TOMBSTONE: &str = "INSERT INTO pgstore.streams (stream_id, version, state, tombstone_reason) \
     VALUES ($1, 0, 3, $2) \
     ON CONFLICT (stream_id) DO UPDATE SET state = 3, tombstone_reason = EXCLUDED.tombstone_reason, \
       updated_at = now() WHERE pgstore.streams.state <> 3";
const MARK_DELETING: &str =
    "UPDATE pgstore.streams SET state = 4, updated_at = now() WHERE stream_id = $1";
/// One batch: a range of versions. (Walking the versions, each batch's index scan starts past
/// the entries the batches before it left dead; re-selecting "any N rows of the stream" would
/// wade through all of them every time.)
const DELETE_EVENTS_BATCH: &str =
    "DELETE FROM pgstore.events WHERE stream_id = $1 AND version >= $2 AND version < $3";
const VERSION_RANGE: &str =
    "SELECT min(version), max(version) FROM pgstore.events WHERE stream_id = $1";
const DELETE_SNAPSHOT: &str = "DELETE FROM pgstore.snapshots WHERE stream_id = $1";
const DROP_DELETED: &str = "DELETE FROM pgstore.streams WHERE stream_id = $1 AND state = 4";
const DROP_RETENTION: &str = "DELETE FROM pgstore.stream_metadata WHERE stream_id = $1";
const ABANDONED: &str = "SELECT stream_id FROM pgstore.streams \
     WHERE state = 4 AND updated_at < now() - make_interval(secs => $1) LIMIT 100";

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
        retention: Retention {
            max_count: row.get::<_, Option<i64>>(5).map(|n| n as u64),
            max_age: row.get::<_, Option<f64>>(6).map(super::retention::seconds),
            truncate_before: row.get::<_, Option<i64>>(7).map(|n| n as u64),
        },
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

/// The first step of a delete, under the global lock: an active or archived stream becomes
/// `deleting` (a stream already `deleting` stays so: its delete is finished). Returns the state
/// it was in; NOT_FOUND for a stream that does not exist.
pub async fn mark_for_delete(conn: &mut PgConn, stream_id: &str) -> Result<StreamState> {
    let get_state = conn.stmt(DELETE_STATE_FOR_UPDATE).await.map_err(db_err)?;
    let mark = conn.stmt(MARK_DELETING).await.map_err(db_err)?;
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
        if matches!(state, StreamState::Active | StreamState::Archived) {
            tx.execute(&mark, &[&stream_id]).await?;
        }
        Ok(Ok(state))
    })
    .await
}

/// Deletes the events of a stream that is `deleting` (or tombstoned) in batches, then its
/// snapshot, then (unless tombstoned) its row.
pub async fn remove_events(
    conn: &mut PgConn,
    stream_id: &str,
    batch: u32,
    tombstoned: bool,
) -> Result<u64> {
    let delete_batch = conn.stmt(DELETE_EVENTS_BATCH).await.map_err(db_err)?;
    let version_range = conn.stmt(VERSION_RANGE).await.map_err(db_err)?;
    let delete_snapshot = conn.stmt(DELETE_SNAPSHOT).await.map_err(db_err)?;
    let drop_row = conn.stmt(DROP_DELETED).await.map_err(db_err)?;
    let drop_retention = conn.stmt(DROP_RETENTION).await.map_err(db_err)?;
    let step = i64::from(batch.max(1));
    let mut deleted = 0;
    // No event can be added meanwhile (the stream refuses appends), so the range is final.
    let range = conn
        .client
        .query_one(&version_range, &[&stream_id])
        .await
        .map_err(db_err)?;
    if let (Some(first), Some(last)) = (
        range.get::<_, Option<i64>>(0),
        range.get::<_, Option<i64>>(1),
    ) {
        let mut from = first;
        while from <= last {
            let to = from.saturating_add(step);
            let started = std::time::Instant::now();
            // Its own transaction: row locks on these events only, held for one batch.
            deleted += conn
                .client
                .execute(&delete_batch, &[&stream_id, &from, &to])
                .await
                .map_err(db_err)?;
            from = to;
            // Yield as long as the batch took (at most 50 ms): the delete takes at most half of
            // the database's time, whatever else it is doing.
            if from <= last {
                tokio::time::sleep(started.elapsed().min(std::time::Duration::from_millis(50)))
                    .await;
            }
        }
    }
    conn.client
        .execute(&delete_snapshot, &[&stream_id])
        .await
        .map_err(db_err)?;
    if !tombstoned {
        // No append can have added events meanwhile: the stream refused them while deleting.
        conn.client
            .execute(&drop_row, &[&stream_id])
            .await
            .map_err(db_err)?;
        // A stream created again later starts without the old one's retention.
        conn.client
            .execute(&drop_retention, &[&stream_id])
            .await
            .map_err(db_err)?;
    }
    Ok(deleted)
}

/// Finishes deletes that were cut short (the stream still `deleting` `older_than` after its
/// last change). Returns how many streams were finished.
pub async fn finish_abandoned_deletes(
    conn: &mut PgConn,
    older_than: std::time::Duration,
    batch: u32,
) -> Result<usize> {
    let find = conn.stmt(ABANDONED).await.map_err(db_err)?;
    let rows = conn
        .client
        .query(&find, &[&older_than.as_secs_f64()])
        .await
        .map_err(db_err)?;
    for row in &rows {
        let stream_id: String = row.get(0);
        tracing::info!(stream_id = %stream_id, "finishing a delete that was cut short");
        remove_events(conn, &stream_id, batch, false).await?;
    }
    Ok(rows.len())
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
