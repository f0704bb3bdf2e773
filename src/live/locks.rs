//! Per-stream locks with fencing tokens, held for as long as a `Lock` call stays open.
//!
//! A lock is a lease row in `pgstore.locks`, not a PostgreSQL session lock, so holding a lock
//! costs no database connection: the holder's task renews the lease every third of the lease
//! timeout on a pooled connection and releases it when the client cancels or disconnects. If the
//! holder's instance dies, the lease runs out after `locks.lease_timeout` and the lock is free
//! again. Every grant increments the lock's fencing token, so a resource guarded by the lock can
//! refuse a writer whose token is older than one it has already seen.
//!
//! A waiting acquirer is woken by a release: on this instance directly, on others through a
//! NOTIFY on `database.locks_channel` relayed by their listener; it also retries every `poll`
//! in case a wake-up was missed or a holder's lease ran out. A holder that cannot renew its
//! lease is told before the lease can expire: its stream ends with UNAVAILABLE once less than a
//! sixth of the lease is left, so two holders never overlap.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;
use uuid::Uuid;

use super::context::{LiveContext, LockConfig};
use crate::error::Error;
use crate::metrics::GaugeGuard;
use crate::proto::{self, lock_response::Message};
use crate::store::db;

/// Takes the lock if it is free; otherwise says how long the holder's lease has left (in ms), so a
/// waiter whose holder vanished retries the moment the lease runs out.
const ACQUIRE: &str = "WITH acquired AS ( \
       INSERT INTO pgstore.locks AS l (name, owner, fencing_token, lease_until) \
       VALUES ($1, $2, nextval('pgstore.fencing_tokens'), now() + $3 * interval '1 millisecond') \
       ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, \
         fencing_token = greatest(EXCLUDED.fencing_token, l.fencing_token + 1), \
         lease_until = EXCLUDED.lease_until \
       WHERE l.owner IS NULL OR l.lease_until < now() \
       RETURNING fencing_token) \
     SELECT (SELECT fencing_token FROM acquired), \
       (SELECT extract(epoch FROM lease_until - now())::float8 * 1000 FROM pgstore.locks WHERE name = $1)";
const RENEW: &str = "UPDATE pgstore.locks SET lease_until = now() + $3 * interval '1 millisecond' \
     WHERE name = $1 AND owner = $2 AND lease_until >= now()";
/// A released lock keeps `lease_until` at the release time: how long it has been idle, for
/// pruning ([`prune`]).
const RELEASE: &str =
    "UPDATE pgstore.locks SET owner = NULL, lease_until = now() WHERE name = $1 AND owner = $2";
/// Releases and wakes the waiters of every instance, in one statement.
const RELEASE_NOTIFY: &str = "WITH released AS (UPDATE pgstore.locks SET owner = NULL, lease_until = now() \
     WHERE name = $1 AND owner = $2 RETURNING name) \
     SELECT pg_notify($3, name) FROM released";
/// The largest NOTIFY payload PostgreSQL takes.
const MAX_NOTIFY_BYTES: usize = 7999;

type Tx = mpsc::Sender<Result<proto::LockResponse, Status>>;

/// Tries once to take the lock: the fencing token when granted, else how long the holder's lease
/// has left.
async fn try_acquire(
    ctx: &LiveContext,
    name: &str,
    owner: Uuid,
    ttl_ms: f64,
) -> Result<Result<i64, Option<Duration>>, Error> {
    let conn = db::get(ctx.store.pool()).await?;
    let row = conn
        .client
        .query_one(ACQUIRE, &[&name, &owner, &ttl_ms])
        .await
        .map_err(db::db_err)?;
    Ok(match row.get::<_, Option<i64>>(0) {
        Some(token) => Ok(token),
        None => Err(row
            .get::<_, Option<f64>>(1)
            .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))),
    })
}

