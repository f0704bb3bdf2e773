//! Per-stream locks: contention, hand-over on disconnect and on the holder's instance dying,
//! strictly increasing fencing tokens.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgstore::proto::{self, lock_response::Message};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming};

async fn lock(c: &mut Client, name: &str, try_only: bool) -> Streaming<proto::LockResponse> {
    c.lock(proto::LockRequest {
        stream_id: name.into(),
        try_only,
    })
    .await
    .expect("lock call")
    .into_inner()
}

/// Waits for the grant; returns its fencing token.
async fn granted(s: &mut Streaming<proto::LockResponse>, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, s.next())
            .await
            .expect("granted in time")
            .expect("stream open")
            .expect("no error");
        if let Some(Message::Granted(g)) = msg.message {
            return g.fencing_token;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contenders_wait_try_lock_fails_fast_and_tokens_increase() {
    let server = Server::fresh().await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    let mut held_a = lock(&mut a, "acct-1", false).await;
    let t1 = granted(&mut held_a, Duration::from_secs(5)).await;

    // try-lock answers at once.
    let started = Instant::now();
    let mut tried = lock(&mut b, "acct-1", true).await;
    let err = tokio::time::timeout(Duration::from_secs(2), tried.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(started.elapsed() < Duration::from_secs(1));

    // A waiting contender gets it when the holder disconnects.
    let mut waiting = lock(&mut b, "acct-1", false).await;
    let nothing = tokio::time::timeout(Duration::from_millis(400), waiting.next()).await;
    assert!(nothing.is_err(), "granted while held: {nothing:?}");
    // Other locks are independent.
    let mut other = lock(&mut a, "acct-2", true).await;
    granted(&mut other, Duration::from_secs(5)).await;
    drop(held_a);
    let t2 = granted(&mut waiting, Duration::from_secs(5)).await;
    assert!(t2 > t1, "fencing tokens increase: {t1} then {t2}");

    // And again.
    drop(waiting);
    let mut again = lock(&mut a, "acct-1", false).await;
    let t3 = granted(&mut again, Duration::from_secs(5)).await;
    assert!(t3 > t2);

    let err = a
        .lock(proto::LockRequest {
            stream_id: String::new(),
            try_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_a_dead_instance_is_free_after_the_lease() {
    let url = fresh_db().await;
    let mut holder = Process::spawn(
        &["--database-url", &url],
        &[("PGSTORE_LOCKS__LEASE_TIMEOUT", "1s".into())],
    );
    let mut hc = holder.client().await;
    let mut held = lock(&mut hc, "order-9", false).await;
    let t1 = granted(&mut held, Duration::from_secs(5)).await;

    let server = Server::fresh_on(&url).await;
    let mut c = server.client().await;
    let mut waiting = lock(&mut c, "order-9", false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.kill();
    let started = Instant::now();
    let t2 = granted(&mut waiting, Duration::from_secs(10)).await;
    assert!(t2 > t1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?} after the holder died",
        started.elapsed()
    );
}
