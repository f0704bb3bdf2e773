//! Bad input gets a precise status code and changes nothing.

mod common;

use common::*;
use pgstore::proto::{self, append_request::ExpectedVersion as Ev, event_data::Payload};
use tonic::Code;

fn ev(f: impl FnOnce(&mut proto::EventData)) -> proto::EventData {
    let mut e = json_event("E", "{}");
    f(&mut e);
    e
}

fn one(f: impl FnOnce(&mut proto::EventData)) -> proto::AppendRequest {
    append("s", None, vec![ev(f)])
}

#[tokio::test]
async fn invalid_requests_are_refused_with_the_right_code_and_write_nothing() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    config.limits.max_event_bytes = 1024;
    config.limits.max_append_bytes = 4096;
    config.limits.max_events_per_append = 10;
    config.limits.max_metadata_bytes = 256;
    let server = Server::start(config).await;
    let c = server.client().await;
    // A stream that exists, to check nothing changes in it either.
    c.clone()
        .append(append("existing", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();

    let long_id = "x".repeat(257);
    let id = uuid::Uuid::new_v4().to_string();
    let appends: Vec<(&str, Code, proto::AppendRequest)> = vec![
        (
            "empty stream id",
            Code::InvalidArgument,
            append("", None, vec![json_event("E", "{}")]),
        ),
        (
            "stream id too long",
            Code::InvalidArgument,
            append(&long_id, None, vec![json_event("E", "{}")]),
        ),
        (
            "control char in stream id",
            Code::InvalidArgument,
            append("a\u{7}b", None, vec![json_event("E", "{}")]),
        ),
        (
            "no events",
            Code::InvalidArgument,
            append("s", None, vec![]),
        ),
        (
            "empty event type",
            Code::InvalidArgument,
            one(|e| e.event_type.clear()),
        ),
        (
            "event type too long",
            Code::InvalidArgument,
            one(|e| e.event_type = "t".repeat(257)),
        ),
        (
            "invalid JSON",
            Code::InvalidArgument,
            one(|e| e.payload = Some(Payload::Json("{\"a\":".into()))),
        ),
        (
            "JSON with NUL",
            Code::InvalidArgument,
            one(|e| e.payload = Some(Payload::Json(r#"{"a":"\u0000"}"#.into()))),
        ),
        (
            "JSON type without payload",
            Code::InvalidArgument,
            one(|e| e.payload = None),
        ),
        (
            "JSON bytes not UTF-8",
            Code::InvalidArgument,
            one(|e| e.payload = Some(Payload::Data(vec![0xff, 0xfe].into()))),
        ),
        (
            "bad UUID",
            Code::InvalidArgument,
            one(|e| e.event_id = "not-a-uuid".into()),
        ),
        (
            "nil UUID",
            Code::InvalidArgument,
            one(|e| e.event_id = uuid::Uuid::nil().to_string()),
        ),
        (
            "same id twice",
            Code::InvalidArgument,
            append(
                "s",
                None,
                vec![
                    ev(|e| e.event_id = id.clone()),
                    ev(|e| e.event_id = id.clone()),
                ],
            ),
        ),
        (
            "ids for some events only",
            Code::InvalidArgument,
            append(
                "s",
                None,
                vec![
                    ev(|e| e.event_id = uuid::Uuid::new_v4().to_string()),
                    json_event("E", "{}"),
                ],
            ),
        ),
        (
            "bad content type",
            Code::InvalidArgument,
            one(|e| e.content_type = "nope".into()),
        ),
        (
            "content type not ASCII",
            Code::InvalidArgument,
            one(|e| e.content_type = "text/plé".into()),
        ),
        (
            "huge exact version",
            Code::InvalidArgument,
            append("s", Some(Ev::Exact(u64::MAX)), vec![json_event("E", "{}")]),
        ),
        (
            "no_stream false",
            Code::InvalidArgument,
            append("s", Some(Ev::NoStream(false)), vec![json_event("E", "{}")]),
        ),
        (
            "timestamp out of range",
            Code::InvalidArgument,
            one(|e| {
                e.timestamp = Some(prost_types::Timestamp {
                    seconds: i64::MAX / 2,
                    nanos: 0,
                })
            }),
        ),
        (
            "negative nanos",
            Code::InvalidArgument,
            one(|e| {
                e.timestamp = Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                })
            }),
        ),
        (
            "metadata with NUL",
            Code::InvalidArgument,
            one(|e| {
                e.metadata.insert("k".into(), "a\0b".into());
            }),
        ),
        ("idempotency key too long", Code::InvalidArgument, {
            let mut r = append("s", None, vec![json_event("E", "{}")]);
            r.idempotency_key = long_id.clone();
            r
        }),
        (
            "payload over the event limit",
            Code::ResourceExhausted,
            one(|e| e.payload = Some(Payload::Json(format!("\"{}\"", "a".repeat(1100))))),
        ),
        (
            "binary payload over the event limit",
            Code::ResourceExhausted,
            one(|e| {
                e.content_type = "application/octet-stream".into();
                e.payload = Some(Payload::Data(vec![0; 1025].into()));
            }),
        ),
        (
            "metadata over the limit",
            Code::ResourceExhausted,
            one(|e| {
                e.metadata.insert("k".into(), "v".repeat(300));
            }),
        ),
        (
            "too many events",
            Code::ResourceExhausted,
            append("s", None, (0..11).map(|_| json_event("E", "{}")).collect()),
        ),
        (
            "append over the byte limit",
            Code::ResourceExhausted,
            append(
                "s",
                None,
                (0..5)
                    .map(|_| json_event("E", &format!("\"{}\"", "a".repeat(1000))))
                    .collect(),
            ),
        ),
        (
            "message over the transport limit",
            Code::ResourceExhausted,
            one(|e| e.payload = Some(Payload::Json(format!("\"{}\"", "a".repeat(20_000))))),
        ),
        (
            "wrong expected version",
            Code::Aborted,
            append("existing", Some(Ev::Exact(7)), vec![json_event("E", "{}")]),
        ),
    ];
    for (name, code, req) in appends {
        let err = c.clone().append(req).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(!err.message().is_empty(), "{name}: a message says why");
    }

    let mut c2 = c.clone();
    let load = |f: fn(&mut proto::LoadRequest)| {
        let mut r = proto::LoadRequest {
            stream_id: "existing".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let loads: Vec<(&str, Code, proto::LoadRequest)> = vec![
        (
            "load: empty id",
            Code::InvalidArgument,
            load(|r| r.stream_id.clear()),
        ),
        (
            "load: huge from_version",
            Code::InvalidArgument,
            load(|r| r.from_version = u64::MAX),
        ),
        (
            "load: huge min_sequence",
            Code::InvalidArgument,
            load(|r| r.min_sequence = u64::MAX),
        ),
        (
            "load: empty type filter",
            Code::InvalidArgument,
            load(|r| r.event_types = vec![String::new()]),
        ),
        (
            "load: unknown stream",
            Code::NotFound,
            load(|r| r.stream_id = "unknown".into()),
        ),
    ];
    for (name, code, req) in loads {
        assert_eq!(c2.load(req).await.expect_err(name).code(), code, "{name}");
    }
    let reads: Vec<(&str, proto::ReadFromRequest)> = vec![
        (
            "read: huge from",
            proto::ReadFromRequest {
                from_sequence: u64::MAX,
                ..Default::default()
            },
        ),
        (
            "read: long prefix",
            proto::ReadFromRequest {
                stream_prefix: long_id.clone(),
                ..Default::default()
            },
        ),
        (
            "read: empty type",
            proto::ReadFromRequest {
                event_types: vec![String::new()],
                ..Default::default()
            },
        ),
    ];
    for (name, req) in reads {
        assert_eq!(
            c2.read_from(req).await.expect_err(name).code(),
            Code::InvalidArgument,
            "{name}"
        );
    }
    let cp = |id: &str, seq| proto::SaveCheckpointRequest {
        consumer_id: id.into(),
        sequence: seq,
    };
    assert_eq!(
        c2.save_checkpoint(cp("", 1)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c2.save_checkpoint(cp("c", u64::MAX))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c2.load_checkpoint(proto::LoadCheckpointRequest {
            consumer_id: long_id.clone()
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c2.save_snapshot(proto::SaveSnapshotRequest { snapshot: None })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c2.save_snapshot(proto::SaveSnapshotRequest {
            snapshot: Some(proto::Snapshot {
                stream_id: "unknown".into(),
                ..Default::default()
            })
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    assert_eq!(
        c2.invalidate_snapshot(proto::InvalidateSnapshotRequest {
            stream_id: "x".into(),
            all: true
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c2.tombstone_stream(proto::TombstoneStreamRequest {
            stream_id: String::new(),
            reason: String::new()
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c2.get_stream(proto::GetStreamRequest {
            stream_id: "unknown".into(),
            min_sequence: 0
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );

    // Nothing was written by any of it.
    let all = read_all(&mut c2).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].stream_id, "existing");
    for s in ["s", "unknown"] {
        let err = c2
            .get_stream(proto::GetStreamRequest {
                stream_id: s.into(),
                min_sequence: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{s} must not exist");
    }
    let cp = c2
        .load_checkpoint(proto::LoadCheckpointRequest {
            consumer_id: "c".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!cp.found);
}

#[tokio::test]
async fn a_payload_postgres_refuses_fails_alone_in_its_batch() {
    // Numbers beyond PostgreSQL's numeric range pass JSON syntax checks but not jsonb; the writer
    // retries the batch one append at a time so only the bad append fails.
    let server = Server::fresh().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = server.client().await;
        let json = if i == 7 {
            "1e1000000".to_string()
        } else {
            format!("{i}")
        };
        tasks.push(tokio::spawn(async move {
            c.append(append(
                &format!("s-{i}"),
                None,
                vec![json_event("E", &json)],
            ))
            .await
        }));
    }
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(i, 7, "{}", e.message());
                assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
            }
        }
    }
    assert_eq!(ok, 19);
    let mut c = server.client().await;
    let all = read_all(&mut c).await;
    assert_eq!(all.len(), 19);
    assert!(all.iter().all(|e| e.stream_id != "s-7"));
    let seqs: Vec<u64> = all.iter().map(|e| e.global_sequence).collect();
    assert_eq!(
        seqs,
        (1..=19).collect::<Vec<_>>(),
        "no hole was left by the failed append"
    );
}

#[tokio::test]
async fn errors_name_the_offending_event_field() {
    use tonic_types::StatusExt;
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let violation = |status: tonic::Status| {
        let details = status
            .get_details_bad_request()
            .expect("BadRequest details");
        details.field_violations[0].field.clone()
    };
    let bad_json = append(
        "s",
        None,
        vec![json_event("A", "{}"), json_event("B", "{not json")],
    );
    let err = c.append(bad_json).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(violation(err), "events[1].json");
    let bad_type = append(
        "s",
        None,
        vec![
            json_event("A", "{}"),
            json_event("A", "{}"),
            json_event("", "{}"),
        ],
    );
    let err = c.append(bad_type).await.unwrap_err();
    assert_eq!(violation(err), "events[2].event_type");
    assert!(read_all(&mut c).await.is_empty());
}
