//! The operator's tools: `/metrics` moving with traffic, `pgstore health`, `pgstore tail` and
//! `pgstore config check`, run as the real binary against a live server.

mod common;

use std::{process::Stdio, time::Duration};

use common::*;
use pgstore::proto;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_stream::StreamExt;
use tonic::Code;

fn pgstore() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgstore"));
    // The commands must not pick up settings from the environment the tests run in.
    for (k, _) in std::env::vars() {
        if k.starts_with("PGSTORE_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs a command to completion: (exit code, stdout, stderr).
async fn run(cmd: &mut tokio::process::Command) -> (i32, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the command finished")
        .expect("the command ran");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let port = free_port();
    let mut config = test_config(&fresh_db().await);
    config.metrics_listen = Some(format!("127.0.0.1:{port}"));
    let server = Server::start(config).await;
    let mut client = server.client().await;
    let text = metrics_text(port).await;
    assert!(
        text.contains("application/openmetrics-text") && text.trim_end().ends_with("# EOF"),
        "OpenMetrics exposition:\n{text}"
    );
    let ok_appends =
        r#"pgstore_grpc_requests_total{service="pgstore.v1.EventStore",method="Append",code="OK"}"#;
    let conflicts = r#"pgstore_grpc_requests_total{service="pgstore.v1.EventStore",method="Append",code="ABORTED"}"#;
    let before = metric(port, ok_appends).await.max(0);

    // A subscriber that stays open while the traffic flows.
    let mut sub = client
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    wait_metric(port, "pgstore_subscribers", 1).await;
    wait_metric(port, "pgstore_listener_connected", 1).await;

    for i in 0..5 {
        client
            .append(append(
                "metrics-1",
                exact(i),
                vec![json_event("E", r#"{"n": 12345}"#)],
            ))
            .await
            .unwrap();
    }
    let err = client
        .append(append("metrics-1", exact(0), vec![json_event("E", "{}")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "a version conflict");
    let mut seen = 0;
    while seen < 5 {
        if let Some(proto::subscribe_response::Message::Event(_)) =
            sub.next().await.unwrap().unwrap().message
        {
            seen += 1;
        }
    }

    assert_eq!(metric(port, ok_appends).await, before + 5);
    assert_eq!(metric(port, conflicts).await, 1);
    let appended_bytes = metric(port, "pgstore_events_written_bytes_total").await;
    assert_eq!(appended_bytes, 5 * r#"{"n": 12345}"#.len() as i64);
    assert_eq!(metric(port, "pgstore_events_written_total").await, 5);
    assert_eq!(metric(port, "pgstore_appends_total").await, 5);
    let batches = metric(port, "pgstore_write_batches_total").await;
    assert!(batches >= 1);
    assert_eq!(
        metric(port, "pgstore_write_batch_events_count").await,
        batches
    );
    assert_eq!(metric(port, "pgstore_write_batch_events_sum").await, 5);
    assert!(metric(port, "pgstore_write_commit_duration_seconds_count").await >= batches);
    assert!(metric(port, "pgstore_events_delivered_total").await >= 5);
    let latency_count = r#"pgstore_grpc_request_duration_seconds_count{service="pgstore.v1.EventStore",method="Append",code="OK"}"#;
    assert_eq!(metric(port, latency_count).await, before + 5);
    assert!(metric(port, r#"pgstore_pool_connections{pool="primary"}"#).await >= 1);
    assert!(metric(port, r#"pgstore_pool_idle{pool="primary"}"#).await >= 0);
    assert_eq!(
        metric(port, r#"pgstore_pool_waiting{pool="primary"}"#).await,
        0
    );
    assert_eq!(metric(port, "pgstore_writer_queue_depth").await, 0);
    assert!(metric(port, "pgstore_notifications_total").await >= 0);

    // Leaving: the subscriber gauges and queues go back to zero.
    drop(sub);
    wait_metric(port, "pgstore_subscribers", 0).await;
    wait_metric(port, "pgstore_subscriber_buffered_bytes", 0).await;
    wait_metric(port, "pgstore_subscriber_buffered", 0).await;

    // Unknown paths do not grow the series.
    let text = metrics_text(port).await;
    assert!(!text.contains("method=\"Nope\""));
}

#[tokio::test]
async fn health_says_serving_or_why_not() {
    let server = Server::fresh().await;
    let addr = server.addr.to_string();
    let (code, out, err) = run(pgstore().args(["health", "--addr", &addr])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("SERVING"), "{out}");
    let (code, out, _) = run(pgstore().args([
        "health",
        "--addr",
        &addr,
        "--service",
        "pgstore.v1.EventStore",
    ]))
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("pgstore.v1.EventStore") && out.contains("SERVING"));

    // The default address follows PGSTORE_LISTEN, as inside the container image.
    let listen = format!("0.0.0.0:{}", server.addr.port());
    let (code, _, err) = run(pgstore().arg("health").env("PGSTORE_LISTEN", listen)).await;
    assert_eq!(code, 0, "{err}");

    let (code, _, err) =
        run(pgstore().args(["health", "--addr", &addr, "--service", "nope"])).await;
    assert_eq!(code, 1);
    assert!(err.contains("NotFound"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let closed = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = run(pgstore().args(["health", "--addr", &closed])).await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[tokio::test]
async fn health_reports_not_serving_while_the_database_is_out_of_reach() {
    // A database nobody listens on: the port is up, health is NOT_SERVING.
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=1",
        free_port()
    );
    let server = Server::spawn(test_config(&url)).await;
    let addr = server.addr.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, err) = run(pgstore().args(["health", "--addr", &addr])).await;
        assert_eq!(code, 1);
        if err.contains("NOT_SERVING") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tail_prints_events_as_json_lines_until_interrupted() {
    let server = Server::fresh().await;
    let mut client = server.client().await;
    client
        .append(append(
            "order-1",
            None,
            vec![json_event("Placed", r#"{"a":1}"#)],
        ))
        .await
        .unwrap();
    let addr = server.addr.to_string();
    let mut child = pgstore()
        .args(["tail", "order-1", "--from-start", "--addr", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let first = next().await;
    assert_eq!(first["stream_id"], "order-1");
    assert_eq!(first["version"], 1);
    assert_eq!(first["global_sequence"], 1);
    assert_eq!(first["event_type"], "Placed");
    assert_eq!(first["data"], serde_json::json!({"a": 1}));

    // Live: another stream with the same prefix is not shown; the stream's next event is.
    client
        .append(append("order-10", None, vec![json_event("Placed", "{}")]))
        .await
        .unwrap();
    let mut raw = json_event("Shipped", "{}");
    raw.content_type = "application/octet-stream".into();
    raw.payload = Some(proto::event_data::Payload::Data(vec![0, 1, 2].into()));
    raw.metadata.insert("by".into(), "ops".into());
    client
        .append(append("order-1", None, vec![raw]))
        .await
        .unwrap();
    let second = next().await;
    assert_eq!(second["stream_id"], "order-1");
    assert_eq!(second["version"], 2);
    assert_eq!(second["data_base64"], "AAEC");
    assert_eq!(second["metadata"]["by"], "ops");

    signal(&[child.id().unwrap()], "INT");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits on Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn tail_filters_by_type_and_prefix_and_prints_text() {
    let server = Server::fresh().await;
    let mut client = server.client().await;
    for (stream, kind) in [("a-1", "X"), ("b-1", "X"), ("a-2", "Y"), ("a-3", "X")] {
        client
            .append(append(stream, None, vec![json_event(kind, "{}")]))
            .await
            .unwrap();
    }
    let addr = server.addr.to_string();
    let mut child = pgstore()
        .args([
            "tail",
            "--prefix",
            "a-",
            "--type",
            "X",
            "--from-sequence",
            "1",
            "--format",
            "text",
            "--addr",
            &addr,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut got = Vec::new();
    while got.len() < 3 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("a line");
        got.push(line);
    }
    assert_eq!(got[0], "#1 a-1@1 X {}");
    assert_eq!(got[1], "#4 a-3@1 X {}");
    assert!(got[2].starts_with("-- caught up"), "{got:?}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn tail_says_when_the_server_is_unreachable() {
    let closed = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = run(pgstore().args(["tail", "--addr", &closed])).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("pgstore: cannot reach"), "{err}");
}

#[tokio::test]
async fn config_check_prints_the_effective_settings_without_secrets() {
    let (code, out, err) = run(pgstore()
        .args(["config", "check", "--format", "env"])
        .env(
            "PGSTORE_DATABASE_URL",
            "postgres://app:s3cret-pw@db:5432/events",
        )
        .env(
            "PGSTORE_AUTH__TOKENS",
            "token-one-0123456789,token-two-0123456789",
        )
        .env("PGSTORE_DATABASE__POOL_SIZE", "7"))
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("PGSTORE_DATABASE__POOL_SIZE=7\n"), "{out}");
    assert!(out.contains("PGSTORE_DATABASE_URL=postgres://app:***@db:5432/events\n"));
    assert!(out.contains("PGSTORE_AUTH__TOKENS=***,***\n"));
    assert!(
        !out.contains("s3cret") && !out.contains("token-one"),
        "{out}"
    );
    // Every setting is listed, set or not.
    let listed = out
        .lines()
        .filter(|l| l.starts_with("PGSTORE_") || l.starts_with("# PGSTORE_"))
        .count();
    assert_eq!(listed, pgstore::config::Config::default().settings().len());

    let (code, out, _) = run(pgstore().args(["config", "check", "--listen", "0.0.0.0:7000"])).await;
    assert_eq!(code, 0);
    assert!(out.contains("listen = \"0.0.0.0:7000\""), "{out}");

    // Unknown names, bad values: exit 1 with the reason.
    let (code, _, err) = run(pgstore()
        .args(["config", "check"])
        .env("PGSTORE_DATABASE__POOL_SIZ", "7"))
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("pool_siz"), "{err}");
    let (code, _, err) = run(pgstore()
        .args(["config", "check"])
        .env("PGSTORE_WRITER__COMMIT_TIMEOUT", "soon"))
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("commit_timeout"), "{err}");
}

#[tokio::test]
async fn serve_help_names_each_flags_variable_and_default() {
    let (code, help, _) = run(pgstore().args(["serve", "--help"])).await;
    assert_eq!(code, 0);
    let (_, defaults, _) = run(pgstore().args(["config", "check", "--format", "env"])).await;
    // "--listen <ADDR>  Address ... [env: PGSTORE_LISTEN] [default: 127.0.0.1:50051]"
    let help = help.replace('\n', " ");
    let mut checked = 0;
    for flag in help.split("  --").skip(1) {
        let name = flag.split_whitespace().next().unwrap();
        if name == "config" || name == "help" {
            continue;
        }
        let env = flag
            .split("[env: ")
            .nth(1)
            .and_then(|r| r.split(']').next())
            .unwrap_or_else(|| panic!("--{name} names no variable: {flag}"));
        let default = flag
            .split("[default: ")
            .nth(1)
            .and_then(|r| r.split(']').next())
            .unwrap_or_else(|| panic!("--{name} names no default: {flag}"));
        let actual = if default == "none" {
            format!("# {env} is not set")
        } else {
            format!("{env}={default}")
        };
        assert!(
            defaults.lines().any(|l| l == actual),
            "--{name}: help says {env} defaults to {default}, config check says otherwise"
        );
        checked += 1;
    }
    assert!(checked >= 6, "{help}");
}

/// The client commands speak TLS, mutual TLS and bearer tokens.
#[tokio::test]
async fn health_and_tail_over_mutual_tls_with_a_token() {
    let dir = std::env::temp_dir().join(format!("pgstore-ops-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("pgstore test CA");
    let (server_cert, server_key) = ca.issue("events.internal");
    let (client_cert, client_key) = ca.issue("ops");
    let file = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca_file = file("ca.pem", &ca.cert.pem());
    let cert_file = file("client.pem", &client_cert);
    let key_file = file("client.key", &client_key);
    let token = "ops-token-0123456789abcdef";
    let token_file = file("token", &format!("{token}\n"));
    let mut config = test_config(&fresh_db().await);
    config.tls.cert_file = Some(file("server.pem", &server_cert).into());
    config.tls.key_file = Some(file("server.key", &server_key).into());
    config.tls.client_ca_file = Some(ca_file.clone().into());
    config.auth.tokens = vec![token.into()];
    let server = Server::spawn(config).await;
    let addr = format!("https://127.0.0.1:{}", server.addr.port());
    let tls = [
        "--ca-file",
        &ca_file,
        "--cert-file",
        &cert_file,
        "--key-file",
        &key_file,
        "--tls-server-name",
        "events.internal",
    ];

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = run(pgstore().args(["health", "--addr", &addr]).args(tls)).await;
        if code == 0 {
            assert!(out.contains("SERVING"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Without the client certificate, or trusting nobody: refused, and said so on one line.
    let (code, _, err) = run(pgstore().args([
        "health",
        "--addr",
        &addr,
        "--ca-file",
        &ca_file,
        "--tls-server-name",
        "events.internal",
    ]))
    .await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // tail needs the token as well as the certificate.
    let (code, _, err) = run(pgstore()
        .args(["tail", "--from-start", "--addr", &addr])
        .args(tls))
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("Unauthenticated"), "{err}");
    let mut child = pgstore()
        .args(["tail", "--from-start", "--format", "text", "--addr", &addr])
        .args(tls)
        .args(["--token-file", &token_file])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .unwrap();
    assert!(line.starts_with("-- caught up at sequence 0"), "{line}");
    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
