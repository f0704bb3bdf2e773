//! Leases that can no longer be renewed are given up before they can expire. A consumer-group
//! member whose renewals fail stops delivering its partitions before another member can claim
//! them; a lock holder whose renewals fail is told (its Lock stream ends) before anyone else can
//! be granted the lock. Renewals are made to fail by revoking the instance's database role's
//! right to update the lease tables, while everything else keeps working.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use pgstore::proto::{self, lock_response, subscribe_response::Message};
use tokio_stream::StreamExt;

/// A login role with every right on the store's database, and a URL that connects as it.
async fn restricted_role(url: &str) -> (String, String) {
    let db = url.rsplit('/').next().unwrap().to_owned();
    let role = unique("lease_role");
    shared()
        .sql(
            &db,
            &format!(
                "CREATE ROLE {role} LOGIN; \
                 GRANT ALL ON DATABASE {db} TO {role}; \
                 GRANT ALL ON SCHEMA pgstore TO {role}; \
                 GRANT ALL ON ALL TABLES IN SCHEMA pgstore TO {role}; \
                 GRANT ALL ON ALL SEQUENCES IN SCHEMA pgstore TO {role}; \
                 GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgstore TO {role};"
            ),
        )
        .await;
    let url = url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    (role, url)
}

/// What one member saw, with the time it saw it.
#[derive(Default)]
struct Seen {
    assignments: Vec<(Instant, Vec<u32>)>,
    events: Vec<(Instant, u32)>,
}

fn member(mut c: Client, name: &str) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let req = proto::SubscribeRequest {
        group: "lease-group".into(),
        member: name.into(),
        ..Default::default()
    };
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut stream = c.subscribe(req).await.unwrap().into_inner();
            while let Some(Ok(msg)) = stream.next().await {
                let now = Instant::now();
                match msg.message {
                    Some(Message::Assignment(a)) => {
                        seen.lock().unwrap().assignments.push((now, a.partitions))
                    }
                    Some(Message::Event(e)) => seen.lock().unwrap().events.push((now, e.partition)),
                    _ => {}
                }
            }
        })
    };
    (seen, task)
}

