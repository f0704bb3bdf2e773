//! Append: expected versions, idempotent retries, payloads, metadata, timestamps.

mod common;

use common::*;
use pgstore::proto::{self, append_request::ExpectedVersion as Ev};
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn appends_get_dense_versions_and_global_sequences() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let a = c
        .append(append(
            "order-1",
            Some(Ev::NoStream(true)),
            vec![
                json_event("Placed", r#"{"n":1}"#),
                json_event("Paid", r#"{"n":2}"#),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.version, a.first_sequence, a.last_sequence), (2, 1, 2));
    assert!(!a.duplicate);
    let b = c
        .append(append("order-2", None, vec![json_event("Placed", "{}")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.version, b.first_sequence, b.last_sequence), (1, 3, 3));
    let d = c
        .append(append(
            "order-1",
            exact(2),
            vec![json_event("Shipped", "{}")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.version, d.first_sequence, d.last_sequence), (3, 4, 4));
    let all = read_all(&mut c).await;
    let seqs: Vec<u64> = all.iter().map(|e| e.global_sequence).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let head = c
        .latest_sequence(proto::LatestSequenceRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(head.sequence, 4);
}

#[tokio::test]
async fn each_expected_version_mode_is_enforced() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let s = "acct-1";
    // stream_exists on a missing stream fails with actual version 0.
    let err = c
        .append(append(
            s,
            Some(Ev::StreamExists(true)),
            vec![json_event("E", "{}")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let info = err.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "WRONG_EXPECTED_VERSION");
    assert_eq!(info.metadata["actual_version"], "0");
    assert_eq!(info.metadata["expected_version"], "stream_exists");

    // exact 0 == no stream.
    c.append(append(s, exact(0), vec![json_event("E", "{}")]))
        .await
        .unwrap();
    // no_stream now fails.
    let err = c
        .append(append(
            s,
            Some(Ev::NoStream(true)),
            vec![json_event("E", "{}")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(
        err.get_details_error_info().unwrap().metadata["actual_version"],
        "1"
    );
    // stale exact fails, with the actual version in the details.
    let err = c
        .append(append(s, exact(0), vec![json_event("E", "{}")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(
        err.get_details_error_info().unwrap().metadata["actual_version"],
        "1"
    );
    // a version from the future fails too.
    let err = c
        .append(append(s, exact(5), vec![json_event("E", "{}")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    // stream_exists and any succeed.
    c.append(append(
        s,
        Some(Ev::StreamExists(true)),
        vec![json_event("E", "{}")],
    ))
    .await
    .unwrap();
    let r = c
        .append(append(s, Some(Ev::Any(true)), vec![json_event("E", "{}")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 3);
    // Failed appends wrote nothing.
    assert_eq!(read_all(&mut c).await.len(), 3);
}

#[tokio::test]
async fn retry_with_the_same_event_ids_returns_the_original_result() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let mut e1 = json_event("A", r#"{"x":1}"#);
    e1.event_id = uuid::Uuid::new_v4().to_string();
    let mut e2 = json_event("B", r#"{"x":2}"#);
    e2.event_id = uuid::Uuid::new_v4().to_string();
    c.append(append("other", None, vec![json_event("X", "{}")]))
        .await
        .unwrap();
    let req = append("retry-1", exact(0), vec![e1.clone(), e2.clone()]);
    let first = c.append(req.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    // Something else lands in the stream after it.
    c.append(append("retry-1", None, vec![json_event("C", "{}")]))
        .await
        .unwrap();
    let again = c.append(req.clone()).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(
        (again.version, again.first_sequence, again.last_sequence),
        (first.version, first.first_sequence, first.last_sequence)
    );
    assert_eq!(read_all(&mut c).await.len(), 4, "the retry wrote nothing");

    // Re-using one id in a different place is a conflict, not a retry.
    let err = c
        .append(append("retry-2", None, vec![e2.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "EVENT_ID_CONFLICT"
    );
    // Mixing a stored id with new events is a conflict too.
    let mut fresh = json_event("D", "{}");
    fresh.event_id = uuid::Uuid::new_v4().to_string();
    let err = c
        .append(append("retry-1", None, vec![e1.clone(), fresh]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(read_all(&mut c).await.len(), 4);
}

#[tokio::test]
async fn concurrent_duplicates_in_one_batch_are_written_once() {
    let server = Server::fresh().await;
    let mut e = json_event("A", "{}");
    e.event_id = uuid::Uuid::new_v4().to_string();
    let req = append("dup-batch", None, vec![e]);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = server.client().await;
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            c.append(req).await.unwrap().into_inner()
        }));
    }
    let mut written = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.version, r.first_sequence), (1, 1));
        if !r.duplicate {
            written += 1;
        }
    }
    assert_eq!(written, 1);
    let mut c = server.client().await;
    assert_eq!(read_all(&mut c).await.len(), 1);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_result() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let mut req = append("keyed", None, vec![json_event("A", "{}")]);
    req.idempotency_key = "cmd-42".into();
    let first = c.append(req.clone()).await.unwrap().into_inner();
    let again = c.append(req.clone()).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(first.last_sequence, again.last_sequence);
    assert_eq!(read_all(&mut c).await.len(), 1);
    // The same key for another stream is refused.
    let mut other = append("keyed-other", None, vec![json_event("A", "{}")]);
    other.idempotency_key = "cmd-42".into();
    let err = c.append(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(read_all(&mut c).await.len(), 1);
}

#[tokio::test]
async fn payloads_metadata_and_timestamps_round_trip() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let binary: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let ts = prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 123_456_000,
    };
    let before_1970 = prost_types::Timestamp {
        seconds: -1_000_001,
        nanos: 250_000_000,
    };
    let events = vec![
        proto::EventData {
            event_type: "Json".into(),
            payload: Some(proto::event_data::Payload::Json(
                r#"{"b": [1, 2.5, "x"], "a": {"nested": true}, "big": 12345678901234567890}"#
                    .into(),
            )),
            metadata: [("correlation".to_string(), "c-1".to_string())].into(),
            timestamp: Some(ts),
            ..Default::default()
        },
        proto::EventData {
            event_type: "Bin".into(),
            content_type: "application/octet-stream".into(),
            payload: Some(proto::event_data::Payload::Data(binary.clone().into())),
            ..Default::default()
        },
        proto::EventData {
            event_type: "JsonAsBytes".into(),
            content_type: "application/vnd.thing+json".into(),
            payload: Some(proto::event_data::Payload::Data(
                br#"[1,2,3]"#.to_vec().into(),
            )),
            ..Default::default()
        },
        proto::EventData {
            event_type: "Empty".into(),
            content_type: "text/plain".into(),
            timestamp: Some(before_1970),
            ..Default::default()
        },
    ];
    c.append(append("rt", None, events)).await.unwrap();
    let page = c
        .load(proto::LoadRequest {
            stream_id: "rt".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = &page.events;
    assert_eq!(e.len(), 4);
    assert_eq!(
        json_of(&e[0]),
        serde_json::json!({"a": {"nested": true}, "b": [1, 2.5, "x"], "big": 12345678901234567890u64})
    );
    assert_eq!(e[0].content_type, "application/json");
    assert_eq!(e[0].metadata["correlation"], "c-1");
    assert_eq!(e[0].timestamp, Some(ts));
    assert!(e[0].recorded_at.is_some());
    assert_eq!(
        e[0].partition_key,
        pgstore::store::partition_key("rt"),
        "partition key is FNV-1a of the stream id"
    );
    assert!(uuid::Uuid::parse_str(&e[0].event_id).is_ok());
    match &e[1].payload {
        Some(proto::recorded_event::Payload::Data(b)) => assert_eq!(b.as_ref(), &binary[..]),
        other => panic!("expected bytes, got {other:?}"),
    }
    assert_eq!(e[1].content_type, "application/octet-stream");
    assert_eq!(json_of(&e[2]), serde_json::json!([1, 2, 3]));
    match &e[3].payload {
        Some(proto::recorded_event::Payload::Data(b)) => assert!(b.is_empty()),
        other => panic!("expected empty bytes, got {other:?}"),
    }
    assert_eq!(e[3].timestamp, Some(before_1970));

    // ReadFrom and Subscribe carry the very same events.
    let log = c
        .read_from(proto::ReadFromRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&log.events, e);
    let mut sub = c
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut live = Vec::new();
    while let Some(msg) = sub.message().await.unwrap() {
        match msg.message {
            Some(proto::subscribe_response::Message::Event(ev)) => live.push(ev),
            _ => break,
        }
    }
    assert_eq!(&live, e);
}

#[tokio::test]
async fn json_payloads_are_queryable_in_sql() {
    let url = fresh_db().await;
    let server = Server::start(test_config(&url)).await;
    let mut c = server.client().await;
    c.append(append(
        "sql-1",
        None,
        vec![json_event("Placed", r#"{"customer": "ada", "total": 42}"#)],
    ))
    .await
    .unwrap();
    let config = pgstore::config::parse_database_url(&url).unwrap();
    let (client, conn) = config.connect().await.unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT data->>'customer', (data->>'total')::int FROM pgstore.events WHERE stream_id = 'sql-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ada");
    assert_eq!(row.get::<_, i32>(1), 42);
}

#[tokio::test]
async fn tombstoned_and_archived_streams_refuse_appends() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    c.append(append("t-1", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    c.append(append("a-1", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    c.tombstone_stream(proto::TombstoneStreamRequest {
        stream_id: "t-1".into(),
        reason: "gdpr".into(),
    })
    .await
    .unwrap();
    c.archive_stream(proto::ArchiveStreamRequest {
        stream_id: "a-1".into(),
    })
    .await
    .unwrap();
    for (s, reason) in [("t-1", "STREAM_TOMBSTONED"), ("a-1", "STREAM_ARCHIVED")] {
        let err = c
            .append(append(s, None, vec![json_event("E", "{}")]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{s}");
        assert_eq!(err.get_details_error_info().unwrap().reason, reason);
    }
    assert_eq!(read_all(&mut c).await.len(), 2);
}

/// The writer plans from what it remembers and proves it under the lock; when another instance
/// or a lifecycle change made that memory stale, the append is redone reading first, and the
/// result is what a fresh read would have given.
#[tokio::test]
async fn a_stale_writer_memory_is_detected_and_the_append_redone() {
    let url = fresh_db().await;
    let metrics_port = free_port();
    let mut config = test_config(&url);
    config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    let a = Server::start(config).await;
    let b = Server::fresh_on(&url).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let one = |s: &str, v| append(s, v, vec![json_event("E", "{}")]);

    // a remembers t as active; b tombstones it (the head does not move): a's append is
    // refused, nothing written.
    ca.append(one("t", None)).await.unwrap();
    cb.tombstone_stream(proto::TombstoneStreamRequest {
        stream_id: "t".into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let err = ca.append(one("t", None)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        metric(metrics_port, "pgstore_write_rereads_total").await,
        1,
        "the one-round-trip attempt saw the stream's state had changed"
    );
    tokio::time::sleep(
        pgstore::store::writer::FAST_PATH_REST + std::time::Duration::from_millis(100),
    )
    .await;

    // a remembers s at version 1; b moves it and the head.
    ca.append(one("s", None)).await.unwrap();
    cb.append(one("s", None)).await.unwrap();
    let r = ca.append(one("s", None)).await.unwrap().into_inner();
    assert_eq!((r.version, r.first_sequence), (3, 4));
    assert_eq!(
        metric(metrics_port, "pgstore_write_rereads_total").await,
        2,
        "the one-round-trip attempt saw the head had moved"
    );
    // Memory refreshed: an exact expectation that only a fresh read satisfies.
    let r = ca.append(one("s", exact(3))).await.unwrap().into_inner();
    assert_eq!(r.version, 4);

    // b deletes a stream a remembers; a starts it again from version 1.
    ca.append(one("u", None)).await.unwrap();
    cb.delete_stream(proto::DeleteStreamRequest {
        stream_id: "u".into(),
    })
    .await
    .unwrap();
    let r = ca.append(one("u", exact(0))).await.unwrap().into_inner();
    assert_eq!(r.version, 1);

    // Sequences only went up (u's first events were deleted), and s's versions are dense.
    let all = read_all(&mut ca).await;
    assert!(
        all.windows(2)
            .all(|w| w[0].global_sequence < w[1].global_sequence)
    );
    assert_eq!(all.last().unwrap().global_sequence, 7);
    let s: Vec<u64> = all
        .iter()
        .filter(|e| e.stream_id == "s")
        .map(|e| e.version)
        .collect();
    assert_eq!(s, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn idempotency_keys_are_forgotten_after_their_retention() {
    let port = free_port();
    let mut config = test_config(&fresh_db().await);
    config.writer.idempotency_key_retention = Some(std::time::Duration::from_secs(1));
    config.metrics_listen = Some(format!("127.0.0.1:{port}"));
    let server = Server::start(config).await;
    let mut c = server.client().await;
    let keyed = |key: &str| proto::AppendRequest {
        idempotency_key: key.into(),
        ..append("retained", None, vec![json_event("E", "{}")])
    };

    let first = c.append(keyed("k-old")).await.unwrap().into_inner();
    let retry = c.append(keyed("k-old")).await.unwrap().into_inner();
    assert!(!first.duplicate && retry.duplicate);
    assert_eq!(retry.version, first.version);

    // Once the key is past its retention it is deleted, and the same key appends anew.
    wait_metric(port, "pgstore_idempotency_keys_pruned_total", 1).await;
    let again = c.append(keyed("k-old")).await.unwrap().into_inner();
    assert!(!again.duplicate, "a forgotten key is a new append");
    assert_eq!(again.version, first.version + 1);

    // A young key is still remembered.
    let young = c.append(keyed("k-young")).await.unwrap().into_inner();
    let retry = c.append(keyed("k-young")).await.unwrap().into_inner();
    assert!(retry.duplicate);
    assert_eq!(retry.version, young.version);
}

/// An id pgstore assigns: a UUIDv8 of the store's prefix (bytes 0-5) and the event's sequence
/// (the low 62 bits of bytes 8-15).
fn with_sequence(id: &str, seq: u64) -> String {
    let mut b = *uuid::Uuid::parse_str(id).unwrap().as_bytes();
    b[8..].copy_from_slice(&(seq | 1 << 63).to_be_bytes());
    uuid::Uuid::from_bytes(b).to_string()
}

#[tokio::test]
async fn assigned_event_ids_come_from_the_sequence_and_are_checked_when_sent_back() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    c.append(append(
        "assigned-1",
        None,
        vec![json_event("A", "{}"), json_event("B", "{}")],
    ))
    .await
    .unwrap();
    let mut chosen = json_event("C", "{}");
    chosen.event_id = uuid::Uuid::new_v4().to_string();
    c.append(append("assigned-2", None, vec![chosen.clone()]))
        .await
        .unwrap();
    c.append(append("assigned-1", None, vec![json_event("D", "{}")]))
        .await
        .unwrap();

    let all = read_all(&mut c).await;
    assert_eq!(all.len(), 4);
    for e in [&all[0], &all[1], &all[3]] {
        let id = uuid::Uuid::parse_str(&e.event_id).unwrap();
        assert_eq!(id.get_version_num(), 8, "{id}");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(
            e.event_id,
            with_sequence(&all[0].event_id, e.global_sequence)
        );
    }
    assert_eq!(all[2].event_id, chosen.event_id, "a client's id is kept");
    // Every read reports the same ids.
    let loaded = c
        .load(proto::LoadRequest {
            stream_id: "assigned-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let ids: Vec<&str> = loaded.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, [&all[0].event_id, &all[1].event_id, &all[3].event_id]);

    // Sending assigned ids back: the same events in the same place are a retry...
    let again = |e: &proto::RecordedEvent, ty: &str| {
        let mut ev = json_event(ty, "{}");
        ev.event_id = e.event_id.clone();
        ev
    };
    let retry = c
        .append(append(
            "assigned-1",
            None,
            vec![again(&all[0], "A"), again(&all[1], "B")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.version, retry.first_sequence, retry.last_sequence),
        (2, 1, 2)
    );
    // ...and anywhere else a conflict, as for ids clients chose.
    let err = c
        .append(append("assigned-3", None, vec![again(&all[3], "D")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "EVENT_ID_CONFLICT"
    );
    // An id of the store's form that no event has (a sequence not reached yet, or one whose
    // event has a client's id) is refused: the event at that sequence has or will get it.
    for seq in [5, 1_000_000, all[2].global_sequence] {
        let mut forged = json_event("F", "{}");
        forged.event_id = with_sequence(&all[0].event_id, seq);
        let err = c
            .append(append("assigned-4", None, vec![forged]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "seq {seq}: {err:?}");
        assert!(err.message().contains("events[0].event_id"), "{err:?}");
    }
    assert_eq!(read_all(&mut c).await.len(), 4, "nothing was written");
    // The next assigned id is the one of the next sequence.
    let next = c
        .append(append("assigned-4", None, vec![json_event("G", "{}")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.first_sequence, 5);
    let all = read_all(&mut c).await;
    assert_eq!(all[4].event_id, with_sequence(&all[0].event_id, 5));
}
