//! A primary that stops answering (every PostgreSQL process frozen with SIGSTOP: what a stalled
//! host or a network partition looks like from pgstore, with TCP connections that stay open and
//! silent): appends are answered UNAVAILABLE (or DEADLINE_EXCEEDED) in bounded time, reads DEADLINE_EXCEEDED or
//! UNAVAILABLE, health goes NOT_SERVING and back, nothing acknowledged is lost, every append
//! whose outcome was unknown is settled by retrying it with its idempotency key, and shutdown
//! finishes in bounded time while the primary is frozen.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use pgstore::proto;
use tonic_health::pb::health_check_response::ServingStatus;

/// What the writers saw: acknowledged keys (with their first sequence) and keys whose append
/// failed (with the status code).
#[derive(Default)]
struct Outcomes {
    acked: BTreeMap<String, u64>,
    failed: BTreeMap<String, tonic::Code>,
    slowest_failure: Duration,
}

fn keyed(stream: &str, key: &str) -> proto::AppendRequest {
    let mut r = append(
        stream,
        None,
        vec![json_event("Written", &format!(r#"{{"key":"{key}"}}"#))],
    );
    r.idempotency_key = key.into();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_primary_costs_bounded_time_and_loses_nothing_acknowledged() {
    let pg = PgCluster::start(FAST);
    let url = pg.create_db().await;
    let mut config = test_config(&url);
    config.writer.commit_timeout = Duration::from_secs(1);
    config.database.connect_timeout = Duration::from_secs(1);
    config.server.request_timeout = Duration::from_secs(2);
    config.server.health_interval = Duration::from_millis(200);
    config.server.shutdown_grace = Duration::from_secs(2);
    let server = Server::start(config).await;
    let channel = server.channel().await;

    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = server.client().await;
        let outcomes = outcomes.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w}-{n}");
                n += 1;
                let started = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(30),
                    c.append(keyed(&format!("frozen-{w}"), &key)),
                )
                .await
                .expect("an append must be answered in bounded time");
                let failed = {
                    let mut o = outcomes.lock().unwrap();
                    match r {
                        Ok(resp) => {
                            o.acked.insert(key, resp.into_inner().first_sequence);
                            false
                        }
                        Err(status) => {
                            o.slowest_failure = o.slowest_failure.max(started.elapsed());
                            o.failed.insert(key, status.code());
                            true
                        }
                    }
                };
                if failed {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Freeze the primary while the writers run.
    let frozen = Frozen::freeze(&pg);
    let froze_at = Instant::now();
    wait_health(&channel, "", ServingStatus::NotServing).await;
    let noticed = froze_at.elapsed();
    assert!(
        noticed < Duration::from_secs(5),
        "health took {noticed:?} to notice"
    );
    // A read is cut off by the request deadline (or fails fast), never hangs.
    let mut reader = server.client().await;
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        reader.read_from(proto::ReadFromRequest {
            from_sequence: 1,
            ..Default::default()
        }),
    )
    .await
    .expect("a read must be answered in bounded time")
    .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "read took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let o = outcomes.lock().unwrap();
        assert!(!o.failed.is_empty(), "appends during the freeze must fail");
        // UNAVAILABLE from the writer (commit timeout, no connection), or DEADLINE_EXCEEDED when
        // an append waited behind a stuck batch past the request deadline: both say "outcome
        // unknown, retry with the same idempotency key".
        assert!(
            o.failed
                .values()
                .all(|c| matches!(c, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)),
            "{:?}",
            o.failed
        );
        assert!(
            o.slowest_failure < Duration::from_secs(4),
            "a failed append took {:?}",
            o.slowest_failure
        );
    }

    // Thaw: pgstore serves again without a restart.
    frozen.thaw();
    wait_health(&channel, "", ServingStatus::Serving).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Settle every unknown outcome by retrying with the same idempotency key.
    let mut c = server.client().await;
    let (acked, failed) = {
        let o = outcomes.lock().unwrap();
        (o.acked.clone(), o.failed.clone())
    };
    assert!(!acked.is_empty());
    let mut settled = acked.clone();
    for key in failed.keys() {
        let w = &key[1..key.find('-').unwrap()];
        let resp = c
            .append(keyed(&format!("frozen-{w}"), key))
            .await
            .expect("a retry after the thaw succeeds")
            .into_inner();
        settled.insert(key.clone(), resp.first_sequence);
    }

    // The log is dense, every acknowledged append is in it where it was acknowledged, and every
    // key is there exactly once.
    let log = read_all(&mut c).await;
    let seqs: Vec<u64> = log.iter().map(|e| e.global_sequence).collect();
    assert_eq!(
        seqs,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "dense log"
    );
    let mut at: BTreeMap<String, u64> = BTreeMap::new();
    for e in &log {
        let key = json_of(e)["key"].as_str().unwrap().to_owned();
        assert!(
            at.insert(key.clone(), e.global_sequence).is_none(),
            "{key} written twice"
        );
    }
    for (key, seq) in &acked {
        assert_eq!(at.get(key), Some(seq), "acknowledged {key} lost or moved");
    }
    assert_eq!(at, settled, "every key once, where its answer said");

    // Shutdown with the primary frozen again ends within the grace period and a few seconds.
    let frozen = Frozen::freeze(&pg);
    let _pending = tokio::spawn({
        let mut c = server.client().await;
        async move { c.append(keyed("frozen-x", "x-0")).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(30), server.shutdown()).await;
    assert!(stopped.is_ok(), "shutdown hung with the primary frozen");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "shutdown took {:?}",
        started.elapsed()
    );
    frozen.thaw();
}
