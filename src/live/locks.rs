//! Per-stream locks with fencing tokens, held for as long as a `Lock` call stays open.
//!
//! A lock is a lease row in `pgstore.locks`, not a PostgreSQL session lock, so holding a lock
//! costs no database connection: the holder's task renews the lease every third of the lease
//! timeout on a pooled connection and releases it when the client cancels or disconnects. If the
//! holder's instance dies, the lease runs out after `locks.lease_timeout` and the lock is free
//! again. Every grant increments the lock's fencing token, so a resource guarded by the lock can
//! refuse a writer whose token is older than one it has already seen.
//!
//! Limits: a waiting acquirer polls (every `poll`), so hand-over takes up to one poll interval
//! after a release; a holder cut off from the database for longer than the lease loses the lock
//! (its stream then ends with ABORTED).

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;
use uuid::Uuid;

use super::subscribe::LiveContext;
use crate::error::Error;
use crate::metrics::GaugeGuard;
use crate::proto::{self, lock_response::Message};
use crate::store::db;

/// Lock settings.
#[derive(Debug, Clone)]
pub struct LockConfig {
    /// A lease not renewed for this long expires.
    pub lease_timeout: Duration,
    /// How often a waiting acquirer retries.
    pub poll: Duration,
}

const ACQUIRE: &str = "INSERT INTO pgstore.locks AS l (name, owner, fencing_token, lease_until) \
     VALUES ($1, $2, 1, now() + $3 * interval '1 millisecond') \
     ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, fencing_token = l.fencing_token + 1, \
       lease_until = EXCLUDED.lease_until \
     WHERE l.owner IS NULL OR l.lease_until < now() \
     RETURNING fencing_token";
const RENEW: &str = "UPDATE pgstore.locks SET lease_until = now() + $3 * interval '1 millisecond' \
     WHERE name = $1 AND owner = $2 AND lease_until >= now()";
const RELEASE: &str =
    "UPDATE pgstore.locks SET owner = NULL, lease_until = NULL WHERE name = $1 AND owner = $2";

type Tx = mpsc::Sender<Result<proto::LockResponse, Status>>;

/// Tries once to take the lock; the fencing token when granted.
async fn try_acquire(
    ctx: &LiveContext,
    name: &str,
    owner: Uuid,
    ttl_ms: f64,
) -> Result<Option<i64>, Error> {
    let conn = db::get(ctx.store.pool()).await?;
    let row = conn
        .client
        .query_opt(ACQUIRE, &[&name, &owner, &ttl_ms])
        .await
        .map_err(db::db_err)?;
    Ok(row.map(|r| r.get(0)))
}

/// Acquires (or, with `try_only`, fails at once with ABORTED), then holds the lock until the client
/// leaves or the server stops. The caller spawns it.
pub async fn run(ctx: LiveContext, config: LockConfig, name: String, try_only: bool, tx: Tx) {
    let metrics = ctx.hub.metrics.clone();
    let _task = GaugeGuard::new(&metrics, |m| &m.stream_tasks);
    let owner = Uuid::new_v4();
    let ttl_ms = config.lease_timeout.as_secs_f64() * 1000.0;
    // Acquire.
    let token = loop {
        match try_acquire(&ctx, &name, owner, ttl_ms).await {
            Ok(Some(token)) => break token,
            Ok(None) if try_only => {
                let _ = tx
                    .send(Err(Status::aborted(format!(
                        "lock {name:?} is held elsewhere"
                    ))))
                    .await;
                return;
            }
            Ok(None) => {}
            // Only an unreachable database is worth waiting out.
            Err(e) if try_only || !matches!(e, Error::Unavailable(_)) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            Err(e) => tracing::debug!(error = %e, "lock acquisition failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.poll) => {}
            _ = tx.closed() => return,
            _ = ctx.shutdown.cancelled() => {
                let _ = tx.try_send(Err(Status::unavailable("server is shutting down")));
                return;
            }
        }
    };
    let _held = GaugeGuard::new(&metrics, |m| &m.locks);
    let outcome = hold(&ctx, &config, &name, owner, ttl_ms, token, &tx).await;
    // Release (also after a lost lease: it is a no-op then).
    if let Ok(conn) = db::get(ctx.store.pool()).await {
        let _ = conn.client.execute(RELEASE, &[&name, &owner]).await;
    }
    if let Err(status) = outcome {
        let _ = tx.try_send(Err(status));
    }
}

async fn hold(
    ctx: &LiveContext,
    config: &LockConfig,
    name: &str,
    owner: Uuid,
    ttl_ms: f64,
    token: i64,
    tx: &Tx,
) -> Result<(), Status> {
    let granted = proto::LockResponse {
        message: Some(Message::Granted(proto::LockGranted {
            fencing_token: token as u64,
        })),
    };
    if tx.send(Ok(granted)).await.is_err() {
        return Ok(());
    }
    let renew_every = config.lease_timeout / 3;
    let mut next_heartbeat = tokio::time::Instant::now() + ctx.config.heartbeat;
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(renew_every) => {
                let renewed = async {
                    let conn = db::get(ctx.store.pool()).await?;
                    conn.client
                        .execute(RENEW, &[&name, &owner, &ttl_ms])
                        .await
                        .map_err(db::db_err)
                }
                .await;
                match renewed {
                    Ok(1) => last_renewed = tokio::time::Instant::now(),
                    Ok(_) => return Err(Status::aborted(format!("lock {name:?} was lost (lease expired)"))),
                    Err(e) => {
                        tracing::warn!(error = %e, "lock renewal failed");
                        if last_renewed.elapsed() >= config.lease_timeout {
                            return Err(Status::aborted(format!("lock {name:?} was lost (lease expired)")));
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(next_heartbeat) => {
                let hb = proto::LockResponse {
                    message: Some(Message::Heartbeat(proto::Heartbeat { head: ctx.hub.head() })),
                };
                if tx.send(Ok(hb)).await.is_err() {
                    return Ok(());
                }
                next_heartbeat = tokio::time::Instant::now() + ctx.config.heartbeat;
            }
            _ = tx.closed() => return Ok(()),
            _ = ctx.shutdown.cancelled() => return Err(Status::unavailable("server is shutting down")),
        }
    }
}
