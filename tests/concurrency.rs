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
