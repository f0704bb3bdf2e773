//! Consumer checkpoints: a consumer's last processed global sequence.

use std::time::SystemTime;

use super::{db::PgConn, db::db_err};
use crate::error::Result;

const SAVE: &str = "INSERT INTO pgstore.checkpoints (consumer_id, seq) VALUES ($1, $2) \
     ON CONFLICT (consumer_id) DO UPDATE SET seq = EXCLUDED.seq, updated_at = now()";
const LOAD: &str = "SELECT seq, updated_at FROM pgstore.checkpoints WHERE consumer_id = $1";

/// Saves a checkpoint (upsert; moving it backwards is allowed, to replay).
pub async fn save(conn: &mut PgConn, consumer_id: &str, seq: u64) -> Result<()> {
    let stmt = conn.stmt(SAVE).await.map_err(db_err)?;
    conn.client
        .execute(&stmt, &[&consumer_id, &(seq as i64)])
        .await
        .map_err(db_err)?;
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
