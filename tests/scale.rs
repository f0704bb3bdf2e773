//! Behaviour that matters once the log is large: filtered reads look at a bounded window per call,
//! and migrations build indexes online, safely from several instances at once.

mod common;

use std::process::Command;

use common::*;
use pgstore::proto;
use pgstore::store::migrate::{MIGRATIONS, migrate};
use tokio_stream::StreamExt;

async fn raw_client(url: &str) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test]
async fn a_filtered_read_looks_at_a_bounded_window_and_moves_on() {
    let mut config = test_config(&fresh_db().await);
    config.limits.max_scan_window = 100;
    let server = Server::start(config).await;
    let mut client = server.client().await;
    for i in 0..35 {
        let events = (0..10).map(|_| json_event("Common", "{}")).collect();
        client
            .append(append(&format!("common-{}", i % 3), None, events))
            .await
            .unwrap();
    }
    client
        .append(append("rare-1", None, vec![json_event("Rare", "{}")]))
        .await
        .unwrap();

    // Nothing matches in [1, 101): an empty page whose cursor moved past the window.
    let page = |from: u64, types: Vec<String>, prefix: &str| proto::ReadFromRequest {
        from_sequence: from,
        limit: 10,
        event_types: types,
        stream_prefix: prefix.into(),
        min_sequence: 0,
    };
    for (types, prefix) in [(vec!["Rare".to_string()], ""), (vec![], "rare-")] {
        let mut from = 1;
        let mut calls = 0;
        let mut found = Vec::new();
        loop {
            let r = client
                .read_from(page(from, types.clone(), prefix))
                .await
                .unwrap()
                .into_inner();
            calls += 1;
            assert_eq!(r.head, 351);
            assert!(r.next_sequence <= from + 100, "at most one window per call");
            found.extend(r.events.iter().map(|e| e.global_sequence));
            if r.next_sequence > r.head {
                break;
            }
            assert!(r.next_sequence > from, "the cursor moves forward");
            from = r.next_sequence;
        }
        assert_eq!(found, vec![351]);
        assert_eq!(calls, 4, "windows [1,101) [101,201) [201,301) [301,352)");
    }

    // An unfiltered read is not windowed: a full page.
    let r = client
        .read_from(page(1, vec![], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.events.len(), r.next_sequence), (10, 11));

    // A filtered subscription pages through the windows and reports caught-up at the head.
    let mut sub = client
        .subscribe(proto::SubscribeRequest {
            event_types: vec!["Rare".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    loop {
        match sub.next().await.unwrap().unwrap().message {
            Some(proto::subscribe_response::Message::Event(e)) => events.push(e.global_sequence),
            Some(proto::subscribe_response::Message::CaughtUp(c)) => {
                assert_eq!(c.sequence, 351);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(events, vec![351]);
}

#[tokio::test]
async fn migrations_run_concurrently_and_again() {
    let url = fresh_db().await;
    let runs = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let mut client = raw_client(&url).await;
            migrate(&mut client).await
        })
    });
    let mut applied = 0;
    for run in runs {
        applied += run.await.unwrap().expect("a concurrent migration succeeds");
    }
    assert_eq!(
        applied,
        MIGRATIONS.len(),
        "each migration applied exactly once"
    );
    let mut client = raw_client(&url).await;
    assert_eq!(migrate(&mut client).await.unwrap(), 0);
    let valid: bool = client
        .query_one(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'events_type_seq'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid);
}

#[tokio::test]
async fn dry_run_changes_nothing_and_an_index_left_invalid_is_rebuilt() {
    let url = fresh_db().await;
    let mut client = raw_client(&url).await;
    let server = Server::fresh_on(&url).await;
    let mut c = server.client().await;
    for _ in 0..2 {
        c.append(append("dup", None, vec![json_event("Same", "{}")]))
            .await
            .unwrap();
    }
    drop(c);
    server.shutdown().await.unwrap();
    // As if the online index build of 0008 had failed half-way: its row is missing and an
    // invalid index of that name is left.
    client
        .batch_execute(
            "DELETE FROM pgstore.schema_migrations WHERE version = 8;
             DROP INDEX pgstore.events_type_seq;",
        )
        .await
        .unwrap();
    let failed = client
        .batch_execute(
            "CREATE UNIQUE INDEX CONCURRENTLY events_type_seq ON pgstore.events (event_type)",
        )
        .await;
    assert!(failed.is_err(), "duplicate types: the build fails");
    let invalid: bool = client
        .query_one(
            "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'events_type_seq'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(invalid, "the failed concurrent build left an invalid index");

    let out = Command::new(env!("CARGO_BIN_EXE_pgstore"))
        .args(["migrate", "--dry-run", "--database-url", &url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("would apply 0008_events_type_seq statement by statement")
            && stdout.contains("CREATE INDEX CONCURRENTLY"),
        "{stdout}"
    );
    let rows: i64 = client
        .query_one("SELECT count(*) FROM pgstore.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows as usize,
        MIGRATIONS.len() - 1,
        "the dry run applied nothing"
    );

    assert_eq!(migrate(&mut client).await.unwrap(), 1);
    let (valid, unique): (bool, bool) = client
        .query_one(
            "SELECT i.indisvalid, i.indisunique FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'events_type_seq'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(valid && !unique, "rebuilt as the migration defines it");
    let out = Command::new(env!("CARGO_BIN_EXE_pgstore"))
        .args(["migrate", "--dry-run", "--database-url", &url])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
}
