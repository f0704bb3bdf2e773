//! The writer's SQL: the statements, the read under the global lock (phase 1), the one
//! statement that writes a batch and commits (phase 3), and what a failed write means for the
//! batch's callers.

use std::collections::HashMap;

use postgres_types::ToSql;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::plan::{Check, Keyed, Keys, Rows, Snapshot, Stored};
use crate::error::{Error, Result};
use crate::store::{
    AppendCommand, StreamState,
    db::{self, PgConn, is_connection_error},
    ids::AssignedIds,
};

pub(super) const BEGIN: &str = "BEGIN";
pub(super) const COMMIT: &str = "COMMIT";
pub(super) const ROLLBACK: &str = "ROLLBACK";
pub(super) const LOCK_HEAD: &str = "SELECT seq FROM pgstore.head FOR UPDATE";
pub(super) const READ_STREAMS: &str =
    "SELECT stream_id, version, state FROM pgstore.streams WHERE stream_id = ANY($1)";
/// Client event ids stored already: through the unique index of ids outside this store's own
/// range, and, for ids inside it (`$2`, their sequences), through the primary key.
pub(super) const FIND_EVENT_IDS: &str = "SELECT event_id, stream_id, version, seq FROM pgstore.events \
     WHERE event_id = ANY($1) AND NOT pgstore.assigned_event_id(event_id) \
     UNION ALL SELECT event_id, stream_id, version, seq FROM pgstore.events \
     WHERE seq = ANY($2) AND event_id = ANY($1)";
/// For each condition (`[{"i": index, "after": seq, "items": [...]}, ...]`), the first stored
/// event after its sequence that matches its query. Run under the global lock, with nothing in
/// flight: every committed event is visible. A condition after a recent sequence (the head of a
/// decision's read) reads the events since then in sequence order, with the tags test kept out
/// of the GIN index (whose pending list can be long just after many appends); one after an old
/// sequence goes through the GIN or the type index (as in migration 0014).
pub(super) const FIND_CONFLICTS: &str = "SELECT i.i, min(CASE \
       WHEN i.after >= (SELECT seq FROM pgstore.head) - 10000 THEN (SELECT min(e.seq) \
         FROM pgstore.events e WHERE e.seq > i.after AND (e.tags || '{}'::text[]) @> i.tags \
           AND (cardinality(i.types) = 0 OR e.event_type = ANY(i.types))) \
       ELSE (SELECT min(e.seq) FROM pgstore.events e WHERE e.seq > i.after AND e.tags @> i.tags \
           AND (cardinality(i.types) = 0 OR e.event_type = ANY(i.types))) END) \
     FROM (SELECT c.i, c.after, q.types, q.tags \
           FROM jsonb_to_recordset($1::jsonb) AS c(i int, after bigint, items jsonb), \
                jsonb_to_recordset(c.items) AS q(types text[], tags text[])) i \
     GROUP BY i.i";
pub(super) const FIND_KEYS: &str = "SELECT key, stream_id, version, first_seq, last_seq \
     FROM pgstore.idempotency_keys WHERE key = ANY($1)";
/// Every write of a batch in one statement (migrations 0004, 0007, 0013 and 0014).
pub(super) const APPEND_BATCH: &str = "SELECT pgstore.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
     $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)";

/// The SQLSTATE `pgstore.append_batch` raises when the writer's memory is stale.
pub(super) const STALE_MEMORY: &str = "PGS01";
/// The SQLSTATE `pgstore.append_batch` raises when an append condition fails against the
/// events before the batch.
pub(super) const CONDITION_FAILED: &str = "PGS02";

/// Whether a failed one-round-trip statement wrote nothing because an append condition failed
/// (the batch is committed again the reading way; the writer's memory was right).
pub(super) fn condition_failed(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == CONDITION_FAILED)
}

/// The append conditions of the appends a batch writes that the writer's memory did not check
/// (`checked`), as `append_batch` checks them (`None` without any).
pub(super) fn conditions_json(
    cmds: &[&AppendCommand],
    results: &[crate::error::Result<crate::store::AppendOutcome>],
    checked: &[usize],
) -> Option<String> {
    let conditions: Vec<serde_json::Value> = cmds
        .iter()
        .zip(results)
        .enumerate()
        .filter(|(i, (_, r))| r.as_ref().is_ok_and(|o| !o.duplicate) && !checked.contains(i))
        .filter_map(|(_, (c, _))| c.condition.as_ref())
        .map(crate::store::AppendCondition::to_value)
        .collect();
    (!conditions.is_empty()).then(|| serde_json::Value::Array(conditions).to_string())
}

