//! Startup against a database that is not there yet, or never will be: the port answers at once
//! (health NOT_SERVING, calls UNAVAILABLE naming the server and the cause) and pgstore serves as
//! soon as the database comes up; a login that will never work (unknown role, missing database)
//! ends startup with an error that says so, and the process exits non-zero.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgstore::{embedded::Cluster, proto};
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_answers_before_the_database_and_serves_once_it_is_up() {
    let port = free_port();
    let mut config = test_config(&format!("postgres://postgres@127.0.0.1:{port}/postgres"));
    config.database.connect_timeout = Duration::from_millis(500);
    let server = Server::spawn(config).await;

    // Health answers at once, NOT_SERVING; the event store says why it cannot serve.
    let started = Instant::now();
    wait_health(
        &server.channel().await,
        pgstore::server::SERVICE_NAME,
        ServingStatus::NotServing,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let mut c = server.client().await;
    let mut err = None;
    for _ in 0..50 {
        let e = c
            .latest_sequence(proto::LatestSequenceRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        if e.message().contains("refused") {
            err = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = err.expect("the cause is reported");
    assert!(
        err.message().contains(&format!("127.0.0.1:{port}")),
        "{}",
        err.message()
    );

    // The database comes up on that port: pgstore serves without a restart.
    let root = std::env::temp_dir().join(unique("pgstore-late"));
    let cluster = Cluster::in_dir(&root, port, true).unwrap();
    cluster.init().unwrap();
    cluster.start(FAST).unwrap();
    let pg = PgCluster { cluster, root };
    wait_health(
        &server.channel().await,
        pgstore::server::SERVICE_NAME,
        ServingStatus::Serving,
    )
    .await;
    c.append(append("late", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    server.shutdown().await.unwrap();
    drop(pg);
}

#[tokio::test]
async fn a_login_that_cannot_work_ends_startup_with_the_reason() {
    let port = shared().cluster.port;
    for (url, reason) in [
        (
            format!("postgres://postgres@127.0.0.1:{port}/no_such_database"),
            "database does not exist",
        ),
        (
            format!("postgres://no_such_role@127.0.0.1:{port}/postgres"),
            "authentication failed",
        ),
    ] {
        let mut config = test_config(&url);
        config.database.startup_permanent_failures = 2;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = tokio::time::timeout(
            Duration::from_secs(30),
            pgstore::server::run(listener, config, std::future::pending()),
        )
        .await
        .expect("startup gives up")
        .expect_err("startup fails")
        .to_string();
        assert!(err.contains(reason), "{err}");
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }

    // The process exits non-zero, saying so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgstore"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
        .arg(format!(
            "postgres://postgres@127.0.0.1:{port}/no_such_database"
        ))
        .env("PGSTORE_DATABASE__STARTUP_PERMANENT_FAILURES", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("database does not exist"), "{stderr}");
}
