//! Concurrency invariants: dense per-stream versions, exactly the winners stored, and a reader
//! that pages the log during the storm never sees a hole or a reordering.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use common::*;
use pgstore::proto;
use tonic::Code;
use tonic_types::StatusExt;

const CLIENTS: usize = 32;
const ATTEMPTS: usize = 40;
const STREAMS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_exact_version_appends_keep_every_invariant() {
    let server = Server::fresh().await;
    let stop = Arc::new(AtomicBool::new(false));

    // A reader paging ReadFrom for the whole run.
    let mut reader_client = server.client().await;
    let reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        let mut seen: Vec<(u64, String)> = Vec::new();
        let mut from = 1;
        loop {
            let done = reader_stop.load(Ordering::SeqCst);
            let page = reader_client
                .read_from(proto::ReadFromRequest {
                    from_sequence: from,
                    limit: 50,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for e in &page.events {
                let expected = seen.last().map_or(1, |(s, _)| s + 1);
                assert_eq!(
                    e.global_sequence, expected,
                    "the reader saw a hole or a reordering"
                );
                seen.push((e.global_sequence, e.event_id.clone()));
            }
            assert!(page.next_sequence >= from);
            from = page.next_sequence;
            if done && page.events.is_empty() {
                return seen;
            }
        }
    });

    let mut writers = Vec::new();
    for w in 0..CLIENTS {
        let mut c = server.client().await;
        writers.push(tokio::spawn(async move {
            let mut won: Vec<(String, u64, Vec<String>)> = Vec::new();
            let mut lost: Vec<Vec<String>> = Vec::new();
            let mut known: BTreeMap<String, u64> = BTreeMap::new();
            for i in 0..ATTEMPTS {
                let stream = format!("acct-{}", (w + i) % STREAMS);
                let expected = *known.get(&stream).unwrap_or(&0);
                let n = 1 + (i % 3);
                let events: Vec<proto::EventData> = (0..n)
                    .map(|k| {
                        let mut e = json_event("Moved", &format!(r#"{{"w":{w},"i":{i},"k":{k}}}"#));
                        e.event_id = uuid::Uuid::new_v4().to_string();
                        e
                    })
                    .collect();
                let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
                match c.append(append(&stream, exact(expected), events)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert_eq!(r.version, expected + n as u64);
                        assert_eq!(r.last_sequence - r.first_sequence + 1, n as u64);
                        known.insert(stream.clone(), r.version);
                        won.push((stream, expected + 1, ids));
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::Aborted, "{}", e.message());
                        let actual: u64 =
                            e.get_details_error_info().unwrap().metadata["actual_version"]
                                .parse()
                                .unwrap();
                        assert_ne!(actual, expected);
                        known.insert(stream, actual);
                        lost.push(ids);
                    }
                }
            }
            (won, lost)
        }));
    }
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for w in writers {
        let (a, b) = w.await.unwrap();
        won.extend(a);
        lost.extend(b);
    }
    stop.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();

    let mut c = server.client().await;
    let all = read_all(&mut c).await;
    // The reader saw exactly the final log, in order.
    let final_ids: Vec<(u64, String)> = all
        .iter()
        .map(|e| (e.global_sequence, e.event_id.clone()))
        .collect();
    assert_eq!(seen, final_ids);
    // Global sequences are dense.
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.global_sequence, i as u64 + 1);
    }
    // Exactly the winning appends are stored, each at the version it was told.
    let stored: HashSet<&str> = all.iter().map(|e| e.event_id.as_str()).collect();
    let won_ids: usize = won.iter().map(|(_, _, ids)| ids.len()).sum();
    assert_eq!(stored.len(), all.len());
    assert_eq!(won_ids, all.len());
    for ids in &lost {
        for id in ids {
            assert!(!stored.contains(id.as_str()), "a losing append was stored");
        }
    }
    let by_id: BTreeMap<&str, &proto::RecordedEvent> =
        all.iter().map(|e| (e.event_id.as_str(), e)).collect();
    for (stream, first_version, ids) in &won {
        for (k, id) in ids.iter().enumerate() {
            let e = by_id[id.as_str()];
            assert_eq!(&e.stream_id, stream);
            assert_eq!(e.version, first_version + k as u64);
        }
    }
    // Every stream's versions are dense.
    for s in 0..STREAMS {
        let page = c
            .load(proto::LoadRequest {
                stream_id: format!("acct-{s}"),
                max_count: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let versions: Vec<u64> = page.events.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=page.stream_version).collect::<Vec<_>>());
    }
    assert!(!lost.is_empty(), "the test should produce conflicts");
    assert!(!won.is_empty());
}

