//! Tags and queries: events carry tags, and Read, ReadFrom and Subscribe select events by type
//! and tags with the Dynamic Consistency Boundary matching rules.

mod common;

use common::*;
use pgstore::proto;
use tokio_stream::StreamExt;

fn tagged(event_type: &str, tags: &[&str]) -> proto::EventData {
    proto::EventData {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..json_event(event_type, "{}")
    }
}

fn item(types: &[&str], tags: &[&str]) -> proto::QueryItem {
    proto::QueryItem {
        types: types.iter().map(|t| t.to_string()).collect(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

fn query(items: Vec<proto::QueryItem>) -> Option<proto::Query> {
    Some(proto::Query { items })
}

async fn read(c: &mut Client, q: Option<proto::Query>, from: u64, limit: u32) -> (Vec<u64>, u64) {
    let r = c
        .read(proto::ReadRequest {
            query: q,
            from_sequence: from,
            limit,
            min_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    (r.events.iter().map(|e| e.global_sequence).collect(), r.head)
}

/// Sequences 1..=6:
/// 1 CourseDefined [course:1]          2 CourseDefined [course:2]
/// 3 Subscribed [course:1, student:7]  4 Subscribed [course:2, student:7]
/// 5 Subscribed [course:1, student:8]  6 Renamed [student:7]
async fn seed(c: &mut Client) {
    for (stream, e) in [
        ("course-1", tagged("CourseDefined", &["course:1"])),
        ("course-2", tagged("CourseDefined", &["course:2"])),
        ("sub-a", tagged("Subscribed", &["course:1", "student:7"])),
        ("sub-b", tagged("Subscribed", &["course:2", "student:7"])),
        ("sub-c", tagged("Subscribed", &["student:8", "course:1"])),
        ("student-7", tagged("Renamed", &["student:7", "student:7"])),
    ] {
        c.append(append(stream, None, vec![e])).await.unwrap();
    }
}

#[tokio::test]
async fn queries_match_by_type_and_tags() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    seed(&mut c).await;

    // Tags come back on every read, as a set.
    let log = read_all(&mut c).await;
    assert_eq!(log[2].tags, vec!["course:1", "student:7"]);
    assert_eq!(log[5].tags, vec!["student:7"], "duplicates dropped");
    let loaded = c
        .load(proto::LoadRequest {
            stream_id: "sub-c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(loaded.events[0].tags, vec!["student:8", "course:1"]);

    // Tags: all of them.
    assert_eq!(
        read(&mut c, query(vec![item(&[], &["course:1"])]), 0, 0).await,
        (vec![1, 3, 5], 6)
    );
    assert_eq!(
        read(
            &mut c,
            query(vec![item(&[], &["course:1", "student:7"])]),
            0,
            0
        )
        .await,
        (vec![3], 6)
    );
    // Types: any of them; with tags, both must hold.
    assert_eq!(
        read(
            &mut c,
            query(vec![item(&["Subscribed", "Renamed"], &["student:7"])]),
            0,
            0
        )
        .await,
        (vec![3, 4, 6], 6)
    );
    assert_eq!(
        read(&mut c, query(vec![item(&["CourseDefined"], &[])]), 0, 0).await,
        (vec![1, 2], 6)
    );
    // Items: any of them.
    assert_eq!(
        read(
            &mut c,
            query(vec![
                item(&["CourseDefined"], &["course:2"]),
                item(&[], &["student:8"])
            ]),
            0,
            0
        )
        .await,
        (vec![2, 5], 6)
    );
    // No query, or no items: everything; an item without types or tags: everything.
    assert_eq!(read(&mut c, None, 0, 0).await, ((1..=6).collect(), 6));
    assert_eq!(
        read(&mut c, query(vec![]), 0, 0).await,
        ((1..=6).collect(), 6)
    );
    assert_eq!(
        read(
            &mut c,
            query(vec![item(&[], &[]), item(&[], &["nothing"])]),
            0,
            0
        )
        .await,
        ((1..=6).collect(), 6)
    );
    // Nothing matches: empty, consistent with the head.
    assert_eq!(
        read(&mut c, query(vec![item(&[], &["course:3"])]), 0, 0).await,
        (vec![], 6)
    );
    // From a sequence; cut short by limit: the head is the last event's sequence.
    assert_eq!(
        read(&mut c, query(vec![item(&[], &["course:1"])]), 2, 0).await,
        (vec![3, 5], 6)
    );
    assert_eq!(
        read(&mut c, query(vec![item(&[], &["student:7"])]), 0, 2).await,
        (vec![3, 4], 4)
    );
    assert_eq!(
        read(&mut c, query(vec![item(&[], &["student:7"])]), 5, 2).await,
        (vec![6], 6)
    );

    // ReadFrom with a query (and the other filters alongside).
    let page = c
        .read_from(proto::ReadFromRequest {
            query: query(vec![item(&[], &["student:7"])]),
            stream_prefix: "sub-".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.events
            .iter()
            .map(|e| e.global_sequence)
            .collect::<Vec<_>>(),
        vec![3, 4]
    );
}

#[tokio::test]
async fn a_subscription_with_a_query_catches_up_and_stays_live() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    seed(&mut c).await;
    let mut sub = c
        .subscribe(proto::SubscribeRequest {
            query: query(vec![item(&["Subscribed"], &["course:1"])]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let mut live = false;
    while seen.len() < 4 {
        match sub.next().await.unwrap().unwrap().message {
            Some(proto::subscribe_response::Message::Event(e)) => seen.push(e.global_sequence),
            Some(proto::subscribe_response::Message::CaughtUp(_)) if !live => {
                live = true;
                assert_eq!(seen, vec![3, 5]);
                // Live: only the matching ones arrive.
                for e in [
                    tagged("Subscribed", &["course:2"]),
                    tagged("Subscribed", &["course:1", "student:9"]),
                    tagged("Unsubscribed", &["course:1"]),
                    tagged("Subscribed", &["course:1"]),
                ] {
                    c.append(append("more", None, vec![e])).await.unwrap();
                }
            }
            _ => {}
        }
    }
    assert_eq!(seen, vec![3, 5, 8, 10]);
}

#[tokio::test]
async fn bad_tags_and_queries_are_refused_and_change_nothing() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let long = "t".repeat(300);
    let many: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    for tags in [
        vec![""],
        vec![long.as_str()],
        vec!["a\u{1f}b"],
        vec!["line\nbreak"],
        many.clone(),
    ] {
        let err = c
            .append(append("s", None, vec![tagged("E", &tags)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{tags:?}: {err}");
    }
    assert!(read_all(&mut c).await.is_empty(), "nothing written");

    let bad_queries = [
        query(vec![item(&[""], &[])]),
        query(vec![item(&[], &[""])]),
        query(vec![item(&[], &[long.as_str()])]),
        query((0..33).map(|_| item(&["E"], &[])).collect()),
        query(vec![item(&[], &many)]),
    ];
    for q in bad_queries {
        let err = c
            .read(proto::ReadRequest {
                query: q.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{q:?}: {err}");
        let err = c
            .read_from(proto::ReadFromRequest {
                query: q.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{q:?}: {err}");
    }
}
