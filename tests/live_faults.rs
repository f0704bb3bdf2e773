//! The LISTEN connection under faults: its backend terminated, PostgreSQL restarted. Delivery
//! resumes with nothing lost, without restarting pgstore.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgstore::proto::{self, subscribe_response::Message};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;

async fn next_events(
    sub: &mut tonic::Streaming<proto::SubscribeResponse>,
    got: &mut Vec<u64>,
    until: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.last().copied().unwrap_or(0) < until {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| panic!("stuck at {:?}, waiting for {until}", got.last()))
            .expect("stream ended")
            .expect("stream error");
        if let Some(Message::Event(e)) = msg.message {
            got.push(e.global_sequence);
        }
    }
}

async fn wait_listener(server: &Server, want: ServingStatus) {
    wait_health(&server.channel().await, "pgstore.listener", want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivery_survives_listener_kills_and_a_postgres_restart() {
    let pg = PgCluster::start(FAST);
    let url = pg.create_db().await;
    // The subscriber's instance polls only every minute: delivery must come from notifications
    // and from the re-read after every reconnection.
    let mut sub_config = test_config(&url);
    sub_config.live.poll_interval = Duration::from_secs(60);
    sub_config.live.heartbeat_interval = Duration::from_secs(60);
    let a = Server::start(sub_config).await;
    let b = Server::start(test_config(&url)).await;
    let mut writer = b.client().await;
    let mut sub = a
        .client()
        .await
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    wait_listener(&a, ServingStatus::Serving).await;

    let h = append_many(&mut writer, 10, "f", 1).await;
    next_events(&mut sub, &mut got, h).await;

    // Kill the listeners' backends repeatedly, appending right after each kill (notifications
    // sent while a listener is down are lost).
    let admin = pg_client(&pg.cluster, "postgres").await;
    for _ in 0..5 {
        // Wait until both instances' listeners are (back) up.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgstore-listener'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "listeners did not come back ({n})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'pgstore-listener'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(killed.len(), 2, "one listener per instance");
        append_many(&mut writer, 5, "f", 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h = append_many(&mut writer, 1, "f", 1).await;
    next_events(&mut sub, &mut got, h).await;

    // Full restart of PostgreSQL.
    pg.stop("fast");
    wait_listener(&a, ServingStatus::NotServing).await;
    pg.restart(FAST);
    let deadline = Instant::now() + Duration::from_secs(20);
    let h = loop {
        match writer
            .append(append("f", None, vec![json_event("E", "{}")]))
            .await
        {
            Ok(r) => break r.into_inner().last_sequence,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
                assert!(Instant::now() < deadline, "appends never recovered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_listener(&a, ServingStatus::Serving).await;
    let h2 = append_many(&mut writer, 10, "f", 1).await;
    assert!(h2 > h);
    next_events(&mut sub, &mut got, h2).await;

    // Everything, once, in order.
    assert_eq!(got, (1..=h2).collect::<Vec<_>>());
    let mut c = a.client().await;
    assert_eq!(read_all(&mut c).await.len() as u64, h2);
}