/// While one instance keeps several batches in flight on its connection, another instance writes
/// to the same streams: batches planned on a memory that went stale fail their checks and are
/// redone, and the log stays dense, in order, and holds exactly what was acknowledged, each
/// event at the sequence and version its append was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_batches_that_meet_another_instance_are_redone_and_lose_nothing() {
    const STREAMS: usize = 4;
    let url = fresh_db().await;
    let metrics_port = free_port();
    let mut config = test_config(&url);
    config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    config.writer.pipeline_depth = 4;
    let a = Server::start(config).await;
    let b = Server::fresh_on(&url).await;
    let stop = Arc::new(AtomicBool::new(false));

    // Clients of both instances append to the same streams; b's few writes make a's memory
    // stale now and then, while a has batches in flight.
    let mut writers = Vec::new();
    for w in 0..20usize {
        let mut c = if w < 16 {
            a.client().await
        } else {
            b.client().await
        };
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<(String, proto::AppendResponse, Vec<String>)> = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                if w >= 16 {
                    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                }
                let stream = format!("shared-{}", (w + i) % STREAMS);
                // Appends large enough for batches to be sent behind each other.
                let events: Vec<proto::EventData> = (0..10 + (i % 5) * 10)
                    .map(|k| {
                        let mut e = json_event("Put", &format!(r#"{{"w":{w},"i":{i},"k":{k}}}"#));
                        e.event_id = uuid::Uuid::new_v4().to_string();
                        e
                    })
                    .collect();
                let ids = events.iter().map(|e| e.event_id.clone()).collect();
                let r = c.append(append(&stream, None, events)).await.unwrap();
                acked.push((stream, r.into_inner(), ids));
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }

    let mut c = a.client().await;
    let all = read_all(&mut c).await;
    for (i, e) in all.iter().enumerate() {
        assert_eq!(
            e.global_sequence,
            i as u64 + 1,
            "global sequences are dense"
        );
    }
    let acked_events: usize = acked.iter().map(|(_, _, ids)| ids.len()).sum();
    assert_eq!(
        all.len(),
        acked_events,
        "exactly the acknowledged events are stored"
    );
    for (stream, r, ids) in &acked {
        let first_version = r.version + 1 - ids.len() as u64;
        for (k, id) in ids.iter().enumerate() {
            let e = &all[(r.first_sequence - 1) as usize + k];
            assert_eq!(
                (&e.event_id, &e.stream_id, e.version),
                (id, stream, first_version + k as u64),
                "an event is where its append was told"
            );
        }
        assert_eq!(r.last_sequence - r.first_sequence + 1, ids.len() as u64);
    }
    for s in 0..STREAMS {
        let versions: Vec<u64> = all
            .iter()
            .filter(|e| e.stream_id == format!("shared-{s}"))
            .map(|e| e.version)
            .collect();
        assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    }
    assert!(
        metric(metrics_port, "pgstore_write_batches_pipelined_total").await > 0,
        "a kept batches in flight"
    );
    assert!(
        metric(metrics_port, "pgstore_write_rereads_total").await > 0,
        "a's memory went stale"
    );
}
