//! Read replicas: reads with `min_sequence` always see their writes, through a lagging replica
//! and a stopped one; subscribers served by a replica miss nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgstore::proto::{self, subscribe_response::Message};
use tokio_stream::StreamExt;

/// A running primary + replica + pgstore reading from the replica.
struct Setup {
    _primary: PgCluster,
    replica: PgCluster,
    server: Server,
    metrics_port: u16,
}

impl Setup {
    /// A primary, a replica whose replay is delayed by `delay`, a database, and pgstore reading
    /// from the replica (configured further by `tweak`), once the replica is in rotation.
    async fn start(delay: &str, tweak: impl FnOnce(&mut pgstore::config::Config)) -> Setup {
        let primary = PgCluster::start(FAST);
        let url = primary.create_db().await;
        let db = url.rsplit('/').next().unwrap().to_string();
        let replica = primary.replica(FAST);
        replica
            .sql(
                "postgres",
                &format!("ALTER SYSTEM SET recovery_min_apply_delay = '{delay}'"),
            )
            .await;
        replica.sql("postgres", "SELECT pg_reload_conf()").await;
        let metrics_port = free_port();
        let mut config = test_config(&url);
        config.replica_urls = vec![replica.url(&db)];
        config.replicas.probe_interval = Duration::from_millis(100);
        config.replicas.fence_wait = Duration::from_millis(20);
        config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
        tweak(&mut config);
        let server = Server::start(config).await;
        let setup = Setup {
            _primary: primary,
            replica,
            server,
            metrics_port,
        };
        wait_metric(metrics_port, &setup.label("pgstore_replica_healthy"), 1).await;
        setup
    }

    /// The replica's series of a labelled metric.
    fn label(&self, name: &str) -> String {
        format!(
            "{name}{{replica=\"127.0.0.1:{}\"}}",
            self.replica.cluster.port
        )
    }
}

