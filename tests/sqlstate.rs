//! PostgreSQL errors become the gRPC codes a client can act on: serialization failures and
//! deadlocks are retryable conflicts (ABORTED), a statement cut off by `statement_timeout` is
//! DEADLINE_EXCEEDED, a refused login or a missing database is UNAVAILABLE and says so, and a
//! dropped connection is UNAVAILABLE. The errors are real ones, raised by a real server.

mod common;

use common::*;
use pgstore::store::db::db_err;
use tonic::Code;

async fn error_of(sql: &str) -> tokio_postgres::Error {
    pg_client(&shared().cluster, "postgres")
        .await
        .batch_execute(sql)
        .await
        .unwrap_err()
}

fn raise(sqlstate: &str) -> String {
    format!("DO $$ BEGIN RAISE EXCEPTION 'raised here' USING ERRCODE = '{sqlstate}'; END $$")
}

#[tokio::test]
async fn sqlstates_map_to_actionable_codes() {
    for (sqlstate, code, says) in [
        ("40001", Code::Aborted, "retry"),
        ("40P01", Code::Aborted, "retry"),
        ("57014", Code::DeadlineExceeded, "statement_timeout"),
        ("28P01", Code::Unavailable, "refused the session"),
        ("3D000", Code::Unavailable, "refused the session"),
        ("57P01", Code::Unavailable, "raised here"),
        ("23505", Code::Internal, "raised here"),
    ] {
        let status = tonic::Status::from(db_err(error_of(&raise(sqlstate)).await));
        assert_eq!(status.code(), code, "{sqlstate}: {status:?}");
        assert!(
            status.message().contains(says),
            "{sqlstate}: {}",
            status.message()
        );
    }
    // A real statement timeout.
    let status = tonic::Status::from(db_err(
        error_of("SET statement_timeout = 50; SELECT pg_sleep(5)").await,
    ));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test]
async fn a_connection_that_died_is_unavailable() {
    let client = pg_client(&shared().cluster, "postgres").await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let admin = pg_client(&shared().cluster, "postgres").await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let e = client.simple_query("SELECT 1").await.unwrap_err();
    let status = tonic::Status::from(db_err(e));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
