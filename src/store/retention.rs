//! Per-stream retention (SetStreamMetadata): KurrentDB's `$maxCount`, `$maxAge` and `$tb`.
//!
//! A rule takes effect for reads the moment it commits: Load, ReadFrom and Subscribe's catch-up
//! evaluate it in the same statement that reads the events (see [`super::read`]). Deleting the
//! expired rows is the scavenger's job ([`scavenge`]): it walks each ruled stream from its oldest
//! event, deleting in transactions of at most `database.delete_batch_size` versions, each
//! followed by a pause as long as it took, without the global lock. The sequences it frees are
//! holes like those of DeleteStream: readers never wait on them, since every read takes a
//! prefix of the log up to a head, whatever lies below it.

use std::time::{Duration, Instant};

use super::{db::PgConn, db::db_err};
use crate::error::Result;

/// A stream's retention rule. All `None`: keep everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep only the newest this many events.
    pub max_count: Option<u64>,
    /// Hide events recorded longer ago than this.
    pub max_age: Option<Duration>,
    /// Hide events whose version is below this.
    pub truncate_before: Option<u64>,
}

impl Retention {
    /// Whether the rule keeps everything.
    pub fn is_empty(&self) -> bool {
        *self == Retention::default()
    }
}

const UPSERT: &str = "INSERT INTO pgstore.stream_metadata \
       (stream_id, max_count, max_age, truncate_before, updated_at) \
     VALUES ($1, $2, make_interval(secs => $3), $4, now()) \
     ON CONFLICT (stream_id) DO UPDATE SET max_count = EXCLUDED.max_count, \
       max_age = EXCLUDED.max_age, truncate_before = EXCLUDED.truncate_before, updated_at = now()";
const CLEAR: &str = "DELETE FROM pgstore.stream_metadata WHERE stream_id = $1";
/// Streams with a rule, in pages (keyset on the stream id).
const RULED: &str = "SELECT stream_id FROM pgstore.stream_metadata WHERE stream_id > $1 \
     ORDER BY stream_id LIMIT 100";
const OLDEST: &str = "SELECT min(version) FROM pgstore.events WHERE stream_id = $1";
/// One batch: the expired events among versions `[$2, $3)`, by the rule and stream version as
/// they are now.
const DELETE_EXPIRED: &str = "DELETE FROM pgstore.events e \
     USING pgstore.stream_metadata r, pgstore.streams s \
     WHERE r.stream_id = $1 AND s.stream_id = $1 AND e.stream_id = $1 \
       AND e.version >= $2 AND e.version < $3 \
       AND (e.version < r.truncate_before OR e.recorded_at < now() - r.max_age \
            OR e.version <= s.version - r.max_count)";

/// Replaces a stream's rule (an empty rule removes it). The stream need not exist yet.
pub async fn set(conn: &mut PgConn, stream_id: &str, rule: &Retention) -> Result<()> {
    if rule.is_empty() {
        let clear = conn.stmt(CLEAR).await.map_err(db_err)?;
        conn.client
            .execute(&clear, &[&stream_id])
            .await
            .map_err(db_err)?;
        return Ok(());
    }
    let upsert = conn.stmt(UPSERT).await.map_err(db_err)?;
    let max_count = rule.max_count.map(|n| n as i64);
    let max_age = rule.max_age.map(|d| d.as_secs_f64());
    let truncate_before = rule.truncate_before.map(|n| n as i64);
    conn.client
        .execute(
            &upsert,
            &[&stream_id, &max_count, &max_age, &truncate_before],
        )
        .await
        .map_err(db_err)?;
    Ok(())
}

/// A duration read back from an `interval` as seconds (microsecond precision, as stored).
pub fn seconds(s: f64) -> Duration {
    Duration::from_micros((s * 1e6).round().max(0.0) as u64)
}

/// One scavenging pass: deletes the expired events of every stream with a rule. Returns how many
/// events it deleted. Several instances may scavenge at once: a batch another one deleted first
/// deletes nothing here.
pub async fn scavenge(conn: &mut PgConn, batch: u32) -> Result<u64> {
    let ruled = conn.stmt(RULED).await.map_err(db_err)?;
    let mut after = String::new();
    let mut deleted = 0;
    loop {
        let rows = conn.client.query(&ruled, &[&after]).await.map_err(db_err)?;
        let Some(last) = rows.last() else {
            return Ok(deleted);
        };
        after = last.get(0);
        for row in &rows {
            let stream_id: &str = row.get(0);
            deleted += scavenge_stream(conn, stream_id, batch).await?;
        }
    }
}

/// Deletes a stream's expired events, oldest first, batch by batch. Expiry takes a prefix of the
/// stream (older versions first) and versions are dense above the oldest event left, so the walk
/// stops at the first range where nothing expired. (It walks version ranges rather than asking
/// for the oldest event again: that index scan would wade through the entries each batch left
/// dead.)
pub async fn scavenge_stream(conn: &mut PgConn, stream_id: &str, batch: u32) -> Result<u64> {
    let oldest = conn.stmt(OLDEST).await.map_err(db_err)?;
    let delete = conn.stmt(DELETE_EXPIRED).await.map_err(db_err)?;
    let step = i64::from(batch.max(1));
    let Some(mut from) = conn
        .client
        .query_one(&oldest, &[&stream_id])
        .await
        .map_err(db_err)?
        .get::<_, Option<i64>>(0)
    else {
        return Ok(0);
    };
    let mut deleted = 0;
    loop {
        let started = Instant::now();
        let to = from.saturating_add(step);
        let n = conn
            .client
            .execute(&delete, &[&stream_id, &from, &to])
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Ok(deleted);
        }
        deleted += n;
        from = to;
        // Yield as long as the batch took (at most 50 ms), as DeleteStream does.
        tokio::time::sleep(started.elapsed().min(Duration::from_millis(50))).await;
    }
}
