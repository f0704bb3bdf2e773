//! Live delivery: Subscribe, the LISTEN connection under faults, slow consumers, change watchers,
//! disconnect storms and shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgstore::proto::{
    self, subscribe_request::Start, subscribe_response::Message,
    watch_changes_response::Message as WatchMessage,
};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming};

type Sub = Streaming<proto::SubscribeResponse>;

async fn subscribe(c: &mut Client, start: Option<Start>) -> Sub {
    c.subscribe(proto::SubscribeRequest {
        start,
        ..Default::default()
    })
    .await
    .expect("subscribe")
    .into_inner()
}

/// What a subscriber received: its events in order, and where the caught-up marker came.
#[derive(Default, Debug)]
struct Received {
    events: Vec<proto::RecordedEvent>,
    caught_up_after: Option<usize>,
    caught_up_count: usize,
    heartbeats: usize,
}

/// Reads from `sub` until an event with sequence >= `until` arrived (or `timeout`).
async fn collect(sub: &mut Sub, got: &mut Received, until: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while got.events.last().map_or(0, |e| e.global_sequence) < until {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out at {:?} waiting for {until}",
                    got.events.last().map(|e| e.global_sequence)
                )
            })
            .expect("stream ended")
            .expect("stream error");
        match msg.message.unwrap() {
            Message::Event(e) => got.events.push(e),
            Message::CaughtUp(_) => {
                got.caught_up_count += 1;
                got.caught_up_after.get_or_insert(got.events.len());
            }
            Message::Heartbeat(_) => got.heartbeats += 1,
            Message::Assignment(_) => {}
        }
    }
}

/// Waits for the caught-up marker (collecting events before it).
async fn until_caught_up(sub: &mut Sub, got: &mut Received) {
    while got.caught_up_after.is_none() {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("caught-up marker")
            .unwrap()
            .unwrap();
        match msg.message.unwrap() {
            Message::Event(e) => got.events.push(e),
            Message::CaughtUp(_) => {
                got.caught_up_count += 1;
                got.caught_up_after = Some(got.events.len());
            }
            _ => {}
        }
    }
}

fn assert_exact(got: &Received, all: &[proto::RecordedEvent], from: u64, name: &str) {
    let want: Vec<(u64, &str)> = all
        .iter()
        .filter(|e| e.global_sequence >= from)
        .map(|e| (e.global_sequence, e.event_id.as_str()))
        .collect();
    let have: Vec<(u64, &str)> = got
        .events
        .iter()
        .map(|e| (e.global_sequence, e.event_id.as_str()))
        .collect();
    assert_eq!(have.len(), want.len(), "{name}: count");
    assert!(have == want, "{name}: events differ from ReadFrom");
    assert_eq!(got.caught_up_count, 1, "{name}: one caught-up marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_subscribers_get_every_event_once_in_order_under_16_writers() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    // Some history first.
    for i in 0..10 {
        let events = (0..10)
            .map(|k| json_event("Seed", &format!("{}", i * 10 + k)))
            .collect();
        c.append(append(&format!("seed-{i}"), None, events))
            .await
            .unwrap();
    }
    c.save_checkpoint(proto::SaveCheckpointRequest {
        consumer_id: "proj".into(),
        sequence: 50,
    })
    .await
    .unwrap();

    let mut from_start = subscribe(&mut c, Some(Start::FromSequence(0))).await;
    let mut from_checkpoint = subscribe(&mut c, Some(Start::ConsumerId("proj".into()))).await;
    let mut from_end = subscribe(&mut c, Some(Start::FromEnd(true))).await;
    let (mut a, mut b, mut e) = (
        Received::default(),
        Received::default(),
        Received::default(),
    );
    until_caught_up(&mut from_end, &mut e).await;
    assert!(
        e.events.is_empty(),
        "from the end: nothing before the marker"
    );

    // 16 writers, 20,000 events, overlapping streams, 1 to 4 events per append.
    let total_events = 20_000usize;
    let mut writers = Vec::new();
    for w in 0..16usize {
        let mut c = server.client().await;
        writers.push(tokio::spawn(async move {
            let mut written = 0;
            let mut i = 0;
            while written < total_events / 16 {
                let n = (1 + (w + i) % 4).min(total_events / 16 - written);
                let events = (0..n)
                    .map(|k| json_event("Live", &format!("{k}")))
                    .collect();
                c.append(append(&format!("live-{}", (w * 7 + i) % 23), None, events))
                    .await
                    .unwrap();
                written += n;
                i += 1;
            }
        }));
    }
    // Read concurrently with the writers.
    let reading = async {
        let last = 100 + total_events as u64;
        tokio::join!(
            collect(&mut from_start, &mut a, last, Duration::from_secs(120)),
            collect(&mut from_checkpoint, &mut b, last, Duration::from_secs(120)),
            collect(&mut from_end, &mut e, last, Duration::from_secs(120)),
        )
    };
    tokio::join!(reading, async {
        for w in writers {
            w.await.unwrap();
        }
    });
    let all = read_all(&mut c).await;
    assert_eq!(all.len(), 100 + total_events);
    assert_exact(&a, &all, 1, "from 0");
    assert_exact(&b, &all, 51, "from checkpoint");
    assert_exact(&e, &all, 101, "from the end");
    assert!(
        a.caught_up_after.unwrap() >= 100,
        "catch-up delivered the history first"
    );
    // Nothing more arrives after the last event (no duplicates trailing behind).
    let extra = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            match from_start.next().await {
                Some(Ok(proto::SubscribeResponse {
                    message: Some(Message::Event(e)),
                })) => return e,
                Some(Ok(_)) => continue,
                _ => std::future::pending::<()>().await,
            }
        }
    })
    .await;
    assert!(extra.is_err(), "an extra event arrived: {extra:?}");
}