/// Whether a failed one-round-trip statement wrote nothing because the writer's memory was wrong:
/// the check failed, or a row it meant to insert is there already (an event id or an idempotency
/// key).
pub(super) fn memory_was_stale(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code() == STALE_MEMORY || *c == SqlState::UNIQUE_VIOLATION)
}

pub(super) enum Failure {
    /// Every append in the batch gets this error.
    All(Error),
    /// A data error (a payload the server refused): retry the appends one by one so only the bad
    /// one fails.
    Data(Error),
}

/// Whether PostgreSQL refused the data (a payload it could not take).
pub(super) fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || *c == SqlState::CHECK_VIOLATION)
}

/// What the callers of a failed batch get: a lost connection after COMMIT was asked for leaves
/// the outcome unknown; a data error lets the batch be retried append by append.
pub(super) fn classify(e: tokio_postgres::Error, commit_sent: bool) -> Failure {
    if is_connection_error(&e) && commit_sent {
        Failure::All(Error::CommitOutcomeUnknown(format!(
            "the connection to the primary was lost after COMMIT was sent: {}",
            crate::error::chain(&e)
        )))
    } else if is_data_error(&e) {
        Failure::Data(Error::invalid("events", db::db_err(e).to_string()))
    } else {
        Failure::All(db::db_err(e))
    }
}

/// Phase 1: begin, take the global lock and read what the checks need, in one round trip.
pub(super) async fn read_under_lock(
    conn: &PgConn,
    cmds: &[&AppendCommand],
    ids: AssignedIds,
) -> Result<Snapshot, tokio_postgres::Error> {
    let begin = conn.stmt(BEGIN).await?;
    let lock = conn.stmt(LOCK_HEAD).await?;
    let streams_stmt = conn.stmt(READ_STREAMS).await?;
    let ids_stmt = conn.stmt(FIND_EVENT_IDS).await?;
    let keys_stmt = conn.stmt(FIND_KEYS).await?;
    let conflicts_stmt = conn.stmt(FIND_CONFLICTS).await?;

    let mut stream_ids: Vec<&str> = cmds
        .iter()
        .flat_map(|c| &c.parts)
        .map(|p| p.stream_id.as_str())
        .collect();
    stream_ids.sort_unstable();
    stream_ids.dedup();
    let event_ids: Vec<Uuid> = cmds
        .iter()
        .filter(|c| c.client_event_ids)
        .flat_map(|c| c.events().map(|e| e.event_id))
        .collect();
    let keys: Vec<&str> = cmds
        .iter()
        .filter_map(|c| c.idempotency_key.as_deref())
        .collect();

    // Each condition with the index of its append in the batch.
    let conditions: Vec<serde_json::Value> = cmds
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let mut v = c.condition.as_ref()?.to_value();
            v["i"] = i.into();
            Some(v)
        })
        .collect();
    let conditions_json = serde_json::Value::Array(conditions).to_string();

    let client = &conn.client;
    let stream_ids = &stream_ids;
    let event_ids = &event_ids;
    let keys = &keys;
    let find_ids = async {
        if event_ids.is_empty() {
            Ok(Vec::new())
        } else {
            let seqs: Vec<i64> = event_ids
                .iter()
                .filter_map(|id| ids.seq(id))
                .map(|s| s as i64)
                .collect();
            client.query(&ids_stmt, &[event_ids, &seqs]).await
        }
    };
    let find_keys = async {
        if keys.is_empty() {
            Ok(Vec::new())
        } else {
            client.query(&keys_stmt, &[keys]).await
        }
    };
    let find_conflicts = async {
        if conditions_json == "[]" {
            Ok(Vec::new())
        } else {
            client
                .query(&conflicts_stmt, &[&db::JsonRef(&conditions_json)])
                .await
        }
    };
    let stream_params: [&(dyn ToSql + Sync); 1] = [stream_ids];
    // `join!`, not `try_join!`: every statement's answer is awaited, and the error reported is
    // the first in pipeline order (later ones only say the transaction was aborted).
    let (begun, head_row, stream_rows, id_rows, key_rows, conflict_rows) = tokio::join!(
        client.execute(&begin, &[]),
        client.query_one(&lock, &[]),
        client.query(&streams_stmt, &stream_params),
        find_ids,
        find_keys,
        find_conflicts,
    );
    begun?;
    let (head_row, stream_rows, id_rows, key_rows, conflict_rows) =
        (head_row?, stream_rows?, id_rows?, key_rows?, conflict_rows?);
    let conflicts = conflict_rows
        .into_iter()
        .filter_map(|r| {
            let seq: Option<i64> = r.get(1);
            Some((r.get::<_, i32>(0) as usize, seq? as u64))
        })
        .collect();

    let head: i64 = head_row.get(0);
    let mut streams = HashMap::with_capacity(stream_rows.len());
    for r in stream_rows {
        // A state this version does not know (from a newer pgstore) refuses appends.
        let state = StreamState::from_code(r.get(2)).unwrap_or(StreamState::Deleting);
        streams.insert(r.get::<_, String>(0), (r.get::<_, i64>(1) as u64, state));
    }
    let event_ids = id_rows
        .into_iter()
        .map(|r| {
            (
                r.get::<_, Uuid>(0),
                Stored {
                    stream_id: r.get(1),
                    version: r.get::<_, i64>(2) as u64,
                    seq: r.get::<_, i64>(3) as u64,
                },
            )
        })
        .collect();
    let keys = key_rows
        .into_iter()
        .map(|r| {
            let at = |i| r.get::<_, i64>(i) as u64;
            (r.get(0), Keyed::from_row(r.get(1), at(2), at(3), at(4)))
        })
        .collect();
    Ok(Snapshot {
        head: head as u64,
        streams,
        event_ids,
        keys,
        conflicts,
        checked: Vec::new(),
    })
}

