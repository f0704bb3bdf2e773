//! Consumer groups: the log is split by stream into P partitions (`partition_key % P`, FNV-1a of
//! the stream id). Each member of a group leases partitions in `pgstore.group_partitions`
//! (claimed with `FOR UPDATE SKIP LOCKED`), renews its leases every renew interval, and gives up
//! the ones beyond its fair share (`ceil(P / live members)`) so a new member gets its share. A
//! member that vanishes without releasing (its pgstore instance died) loses its partitions when the
//! leases time out. Each partition has its own checkpoint, stored as consumer
//! `"{group}/{partition}"`; a member resumes a partition after that checkpoint (at-least-once).
//!
//! A member that cannot renew (its database is unreachable, a statement fails or hangs) stops
//! delivering before its leases can expire: it publishes an empty ownership once less than
//! [`safety_margin`] of the lease it last renewed is left, so another member that claims the
//! partitions after expiry never delivers them at the same time. It rejoins when renewing works
//! again, each partition from its checkpoint.

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::store::{Store, db, db::db_err};

/// Consumer group settings.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Partitions of a new group (fixed at the group's first use).
    pub partitions: u32,
    /// A lease not renewed for this long is free for others.
    pub lease_timeout: Duration,
    /// How often leases are renewed and shares rebalanced.
    pub renew_interval: Duration,
}

/// The checkpoint consumer id of a group's partition.
pub fn checkpoint_id(group: &str, partition: u32) -> String {
    format!("{group}/{partition}")
}

const ENSURE_GROUP: &str = "INSERT INTO pgstore.groups (group_name, partitions) VALUES ($1, $2) \
     ON CONFLICT (group_name) DO NOTHING";
const GROUP_PARTITIONS: &str = "SELECT partitions FROM pgstore.groups WHERE group_name = $1";
const SEED_PARTITIONS: &str = "INSERT INTO pgstore.group_partitions (group_name, partition) \
     SELECT $1, generate_series(0, $2 - 1) ON CONFLICT DO NOTHING";
const JOIN: &str = "INSERT INTO pgstore.group_members (group_name, member, token, expires_at) \
     VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond') \
     ON CONFLICT (group_name, member) DO UPDATE SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at \
     WHERE pgstore.group_members.token = EXCLUDED.token OR pgstore.group_members.expires_at < now() \
     RETURNING 1";
const RENEW: &str = "UPDATE pgstore.group_partitions SET lease_until = now() + $3 * interval '1 millisecond' \
     WHERE group_name = $1 AND owner = $2 AND lease_until >= now() RETURNING partition";
const LIVE_MEMBERS: &str =
    "SELECT count(*) FROM pgstore.group_members WHERE group_name = $1 AND expires_at > now()";
const RELEASE: &str = "UPDATE pgstore.group_partitions SET owner = NULL, lease_until = NULL \
     WHERE group_name = $1 AND owner = $2 AND partition = ANY($3)";
const RELEASE_ALL: &str = "UPDATE pgstore.group_partitions SET owner = NULL, lease_until = NULL \
     WHERE group_name = $1 AND owner = $2";
const LEAVE: &str =
    "DELETE FROM pgstore.group_members WHERE group_name = $1 AND member = $2 AND token = $3";
const CLAIM: &str = "WITH free AS ( \
       SELECT partition FROM pgstore.group_partitions \
       WHERE group_name = $1 AND (owner IS NULL OR lease_until < now()) \
       ORDER BY partition LIMIT $3 FOR UPDATE SKIP LOCKED) \
     UPDATE pgstore.group_partitions p SET owner = $2, lease_until = now() + $4 * interval '1 millisecond' \
     FROM free WHERE p.group_name = $1 AND p.partition = free.partition RETURNING p.partition";

