//! Snapshots: the latest saved state of a stream, replaced on every save.

use std::time::SystemTime;

use bytes::Bytes;

use super::{db::PgConn, db::db_err};
use crate::error::{Error, Result};

/// A stream's snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The stream.
    pub stream_id: String,
    /// The stream version the state reflects.
    pub stream_version: u64,
    /// The application's schema version of the state.
    pub schema_version: u32,
    /// The state's media type.
    pub content_type: String,
    /// The state.
    pub state: Bytes,
    /// When it was saved (ignored on save).
    pub created_at: SystemTime,
}

const SAVE: &str = "WITH s AS (SELECT version FROM pgstore.streams WHERE stream_id = $1), \
     ins AS (INSERT INTO pgstore.snapshots \
               (stream_id, stream_version, schema_version, content_type, state) \
             SELECT $1, $2, $3, $4, $5 FROM s WHERE s.version >= $2 \
             ON CONFLICT (stream_id) DO UPDATE SET stream_version = EXCLUDED.stream_version, \
               schema_version = EXCLUDED.schema_version, content_type = EXCLUDED.content_type, \
               state = EXCLUDED.state, created_at = now() \
             RETURNING 1) \
     SELECT (SELECT version FROM s), (SELECT count(*) FROM ins)";
const LOAD: &str = "SELECT stream_version, schema_version, content_type, state, created_at \
     FROM pgstore.snapshots WHERE stream_id = $1";
const DELETE_ONE: &str = "DELETE FROM pgstore.snapshots WHERE stream_id = $1";
const DELETE_ALL: &str = "DELETE FROM pgstore.snapshots";

/// Saves (replaces) a snapshot. The stream must exist and be at least at the snapshot's version.
pub async fn save(conn: &mut PgConn, s: &Snapshot) -> Result<()> {
    let stmt = conn.stmt(SAVE).await.map_err(db_err)?;
    let row = conn
        .client
        .query_one(
            &stmt,
            &[
                &s.stream_id,
                &(s.stream_version as i64),
                &(s.schema_version as i32),
                &s.content_type,
                &s.state.as_ref(),
            ],
        )
        .await
        .map_err(db_err)?;
    let stream_version: Option<i64> = row.get(0);
    let saved: i64 = row.get(1);
    match stream_version {
        None => Err(Error::StreamNotFound {
            stream_id: s.stream_id.clone(),
        }),
        Some(v) if saved == 0 => Err(Error::SnapshotAhead {
            stream_id: s.stream_id.clone(),
            snapshot_version: s.stream_version,
            stream_version: v as u64,
        }),
        Some(_) => Ok(()),
    }
}

/// The snapshot of a stream, if any.
pub async fn load(conn: &mut PgConn, stream_id: &str) -> Result<Option<Snapshot>> {
    let stmt = conn.stmt(LOAD).await.map_err(db_err)?;
    let row = conn
        .client
        .query_opt(&stmt, &[&stream_id])
        .await
        .map_err(db_err)?;
    Ok(row.map(|r| Snapshot {
        stream_id: stream_id.to_owned(),
        stream_version: r.get::<_, i64>(0) as u64,
        schema_version: r.get::<_, i32>(1) as u32,
        content_type: r.get(2),
        state: Bytes::from(r.get::<_, Vec<u8>>(3)),
        created_at: r.get(4),
    }))
}

/// Deletes one stream's snapshot, or all of them (`stream_id` = None). Returns how many.
pub async fn invalidate(conn: &mut PgConn, stream_id: Option<&str>) -> Result<u64> {
    match stream_id {
        Some(id) => {
            let stmt = conn.stmt(DELETE_ONE).await.map_err(db_err)?;
            conn.client.execute(&stmt, &[&id]).await.map_err(db_err)
        }
        None => {
            let stmt = conn.stmt(DELETE_ALL).await.map_err(db_err)?;
            conn.client.execute(&stmt, &[]).await.map_err(db_err)
        }
    }
}
