//! Behaviour that matters once the log is large: filtered reads look at a bounded window per call,
//! and migrations build indexes online, safely from several instances at once.

mod common;

/// How long the tests' migrations wait for each other.
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

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

/// Writes `n` events of one new stream straight into the tables (quicker than the API).
async fn fill_stream(pg: &tokio_postgres::Client, stream: &str, n: i64) {
    pg.batch_execute(&format!(
        "BEGIN;
         WITH h AS (UPDATE pgstore.head SET seq = seq + {n} RETURNING seq - {n} AS base)
         INSERT INTO pgstore.events (seq, stream_id, version, event_id, event_type, content_type,
                                     data, created_at, recorded_at, partition_key)
         SELECT base + g, '{stream}', g, gen_random_uuid(), 'E', 'application/json', '{{}}'::jsonb,
                now(), now(), 7 FROM h, generate_series(1, {n}) g;
         INSERT INTO pgstore.streams (stream_id, version) VALUES ('{stream}', {n});
         COMMIT;"
    ))
    .await
    .unwrap();
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
        query: None,
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

    // An unfiltered read of a dense log fills its page.
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
            migrate(&mut client, WAIT).await
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
    assert_eq!(migrate(&mut client, WAIT).await.unwrap(), 0);
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

    assert_eq!(migrate(&mut client, WAIT).await.unwrap(), 1);
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

/// A large DeleteStream does not hold the global lock while it deletes: appends to other streams
/// go on during it. (Holding it, every append would wait for the whole delete.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_delete_does_not_stall_appends() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    config.database.delete_batch_size = 2000;
    let server = Server::start(config).await;
    let mut client = server.client().await;
    client
        .append(append("small", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    let pg = raw_client(&url).await;
    fill_stream(&pg, "big", 300000).await;

    let mut deleter = server.client().await;
    let delete = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r = deleter
            .delete_stream(proto::DeleteStreamRequest {
                stream_id: "big".into(),
            })
            .await
            .unwrap()
            .into_inner();
        (r.deleted_events, started.elapsed())
    });
    // Appends while the delete runs: each one is answered without waiting for the delete.
    let mut during = Vec::new();
    while !delete.is_finished() {
        let started = std::time::Instant::now();
        client
            .append(append("small", None, vec![json_event("E", "{}")]))
            .await
            .unwrap();
        during.push(started.elapsed());
    }
    let (deleted, took) = delete.await.unwrap();
    assert_eq!(deleted, 300_000);
    let slowest = during.iter().max().copied().unwrap_or_default();
    assert!(
        during.len() >= 5 && slowest < took / 2,
        "{} appends during a {took:?} delete, the slowest took {slowest:?}",
        during.len()
    );

    // Gone, and the stream id is free again.
    let err = client
        .get_stream(proto::GetStreamRequest {
            stream_id: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let r = client
        .append(append(
            "big",
            Some(proto::append_request::ExpectedVersion::NoStream(true)),
            vec![json_event("E", "{}")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 1);
}

/// While a stream is being deleted it refuses appends and reads as absent; a delete cut short
/// is finished by the next DeleteStream.
#[tokio::test]
async fn a_stream_being_deleted_refuses_appends_and_a_cut_short_delete_is_finished() {
    let url = fresh_db().await;
    let server = Server::fresh_on(&url).await;
    let mut client = server.client().await;
    let events = (0..10).map(|_| json_event("E", "{}")).collect();
    client.append(append("s", None, events)).await.unwrap();
    // As a delete cut short leaves it: marked, some events already gone.
    let pg = raw_client(&url).await;
    pg.batch_execute(
        "UPDATE pgstore.streams SET state = 4 WHERE stream_id = 's';
         DELETE FROM pgstore.events WHERE stream_id = 's' AND version <= 4;",
    )
    .await
    .unwrap();
    let err = client
        .append(append("s", None, vec![json_event("E", "{}")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("being deleted"), "{}", err.message());
    let err = client
        .get_stream(proto::GetStreamRequest {
            stream_id: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let page = client
        .load(proto::LoadRequest {
            stream_id: "s".into(),
            ..Default::default()
        })
        .await;
    assert!(
        page.as_ref()
            .map_or(true, |p| p.get_ref().events.is_empty()),
        "{page:?}"
    );

    let r = client
        .delete_stream(proto::DeleteStreamRequest {
            stream_id: "s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted_events, 6, "the rest");
    let left: i64 = pg
        .query_one(
            "SELECT count(*) FROM pgstore.streams WHERE stream_id = 's'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// A delete that outlasts the request deadline is answered DEADLINE_EXCEEDED and still finishes.
#[tokio::test]
async fn a_delete_past_the_request_deadline_still_finishes() {
    let url = fresh_db().await;
    let mut config = test_config(&url);
    config.server.request_timeout = std::time::Duration::from_millis(200);
    config.database.delete_batch_size = 500;
    let server = Server::start(config).await;
    let mut client = server.client().await;
    client
        .append(append("other", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    let pg = raw_client(&url).await;
    fill_stream(&pg, "big", 200000).await;
    let err = client
        .delete_stream(proto::DeleteStreamRequest {
            stream_id: "big".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left: i64 = pg
            .query_one(
                "SELECT (SELECT count(*) FROM pgstore.events WHERE stream_id = 'big') \
                      + (SELECT count(*) FROM pgstore.streams WHERE stream_id = 'big')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{left} rows left");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Idle lock and group-member rows are deleted after `database.dead_row_retention`; a lock taken
/// again still gets a higher fencing token than it ever had.
#[tokio::test]
async fn idle_lock_and_member_rows_are_pruned_and_tokens_keep_increasing() {
    use proto::lock_response::Message as Lock;
    let url = fresh_db().await;
    let mut config = test_config(&url);
    config.database.dead_row_retention = std::time::Duration::from_secs(1);
    let server = Server::start(config).await;
    let mut client = server.client().await;
    let pg = raw_client(&url).await;
    let take = async |client: &mut Client| -> (tonic::Streaming<proto::LockResponse>, u64) {
        let mut s = client
            .lock(proto::LockRequest {
                stream_id: "lk".into(),
                try_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            if let Some(Lock::Granted(g)) = s.next().await.unwrap().unwrap().message {
                return (s, g.fencing_token);
            }
        }
    };
    let (held, first) = take(&mut client).await;
    drop(held);
    let (held, second) = take(&mut client).await;
    assert!(second > first);
    drop(held);
    // A member that vanished without leaving (its instance died): its lease ran out long ago.
    pg.batch_execute(
        "INSERT INTO pgstore.group_members (group_name, member, token, expires_at) \
         VALUES ('gp', 'ghost', gen_random_uuid(), now() - interval '1 hour')",
    )
    .await
    .unwrap();

    let rows = async || -> i64 {
        pg.query_one(
            "SELECT (SELECT count(*) FROM pgstore.locks) + \
                    (SELECT count(*) FROM pgstore.group_members)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rows().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle rows were not pruned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_held, third) = take(&mut client).await;
    assert!(
        third > second,
        "{third} after {second}: fencing tokens never go back"
    );
}

/// A migration held elsewhere for longer than `database.migration_wait` fails, naming it.
#[tokio::test]
async fn waiting_for_another_migration_is_bounded() {
    let url = fresh_db().await;
    let holder = raw_client(&url).await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&pgstore::store::migrate::MIGRATION_LOCK],
        )
        .await
        .unwrap();
    let mut client = raw_client(&url).await;
    let started = std::time::Instant::now();
    let err = migrate(&mut client, std::time::Duration::from_millis(500))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("database.migration_wait"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