#[tokio::test]
async fn subscriptions_filter_by_type_and_prefix_and_send_heartbeats() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    config.live.heartbeat_interval = Duration::from_millis(100);
    let server = Server::start(config).await;
    let mut c = server.client().await;
    let mut sub = c
        .subscribe(proto::SubscribeRequest {
            event_types: vec!["Paid".into()],
            stream_prefix: "order-".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Received::default();
    until_caught_up(&mut sub, &mut got).await;
    c.append(append(
        "order-1",
        None,
        vec![json_event("Placed", "{}"), json_event("Paid", "{}")],
    ))
    .await
    .unwrap();
    c.append(append("invoice-1", None, vec![json_event("Paid", "{}")]))
        .await
        .unwrap();
    c.append(append("order-2", None, vec![json_event("Paid", "{}")]))
        .await
        .unwrap();
    collect(&mut sub, &mut got, 4, Duration::from_secs(10)).await;
    let seqs: Vec<u64> = got.events.iter().map(|e| e.global_sequence).collect();
    assert_eq!(seqs, vec![2, 4]);
    // Idle: heartbeats keep coming.
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("heartbeat")
            .unwrap()
            .unwrap();
        if let Some(Message::Heartbeat(h)) = msg.message {
            assert_eq!(h.head, 4);
            heartbeats += 1;
        }
    }
}

