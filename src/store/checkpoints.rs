//! Consumer checkpoints: a consumer's last processed global sequence.

use std::time::SystemTime;

use super::{db::PgConn, db::db_err};
use crate::error::{Error, Result};

/// Saves only a sequence the log has reached; returns the head either way.
const SAVE: &str = "WITH h AS (SELECT seq FROM pgstore.head), \
     saved AS (INSERT INTO pgstore.checkpoints (consumer_id, seq) \
       SELECT $1, $2 FROM h WHERE $2 <= h.seq \
       ON CONFLICT (consumer_id) DO UPDATE SET seq = EXCLUDED.seq, updated_at = now() \
       RETURNING 1) \
     SELECT h.seq, (SELECT count(*) FROM saved) FROM h";
const LOAD: &str = "SELECT seq, updated_at FROM pgstore.checkpoints WHERE consumer_id = $1";

/// Saves a checkpoint (upsert; moving it backwards is allowed, to replay). A sequence beyond the
/// head of the log is refused and nothing is stored: a consumer resuming from it would skip
/// every event written up to it.
pub async fn save(conn: &mut PgConn, consumer_id: &str, seq: u64) -> Result<()> {
    let stmt = conn.stmt(SAVE).await.map_err(db_err)?;
    let row = conn
        .client
        .query_one(&stmt, &[&consumer_id, &(seq as i64)])
        .await
        .map_err(db_err)?;
    let head = row.get::<_, i64>(0) as u64;
    if row.get::<_, i64>(1) == 0 {
        return Err(Error::CheckpointAhead {
            consumer_id: consumer_id.to_owned(),
            sequence: seq,
            head,
        });
    }
    Ok(())
}

/// A consumer's checkpoint, if it ever saved one.
pub async fn load(conn: &mut PgConn, consumer_id: &str) -> Result<Option<(u64, SystemTime)>> {
    let stmt = conn.stmt(LOAD).await.map_err(db_err)?;
    let row = conn
        .client
        .query_opt(&stmt, &[&consumer_id])
        .await
        .map_err(db_err)?;
    Ok(row.map(|r| (r.get::<_, i64>(0) as u64, r.get(1))))
}