fn owned(seen: &Arc<Mutex<Seen>>) -> Vec<u32> {
    seen.lock()
        .unwrap()
        .assignments
        .last()
        .map(|a| a.1.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_cannot_renew_stops_delivering_before_another_takes_over() {
    let url = fresh_db().await;
    let config = |url: &str| {
        let mut c = test_config(url);
        c.groups.lease_timeout = Duration::from_secs(3);
        c.groups.renew_interval = Duration::from_millis(500);
        c.live.poll_interval = Duration::from_millis(200);
        c
    };
    let b = Server::start(config(&url)).await;
    let (role, role_url) = restricted_role(&url).await;
    let a = Server::start(config(&role_url)).await;

    let (seen_a, _ta) = member(a.client().await, "a");
    wait_for("a owns every partition", Duration::from_secs(10), || {
        owned(&seen_a).len() == GROUP_PARTITIONS as usize
    })
    .await;
    let (seen_b, _tb) = member(b.client().await, "b");
    wait_for("the partitions are shared", Duration::from_secs(15), || {
        owned(&seen_a).len() == 4 && owned(&seen_b).len() == 4
    })
    .await;

    // Events keep flowing to every partition.
    let mut writer = b.client().await;
    let writing = tokio::spawn(async move {
        for i in 0.. {
            writer
                .append(append(
                    &format!("lease-{}", i % 32),
                    None,
                    vec![json_event("E", "{}")],
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    wait_for("a delivers", Duration::from_secs(10), || {
        !seen_a.lock().unwrap().events.is_empty()
    })
    .await;

    // a's instance can no longer renew (its role may not update leases); reads still work.
    let a_partitions = owned(&seen_a);
    assert_eq!(a_partitions.len(), 4);
    let db = url.rsplit('/').next().unwrap();
    shared()
        .sql(
            db,
            &format!(
                "REVOKE UPDATE ON pgstore.group_members, pgstore.group_partitions FROM {role}"
            ),
        )
        .await;
    let revoked = Instant::now();
    wait_for("b takes every partition", Duration::from_secs(20), || {
        owned(&seen_b).len() == GROUP_PARTITIONS as usize
    })
    .await;
    writing.abort();

    let a_seen = seen_a.lock().unwrap();
    let b_seen = seen_b.lock().unwrap();
    let (a_stopped, a_last) = a_seen.assignments.last().cloned().unwrap();
    assert!(a_last.is_empty(), "a gave up its partitions: {a_last:?}");
    assert!(a_stopped > revoked);
    let b_took_over = b_seen
        .assignments
        .iter()
        .find(|(t, ps)| *t > revoked && a_partitions.iter().any(|p| ps.contains(p)))
        .map(|(t, _)| *t)
        .expect("b took a's partitions");
    assert!(
        a_stopped < b_took_over,
        "a stopped {:?} after b took over",
        a_stopped - b_took_over
    );
    let last_a_event = a_seen.events.last().map(|e| e.0).unwrap();
    assert!(
        last_a_event <= a_stopped,
        "a delivered after giving up its partitions"
    );
    assert!(
        b_seen
            .events
            .iter()
            .filter(|(t, p)| *t > revoked && a_partitions.contains(p))
            .all(|(t, _)| *t > a_stopped),
        "b delivered a's partitions while a still did"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_holder_that_cannot_renew_is_told_before_the_lock_moves() {
    let url = fresh_db().await;
    let config = |url: &str| {
        let mut c = test_config(url);
        c.locks.lease_timeout = Duration::from_millis(1500);
        c.locks.poll_interval = Duration::from_millis(100);
        c
    };
    let b = Server::start(config(&url)).await;
    let (role, role_url) = restricted_role(&url).await;
    let a = Server::start(config(&role_url)).await;
    let lock = |name: &str| proto::LockRequest {
        stream_id: name.into(),
        try_only: false,
    };

    let mut held = a
        .client()
        .await
        .lock(lock("acct-7"))
        .await
        .unwrap()
        .into_inner();
    let first = match held.next().await {
        Some(Ok(proto::LockResponse {
            message: Some(lock_response::Message::Granted(g)),
        })) => g.fencing_token,
        other => panic!("holder: {other:?}"),
    };
    let mut waiting = b
        .client()
        .await
        .lock(lock("acct-7"))
        .await
        .unwrap()
        .into_inner();
    let waiter = tokio::spawn(async move {
        loop {
            match waiting.next().await {
                Some(Ok(proto::LockResponse {
                    message: Some(lock_response::Message::Granted(g)),
                })) => return (Instant::now(), g.fencing_token),
                Some(Ok(_)) => {}
                other => panic!("waiter: {other:?}"),
            }
        }
    });

    let db = url.rsplit('/').next().unwrap();
    shared()
        .sql(db, &format!("REVOKE UPDATE ON pgstore.locks FROM {role}"))
        .await;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), held.next())
            .await
            .expect("the holder is told")
        {
            Some(Ok(_)) => {}
            Some(Err(status)) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    status.message().contains("can no longer be guaranteed"),
                    "{}",
                    status.message()
                );
                break Instant::now();
            }
            None => panic!("the stream ended without saying why"),
        }
    };
    let (granted, token) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter gets the lock after the lease")
        .unwrap();
    assert!(
        token > first,
        "a larger fencing token: {token} after {first}"
    );
    assert!(
        ended < granted,
        "the holder was told {:?} after the lock moved",
        ended - granted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiter_on_another_instance_at_once() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    // Without the release notification the waiter would wait for its poll.
    config.locks.poll_interval = Duration::from_secs(60);
    let a = Server::start(config.clone()).await;
    let b = Server::start(config).await;
    let lock = |name: &str| proto::LockRequest {
        stream_id: name.into(),
        try_only: false,
    };
    let mut held = a
        .client()
        .await
        .lock(lock("acct-8"))
        .await
        .unwrap()
        .into_inner();
    assert!(held.next().await.unwrap().is_ok());
    let mut waiting = b
        .client()
        .await
        .lock(lock("acct-8"))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    let released = Instant::now();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), waiting.next())
            .await
            .expect("woken by the release")
            .unwrap()
            .unwrap();
        if let Some(lock_response::Message::Granted(_)) = msg.message {
            break;
        }
    }
    assert!(
        released.elapsed() < Duration::from_secs(2),
        "granted {:?} after the release",
        released.elapsed()
    );
}
