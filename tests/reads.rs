//! Load, ReadFrom and LatestSequence.

mod common;

use common::*;
use pgstore::proto;
use tonic::Code;

async fn seed(c: &mut Client) {
    // a: A1 B2 A3 B4 A5 ; b: A1 ; acct-x: B1
    c.append(append(
        "a",
        None,
        vec![
            json_event("A", r#"{"i":1}"#),
            json_event("B", r#"{"i":2}"#),
            json_event("A", r#"{"i":3}"#),
        ],
    ))
    .await
    .unwrap();
    c.append(append("b", None, vec![json_event("A", r#"{"i":1}"#)]))
        .await
        .unwrap();
    c.append(append(
        "a",
        None,
        vec![json_event("B", r#"{"i":4}"#), json_event("A", r#"{"i":5}"#)],
    ))
    .await
    .unwrap();
    c.append(append("acct-x", None, vec![json_event("B", r#"{"i":1}"#)]))
        .await
        .unwrap();
}

fn versions(events: &[proto::RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version).collect()
}

fn seqs(events: &[proto::RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.global_sequence).collect()
}

#[tokio::test]
async fn load_reads_a_stream_forwards_backwards_filtered_and_paged() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    seed(&mut c).await;
    let load = |from_version, max_count, types: &[&str], backwards| proto::LoadRequest {
        stream_id: "a".into(),
        from_version,
        max_count,
        event_types: types.iter().map(|s| s.to_string()).collect(),
        backwards,
        min_sequence: 0,
    };
    let all = c.load(load(0, 0, &[], false)).await.unwrap().into_inner();
    assert_eq!(versions(&all.events), vec![1, 2, 3, 4, 5]);
    assert_eq!(all.stream_version, 5);
    assert!(all.end_of_stream);
    assert_eq!(all.next_version, 0);
    assert_eq!(all.state, proto::StreamState::Active as i32);
    assert_eq!(seqs(&all.events), vec![1, 2, 3, 5, 6]);

    let from3 = c.load(load(3, 0, &[], false)).await.unwrap().into_inner();
    assert_eq!(versions(&from3.events), vec![3, 4, 5]);

    let page = c.load(load(1, 2, &[], false)).await.unwrap().into_inner();
    assert_eq!(versions(&page.events), vec![1, 2]);
    assert!(!page.end_of_stream);
    assert_eq!(page.next_version, 3);
    let page = c.load(load(3, 2, &[], false)).await.unwrap().into_inner();
    assert_eq!(versions(&page.events), vec![3, 4]);
    let page = c.load(load(5, 2, &[], false)).await.unwrap().into_inner();
    assert_eq!(versions(&page.events), vec![5]);
    assert!(page.end_of_stream);

    let only_a = c
        .load(load(0, 0, &["A"], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(versions(&only_a.events), vec![1, 3, 5]);

    let back = c.load(load(0, 0, &[], true)).await.unwrap().into_inner();
    assert_eq!(versions(&back.events), vec![5, 4, 3, 2, 1]);
    let back = c.load(load(4, 2, &[], true)).await.unwrap().into_inner();
    assert_eq!(versions(&back.events), vec![4, 3]);
    assert_eq!(back.next_version, 2);
    let back_b = c.load(load(0, 0, &["B"], true)).await.unwrap().into_inner();
    assert_eq!(versions(&back_b.events), vec![4, 2]);

    // Past the end: an empty page, not an error.
    let past = c.load(load(99, 0, &[], false)).await.unwrap().into_inner();
    assert!(past.events.is_empty());
    assert!(past.end_of_stream);
    assert_eq!(past.stream_version, 5);
}

#[tokio::test]
async fn load_of_an_unknown_stream_is_not_found() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let err = c
        .load(proto::LoadRequest {
            stream_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn read_from_pages_the_global_log_with_filters() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let empty = c
        .read_from(proto::ReadFromRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(empty.events.is_empty());
    assert_eq!((empty.next_sequence, empty.head), (1, 0));
    seed(&mut c).await;
    let read = |from_sequence, limit, types: &[&str], prefix: &str| proto::ReadFromRequest {
        from_sequence,
        limit,
        event_types: types.iter().map(|s| s.to_string()).collect(),
        stream_prefix: prefix.into(),
        min_sequence: 0,
        query: None,
    };
    let all = c.read_from(read(0, 0, &[], "")).await.unwrap().into_inner();
    assert_eq!(seqs(&all.events), vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!((all.next_sequence, all.head), (8, 7));

    let p1 = c.read_from(read(1, 3, &[], "")).await.unwrap().into_inner();
    assert_eq!(seqs(&p1.events), vec![1, 2, 3]);
    assert_eq!(p1.next_sequence, 4);
    let p2 = c
        .read_from(read(p1.next_sequence, 3, &[], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seqs(&p2.events), vec![4, 5, 6]);

    let bs = c
        .read_from(read(0, 0, &["B"], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seqs(&bs.events), vec![2, 5, 7]);
    let acct = c
        .read_from(read(0, 0, &[], "acct-"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seqs(&acct.events), vec![7]);
    assert_eq!(
        acct.next_sequence, 8,
        "a filtered page still advances to the head"
    );
    let none = c
        .read_from(read(0, 0, &["Nope"], ""))
        .await
        .unwrap()
        .into_inner();
    assert!(none.events.is_empty());
    assert_eq!(none.next_sequence, 8);
    let a_only = c
        .read_from(read(2, 2, &["A"], "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seqs(&a_only.events), vec![3, 6]);
    assert!(a_only.events.iter().all(|e| e.stream_id == "a"));

    // Past the head: empty, next stays where asked.
    let past = c
        .read_from(read(100, 0, &[], ""))
        .await
        .unwrap()
        .into_inner();
    assert!(past.events.is_empty());
    assert_eq!(past.next_sequence, 100);
}

#[tokio::test]
async fn page_sizes_default_and_are_capped() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    config.limits.default_page_size = 3;
    config.limits.max_page_size = 4;
    let server = Server::start(config).await;
    let mut c = server.client().await;
    let events = (0..10).map(|i| json_event("E", &format!("{i}"))).collect();
    c.append(append("many", None, events)).await.unwrap();
    let page = c
        .read_from(proto::ReadFromRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 3);
    let page = c
        .read_from(proto::ReadFromRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 4);
    let page = c
        .load(proto::LoadRequest {
            stream_id: "many".into(),
            max_count: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 4);
    assert_eq!(page.next_version, 5);
}

#[tokio::test]
async fn paging_reads_ahead_but_never_serves_a_deleted_stream_or_a_stale_end() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    for i in 0..10 {
        let stream = if i % 2 == 0 { "keep" } else { "gone" };
        c.append(append(stream, None, vec![json_event("E", &format!("{i}"))]))
            .await
            .unwrap();
    }
    let page = |from| proto::ReadFromRequest {
        from_sequence: from,
        limit: 4,
        ..Default::default()
    };
    // A full page: the next one is read ahead.
    let p1 = c.read_from(page(1)).await.unwrap().into_inner();
    assert_eq!(seqs(&p1.events), vec![1, 2, 3, 4]);
    // Deleting a stream throws the read-ahead away.
    c.delete_stream(proto::DeleteStreamRequest {
        stream_id: "gone".into(),
    })
    .await
    .unwrap();
    let p2 = c
        .read_from(page(p1.next_sequence))
        .await
        .unwrap()
        .into_inner();
    assert!(p2.events.iter().all(|e| e.stream_id == "keep"), "{p2:?}");
    assert_eq!(seqs(&p2.events), vec![5, 7, 9]);
    // A short page read ahead is never served: a commit after it is seen.
    let p3 = c.read_from(page(1)).await.unwrap().into_inner();
    assert_eq!(seqs(&p3.events), vec![1, 3, 5, 7]);
    // (the page after p3, [9], was read ahead and is short)
    c.append(append("keep", None, vec![json_event("E", "10")]))
        .await
        .unwrap();
    let p4 = c
        .read_from(page(p3.next_sequence))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seqs(&p4.events), vec![9, 11]);
    // Paging the whole log with and without filters gives what one big read gives.
    let all = c.read_from(page(0)).await.unwrap().into_inner();
    let mut paged = Vec::new();
    let mut from = 1;
    loop {
        let p = c.read_from(page(from)).await.unwrap().into_inner();
        if p.events.is_empty() {
            break;
        }
        paged.extend(p.events);
        from = p.next_sequence;
    }
    assert_eq!(seqs(&paged), vec![1, 3, 5, 7, 9, 11]);
    assert_eq!(seqs(&all.events), vec![1, 3, 5, 7]);
}
