//! Faults: pgstore killed mid-append, PostgreSQL restarted or crashed under a running pgstore.

mod common;

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use pgstore::proto;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn spawn_pgstore(url: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pgstore"))
        .args([
            "serve",
            "--database-url",
            url,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("PGSTORE_LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgstore")
}

async fn connect(port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = pgstore::proto::event_store_client::EventStoreClient::connect(format!(
            "http://127.0.0.1:{port}"
        ))
        .await
        {
            let mut probe = c.clone();
            if probe
                .latest_sequence(proto::LatestSequenceRequest::default())
                .await
                .is_ok()
            {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "pgstore did not come up on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_appends_survive_a_sigkill_and_none_is_half_written() {
    let url = fresh_db().await;
    let port = free_port();
    let mut child = spawn_pgstore(&url, port);
    let c = connect(port).await;

    // 16 writers append 3-event batches with known ids until the process dies.
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut c = c.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<Vec<String>> = Vec::new();
            let mut attempted: Vec<Vec<String>> = Vec::new();
            for i in 0.. {
                let (events, ids) = events_with_ids(3, i);
                attempted.push(ids.clone());
                match c
                    .append(append(&format!("crash-{}", w % 5), None, events))
                    .await
                {
                    Ok(_) => acked.push(ids),
                    Err(_) => return (acked, attempted),
                }
            }
            unreachable!()
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().expect("SIGKILL pgstore");
    child.wait().unwrap();
    let (acked, attempted) = join_writers(writers).await;
    assert!(
        acked.len() > 50,
        "appends were acknowledged before the kill ({})",
        acked.len()
    );

    // Restart on the same database and check.
    let port = free_port();
    let mut child = spawn_pgstore(&url, port);
    let mut c = connect(port).await;
    assert_log_keeps(&read_all(&mut c).await, &acked, &attempted);
    // The server still works.
    c.append(append("after", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The events as one MultiStreamAppend over three streams named after `stream`.
fn spread(stream: &str, events: Vec<proto::EventData>) -> proto::MultiStreamAppendRequest {
    let third = events.len().div_ceil(3);
    proto::MultiStreamAppendRequest {
        parts: events
            .chunks(third)
            .enumerate()
            .map(|(i, chunk)| proto::AppendPart {
                stream_id: format!("{stream}-{i}"),
                expected_version: None,
                events: chunk.to_vec(),
            })
            .collect(),
        ..Default::default()
    }
}

/// Ids of the appends each writer had acknowledged, and of those it tried.
type Appends = (Vec<Vec<String>>, Vec<Vec<String>>);

/// The appends of every writer, acknowledged and tried.
async fn join_writers(writers: Vec<tokio::task::JoinHandle<Appends>>) -> Appends {
    let (mut acked, mut attempted) = (Vec::new(), Vec::new());
    for w in writers {
        let (a, b) = w.await.unwrap();
        acked.extend(a);
        attempted.extend(b);
    }
    (acked, attempted)
}

/// `n` events with ids of the test's choosing, and those ids.
fn events_with_ids(n: usize, i: usize) -> (Vec<proto::EventData>, Vec<String>) {
    let events: Vec<proto::EventData> = (0..n)
        .map(|_| {
            let mut e = json_event("E", &format!("{i}"));
            e.event_id = uuid::Uuid::new_v4().to_string();
            e
        })
        .collect();
    let ids = events.iter().map(|e| e.event_id.clone()).collect();
    (events, ids)
}

/// The log holds every acknowledged append, no append in part (`attempted` are the event ids of
/// each append tried), and dense global sequences.
fn assert_log_keeps(
    all: &[proto::RecordedEvent],
    acked: &[Vec<String>],
    attempted: &[Vec<String>],
) {
    let stored: HashMap<&str, &proto::RecordedEvent> =
        all.iter().map(|e| (e.event_id.as_str(), e)).collect();
    for ids in acked {
        for id in ids {
            assert!(
                stored.contains_key(id.as_str()),
                "an acknowledged event was lost"
            );
        }
    }
    for ids in attempted {
        let present = ids
            .iter()
            .filter(|id| stored.contains_key(id.as_str()))
            .count();
        assert!(
            present == 0 || present == ids.len(),
            "an append was half-written"
        );
    }
    for (i, e) in all.iter().enumerate() {
        assert_eq!(
            e.global_sequence,
            i as u64 + 1,
            "global sequences are dense"
        );
    }
}

/// Waits until the server and the event store service both report `want`.
async fn wait_serving(channel: &tonic::transport::Channel, want: ServingStatus) {
    wait_health(channel, "", want).await;
    wait_health(channel, "pgstore.v1.EventStore", want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_gives_unavailable_then_recovers_without_restarting_pgstore() {
    let pg = PgCluster::start(FAST);
    let url = pg.create_db().await;
    let server = Server::start(test_config(&url)).await;
    let mut c = server.client().await;
    let channel = server.channel().await;
    wait_serving(&channel, ServingStatus::Serving).await;
    let before = c
        .append(append("r", None, vec![json_event("E", "1")]))
        .await
        .unwrap()
        .into_inner();
    // Warm some pooled connections so the pool holds connections that will die.
    for _ in 0..4 {
        c.load(proto::LoadRequest {
            stream_id: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    pg.stop("fast");
    let err = c
        .append(append("r", None, vec![json_event("E", "2")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    let err = c
        .read_from(proto::ReadFromRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    wait_serving(&channel, ServingStatus::NotServing).await;

    pg.restart(FAST);
    wait_serving(&channel, ServingStatus::Serving).await;
    // Both paths work again, and nothing acknowledged was lost.
    let after = c
        .append(append("r", None, vec![json_event("E", "3")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.first_sequence, before.last_sequence + 1);
    let all = read_all(&mut c).await;
    assert_eq!(all.len(), 2);
    let page = c
        .load(proto::LoadRequest {
            stream_id: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.stream_version, 2);
    server.shutdown().await.unwrap();
}

/// PostgreSQL crashes (immediate stop) while the writer has batches in flight behind each other:
/// every append acknowledged before or after is stored, none is half-written, the log stays
/// dense, and appends succeed again once PostgreSQL is back, without restarting pgstore.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_crash_with_batches_in_flight_loses_nothing_acknowledged() {
    // Commits wait for their WAL write (synchronous_commit on), so a crash of PostgreSQL, unlike
    // one of the machine, loses nothing committed even with fsync off.
    let pg = PgCluster::start(&[("fsync", "off"), ("max_connections", "400")]);
    let url = pg.create_db().await;
    let metrics_port = free_port();
    let mut config = test_config(&url);
    config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    let server = Server::start(config).await;
    let stop = Arc::new(AtomicBool::new(false));

    // 8 writers append 20-event batches with known ids, through the crash and after it; the odd
    // ones as MultiStreamAppends spreading them over three streams.
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = server.client().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<Vec<String>> = Vec::new();
            let mut attempted: Vec<Vec<String>> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let (events, ids) = events_with_ids(20, i);
                attempted.push(ids.clone());
                let sent = if w % 2 == 0 {
                    c.append(append(&format!("pg-crash-{w}"), None, events))
                        .await
                        .map(|_| ())
                } else {
                    c.multi_stream_append(spread(&format!("pg-crash-{w}"), events))
                        .await
                        .map(|_| ())
                };
                match sent {
                    Ok(()) => acked.push(ids),
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                i += 1;
            }
            (acked, attempted)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pipelined = metric(metrics_port, "pgstore_write_batches_pipelined_total").await;
    assert!(pipelined > 0, "batches were in flight behind each other");
    pg.stop("immediate");
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.restart(&[("fsync", "off"), ("max_connections", "400")]);
    let channel = server.channel().await;
    wait_serving(&channel, ServingStatus::Serving).await;
    // Let the writers get appends through after the crash too.
    let acked_at_restart = metric(metrics_port, "pgstore_appends_total").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(metrics_port, "pgstore_appends_total").await < acked_at_restart + 50 {
        assert!(Instant::now() < deadline, "appends did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (acked, attempted) = join_writers(writers).await;

    let mut c = server.client().await;
    assert_log_keeps(&read_all(&mut c).await, &acked, &attempted);
    server.shutdown().await.unwrap();
}