/// Phase 3: write everything and notify with one `pgstore.append_batch` statement, then
/// commit. With `check`, that statement is the whole append: its own implicit transaction, which proves the writer's memory before it commits
/// (one round trip, one message each way). Without, it runs in the transaction phase 1 began,
/// and `COMMIT` is pipelined after it. On error, says whether the commit had been asked for (then
/// the outcome is unknown if the connection dropped).
pub(super) async fn write_and_commit(
    conn: &PgConn,
    check: Option<&Check>,
    rows: &Rows<'_>,
    keys: &Keys<'_>,
    new_head: u64,
    channel: &str,
    conditions: Option<&str>,
) -> Result<(), (tokio_postgres::Error, bool)> {
    let prepared = async {
        Ok::<_, tokio_postgres::Error>((conn.stmt(APPEND_BATCH).await?, conn.stmt(COMMIT).await?))
    };
    let (append, commit) = prepared.await.map_err(|e| (e, false))?;
    let head = new_head as i64;
    let (check_head, check_streams, check_versions) = match check {
        Some(c) => (Some(c.head), Some(&c.stream_ids), Some(&c.versions)),
        None => (None, None, None),
    };
    let conditions = conditions.map(db::JsonRef);
    let params: [&(dyn ToSql + Sync); 25] = [
        &check_head,
        &check_streams,
        &check_versions,
        &rows.seq,
        &rows.stream_id,
        &rows.version,
        &rows.event_id,
        &rows.event_type,
        &rows.content_type,
        &rows.data,
        &rows.data_bytes,
        &rows.metadata,
        &rows.created_at,
        &rows.partition_key,
        &rows.tags,
        &rows.upsert_stream,
        &rows.upsert_version,
        &keys.key,
        &keys.stream_id,
        &keys.version,
        &keys.first,
        &keys.last,
        &head,
        &channel,
        &conditions,
    ];
    let client = &conn.client;
    let result = if check.is_some() {
        client.execute(&append, &params).await.map(|_| ())
    } else {
        let (appended, committed) = tokio::join!(
            client.execute(&append, &params),
            client.execute(&commit, &[])
        );
        // The first error in pipeline order is the cause.
        appended.and(committed).map(|_| ())
    };
    result.map_err(|e| (e, true))
}