/// Acquires (or, with `try_only`, fails at once with ABORTED), then holds the lock until the client
/// leaves or the server stops. The caller spawns it.
pub async fn run(ctx: LiveContext, config: LockConfig, name: String, try_only: bool, tx: Tx) {
    let metrics = ctx.hub.metrics.clone();
    let _task = GaugeGuard::new(&metrics, |m| &m.stream_tasks);
    let owner = Uuid::new_v4();
    let ttl_ms = config.lease_timeout.as_secs_f64() * 1000.0;
    let mut released = ctx.hub.watch_lock_releases();
    // Acquire.
    let (token, granted_at) = loop {
        let attempt = tokio::time::Instant::now();
        // Registered before the attempt, so a release during it is not missed.
        let wake = released.wait_for(&name);
        tokio::pin!(wake);
        let tried = tokio::time::timeout(
            config.lease_timeout / 3,
            try_acquire(&ctx, &name, owner, ttl_ms),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Error::Unavailable(
                "the database did not answer the lock request in time".into(),
            ))
        });
        // Without a wake-up, retry after the poll interval, or as soon as the holder's lease runs
        // out (a holder that vanished releases nothing).
        let mut wait = config.poll;
        match tried {
            Ok(Ok(token)) => break (token, attempt),
            Ok(Err(_)) if try_only => {
                let _ = tx
                    .send(Err(Status::aborted(format!(
                        "lock {name:?} is held elsewhere"
                    ))))
                    .await;
                return;
            }
            Ok(Err(left)) => {
                if let Some(left) = left {
                    wait = wait.min(left + Duration::from_millis(5));
                }
            }
            // Only an unreachable database is worth waiting out.
            Err(e) if try_only || !matches!(e, Error::Unavailable(_)) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            Err(e) => tracing::debug!(error = %e, "lock acquisition failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut wake => {}
            _ = tx.closed() => return,
            _ = ctx.shutdown.cancelled() => {
                let _ = tx.try_send(Err(Status::unavailable("server is shutting down")));
                return;
            }
        }
    };
    let _held = GaugeGuard::new(&metrics, |m| &m.locks);
    let outcome = hold(&ctx, &config, &name, owner, ttl_ms, token, granted_at, &tx).await;
    if let Err(status) = outcome {
        let _ = tx.try_send(Err(status));
    }
    // Release (also after a lost lease: it is a no-op then), waking waiters everywhere. It must
    // not hang on an unreachable database: the lease runs out anyway.
    let release = async {
        let conn = db::get(ctx.store.pool()).await?;
        if name.len() <= MAX_NOTIFY_BYTES {
            conn.client
                .execute(RELEASE_NOTIFY, &[&name, &owner, &config.channel])
                .await
        } else {
            conn.client.execute(RELEASE, &[&name, &owner]).await
        }
        .map_err(db::db_err)
    };
    match tokio::time::timeout(config.lease_timeout / 3, release).await {
        Ok(Ok(_)) => ctx.hub.lock_released(&name),
        Ok(Err(e)) => tracing::debug!(error = %e, "lock release failed; the lease will run out"),
        Err(_) => tracing::debug!("lock release timed out; the lease will run out"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn hold(
    ctx: &LiveContext,
    config: &LockConfig,
    name: &str,
    owner: Uuid,
    ttl_ms: f64,
    token: i64,
    granted_at: tokio::time::Instant,
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
    let margin = config.lease_timeout / 6;
    // The lease runs from the acquiring statement at the latest, as the database counts.
    let mut valid_until = granted_at + config.lease_timeout;
    let mut next_renewal = tokio::time::Instant::now() + renew_every;
    let mut next_heartbeat = tokio::time::Instant::now() + ctx.config.heartbeat;
    let lost = |why: String| {
        Status::unavailable(format!(
            "lock {name:?} can no longer be guaranteed ({why}): stop using fencing token {token}"
        ))
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_renewal) => {
                let started = tokio::time::Instant::now();
                let left = valid_until.saturating_duration_since(started + margin);
                let renewed = tokio::time::timeout(left.min(renew_every), async {
                    let conn = db::get(ctx.store.pool()).await?;
                    conn.client
                        .execute(RENEW, &[&name, &owner, &ttl_ms])
                        .await
                        .map_err(db::db_err)
                })
                .await;
                match renewed {
                    Ok(Ok(1)) => {
                        valid_until = started + config.lease_timeout;
                        next_renewal = started + renew_every;
                    }
                    Ok(Ok(_)) => return Err(Status::aborted(format!("lock {name:?} was lost (lease expired)"))),
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "renewal got no answer in time".to_string(),
                        };
                        tracing::warn!(lock = name, error = %why, "lock renewal failed");
                        let now = tokio::time::Instant::now();
                        if now + margin >= valid_until {
                            return Err(lost(why));
                        }
                        next_renewal = (now + renew_every / 4).min(valid_until - margin);
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

/// Deletes lock rows idle (released, or their lease run out) for longer than `after`. Safe for
/// fencing: tokens come from one sequence, so a lock taken again gets a higher token.
pub async fn prune(conn: &mut db::PgConn, after: Duration) -> crate::Result<u64> {
    conn.client
        .execute(
            "DELETE FROM pgstore.locks WHERE lease_until < now() - make_interval(secs => $1)",
            &[&after.as_secs_f64()],
        )
        .await
        .map_err(db::db_err)
}