#[tokio::test]
async fn subscribe_rejects_bad_requests() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let bad = [
        proto::SubscribeRequest {
            start: Some(Start::FromSequence(u64::MAX)),
            ..Default::default()
        },
        proto::SubscribeRequest {
            start: Some(Start::ConsumerId(String::new())),
            ..Default::default()
        },
        proto::SubscribeRequest {
            start: Some(Start::FromEnd(false)),
            ..Default::default()
        },
        proto::SubscribeRequest {
            group: "g".into(),
            ..Default::default()
        },
        proto::SubscribeRequest {
            group: "g".into(),
            member: "m".into(),
            start: Some(Start::FromSequence(1)),
            ..Default::default()
        },
        proto::SubscribeRequest {
            event_types: vec![String::new()],
            ..Default::default()
        },
    ];
    for req in bad {
        let err = c.subscribe(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_does_not_delay_others_and_memory_stays_bounded() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    let metrics_port = free_port();
    config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    config.live.buffer = 16;
    config.live.page_size = 100;
    // A small shared tail: the slow subscriber falls out of it and must read the database again.
    config.live.tail_events = 50;
    let server = Server::start(config).await;
    let mut c = server.client().await;
    // The slow one reads nothing for now; the fast one reads everything.
    let mut slow = subscribe(&mut server.client().await, None).await;
    let mut fast = subscribe(&mut server.client().await, None).await;
    let mut fast_got = Received::default();
    until_caught_up(&mut fast, &mut fast_got).await;
    for i in 0..40 {
        let events = (0..100)
            .map(|k| json_event("E", &format!("\"{}\"", "x".repeat(200 + k))))
            .collect();
        c.append(append(&format!("s-{}", i % 4), None, events))
            .await
            .unwrap();
    }
    let started = Instant::now();
    collect(&mut fast, &mut fast_got, 4000, Duration::from_secs(30)).await;
    assert_eq!(fast_got.events.len(), 4000);
    let fast_took = started.elapsed();
    // While the slow one is stuck, the server holds at most its buffer for it.
    let buffered = metric(metrics_port, "pgstore_subscriber_buffered").await;
    assert!(
        buffered <= 16 + 1,
        "server buffers {buffered} messages for the stuck subscriber (limit 16)"
    );
    assert_eq!(metric(metrics_port, "pgstore_subscribers").await, 2);
    // The slow one still gets everything, in order, when it reads.
    let mut slow_got = Received::default();
    collect(&mut slow, &mut slow_got, 4000, Duration::from_secs(30)).await;
    let seqs: Vec<u64> = slow_got.events.iter().map(|e| e.global_sequence).collect();
    assert_eq!(seqs, (1..=4000).collect::<Vec<_>>());
    assert!(fast_took < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_storm_leaves_no_tasks_behind() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    let metrics_port = free_port();
    config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    let server = Server::start(config).await;
    let mut c = server.client().await;
    c.append(append("storm", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    let mut subs = Vec::new();
    for conn in 0..5 {
        let client = server.client().await;
        for i in 0..100 {
            let mut client = client.clone();
            subs.push(tokio::spawn(async move {
                let mut s = subscribe(
                    &mut client,
                    Some(Start::FromSequence(((conn + i) % 2) as u64)),
                )
                .await;
                let mut got = Received::default();
                until_caught_up(&mut s, &mut got).await;
                s
            }));
        }
    }
    let mut streams = Vec::new();
    for s in subs {
        streams.push(s.await.unwrap());
    }
    assert_eq!(metric(metrics_port, "pgstore_subscribers").await, 500);
    drop(streams);
    wait_metric(metrics_port, "pgstore_subscribers", 0).await;
    wait_metric(metrics_port, "pgstore_stream_tasks", 0).await;
    wait_metric(metrics_port, "pgstore_subscriber_buffered", 0).await;
    // The server still serves.
    let mut s = subscribe(&mut c, None).await;
    let mut got = Received::default();
    collect(&mut s, &mut got, 1, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn shutdown_ends_live_streams_with_unavailable() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let mut sub = subscribe(&mut c, None).await;
    let mut watch = c
        .watch_changes(proto::WatchChangesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut got = Received::default();
    until_caught_up(&mut sub, &mut got).await;
    let started = Instant::now();
    let done = tokio::spawn(server.shutdown());
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sub.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status.code()),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream ends");
    assert_eq!(end, Some(Code::Unavailable));
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status.code()),
                None => return None,
            }
        }
    })
    .await
    .expect("the watch ends");
    assert_eq!(end, Some(Code::Unavailable));
    done.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown did not hang"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_published_on_one_instance_reach_watchers_on_another() {
    let url = fresh_db().await;
    let a = Server::start(test_config(&url)).await;
    let b = Server::start(test_config(&url)).await;
    let mut watcher = a
        .client()
        .await
        .watch_changes(proto::WatchChangesRequest {
            projections: vec!["orders".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut all = a
        .client()
        .await
        .watch_changes(proto::WatchChangesRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Give both listeners time to be up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pb = b.client().await;
    for (projection, key) in [("customers", "c-1"), ("orders", "o-1"), ("orders", "o-2")] {
        pb.publish_change(proto::PublishChangeRequest {
            change: Some(proto::Change {
                projection: projection.into(),
                key: key.into(),
                payload: r#"{"v":1}"#.into(),
                sequence: 7,
            }),
        })
        .await
        .unwrap();
    }
    let next_change = async |s: &mut Streaming<proto::WatchChangesResponse>| loop {
        let m = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a change")
            .unwrap()
            .unwrap();
        if let Some(WatchMessage::Change(c)) = m.message {
            return c;
        }
    };
    let c1 = next_change(&mut watcher).await;
    let c2 = next_change(&mut watcher).await;
    assert_eq!((c1.key.as_str(), c2.key.as_str()), ("o-1", "o-2"));
    assert_eq!(c1.payload, r#"{"v":1}"#);
    assert_eq!(c1.sequence, 7);
    let keys: Vec<String> = [
        next_change(&mut all).await,
        next_change(&mut all).await,
        next_change(&mut all).await,
    ]
    .into_iter()
    .map(|c| c.key)
    .collect();
    assert_eq!(keys, vec!["c-1", "o-1", "o-2"]);

    // Over NOTIFY's limit: refused, clearly.
    let err = pb
        .publish_change(proto::PublishChangeRequest {
            change: Some(proto::Change {
                projection: "orders".into(),
                key: "big".into(),
                payload: "x".repeat(8000),
                sequence: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = pb
        .publish_change(proto::PublishChangeRequest { change: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_cannot_keep_up_is_told_it_lagged() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    config.live.change_buffer = 8;
    config.live.buffer = 4;
    let server = Server::start(config).await;
    let mut c = server.client().await;
    let mut slow = c
        .watch_changes(proto::WatchChangesRequest::default())
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 1,000 changes of ~7 KB: far more than the HTTP/2 windows and the buffers hold.
    for i in 0..1000 {
        c.publish_change(proto::PublishChangeRequest {
            change: Some(proto::Change {
                projection: "p".into(),
                key: format!("k{i}"),
                payload: "y".repeat(7000),
                sequence: 0,
            }),
        })
        .await
        .unwrap();
    }
    let mut changes = 0;
    let mut missed = 0;
    while changes + missed < 1000 {
        let m = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("more messages")
            .unwrap()
            .unwrap();
        match m.message {
            Some(WatchMessage::Change(_)) => changes += 1,
            Some(WatchMessage::Lagged(l)) => missed += l.missed,
            _ => {}
        }
    }
    assert!(missed > 0, "the watcher was told it lagged");
    assert_eq!(
        changes + missed,
        1000,
        "every change is either delivered or counted as missed"
    );
}
