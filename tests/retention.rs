//! Per-stream retention (SetStreamMetadata): every read hides expired events the moment a rule
//! is set, and the scavenger deletes them in batches while appends and subscribers carry on.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgstore::proto;
use tokio_stream::StreamExt;

fn rule(
    stream: &str,
    max_count: Option<u64>,
    max_age: Option<Duration>,
    truncate_before: Option<u64>,
) -> proto::SetStreamMetadataRequest {
    proto::SetStreamMetadataRequest {
        stream_id: stream.into(),
        max_count,
        max_age: max_age.map(|d| prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }),
        truncate_before,
    }
}

async fn load_versions(c: &mut Client, stream: &str, backwards: bool) -> Vec<u64> {
    c.load(proto::LoadRequest {
        stream_id: stream.into(),
        backwards,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .events
    .iter()
    .map(|e| e.version)
    .collect()
}

/// `(stream, version)` of every event ReadFrom returns, paging with a small window.
async fn log_of(c: &mut Client) -> Vec<(String, u64)> {
    read_all(c)
        .await
        .into_iter()
        .map(|e| (e.stream_id, e.version))
        .collect()
}

/// `(stream, version)` of every event a subscription from the start delivers before caught-up.
async fn catch_up(c: &mut Client) -> Vec<(String, u64)> {
    let mut sub = c
        .subscribe(proto::SubscribeRequest {
            start: Some(proto::subscribe_request::Start::FromSequence(1)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    loop {
        match sub.next().await.unwrap().unwrap().message {
            Some(proto::subscribe_response::Message::Event(e)) => {
                out.push((e.stream_id, e.version))
            }
            Some(proto::subscribe_response::Message::CaughtUp(_)) => return out,
            _ => {}
        }
    }
}

fn expected_log(kept: impl Fn(u64) -> bool) -> Vec<(String, u64)> {
    // The log: "r" 1..=10 and "o" 1..=10, interleaved one by one.
    (1..=10)
        .flat_map(|v| {
            let r = kept(v).then(|| ("r".to_string(), v));
            [r, Some(("o".to_string(), v))]
        })
        .flatten()
        .collect()
}

#[tokio::test]
async fn rules_hide_expired_events_from_every_read_at_once() {
    let mut config = test_config(&fresh_db().await);
    config.database.scavenge_interval = Duration::ZERO;
    config.limits.max_scan_window = 3;
    let server = Server::start(config).await;
    let mut c = server.client().await;
    for _ in 0..10 {
        for s in ["r", "o"] {
            c.append(append(s, None, vec![json_event("E", "{}")]))
                .await
                .unwrap();
        }
    }

    // max_count: the newest three.
    c.set_stream_metadata(rule("r", Some(3), None, None))
        .await
        .unwrap();
    assert_eq!(load_versions(&mut c, "r", false).await, vec![8, 9, 10]);
    assert_eq!(load_versions(&mut c, "r", true).await, vec![10, 9, 8]);
    assert_eq!(log_of(&mut c).await, expected_log(|v| v >= 8));
    assert_eq!(catch_up(&mut c).await, expected_log(|v| v >= 8));
    let info = c
        .get_stream(proto::GetStreamRequest {
            stream_id: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            info.version,
            info.max_count,
            info.max_age,
            info.truncate_before
        ),
        (10, Some(3), None, None)
    );
    // Load from a version inside the expired range starts at the first visible one.
    let page = c
        .load(proto::LoadRequest {
            stream_id: "r".into(),
            from_version: 2,
            max_count: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.events.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![8, 9]
    );

    // truncate_before replaces the rule: versions below 5 are hidden.
    c.set_stream_metadata(rule("r", None, None, Some(5)))
        .await
        .unwrap();
    assert_eq!(
        load_versions(&mut c, "r", false).await,
        (5..=10).collect::<Vec<_>>()
    );
    assert_eq!(log_of(&mut c).await, expected_log(|v| v >= 5));
    assert_eq!(catch_up(&mut c).await, expected_log(|v| v >= 5));

    // max_age: everything written so far is older than a second.
    c.set_stream_metadata(rule("r", None, Some(Duration::from_secs(1)), None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(load_versions(&mut c, "r", false).await, Vec::<u64>::new());
    assert_eq!(log_of(&mut c).await, expected_log(|_| false));
    c.append(append("r", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    assert_eq!(load_versions(&mut c, "r", false).await, vec![11]);
    let info = c
        .get_stream(proto::GetStreamRequest {
            stream_id: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_age.map(|d| d.seconds), Some(1));

    // No rule: everything is back (nothing was scavenged).
    c.set_stream_metadata(rule("r", None, None, None))
        .await
        .unwrap();
    assert_eq!(
        load_versions(&mut c, "r", false).await,
        (1..=11).collect::<Vec<_>>()
    );
    let info = c
        .get_stream(proto::GetStreamRequest {
            stream_id: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.max_count, info.max_age, info.truncate_before),
        (None, None, None)
    );
}

#[tokio::test]
async fn a_rule_set_before_the_stream_applies_to_live_delivery() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    // The stream does not exist: the rule is kept for it.
    c.set_stream_metadata(rule("later", Some(2), None, None))
        .await
        .unwrap();
    let err = c
        .get_stream(proto::GetStreamRequest {
            stream_id: "later".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let mut sub = c
        .subscribe(proto::SubscribeRequest {
            start: Some(proto::subscribe_request::Start::FromEnd(true)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        if let Some(proto::subscribe_response::Message::CaughtUp(_)) =
            sub.next().await.unwrap().unwrap().message
        {
            break;
        }
    }
    let five = (0..5).map(|_| json_event("E", "{}")).collect();
    c.append(append("later", None, five)).await.unwrap();
    c.append(append("marker", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    let mut live = Vec::new();
    while live
        .last()
        .is_none_or(|(s, _): &(String, u64)| s != "marker")
    {
        if let Some(proto::subscribe_response::Message::Event(e)) =
            sub.next().await.unwrap().unwrap().message
        {
            live.push((e.stream_id, e.version));
        }
    }
    assert_eq!(
        live,
        vec![
            ("later".to_string(), 4),
            ("later".to_string(), 5),
            ("marker".to_string(), 1)
        ]
    );
    assert_eq!(load_versions(&mut c, "later", false).await, vec![4, 5]);
}

#[tokio::test]
async fn bad_rules_are_refused_and_change_nothing() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    c.append(append("s", None, vec![json_event("E", "{}"); 3]))
        .await
        .unwrap();
    c.set_stream_metadata(rule("s", Some(2), None, None))
        .await
        .unwrap();
    let mut bad = vec![
        rule("s", Some(0), None, None),
        rule("s", None, None, Some(u64::MAX)),
        rule("s", Some(u64::MAX), None, None),
        rule("", Some(1), None, None),
        rule(&"x".repeat(300), Some(1), None, None),
        rule("s", None, Some(Duration::ZERO), None),
        rule(
            "s",
            None,
            Some(Duration::from_secs(10_000 * 366 * 24 * 3600)),
            None,
        ),
    ];
    let mut negative = rule("s", None, None, None);
    negative.max_age = Some(prost_types::Duration {
        seconds: -5,
        nanos: 0,
    });
    bad.push(negative);
    let mut odd_nanos = rule("s", None, None, None);
    odd_nanos.max_age = Some(prost_types::Duration {
        seconds: 1,
        nanos: 2_000_000_000,
    });
    bad.push(odd_nanos);
    for r in bad {
        let err = c.set_stream_metadata(r.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{r:?}: {err}");
    }
    let info = c
        .get_stream(proto::GetStreamRequest {
            stream_id: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.max_count, info.max_age, info.truncate_before),
        (Some(2), None, None)
    );
    assert_eq!(load_versions(&mut c, "s", false).await, vec![2, 3]);
}

/// The scavenger deletes what a rule expired in batches, while a subscriber catches up through
/// the holes it leaves and live appends keep being delivered without a stall.
#[tokio::test]
async fn the_scavenger_deletes_expired_events_while_appends_and_subscribers_go_on() {
    let url = fresh_db().await;
    let port = free_port();
    let mut config = test_config(&url);
    config.database.scavenge_interval = Duration::from_millis(200);
    config.database.delete_batch_size = 500;
    config.limits.max_scan_window = 1000;
    config.metrics_listen = Some(format!("127.0.0.1:{port}"));
    let server = Server::start(config).await;
    let mut c = server.client().await;
    for _ in 0..20 {
        let batch = (0..1000).map(|_| json_event("E", "{}")).collect();
        c.append(append("big", None, batch)).await.unwrap();
    }
    c.append(append("other", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();

    // A subscriber from the start, reading while the scavenger runs.
    let mut sc = server.client().await;
    let subscriber = tokio::spawn(async move {
        let mut sub = sc
            .subscribe(proto::SubscribeRequest {
                start: Some(proto::subscribe_request::Start::FromSequence(1)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        let mut others = 0;
        while others < 40 {
            match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
                Ok(Some(Ok(r))) => {
                    if let Some(proto::subscribe_response::Message::Event(e)) = r.message {
                        if e.stream_id == "other" {
                            others += 1;
                        }
                        seen.push((e.global_sequence, e.stream_id, e.version));
                    }
                }
                other => panic!("subscription stalled or ended: {other:?}"),
            }
        }
        seen
    });
    c.set_stream_metadata(rule("big", Some(10), None, None))
        .await
        .unwrap();
    // Appends go on while the scavenger deletes; each is answered promptly.
    let mut slowest = Duration::ZERO;
    for _ in 0..39 {
        let started = Instant::now();
        c.append(append("other", None, vec![json_event("E", "{}")]))
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_secs(1),
        "an append took {slowest:?}"
    );
    wait_metric(port, "pgstore_events_scavenged_total", 19_990).await;

    let pg = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(pg.1);
    let left: i64 =
        pg.0.query_one(
            "SELECT count(*) FROM pgstore.events WHERE stream_id = 'big'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 10);
    assert_eq!(
        load_versions(&mut c, "big", false).await,
        (19_991..=20_000).collect::<Vec<_>>()
    );

    // The subscriber saw every visible event once, in order: the retained "big" events and
    // all 40 of "other".
    let seen = subscriber.await.unwrap();
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "in sequence order"
    );
    let others: Vec<u64> = seen
        .iter()
        .filter(|e| e.1 == "other")
        .map(|e| e.2)
        .collect();
    assert_eq!(others, (1..=40).collect::<Vec<_>>());
    // Of "big", whatever was read before the rule took effect, then the retained ten, each once.
    let big: Vec<u64> = seen.iter().filter(|e| e.1 == "big").map(|e| e.2).collect();
    assert!(big.windows(2).all(|w| w[0] < w[1]), "each once, in order");
    assert!(big.ends_with(&(19_991..=20_000).collect::<Vec<_>>()));

    // A stream deleted and written again starts without the old rule.
    c.delete_stream(proto::DeleteStreamRequest {
        stream_id: "big".into(),
    })
    .await
    .unwrap();
    c.append(append("big", None, vec![json_event("E", "{}"); 3]))
        .await
        .unwrap();
    assert_eq!(load_versions(&mut c, "big", false).await, vec![1, 2, 3]);
}