/// 1 append then fenced Load and ReadFrom, `n` times over 10 concurrent clients.
async fn read_your_writes(server: &Server, n: usize, tag: &str) {
    let mut tasks = Vec::new();
    for t in 0..10 {
        let mut c = server.client().await;
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 10 {
                let stream = format!("ryw-{tag}-{t}");
                let r = c
                    .append(append(
                        &stream,
                        None,
                        vec![json_event("E", &format!("{i}"))],
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let page = c
                    .load(proto::LoadRequest {
                        stream_id: stream.clone(),
                        backwards: true,
                        max_count: 1,
                        min_sequence: r.last_sequence,
                        ..Default::default()
                    })
                    .await
                    .expect("load")
                    .into_inner();
                assert_eq!(page.stream_version, r.version, "stale Load");
                assert_eq!(page.events[0].global_sequence, r.last_sequence);
                let log = c
                    .read_from(proto::ReadFromRequest {
                        from_sequence: r.last_sequence,
                        limit: 1,
                        min_sequence: r.last_sequence,
                        ..Default::default()
                    })
                    .await
                    .expect("read_from")
                    .into_inner();
                assert_eq!(log.events.len(), 1, "stale ReadFrom");
                assert_eq!(log.events[0].global_sequence, r.last_sequence);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_with_min_sequence_see_their_writes_through_a_lagging_or_stopped_replica() {
    let setup = Setup::start("300ms", |_| {}).await;
    let (server, replica, metrics_port) = (&setup.server, &setup.replica, setup.metrics_port);
    let mut c = server.client().await;
    // Unfenced reads are served by the replica (which lags: they may be stale, never wrong).
    c.append(append("warm", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    // (Until the replica has replayed the schema, reads fall back to the primary.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metric(metrics_port, "pgstore_replica_reads_total").await == 0 {
        assert!(std::time::Instant::now() < deadline, "replica path used");
        for _ in 0..20 {
            c.read_from(proto::ReadFromRequest::default())
                .await
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    read_your_writes(server, 1000, "lagging").await;

    replica.stop("fast");
    read_your_writes(server, 200, "stopped").await;
    let label = setup.label("pgstore_replica_healthy");
    wait_metric(metrics_port, &label, 0).await;

    replica.restart(FAST);
    wait_metric(metrics_port, &label, 1).await;
    read_your_writes(server, 100, "back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_reading_from_a_lagging_replica_misses_nothing() {
    let setup = Setup::start("300ms", |_| {}).await;
    let (server, replica, metrics_port) = (&setup.server, &setup.replica, setup.metrics_port);
    let mut c = server.client().await;
    let mut sub = c
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut got: Vec<u64> = Vec::new();
    let receive = async |sub: &mut tonic::Streaming<proto::SubscribeResponse>,
                         got: &mut Vec<u64>,
                         until: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.last().copied().unwrap_or(0) < until {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, sub.next())
                .await
                .expect("events in time")
                .unwrap()
                .unwrap();
            if let Some(Message::Event(e)) = m.message {
                got.push(e.global_sequence);
            }
        }
    };
    let h = append_many(&mut c, 300, "sub", 7).await;
    receive(&mut sub, &mut got, h).await;
    let served_by_replica = metric(metrics_port, "pgstore_replica_reads_total").await;
    assert!(
        served_by_replica > 0,
        "the subscriber read from the replica"
    );

    replica.stop("fast");
    let h = append_many(&mut c, 200, "sub", 7).await;
    receive(&mut sub, &mut got, h).await;
    replica.restart(FAST);
    let h = append_many(&mut c, 100, "sub", 7).await;
    receive(&mut sub, &mut got, h).await;
    assert_eq!(
        got,
        (1..=h).collect::<Vec<_>>(),
        "everything, once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_too_far_behind_leaves_the_rotation_until_it_catches_up() {
    let setup = Setup::start("1s", |c| c.replicas.max_lag = 20).await;
    let (server, metrics_port) = (&setup.server, setup.metrics_port);
    let label = setup.label("pgstore_replica_healthy");

    // 100 events at once: the delayed replica is 100 sequences behind for about a second.
    let mut c = server.client().await;
    let events = (0..100).map(|i| json_event("E", &format!("{i}"))).collect();
    c.append(append("lag", None, events)).await.unwrap();
    wait_metric(metrics_port, &label, 0).await;
    // Meanwhile unfenced reads are not served by it: they see the whole append.
    let page = c
        .read_from(proto::ReadFromRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.events.len(),
        100,
        "a replica out of rotation served a read"
    );
    // Once it has replayed, it is back.
    wait_metric(metrics_port, &label, 1).await;
    let lag = setup.label("pgstore_replica_lag");
    assert!(metric(metrics_port, &lag).await <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribe_catch_up_reads_from_the_replica() {
    let setup = Setup::start("0s", |c| c.live.page_size = 100).await;
    let (server, metrics_port) = (&setup.server, setup.metrics_port);
    let mut c = server.client().await;
    let h = append_many(&mut c, 1000, "catch-up", 7).await;
    // The replica has replayed everything once a fenced read is served by it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = metric(metrics_port, "pgstore_replica_reads_total").await;
        c.read_from(proto::ReadFromRequest {
            from_sequence: h,
            limit: 1,
            min_sequence: h,
            ..Default::default()
        })
        .await
        .unwrap();
        if metric(metrics_port, "pgstore_replica_reads_total").await > before {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (replica_before, primary_before) = (
        metric(metrics_port, "pgstore_replica_reads_total").await,
        metric(metrics_port, "pgstore_primary_reads_total").await,
    );
    let mut sub = c
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    loop {
        match sub.next().await.unwrap().unwrap().message {
            Some(Message::Event(e)) => got.push(e.global_sequence),
            Some(Message::CaughtUp(_)) => break,
            _ => {}
        }
    }
    assert_eq!(got, (1..=h).collect::<Vec<_>>());
    let replica_pages = metric(metrics_port, "pgstore_replica_reads_total").await - replica_before;
    let primary_pages = metric(metrics_port, "pgstore_primary_reads_total").await - primary_before;
    assert!(
        replica_pages >= 10 && primary_pages <= 1,
        "catch-up pages served by the replica: {replica_pages}, by the primary: {primary_pages}"
    );
}
