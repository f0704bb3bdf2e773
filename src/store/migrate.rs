//! Schema migrations: numbered SQL files embedded in the binary, applied in order, under a
//! session advisory lock so that several instances can start (and migrate) at once.
//!
//! A migration runs in its own transaction, unless its first line is
//! `-- pgstore: no-transaction`: then each of its statements runs on its own, which is what
//! `CREATE INDEX CONCURRENTLY` needs (an index built without blocking writes). Such statements
//! must be safe to run again (`IF NOT EXISTS`); an index that a failed concurrent build left
//! invalid is dropped and built again.
//!
//! Instances waiting for the lock poll for it rather than block in `pg_advisory_lock`: a blocked
//! statement holds a snapshot, which a concurrent index build would wait for while the waiter
//! waits for the lock, a deadlock.

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::store::db::db_err;

/// Advisory lock key held while migrating ("pgstore" + 1 in ASCII).
pub const MIGRATION_LOCK: i64 = 0x7067_7374_6f72_6501;

/// The first line of a migration whose statements run outside a transaction.
const NO_TRANSACTION: &str = "-- pgstore: no-transaction";

/// The migrations, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "groups",
        include_str!("../../migrations/0002_groups.sql"),
    ),
    (3, "locks", include_str!("../../migrations/0003_locks.sql")),
    (
        4,
        "append_batch",
        include_str!("../../migrations/0004_append_batch.sql"),
    ),
    (
        5,
        "idempotency_key_age",
        include_str!("../../migrations/0005_idempotency_key_age.sql"),
    ),
    (
        6,
        "assigned_event_ids",
        include_str!("../../migrations/0006_assigned_event_ids.sql"),
    ),
    (
        7,
        "append_batch_head",
        include_str!("../../migrations/0007_append_batch_head.sql"),
    ),
    (
        8,
        "events_type_seq",
        include_str!("../../migrations/0008_events_type_seq.sql"),
    ),
    (
        9,
        "stream_deleting",
        include_str!("../../migrations/0009_stream_deleting.sql"),
    ),
    (
        10,
        "lock_tokens",
        include_str!("../../migrations/0010_lock_tokens.sql"),
    ),
    (
        11,
        "stream_retention",
        include_str!("../../migrations/0011_stream_retention.sql"),
    ),
    (
        12,
        "event_tags",
        include_str!("../../migrations/0012_event_tags.sql"),
    ),
    (
        13,
        "append_batch_tags",
        include_str!("../../migrations/0013_append_batch_tags.sql"),
    ),
    (
        14,
        "append_batch_conditions",
        include_str!("../../migrations/0014_append_batch_conditions.sql"),
    ),
];

/// A migration not applied yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its number.
    pub version: i32,
    /// Its name.
    pub name: &'static str,
    /// Whether it runs in one transaction (else statement by statement).
    pub transactional: bool,
    /// Its SQL.
    pub sql: &'static str,
}

/// The migrations this database still lacks, changing nothing (`pgstore migrate --dry-run`).
pub async fn pending(client: &Client) -> Result<Vec<Pending>> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('pgstore.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db_err)?
        .get(0);
    let done = if exists {
        applied_versions(client).await?
    } else {
        Vec::new()
    };
    Ok(MIGRATIONS
        .iter()
        .filter(|(v, _, _)| !done.contains(v))
        .map(|&(version, name, sql)| Pending {
            version,
            name,
            transactional: !sql.starts_with(NO_TRANSACTION),
            sql,
        })
        .collect())
}

/// Applies every migration not applied yet, waiting at most `wait` for another instance that is
/// migrating. Returns how many were applied.
pub async fn migrate(client: &mut Client, wait: Duration) -> Result<usize> {
    // Index builds on a large table take longer than any request should: no statement timeout
    // for this session.
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .map_err(db_err)?;
    let started = std::time::Instant::now();
    let mut waited = false;
    loop {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db_err)?
            .get(0);
        if got {
            break;
        }
        if started.elapsed() >= wait {
            return Err(Error::Unavailable(format!(
                "another instance has been migrating the schema for longer than \
                 database.migration_wait ({}); is one stuck?",
                humantime::format_duration(wait)
            )));
        }
        if !waited {
            tracing::info!("another instance is migrating the schema; waiting for it");
            waited = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let result = apply(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err);
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn applied_versions(client: &Client) -> Result<Vec<i32>> {
    let rows = client
        .query("SELECT version FROM pgstore.schema_migrations", &[])
        .await
        .map_err(db_err)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn apply(client: &mut Client) -> Result<usize> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgstore;
             CREATE TABLE IF NOT EXISTS pgstore.schema_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(db_err)?;
    let done = applied_versions(client).await?;
    if let Some(newest) = done.iter().max()
        && *newest > MIGRATIONS.last().map_or(0, |m| m.0)
    {
        return Err(Error::Internal(format!(
            "the database schema is at version {newest}, newer than this pgstore knows; upgrade pgstore"
        )));
    }
    let mut applied = 0;
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        let failed = |e: tokio_postgres::Error| {
            Error::Internal(format!("migration {version:04}_{name} failed: {e:?}"))
        };
        if sql.starts_with(NO_TRANSACTION) {
            drop_invalid_indexes(client).await?;
            for statement in statements(sql) {
                client.batch_execute(statement).await.map_err(failed)?;
            }
            client
                .execute(
                    "INSERT INTO pgstore.schema_migrations (version, name) VALUES ($1, $2)",
                    &[&version, &name],
                )
                .await
                .map_err(db_err)?;
        } else {
            let tx = client.transaction().await.map_err(db_err)?;
            tx.batch_execute(sql).await.map_err(failed)?;
            tx.execute(
                "INSERT INTO pgstore.schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .await
            .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
        }
        tracing::info!(version, name, "applied migration");
        applied += 1;
    }
    Ok(applied)
}

/// Drops the indexes of the pgstore schema that a failed concurrent build left invalid, so that
/// `CREATE INDEX CONCURRENTLY IF NOT EXISTS` builds them again.
async fn drop_invalid_indexes(client: &Client) -> Result<()> {
    let rows = client
        .query(
            "SELECT c.relname FROM pg_index i \
               JOIN pg_class c ON c.oid = i.indexrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = 'pgstore' AND NOT i.indisvalid",
            &[],
        )
        .await
        .map_err(db_err)?;
    for row in rows {
        let name: String = row.get(0);
        tracing::warn!(index = %name, "dropping an index left invalid by a failed build");
        client
            .batch_execute(&format!(
                "DROP INDEX CONCURRENTLY IF EXISTS pgstore.\"{}\"",
                name.replace('"', "\"\"")
            ))
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

/// The statements of a no-transaction migration: separated by `;` at the end of a line, comment
/// lines left out.
fn statements(sql: &str) -> Vec<&str> {
    sql.split(";\n")
        .map(str::trim)
        .filter(|s| {
            s.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_transaction_migrations_split_into_statements() {
        let sql = "-- pgstore: no-transaction\n-- why\nCREATE INDEX CONCURRENTLY a ON t (x);\n\nCREATE INDEX CONCURRENTLY b ON t (y);\n";
        let s = statements(sql);
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].ends_with("CREATE INDEX CONCURRENTLY a ON t (x)"));
        assert_eq!(s[1], "CREATE INDEX CONCURRENTLY b ON t (y)");
    }
}
