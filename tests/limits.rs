//! Limits that keep one client from exhausting the server: pages stop at
//! `limits.max_response_bytes` with a cursor that continues exactly after them, a subscriber that
//! stops reading is cut off with RESOURCE_EXHAUSTED instead of growing memory, and read-only
//! tokens cannot take part in consumer groups.

mod common;

use std::time::Duration;

use common::*;
use pgstore::proto::{self, subscribe_response::Message};
use tokio_stream::StreamExt;

fn sized_event(n: usize, bytes: usize) -> proto::EventData {
    json_event(
        "Sized",
        &format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(bytes)),
    )
}

#[tokio::test]
async fn pages_stop_at_the_byte_cap_and_continue_where_they_stopped() {
    let mut config = test_config(&fresh_db().await);
    config.limits.max_response_bytes = 64 * 1024;
    let server = Server::start(config).await;
    let mut c = server.client().await;
    // 20 events of ~10 KiB, then one larger than the cap, then 5 more.
    for n in 0..20 {
        c.append(append("big", None, vec![sized_event(n, 10 * 1024)]))
            .await
            .unwrap();
    }
    c.append(append("big", None, vec![sized_event(20, 100 * 1024)]))
        .await
        .unwrap();
    for n in 21..26 {
        c.append(append("big", None, vec![sized_event(n, 10 * 1024)]))
            .await
            .unwrap();
    }

    // ReadFrom: every page within the cap (or a single event), together the whole log in order.
    let mut from = 1;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let resp = c
            .read_from(proto::ReadFromRequest {
                from_sequence: from,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let size: usize = resp.events.iter().map(|e| prost_len(e) + 6).sum();
        assert!(
            size <= 64 * 1024 || resp.events.len() == 1,
            "page of {} events, {size} bytes",
            resp.events.len()
        );
        if resp.events.is_empty() {
            break;
        }
        pages += 1;
        seen.extend(resp.events.iter().map(|e| e.global_sequence));
        assert_eq!(resp.next_sequence, seen.last().unwrap() + 1);
        from = resp.next_sequence;
    }
    assert_eq!(seen, (1..=26).collect::<Vec<u64>>());
    assert!(pages >= 5, "{pages} pages");

    // Load, forwards and backwards, the same.
    for backwards in [false, true] {
        let mut from_version = 0;
        let mut versions = Vec::new();
        loop {
            let resp = c
                .load(proto::LoadRequest {
                    stream_id: "big".into(),
                    from_version,
                    max_count: 1000,
                    backwards,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let size: usize = resp.events.iter().map(|e| prost_len(e) + 6).sum();
            assert!(size <= 64 * 1024 || resp.events.len() == 1, "{size} bytes");
            versions.extend(resp.events.iter().map(|e| e.version));
            if resp.end_of_stream {
                break;
            }
            from_version = resp.next_version;
        }
        let mut want: Vec<u64> = (1..=26).collect();
        if backwards {
            want.reverse();
        }
        assert_eq!(versions, want, "backwards: {backwards}");
    }
}

fn prost_len(e: &proto::RecordedEvent) -> usize {
    prost::Message::encoded_len(e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_cut_off_not_buffered() {
    let mut config = test_config(&fresh_db().await);
    config.live.max_buffered_bytes = 64 * 1024;
    config.live.buffer = 16;
    config.live.stall_timeout = Duration::from_millis(500);
    let server = Server::start(config).await;
    let mut c = server.client().await;
    // About 4 MB of events: more than HTTP/2's windows and buffers can hide.
    for chunk in 0..40 {
        let events = (0..25)
            .map(|i| sized_event(chunk * 25 + i, 4 * 1024))
            .collect();
        c.append(append("flood", None, events)).await.unwrap();
    }
    let mut sub = server
        .client()
        .await
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Take one message, then stop reading for a while.
    assert!(sub.next().await.unwrap().is_ok());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut last = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("the stream goes on or ends")
        {
            Some(Ok(m)) => {
                if let Some(Message::Event(e)) = m.message {
                    assert!(e.global_sequence > last, "in order");
                    last = e.global_sequence;
                }
            }
            Some(Err(s)) => break s,
            None => panic!("the stream ended without saying why"),
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("live.max_buffered_bytes"),
        "{}",
        status.message()
    );
    assert!(last < 1000, "cut off before the end ({last})");
    // The server stays healthy for everyone else.
    let n = read_all(&mut c).await.len();
    assert_eq!(n, 1000);
}

#[tokio::test]
async fn a_read_only_token_reads_and_subscribes_but_cannot_join_a_group() {
    const WRITER: &str = "writer-token-0123456789";
    const READER: &str = "reader-token-0123456789";
    let url = fresh_db().await;
    let db = url.rsplit('/').next().unwrap().to_owned();
    let mut config = test_config(&url);
    config.auth.tokens = vec![WRITER.into()];
    config.auth.read_tokens = vec![READER.into()];
    let server = Server::start(config).await;
    let channel = server.channel().await;
    let with_token = |token: &'static str| with_token(channel.clone(), token);
    let mut writer = with_token(WRITER);
    writer
        .append(append("ro-1", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    let mut reader = with_token(READER);

    // A plain subscription works.
    let mut sub = reader
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    match sub.next().await {
        Some(Ok(proto::SubscribeResponse {
            message: Some(Message::Event(e)),
        })) => assert_eq!(e.stream_id, "ro-1"),
        other => panic!("{other:?}"),
    }
    // Joining a group, saving a checkpoint, publishing a change: PERMISSION_DENIED.
    let err = reader
        .subscribe(proto::SubscribeRequest {
            group: "g".into(),
            member: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = reader
        .save_checkpoint(proto::SaveCheckpointRequest {
            consumer_id: "c".into(),
            sequence: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = reader
        .publish_change(proto::PublishChangeRequest {
            change: Some(proto::Change {
                projection: "p".into(),
                key: "k".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // Nothing of the group was written.
    let admin = pg_client(&shared().cluster, &db).await;
    let n: i64 = admin
        .query_one("SELECT count(*) FROM pgstore.group_members", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // The full token may join.
    let mut member = writer
        .subscribe(proto::SubscribeRequest {
            group: "g".into(),
            member: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(member.next().await.unwrap().is_ok());
}