/// Runs one member's lease management until `stop`: joins the group (answering `ready` with the
/// partition count, or the error), then publishes the partitions it owns whenever they change.
/// On the way out it releases its partitions and leaves the group.
pub async fn run_member(
    store: Store,
    config: GroupConfig,
    group: String,
    member: String,
    owned_tx: watch::Sender<Option<Vec<u32>>>,
    ready: oneshot::Sender<Result<u32>>,
    stop: CancellationToken,
) {
    let token = uuid::Uuid::new_v4();
    let count = match join(&store, &config, &group, &member, token).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(count));
    let mut owned: Vec<u32> = Vec::new();
    let mut published = false;
    let margin = safety_margin(&config);
    // Leases taken in the join are none yet; from each successful round on, they are valid
    // until the round's start plus the lease timeout (the database counts from later).
    let mut valid_until = tokio::time::Instant::now();
    loop {
        let started = tokio::time::Instant::now();
        // A round may not outlive the leases it should renew.
        let limit = config
            .renew_interval
            .min(valid_until.saturating_duration_since(started).max(margin));
        let round = tokio::time::timeout(
            limit,
            tick(&store, &config, &group, &member, token, count, &mut owned),
        );
        let round = tokio::select! {
            _ = stop.cancelled() => break,
            r = round => r,
        };
        let wait = match round {
            Ok(Ok(under_share)) => {
                valid_until = started + config.lease_timeout;
                if !published || owned_tx.borrow().as_deref() != Some(&owned[..]) {
                    owned_tx.send_replace(Some(owned.clone()));
                    published = true;
                }
                // While under its share a member retries sooner, so a newcomer gets its
                // partitions within about one renew interval of the others giving them up.
                if under_share {
                    config.renew_interval / 4
                } else {
                    config.renew_interval
                }
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {limit:?}"),
                };
                tracing::warn!(%group, %member, error = %why, "consumer group lease renewal failed");
                if tokio::time::Instant::now() + margin >= valid_until && !owned.is_empty() {
                    tracing::warn!(%group, %member, "leases can no longer be guaranteed: delivering nothing until renewed");
                    owned.clear();
                    owned_tx.send_replace(Some(Vec::new()));
                    published = true;
                }
                // Retry soon, but wake in time to stop before the leases run out.
                (config.renew_interval / 4)
                    .min(
                        valid_until.saturating_duration_since(tokio::time::Instant::now() + margin),
                    )
                    .max(Duration::from_millis(10))
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    let leave = async {
        let conn = db::get(store.pool()).await?;
        conn.client
            .execute(RELEASE_ALL, &[&group, &member])
            .await
            .map_err(db_err)?;
        conn.client
            .execute(LEAVE, &[&group, &member, &token])
            .await
            .map_err(db_err)
    };
    // Leaving is a courtesy (the leases expire anyway): it must not hang a stopping member.
    let _ = tokio::time::timeout(config.renew_interval, leave).await;
}

/// How much of a lease a member keeps in hand: it stops delivering once less than this is left
/// of the lease it last renewed.
pub fn safety_margin(config: &GroupConfig) -> Duration {
    ((config.lease_timeout.saturating_sub(config.renew_interval)) / 2)
        .max(config.lease_timeout / 10)
}

async fn join(
    store: &Store,
    config: &GroupConfig,
    group: &str,
    member: &str,
    token: uuid::Uuid,
) -> Result<u32> {
    let conn = db::get(store.pool()).await?;
    let c = &conn.client;
    c.execute(ENSURE_GROUP, &[&group, &(config.partitions as i32)])
        .await
        .map_err(db_err)?;
    let count: i32 = c
        .query_one(GROUP_PARTITIONS, &[&group])
        .await
        .map_err(db_err)?
        .get(0);
    c.execute(SEED_PARTITIONS, &[&group, &count])
        .await
        .map_err(db_err)?;
    let ttl = member_ttl_ms(config);
    let joined = c
        .query_opt(JOIN, &[&group, &member, &token, &ttl])
        .await
        .map_err(db_err)?;
    if joined.is_none() {
        return Err(Error::invalid(
            "member",
            format!("member {member:?} of group {group:?} is already subscribed elsewhere"),
        ));
    }
    Ok(count as u32)
}

fn member_ttl_ms(config: &GroupConfig) -> f64 {
    config.lease_timeout.as_secs_f64() * 1000.0
}

/// One renew-and-rebalance round. Returns whether the member is below its fair share.
async fn tick(
    store: &Store,
    config: &GroupConfig,
    group: &str,
    member: &str,
    token: uuid::Uuid,
    count: u32,
    owned: &mut Vec<u32>,
) -> Result<bool> {
    let conn = db::get(store.pool()).await?;
    let c = &conn.client;
    let ttl = member_ttl_ms(config);
    if c.query_opt(JOIN, &[&group, &member, &token, &ttl])
        .await
        .map_err(db_err)?
        .is_none()
    {
        // Our membership expired and someone else took the name: own nothing.
        owned.clear();
        return Ok(false);
    }
    let renewed = c
        .query(RENEW, &[&group, &member, &ttl])
        .await
        .map_err(db_err)?;
    *owned = renewed.iter().map(|r| r.get::<_, i32>(0) as u32).collect();
    let live: i64 = c
        .query_one(LIVE_MEMBERS, &[&group])
        .await
        .map_err(db_err)?
        .get(0);
    let live = live.max(1) as u32;
    let share = count.div_ceil(live) as usize;
    owned.sort_unstable();
    if owned.len() > share {
        let extra: Vec<i32> = owned[share..].iter().map(|p| *p as i32).collect();
        c.execute(RELEASE, &[&group, &member, &extra])
            .await
            .map_err(db_err)?;
        owned.truncate(share);
    } else if owned.len() < share {
        let want = (share - owned.len()) as i64;
        let claimed = c
            .query(CLAIM, &[&group, &member, &want, &ttl])
            .await
            .map_err(db_err)?;
        owned.extend(claimed.iter().map(|r| r.get::<_, i32>(0) as u32));
        owned.sort_unstable();
    }
    Ok(owned.len() < share)
}

/// Deletes the rows of group members whose lease ran out longer than `after` ago (members that
/// left without saying so). A member that comes back joins anew.
pub async fn prune_members(conn: &mut db::PgConn, after: Duration) -> crate::Result<u64> {
    conn.client
        .execute(
            "DELETE FROM pgstore.group_members \
             WHERE expires_at < now() - make_interval(secs => $1)",
            &[&after.as_secs_f64()],
        )
        .await
        .map_err(db::db_err)
}
