//! Schema migrations: numbered SQL files embedded in the binary, applied in order, each in its own
//! transaction, under a session advisory lock so that several instances can start at once.

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::store::db::db_err;

/// `pg_advisory_lock` key held while migrating ("pgstore" + 1 in ASCII).
const MIGRATION_LOCK: i64 = 0x7067_7374_6f72_6501;

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
];

/// Applies every migration not applied yet. Returns how many were applied.
pub async fn migrate(client: &mut Client) -> Result<usize> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err)?;
    let result = apply(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err);
    let applied = result?;
    unlock?;
    Ok(applied)
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
    let rows = client
        .query("SELECT version FROM pgstore.schema_migrations", &[])
        .await
        .map_err(db_err)?;
    let done: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    if let Some(newest) = done.iter().max()
        && *newest > MIGRATIONS.last().map_or(0, |m| m.0)
    {
        return Err(Error::Internal(format!(
            "the database schema is at version {newest}, newer than this pgstore knows; upgrade pgstore"
        )));
    }
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await.map_err(db_err)?;
        tx.batch_execute(sql)
            .await
            .map_err(|e| Error::Internal(format!("migration {version:04}_{name} failed: {e:?}")))?;
        tx.execute(
            "INSERT INTO pgstore.schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(version, name, "applied migration");
        applied += 1;
    }
    Ok(applied)
}
