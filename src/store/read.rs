//! Reads: one stream (Load), the global log (ReadFrom) and its head.
//!
//! Each read is ONE statement, so the stream's version (or the log head) and the events come from
//! the same snapshot. Because appends commit in sequence order under the global lock, every
//! snapshot sees a prefix of the log: reading up to the head it reports never skips an event that
//! commits later.

use std::{
    sync::{
        LazyLock,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use bytes::{Bytes, BytesMut};
use futures_util::{TryStreamExt, pin_mut};
use postgres_types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{
    Payload, RecordedEvent, StreamState, db::JsonRef, db::JsonText, db::PgConn, db::db_err, query,
    query::Query,
};
use crate::error::{Error, Result};
use crate::wire::{EncodedEvent, encode_row};

/// The event columns, in the order [`event_from_row`] expects them.
macro_rules! event_columns {
    () => {
        "e.seq, e.stream_id, e.version, e.event_id, e.event_type, e.content_type, e.data, \
         e.data_bytes, e.metadata, e.created_at, e.recorded_at, e.partition_key, e.tags"
    };
}

/// The stream's row and retention: `first_kept` is the lowest version that `truncate_before` and
/// `max_count` leave visible; `max_age` hides events recorded longer ago.
macro_rules! load_stream {
    () => {
        "WITH h AS (SELECT seq FROM pgstore.head), \
              s AS (SELECT st.version, st.state, m.max_age, \
                      greatest(coalesce(m.truncate_before, 0), \
                               st.version - coalesce(m.max_count, st.version) + 1) AS first_kept \
                    FROM pgstore.streams st \
                    LEFT JOIN pgstore.stream_metadata m ON m.stream_id = st.stream_id \
                    WHERE st.stream_id = $1 AND st.state <> 4) \
         SELECT h.seq, s.version, s.state, "
    };
}

/// The events of the stream that its retention leaves visible.
macro_rules! load_events {
    () => {
        " FROM h LEFT JOIN s ON true LEFT JOIN LATERAL (SELECT * FROM pgstore.events e \
            WHERE e.stream_id = $1 AND e.version >= s.first_kept AND e.version <= s.version \
              AND (s.max_age IS NULL OR e.recorded_at >= now() - s.max_age) \
              AND (cardinality($3::text[]) = 0 OR e.event_type = ANY($3)) "
    };
}

const LOAD_FORWARDS: &str = concat!(
    load_stream!(),
    event_columns!(),
    load_events!(),
    " AND e.version >= $2 ORDER BY e.version LIMIT $4) e ON true ORDER BY e.version"
);

const LOAD_BACKWARDS: &str = concat!(
    load_stream!(),
    event_columns!(),
    load_events!(),
    " AND e.version <= $2 ORDER BY e.version DESC LIMIT $4) e ON true ORDER BY e.version DESC"
);

/// ReadFrom's statement for one combination of filters (bit 0: event types, bit 1: stream prefix,
/// bit 2: partitions) and of the retention check (bit 3). One statement per combination, so that
/// a read evaluates only what it needs. Parameters: `$1` from, `$2` limit, `$3` the end of the
/// scan window (exclusive), then those of the filters present, in that order. Columns: the head,
/// whether any retention rule exists, then the event. A read looks at `[from, end)` only: with
/// the `(event_type, seq)` index a type filter reads matching rows only; a prefix or partition
/// filter (or retention hiding events) reads at most the window's rows. No outer `ORDER BY`: the
/// single head row's nested loop returns the inner index scan's rows in its order (sorting would
/// hold every row back until the last); [`read_from`] checks that sequences ascend.
///
/// Retention: without bit 3 the statement does not look at rules, only reports whether any
/// exists in its snapshot; its rows are used only when none does (see [`read_from`]). With bit
/// 3, each row costs a probe of the (small) `stream_metadata` table, and of `streams` for a
/// `max_count` rule. (A store without rules keeps plans free of that sub-plan: its estimated
/// cost would tempt the planner to a generic plan that sorts the window for every page.)
static READ_FROM: LazyLock<[String; 32]> = LazyLock::new(|| {
    std::array::from_fn(|bits| {
        let (filtered, retention) = (bits & 0b10111 != 0, bits & 8 != 0);
        // Unfiltered, the window's end is folded into the head bound, so that the planner sees
        // no range to estimate (the statement stays the plain "from here, in order, LIMIT n").
        let (mut filters, top) = if filtered {
            (String::from(" AND e.seq < $3"), "h.seq")
        } else {
            (String::new(), "least(h.seq, $3::bigint - 1)")
        };
        let mut n = 3;
        let mut param = || {
            n += 1;
            n
        };
        if bits & 1 != 0 {
            filters += &format!(" AND e.event_type = ANY(${}::text[])", param());
        }
        if bits & 2 != 0 {
            filters += &format!(" AND starts_with(e.stream_id, ${}::text)", param());
        }
        if bits & 4 != 0 {
            let (owned, count) = (param(), param());
            filters +=
                &format!(" AND (e.partition_key % ${count}::bigint)::int = ANY(${owned}::int[])");
        }
        let mut items = String::new();
        if bits & 16 != 0 {
            items = format!(
                ", {}",
                query::ITEMS_CTE.replace("$Q", &format!("${}", param()))
            );
            filters += " AND ";
            filters += query::MATCHES;
        }
        if retention {
            filters += RETAINED;
        }
        format!(
            "WITH h AS (SELECT seq, EXISTS (SELECT 1 FROM pgstore.stream_metadata) AS retention \
                        FROM pgstore.head){items} \
             SELECT h.seq, h.retention, {} FROM h LEFT JOIN LATERAL (SELECT * FROM pgstore.events e \
                WHERE e.seq >= $1 AND e.seq <= {top}{filters} \
                ORDER BY e.seq LIMIT $2) e ON true",
            event_columns!(),
        )
    })
});

/// Whether event `e` is visible under its stream's retention (see [`READ_FROM`]). `OFFSET 0`
/// keeps the check a per-row probe: as an anti join the planner would rather sort the whole
/// window by stream id (measured: 8,000 instead of 400,000 events/s).
const RETAINED: &str = " AND NOT EXISTS (SELECT 1 FROM pgstore.stream_metadata r \
       WHERE r.stream_id = e.stream_id \
         AND (e.version < r.truncate_before OR e.recorded_at < now() - r.max_age \
              OR (r.max_count IS NOT NULL AND e.version <= (SELECT s.version \
                    FROM pgstore.streams s WHERE s.stream_id = e.stream_id) - r.max_count)) \
       OFFSET 0)";

/// Whether the last log read of this process found retention rules: the next read checks them
/// straight away. Only a hint: a read without the check whose snapshot has rules is read again
/// with it, and a read with it reports when none are left.
static RULES_SEEN: AtomicBool = AtomicBool::new(false);

const HEAD: &str = "SELECT seq FROM pgstore.head";

/// A Load request, validated.
#[derive(Debug, Clone)]
pub struct LoadQuery {
    /// The stream.
    pub stream_id: String,
    /// First version (inclusive); 0 = start (forwards) or end (backwards).
    pub from_version: u64,
    /// Page size.
    pub max_count: u32,
    /// Event type filter (empty = all).
    pub event_types: Vec<String>,
    /// Newest first.
    pub backwards: bool,
}

/// A page of one stream.
#[derive(Debug)]
pub struct StreamPage {
    /// The log head in the snapshot read.
    pub head: u64,
    /// Whether the stream exists (in that snapshot).
    pub found: bool,
    /// The events, encoded.
    pub events: Vec<EncodedEvent>,
    /// The stream's version in the snapshot read.
    pub stream_version: u64,
    /// The stream's state.
    pub state: StreamState,
    /// The version to continue from, if anything is left.
    pub next_version: Option<u64>,
}

/// A ReadFrom request, validated.
#[derive(Debug, Clone)]
pub struct ReadQuery {
    /// First sequence (inclusive).
    pub from_sequence: u64,
    /// Page size.
    pub limit: u32,
    /// Event type filter (empty = all).
    pub event_types: Vec<String>,
    /// Stream id prefix filter (empty = all).
    pub stream_prefix: String,
    /// Consumer-group partition filter (None = all).
    pub partitions: Option<Partitions>,
    /// Only events matching this query (None = all).
    pub query: Option<Query>,
    /// Look at most at this many sequences from `from_sequence` (0 = up to the head). Bounds the
    /// work of a call whatever a filter (or retention) leaves out.
    pub window: u64,
}

/// Only events whose `partition_key % count` is one of `owned`.
#[derive(Debug, Clone)]
pub struct Partitions {
    /// The group's partition count.
    pub count: u32,
    /// The partitions wanted (must not be empty).
    pub owned: Vec<u32>,
}

/// A page of the global log.
#[derive(Debug)]
pub struct LogPage {
    /// The events, encoded, in sequence order.
    pub events: Vec<EncodedEvent>,
    /// Where the next page starts.
    pub next_sequence: u64,
    /// The head in the snapshot read.
    pub head: u64,
}

/// Reads one stream; `found` is false when the stream does not exist.
pub async fn load(conn: &mut PgConn, q: &LoadQuery) -> Result<StreamPage> {
    let (sql, from) = if q.backwards {
        let from = if q.from_version == 0 {
            i64::MAX
        } else {
            q.from_version as i64
        };
        (LOAD_BACKWARDS, from)
    } else {
        (LOAD_FORWARDS, q.from_version as i64)
    };
    let stmt = conn.stmt(sql).await.map_err(db_err)?;
    // One extra row tells whether the stream goes on.
    let fetch = i64::from(q.max_count) + 1;
    let rows = conn
        .client
        .query(&stmt, &[&q.stream_id, &from, &q.event_types, &fetch])
        .await
        .map_err(db_err)?;
    let first = rows
        .first()
        .ok_or_else(|| Error::Internal("load returned no row".into()))?;
    let head = first.get::<_, i64>(0) as u64;
    let Some(stream_version) = first.get::<_, Option<i64>>(1) else {
        return Ok(StreamPage {
            head,
            found: false,
            events: Vec::new(),
            stream_version: 0,
            state: StreamState::Active,
            next_version: None,
        });
    };
    let stream_version = stream_version as u64;
    let state = StreamState::from_code(first.get(2))?;
    let mut events = Vec::with_capacity(rows.len());
    let mut scratch = BytesMut::with_capacity(rows.len() * 256);
    for row in &rows {
        if row.get::<_, Option<i64>>(3).is_some() {
            events.push(encode_row(row, 3, &mut scratch)?);
        }
    }
    let next_version = if events.len() > q.max_count as usize {
        events.pop().map(|e| e.version)
    } else {
        None
    };
    Ok(StreamPage {
        head,
        found: true,
        events,
        stream_version,
        state,
        next_version,
    })
}

/// Reads a page of the global log.
pub async fn read_from(conn: &mut PgConn, q: &ReadQuery) -> Result<LogPage> {
    let from = q.from_sequence.max(1) as i64;
    let limit = i64::from(q.limit);
    let (owned, count): (Vec<i32>, i64) = match &q.partitions {
        Some(p) => (
            p.owned.iter().map(|x| *x as i32).collect(),
            i64::from(p.count.max(1)),
        ),
        None => (Vec::new(), 1),
    };
    let window = if q.window == 0 {
        i64::MAX
    } else {
        i64::try_from(q.window).unwrap_or(i64::MAX)
    };
    let end = from.saturating_add(window);
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&from, &limit, &end];
    let mut bits = 0;
    if !q.event_types.is_empty() {
        bits |= 1;
        params.push(&q.event_types);
    }
    if !q.stream_prefix.is_empty() {
        bits |= 2;
        params.push(&q.stream_prefix);
    }
    if q.partitions.is_some() {
        bits |= 4;
        params.push(&owned);
        params.push(&count);
    }
    let json = q
        .query
        .as_ref()
        .filter(|q| !q.matches_all())
        .map(Query::to_json);
    let items = json.as_deref().map(JsonRef);
    if let Some(items) = &items {
        bits |= 16;
        params.push(items);
    }
    let (head, events) = read_retained(
        conn,
        [&READ_FROM[bits], &READ_FROM[bits | 8]],
        &params,
        q.limit,
    )
    .await?;
    let next_sequence = match events.last() {
        Some(last) if events.len() >= q.limit as usize => last.seq + 1,
        // Fewer than asked: everything up to the head, or to the end of the window, was scanned.
        _ => (head + 1).min(end as u64).max(from as u64),
    };
    Ok(LogPage {
        events,
        next_sequence,
        head,
    })
}

/// Runs a read in the variant without the retention check (`sql[0]`) or with it (`sql[1]`),
/// whichever [`RULES_SEEN`] suggests, and again with it when the first found rules: the head
/// and the events.
async fn read_retained(
    conn: &mut PgConn,
    sql: [&'static str; 2],
    params: &[&(dyn ToSql + Sync)],
    limit: u32,
) -> Result<(u64, Vec<EncodedEvent>)> {
    let mut check = RULES_SEEN.load(Ordering::Relaxed);
    loop {
        let (head, rules, events) = read_page(conn, sql[usize::from(check)], params, limit).await?;
        if rules != check {
            RULES_SEEN.store(rules, Ordering::Relaxed);
        }
        if check || !rules {
            return Ok((head, events));
        }
        // Read without the check, but rules exist: read again with it.
        check = true;
    }
}

/// Read's statements: bit 0, the retention check; bit 1, the index-friendly prefilter (see
/// [`Query::prefilter`]). Parameters: `$1` from, `$2` limit, `$3` the query's items, then the
/// prefilter's tags and types. Not windowed: a decision needs every matching event, and the
/// prefilter lets the GIN index on tags (or the type index) find them without a scan.
static READ: LazyLock<[String; 4]> = LazyLock::new(|| {
    std::array::from_fn(|bits| {
        let mut filters = String::new();
        if bits & 2 != 0 {
            filters += " AND (e.tags && $4::text[] OR e.event_type = ANY($5::text[]))";
        }
        if bits & 1 != 0 {
            filters += RETAINED;
        }
        format!(
            "WITH h AS (SELECT seq, EXISTS (SELECT 1 FROM pgstore.stream_metadata) AS retention \
                        FROM pgstore.head), {} \
             SELECT h.seq, h.retention, {} FROM h LEFT JOIN LATERAL (SELECT * FROM pgstore.events e \
                WHERE e.seq >= $1 AND e.seq <= h.seq AND {}{filters} \
                ORDER BY e.seq LIMIT $2) e ON true",
            query::ITEMS_CTE.replace("$Q", "$3"),
            event_columns!(),
            query::MATCHES,
        )
    })
});

/// A Read request, validated.
#[derive(Debug, Clone)]
pub struct QueryRead {
    /// The events wanted.
    pub query: Query,
    /// First sequence (inclusive).
    pub from_sequence: u64,
    /// Page size.
    pub limit: u32,
}

/// The events matching a query, in sequence order, and the head they are consistent with.
pub async fn read_query(conn: &mut PgConn, q: &QueryRead) -> Result<(Vec<EncodedEvent>, u64)> {
    let from = q.from_sequence.max(1) as i64;
    let limit = i64::from(q.limit);
    let json = q.query.to_json();
    let items = JsonRef(&json);
    let prefilter = q.query.prefilter();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&from, &limit, &items];
    let bits = if let Some((tags, types)) = &prefilter {
        params.push(tags);
        params.push(types);
        2
    } else {
        0
    };
    let (head, events) =
        read_retained(conn, [&READ[bits], &READ[bits | 1]], &params, q.limit).await?;
    Ok((events, head))
}

/// Runs one ReadFrom statement: the head, whether rules exist, the events (encoded as they
/// arrive, while PostgreSQL is still producing the rest).
async fn read_page(
    conn: &mut PgConn,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
    limit: u32,
) -> Result<(u64, bool, Vec<EncodedEvent>)> {
    let stmt = conn.stmt(sql).await.map_err(db_err)?;
    let rows = conn
        .client
        .query_raw(&stmt, params.iter().map(|p| *p as &dyn ToSql))
        .await
        .map_err(db_err)?;
    pin_mut!(rows);
    let (mut head, mut rules) = (0, false);
    let mut events: Vec<EncodedEvent> = Vec::with_capacity(limit.min(4096) as usize);
    let mut scratch = BytesMut::new();
    while let Some(row) = rows.try_next().await.map_err(db_err)? {
        head = row.get::<_, i64>(0) as u64;
        rules = row.get(1);
        if row.get::<_, Option<i64>>(2).is_some() {
            if scratch.capacity() < 1024 {
                scratch.reserve(64 * 1024);
            }
            let e = encode_row(&row, 2, &mut scratch)?;
            if events.last().is_some_and(|last| last.seq >= e.seq) {
                return Err(Error::Internal("log page out of order".into()));
            }
            events.push(e);
        }
    }
    Ok((head, rules, events))
}

/// The highest committed global sequence.
pub async fn latest_sequence(conn: &mut PgConn) -> Result<u64> {
    let stmt = conn.stmt(HEAD).await.map_err(db_err)?;
    let row = conn.client.query_one(&stmt, &[]).await.map_err(db_err)?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Decodes the event columns starting at `at` into owned values (what a client of the raw table
/// does; the server itself encodes rows straight to protobuf with [`crate::wire::encode_row`]).
pub fn event_from_row(row: &Row, at: usize) -> Result<RecordedEvent> {
    let data: Option<JsonText> = row.get(at + 6);
    let data_bytes: Option<Vec<u8>> = row.get(at + 7);
    let payload = match (data, data_bytes) {
        (Some(j), _) => Payload::Json(j.0),
        (None, Some(b)) => Payload::Bytes(Bytes::from(b)),
        (None, None) => return Err(Error::Internal("event without payload".into())),
    };
    Ok(RecordedEvent {
        seq: row.get::<_, i64>(at) as u64,
        stream_id: row.get(at + 1),
        version: row.get::<_, i64>(at + 2) as u64,
        event_id: row.get::<_, Uuid>(at + 3),
        event_type: row.get(at + 4),
        content_type: row.get(at + 5),
        payload,
        metadata: row.get::<_, Option<JsonText>>(at + 8).map(|j| j.0),
        created_at: row.get::<_, SystemTime>(at + 9),
        recorded_at: row.get::<_, SystemTime>(at + 10),
        partition_key: row.get::<_, i64>(at + 11) as u32,
    })
}
