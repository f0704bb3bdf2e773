//! The server around the store: health, reflection, configuration layering, graceful shutdown and
//! the embedded PostgreSQL default.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use pgstore::proto;
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1alpha::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_service() {
    let server = Server::fresh().await;
    for service in ["", "pgstore.v1.EventStore"] {
        let status = HealthClient::new(server.channel().await)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_v1alpha_lists_the_services() {
    let server = Server::fresh().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["pgstore.v1.EventStore", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn bearer_tokens_guard_the_event_store_but_not_health_or_reflection() {
    const WRITER: &str = "writer-token-0123456789";
    const READER: &str = "reader-token-0123456789";
    let mut config = test_config(&fresh_db().await);
    config.auth.tokens = vec![WRITER.into()];
    config.auth.read_tokens = vec![READER.into()];
    let server = Server::start(config).await;
    let channel = server.channel().await;
    let with_token = |token: &'static str| with_token(channel.clone(), token);
    let events = || vec![json_event("Tested", r#"{"n":1}"#)];

    // No token, or an unknown one: UNAUTHENTICATED, and nothing is written.
    let mut anonymous = server.client().await;
    let err = anonymous
        .append(append("auth-1", None, events()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let err = with_token("not-a-token-at-all-000")
        .latest_sequence(proto::LatestSequenceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // A read-only token reads, and may not write.
    let mut reader = with_token(READER);
    let err = reader
        .append(append("auth-1", None, events()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let head = reader
        .latest_sequence(proto::LatestSequenceRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(head.sequence, 0, "the refused appends wrote nothing");
    // Streaming methods that write are refused the same way.
    let err = reader
        .lock(proto::LockRequest {
            stream_id: "auth-1".into(),
            try_only: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // The full token writes; the reader then reads it, through a stream too.
    let mut writer = with_token(WRITER);
    writer
        .append(append("auth-1", None, events()))
        .await
        .unwrap();
    let page = reader
        .read_from(proto::ReadFromRequest {
            from_sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 1);
    let mut sub = reader
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a delivery")
        .expect("open")
        .unwrap();
    assert!(first.message.is_some());

    // Health and reflection need no token.
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "pgstore.v1.EventStore".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap();
}

/// Whether an append goes through on `endpoint` (connecting may fail, or the first call).
async fn tls_call_works(endpoint: tonic::transport::Endpoint) -> bool {
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    proto::event_store_client::EventStoreClient::new(channel)
        .append(append(&unique("tls"), None, vec![json_event("E", "{}")]))
        .await
        .is_ok()
}

/// Whether an append goes through within 10 s (the server may still be starting).
async fn tls_call_works_soon(endpoint: impl Fn() -> tonic::transport::Endpoint) -> bool {
    for _ in 0..100 {
        if tls_call_works(endpoint()).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Runs `pgstore serve` with `args` and `env`, which must refuse to start; returns its stderr.
fn serve_refused<V: AsRef<std::ffi::OsStr>>(
    args: &[&std::ffi::OsStr],
    env: &[(&str, V)],
) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgstore"))
        .arg("serve")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn tls_and_mutual_tls_on_the_grpc_port() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let dir = std::env::temp_dir().join(unique("pgstore-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("pgstore test CA");
    let (server_cert, server_key) = ca.issue("localhost");
    let (client_cert, client_key) = ca.issue("a-client");
    let (stranger_cert, stranger_key) = TestCa::new("another CA").issue("stranger");
    let file = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let mut config = test_config(&fresh_db().await);
    config.tls.cert_file = Some(file("server.pem", &server_cert));
    config.tls.key_file = Some(file("server.key", &server_key));
    let ca_pem = ca.cert.pem();
    let client_tls = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .domain_name("localhost")
    };
    let https = |addr: std::net::SocketAddr, tls: ClientTlsConfig| {
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .tls_config(tls)
            .unwrap()
    };

    // Server TLS: a client that trusts the CA gets in; a plaintext client does not.
    let server = Server::spawn(config.clone()).await;
    let addr = server.addr;
    assert!(
        tls_call_works_soon(|| https(addr, client_tls())).await,
        "a TLS client reaches the server"
    );
    let plaintext = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    assert!(!tls_call_works(plaintext).await, "plaintext is refused");
    server.shutdown().await.unwrap();

    // Mutual TLS: only clients with a certificate from the configured CA get in.
    config.tls.client_ca_file = Some(file("clients-ca.pem", &ca_pem));
    let server = Server::spawn(config).await;
    let addr = server.addr;
    let with_cert = || client_tls().identity(Identity::from_pem(&client_cert, &client_key));
    assert!(
        tls_call_works_soon(|| https(addr, with_cert())).await,
        "a client with a certificate from the CA gets in"
    );
    assert!(
        !tls_call_works(https(addr, client_tls())).await,
        "no client certificate: refused"
    );
    let stranger = client_tls().identity(Identity::from_pem(&stranger_cert, &stranger_key));
    assert!(
        !tls_call_works(https(addr, stranger)).await,
        "a certificate from another CA: refused"
    );
    server.shutdown().await.unwrap();

    // A key without its certificate, an unreadable file or a key given as the certificate stops
    // startup; the error names the key.
    let no_database =
        ["--database-url", "postgres://nobody@127.0.0.1:1/none"].map(std::ffi::OsStr::new);
    let refused = |env: &[(&str, std::path::PathBuf)]| serve_refused(&no_database, env);
    let (key, missing) = (dir.join("server.key"), dir.join("missing.pem"));
    let stderr = refused(&[("PGSTORE_TLS__KEY_FILE", key.clone())]);
    assert!(stderr.contains("tls"), "{stderr}");
    let stderr = refused(&[
        ("PGSTORE_TLS__CERT_FILE", missing),
        ("PGSTORE_TLS__KEY_FILE", key.clone()),
    ]);
    assert!(
        stderr.contains("tls.cert_file") && stderr.contains("missing.pem"),
        "{stderr}"
    );
    let stderr = refused(&[
        ("PGSTORE_TLS__CERT_FILE", key.clone()),
        ("PGSTORE_TLS__KEY_FILE", key),
    ]);
    assert!(stderr.contains("tls"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_in_flight_appends() {
    let server = Server::fresh().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            c.append(append(&format!("g-{i}"), None, vec![json_event("E", "{}")]))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let addr = server.addr;
    server.shutdown().await.unwrap();
    let mut acked = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await.unwrap() {
            acked.push(r.into_inner().last_sequence);
        }
    }
    // The server is gone...
    assert!(
        proto::event_store_client::EventStoreClient::connect(format!("http://{addr}"))
            .await
            .is_err()
    );
    // ...and everything it acknowledged is stored (checked through a new instance).
    acked.sort();
    assert!(acked.windows(2).all(|w| w[0] < w[1]));
    assert!(!acked.is_empty());
}

/// Sends SIGTERM and waits for the exit without blocking the runtime (client connections must
/// keep being driven to see the server's GOAWAY).
async fn terminate(mut child: std::process::Child) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
}

async fn wait_client(port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) =
            proto::event_store_client::EventStoreClient::connect(format!("http://127.0.0.1:{port}"))
                .await
            && c.latest_sequence(proto::LatestSequenceRequest::default())
                .await
                .is_ok()
        {
            return c;
        }
        assert!(Instant::now() < deadline, "pgstore did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn environment_overrides_the_file_and_flags_override_the_environment() {
    let url = fresh_db().await;
    let dir = std::env::temp_dir().join(unique("pgstore-conf"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pgstore.toml");
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    std::fs::write(
        &file,
        format!("listen = \"127.0.0.1:{file_port}\"\ndatabase_url = \"postgres://nobody@127.0.0.1:1/none\"\n[log]\nlevel = \"warn\"\n"),
    )
    .unwrap();
    // The environment's database URL beats the file's; the file's listen address is used.
    let child = Command::new(env!("CARGO_BIN_EXE_pgstore"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("PGSTORE_DATABASE_URL", &url)
        .env("PGSTORE_DATABASE__POOL_SIZE", "4")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = wait_client(file_port).await;
    c.append(append("cfg", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    assert!(terminate(child).await.success(), "SIGTERM exits cleanly");

    // The environment's listen beats the file's; a flag beats the environment.
    let child = Command::new(env!("CARGO_BIN_EXE_pgstore"))
        .args(["serve", "--config"])
        .arg(&file)
        .args(["--listen", &format!("127.0.0.1:{flag_port}")])
        .env("PGSTORE_LISTEN", format!("127.0.0.1:{env_port}"))
        .env("PGSTORE_DATABASE_URL", &url)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = wait_client(flag_port).await;
    let head = c
        .latest_sequence(proto::LatestSequenceRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(head.sequence, 1, "same database as before");
    assert!(terminate(child).await.success());

    // Invalid configuration is refused before binding, with the key named.
    let with_file = [std::ffi::OsStr::new("--config"), file.as_os_str()];
    let stderr = serve_refused(
        &with_file,
        &[("PGSTORE_DATABASE__EVENTS_CHANNEL", "bad-channel")],
    );
    assert!(stderr.contains("events_channel"), "{stderr}");
    // Unknown keys are refused.
    serve_refused(&with_file, &[("PGSTORE_NO_SUCH_KEY", "1")]);
    // Token lists come from the environment comma-separated; each one is checked.
    let stderr = serve_refused(
        &with_file,
        &[("PGSTORE_AUTH__TOKENS", "a-long-enough-token-1,short")],
    );
    assert!(
        stderr.contains("auth.tokens") && stderr.contains("at least 16"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn migrate_command_applies_the_schema() {
    let url = fresh_db().await;
    let all = pgstore::store::migrate::MIGRATIONS.len();
    for expected in [
        format!("applied {all} migration(s)"),
        "applied 0 migration(s)".to_string(),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pgstore"))
            .args(["migrate", "--database-url", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(&expected));
    }
}

#[tokio::test]
async fn serve_without_a_database_url_runs_an_embedded_postgres() {
    let dir = std::env::temp_dir().join(unique("pgstore-embedded"));
    // No database URL: pgstore manages a cluster in `dir`.
    let serve_embedded = async |dir: &std::path::Path| {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_pgstore"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir)
            .env_remove("PGSTORE_DATABASE_URL")
            .env("PGSTORE_LOG__LEVEL", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        (child, wait_client(port).await)
    };
    let (child, mut c) = serve_embedded(&dir).await;
    let r = c
        .append(append("emb", None, vec![json_event("E", r#"{"ok":true}"#)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 1);
    // The cluster is private: directories 0700, no trust over TCP, and no TCP port at all.
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [dir.clone(), dir.join("pg"), dir.join("run")] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
        }
        let hba = std::fs::read_to_string(dir.join("pg/pg_hba.conf")).unwrap();
        for line in hba.lines().filter(|l| l.starts_with("host")) {
            assert!(!line.contains("trust"), "TCP trusted: {line}");
        }
        let cluster = pgstore::embedded::Cluster::in_dir(&dir, 5432, false).unwrap();
        let client = pg_client(&cluster, "postgres").await;
        for (name, want) in [
            ("listen_addresses", ""),
            ("unix_socket_permissions", "0700"),
        ] {
            let v: String = client
                .query_one("SELECT current_setting($1)", &[&name])
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, want, "{name}");
        }
    }
    assert!(terminate(child).await.success());
    assert!(
        dir.join("pg/PG_VERSION").is_file(),
        "cluster created in the data dir"
    );
    assert!(
        !dir.join("pg/postmaster.pid").exists(),
        "the embedded cluster is stopped at shutdown"
    );

    // A second start reuses the cluster and its data.
    let (child, mut c) = serve_embedded(&dir).await;
    assert_eq!(read_all(&mut c).await.len(), 1);
    assert!(terminate(child).await.success());
    let _ = std::fs::remove_dir_all(&dir);
}
