//! MultiStreamAppend: several streams written in one commit, all or nothing, through the same
//! group-commit writer as Append.

mod common;

use std::{collections::BTreeMap, sync::Arc};

use common::*;
use pgstore::proto;
use tonic::Code;
use tonic_types::StatusExt;

use proto::append_part::ExpectedVersion as Ev;

fn part(stream: &str, expected: Option<Ev>, types: &[&str]) -> proto::AppendPart {
    proto::AppendPart {
        stream_id: stream.into(),
        expected_version: expected,
        events: types.iter().map(|t| json_event(t, "{}")).collect(),
    }
}

fn multi(parts: Vec<proto::AppendPart>) -> proto::MultiStreamAppendRequest {
    proto::MultiStreamAppendRequest {
        parts,
        ..Default::default()
    }
}

async fn head(c: &mut Client) -> u64 {
    c.latest_sequence(proto::LatestSequenceRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sequence
}

async fn version(c: &mut Client, stream: &str) -> Option<u64> {
    match c
        .get_stream(proto::GetStreamRequest {
            stream_id: stream.into(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => Some(r.into_inner().version),
        Err(e) if e.code() == Code::NotFound => None,
        Err(e) => panic!("get_stream: {e}"),
    }
}

#[tokio::test]
async fn parts_are_committed_together_at_consecutive_sequences() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    c.append(append("b", None, vec![json_event("Opened", "{}")]))
        .await
        .unwrap();
    let r = c
        .multi_stream_append(multi(vec![
            part("a", Some(Ev::NoStream(true)), &["Debited", "Fee"]),
            part("b", Some(Ev::Exact(1)), &["Credited"]),
            part("c", None, &["Noted"]),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.duplicate);
    assert_eq!((r.first_sequence, r.last_sequence), (2, 5));
    let got: Vec<(String, u64, u64, u64)> = r
        .parts
        .iter()
        .map(|p| {
            (
                p.stream_id.clone(),
                p.version,
                p.first_sequence,
                p.last_sequence,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".into(), 2, 2, 3),
            ("b".into(), 2, 4, 4),
            ("c".into(), 1, 5, 5)
        ]
    );
    let log: Vec<(String, u64, String)> = read_all(&mut c)
        .await
        .into_iter()
        .map(|e| (e.stream_id, e.version, e.event_type))
        .collect();
    assert_eq!(
        log,
        vec![
            ("b".into(), 1, "Opened".into()),
            ("a".into(), 1, "Debited".into()),
            ("a".into(), 2, "Fee".into()),
            ("b".into(), 2, "Credited".into()),
            ("c".into(), 1, "Noted".into()),
        ]
    );
    assert_eq!(version(&mut c, "a").await, Some(2));
}

#[tokio::test]
async fn one_failing_part_fails_the_call_and_nothing_is_written() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    c.append(append("a", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    c.append(append("archived", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    c.archive_stream(proto::ArchiveStreamRequest {
        stream_id: "archived".into(),
    })
    .await
    .unwrap();
    let before = head(&mut c).await;

    // The second part's expectation fails: FAILED_PRECONDITION naming it, versions in details.
    let err = c
        .multi_stream_append(multi(vec![
            part("new", Some(Ev::NoStream(true)), &["E"]),
            part("a", Some(Ev::Exact(0)), &["E"]),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The google.rpc.Status in the details says the same (clients such as grpcio-status check).
    let details = <tonic_types::Status as prost::Message>::decode(err.details()).unwrap();
    assert_eq!(details.code, Code::FailedPrecondition as i32);
    let info = err.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "WRONG_EXPECTED_VERSION");
    assert_eq!(info.metadata["stream_id"], "a");
    assert_eq!(info.metadata["expected_version"], "0");
    assert_eq!(info.metadata["actual_version"], "1");
    assert!(err.message().contains("\"a\""), "{}", err.message());

    // A part on an archived stream fails the call too.
    let err = c
        .multi_stream_append(multi(vec![
            part("new", None, &["E"]),
            part("archived", None, &["E"]),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "STREAM_ARCHIVED"
    );

    assert_eq!(head(&mut c).await, before, "nothing written");
    assert_eq!(version(&mut c, "new").await, None);
    assert_eq!(version(&mut c, "a").await, Some(1));
    // The log has no hole: the next append takes the next sequence.
    let r = c
        .append(append("a", None, vec![json_event("E", "{}")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.first_sequence, before + 1);
}

#[tokio::test]
async fn a_retry_with_the_key_or_the_event_ids_gets_the_first_result() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let keyed = proto::MultiStreamAppendRequest {
        idempotency_key: "transfer-1".into(),
        ..multi(vec![
            part("acct-1", Some(Ev::NoStream(true)), &["Debited"]),
            part("acct-2", Some(Ev::NoStream(true)), &["Credited", "Noted"]),
        ])
    };
    let first = c
        .multi_stream_append(keyed.clone())
        .await
        .unwrap()
        .into_inner();
    let again = c
        .multi_stream_append(keyed.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate && !first.duplicate);
    assert_eq!(again.parts, first.parts);
    assert_eq!(
        (again.first_sequence, again.last_sequence),
        (first.first_sequence, first.last_sequence)
    );
    assert_eq!(head(&mut c).await, 3, "written once");

    // The same key for other streams: ALREADY_EXISTS naming the streams it was used for.
    let other = proto::MultiStreamAppendRequest {
        idempotency_key: "transfer-1".into(),
        ..multi(vec![part("acct-1", None, &["Debited"])])
    };
    let err = c.multi_stream_append(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "IDEMPOTENCY_KEY_CONFLICT");
    assert_eq!(info.metadata["stream_ids"], r#"["acct-1","acct-2"]"#);
    let mut single = append("acct-1", None, vec![json_event("Debited", "{}")]);
    single.idempotency_key = "transfer-1".into();
    assert_eq!(
        c.append(single).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    // A one-part call and an Append with the same key are the same append.
    let mut single = append("acct-3", None, vec![json_event("Opened", "{}")]);
    single.idempotency_key = "open-3".into();
    let opened = c.append(single).await.unwrap().into_inner();
    let r = c
        .multi_stream_append(proto::MultiStreamAppendRequest {
            idempotency_key: "open-3".into(),
            ..multi(vec![part("acct-3", None, &["Opened"])])
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.duplicate);
    assert_eq!(r.parts[0].version, opened.version);
    assert_eq!(r.last_sequence, opened.last_sequence);

    // Client event ids: the same call again is a retry; the ids elsewhere are a conflict.
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let with_ids = |streams: [&str; 2]| {
        let mut r = multi(vec![
            part(streams[0], None, &["X", "Y"]),
            part(streams[1], None, &["Z"]),
        ]);
        let mut i = 0;
        for p in &mut r.parts {
            for e in &mut p.events {
                e.event_id = ids[i].clone();
                i += 1;
            }
        }
        r
    };
    let first = c
        .multi_stream_append(with_ids(["x", "y"]))
        .await
        .unwrap()
        .into_inner();
    let again = c
        .multi_stream_append(with_ids(["x", "y"]))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.parts, first.parts);
    let err = c
        .multi_stream_append(with_ids(["x", "z"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
}

#[tokio::test]
async fn bad_calls_are_refused_with_the_field_and_change_nothing() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    config.limits.max_events_per_append = 3;
    config.limits.max_append_bytes = 1000;
    let server = Server::start(config).await;
    let mut c = server.client().await;
    c.append(append("s", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    let big = format!("\"{}\"", "x".repeat(600));
    let mut too_many_bytes = multi(vec![part("a", None, &["E"]), part("b", None, &["E"])]);
    for p in &mut too_many_bytes.parts {
        p.events[0] = json_event("E", &big);
    }
    let mut bad_json = multi(vec![part("a", None, &["E"]), part("b", None, &["E"])]);
    bad_json.parts[1].events[0] = json_event("E", "{not json");
    let id = uuid::Uuid::new_v4().to_string();
    let mut twice = multi(vec![part("a", None, &["E"]), part("b", None, &["E"])]);
    for p in &mut twice.parts {
        p.events[0].event_id = id.clone();
    }
    let mut some_ids = multi(vec![part("a", None, &["E"]), part("b", None, &["E"])]);
    some_ids.parts[0].events[0].event_id = id.clone();
    let mut bad_condition = multi(vec![part("a", None, &["E"])]);
    bad_condition.condition = Some(proto::AppendCondition {
        fail_if_events_match: Some(proto::Query {
            items: vec![proto::QueryItem {
                types: vec![],
                tags: vec![String::new()],
            }],
        }),
        after_sequence: 0,
    });
    let cases: Vec<(&str, proto::MultiStreamAppendRequest, Code, &str)> = vec![
        ("no parts", multi(vec![]), Code::InvalidArgument, "parts"),
        (
            "empty stream id",
            multi(vec![part("a", None, &["E"]), part("", None, &["E"])]),
            Code::InvalidArgument,
            "parts[1].stream_id",
        ),
        (
            "control character in a stream id",
            multi(vec![part("a\u{1e}b", None, &["E"])]),
            Code::InvalidArgument,
            "parts[0].stream_id",
        ),
        (
            "a stream twice",
            multi(vec![part("a", None, &["E"]), part("a", None, &["E"])]),
            Code::InvalidArgument,
            "parts[1].stream_id",
        ),
        (
            "a part without events",
            multi(vec![part("a", None, &["E"]), part("b", None, &[])]),
            Code::InvalidArgument,
            "parts[1].events",
        ),
        (
            "no_stream false",
            multi(vec![part("a", Some(Ev::NoStream(false)), &["E"])]),
            Code::InvalidArgument,
            "parts[0].expected_version",
        ),
        (
            "a huge expected version",
            multi(vec![part("a", Some(Ev::Exact(u64::MAX)), &["E"])]),
            Code::InvalidArgument,
            "parts[0].expected_version.exact",
        ),
        (
            "invalid JSON in the second part",
            bad_json,
            Code::InvalidArgument,
            "parts[1].events[0].json",
        ),
        (
            "an event id twice",
            twice,
            Code::InvalidArgument,
            "parts[1].events[0].event_id",
        ),
        (
            "ids for some events only",
            some_ids,
            Code::InvalidArgument,
            "events.event_id",
        ),
        (
            "an empty tag in the condition",
            bad_condition,
            Code::InvalidArgument,
            "condition.fail_if_events_match.items[0].tags[0]",
        ),
        (
            "more events than limits.max_events_per_append in all",
            multi(vec![
                part("a", None, &["E", "E"]),
                part("b", None, &["E", "E"]),
            ]),
            Code::ResourceExhausted,
            "",
        ),
        (
            "more bytes than limits.max_append_bytes in all",
            too_many_bytes,
            Code::ResourceExhausted,
            "",
        ),
    ];
    for (what, req, code, field) in cases {
        let err = c.multi_stream_append(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        if !field.is_empty() {
            let bad = err.get_details_bad_request().expect(what);
            assert_eq!(bad.field_violations[0].field, field, "{what}");
        }
    }
    assert_eq!(head(&mut c).await, 1, "nothing written");
    assert_eq!(version(&mut c, "a").await, None);
}

#[tokio::test]
async fn a_condition_holds_for_the_whole_call() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let seat = proto::Query {
        items: vec![proto::QueryItem {
            types: vec![],
            tags: vec!["seat:1".into()],
        }],
    };
    let booking = |stream: &str| {
        let mut r = multi(vec![
            part(stream, None, &["SeatBooked"]),
            part("seats", None, &["SeatTaken"]),
        ]);
        for p in &mut r.parts {
            p.events[0].tags = vec!["seat:1".into()];
        }
        r.condition = Some(proto::AppendCondition {
            fail_if_events_match: Some(seat.clone()),
            after_sequence: 0,
        });
        r
    };
    // Its own events do not fail it.
    let r = c
        .multi_stream_append(booking("customer-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.last_sequence, 2);
    let err = c
        .multi_stream_append(booking("customer-2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "APPEND_CONDITION_FAILED");
    assert_eq!(info.metadata["first_conflicting_sequence"], "1");
    assert_eq!(head(&mut c).await, 2);
    assert_eq!(version(&mut c, "customer-2").await, None);
}

/// Transfers between accounts, decided on versions read a moment before and appended to both
/// accounts at once from many clients: every transfer is in both accounts or in neither, its
/// two events next to each other in the log, and the money adds up.
#[tokio::test]
async fn concurrent_transfers_are_never_half_written() {
    let server = Server::fresh().await;
    transfers(vec![server.client().await]).await;
}

/// The same through two instances on one database: each writer's memory goes stale under the
/// other's commits, and the versions are proven in the database.
#[tokio::test]
async fn concurrent_transfers_through_two_instances_are_never_half_written() {
    let url = fresh_db().await;
    let (a, b) = (Server::fresh_on(&url).await, Server::fresh_on(&url).await);
    transfers(vec![a.client().await, b.client().await]).await;
}

async fn transfers(instances: Vec<Client>) {
    const ACCOUNTS: usize = 6;
    const CLIENTS: usize = 16;
    const TRANSFERS: usize = 25;
    let c = instances[0].clone();
    let account = |i: usize| format!("account-{i}");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let mut c = instances[client % instances.len()].clone();
        let accepted = accepted.clone();
        tasks.push(tokio::spawn(async move {
            for t in 0..TRANSFERS {
                let from = (client + t) % ACCOUNTS;
                let to = (client * 7 + t * 3 + 1) % ACCOUNTS;
                let to = if to == from { (to + 1) % ACCOUNTS } else { to };
                let (vf, vt) = (
                    version(&mut c, &account(from)).await.unwrap_or(0),
                    version(&mut c, &account(to)).await.unwrap_or(0),
                );
                let id = format!("{client}-{t}");
                let event = |ty: &str| proto::EventData {
                    metadata: [("transfer".to_string(), id.clone())].into(),
                    ..json_event(ty, r#"{"amount": 1}"#)
                };
                let req = multi(vec![
                    proto::AppendPart {
                        stream_id: account(from),
                        expected_version: Some(Ev::Exact(vf)),
                        events: vec![event("Debited")],
                    },
                    proto::AppendPart {
                        stream_id: account(to),
                        expected_version: Some(Ev::Exact(vt)),
                        events: vec![event("Credited")],
                    },
                ]);
                match c.multi_stream_append(req).await {
                    Ok(_) => {
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = c.clone();
    let log = read_all(&mut c).await;
    let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(accepted > 0);
    assert_eq!(log.len(), 2 * accepted, "two events per accepted transfer");
    let mut balance: BTreeMap<String, i64> = BTreeMap::new();
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    for pair in log.chunks(2) {
        let (debit, credit) = (&pair[0], &pair[1]);
        assert_eq!(
            (debit.event_type.as_str(), credit.event_type.as_str()),
            ("Debited", "Credited")
        );
        assert_eq!(
            debit.metadata, credit.metadata,
            "one transfer's events are adjacent"
        );
        assert_eq!(credit.global_sequence, debit.global_sequence + 1);
        *balance.entry(debit.stream_id.clone()).or_default() -= 1;
        *balance.entry(credit.stream_id.clone()).or_default() += 1;
        for e in pair {
            let v = versions.entry(e.stream_id.clone()).or_default();
            *v += 1;
            assert_eq!(e.version, *v, "versions dense per stream");
        }
    }
    assert_eq!(balance.values().sum::<i64>(), 0);
    for (stream, v) in versions {
        assert_eq!(version(&mut c, &stream).await, Some(v));
    }
}
