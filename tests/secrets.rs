//! Secrets stay secret: a database password passed through `--database-url-file` (or
//! `PGPASSWORD`) is on neither the command line nor in the logs, at any log level; bearer tokens
//! are not logged either; a password given on the command line draws a warning.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

const PASSWORD: &str = "pw-Zq8x-not-for-logs";
const TOKEN: &str = "token-Kf3v-not-for-logs-0123";

/// Runs `pgstore serve` with `args` and `env` at the most verbose log level, makes a few calls
/// (one with a wrong token), stops it and returns everything it printed.
async fn run_and_capture(args: &[String], env: &[(&str, String)]) -> String {
    let port = free_port();
    let out_path = std::env::temp_dir().join(unique("pgstore-secrets-log"));
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgstore"))
        .arg("serve")
        .args(args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("PGSTORE_LOG__LEVEL", "trace")
        .env("PGSTORE_AUTH__TOKENS", TOKEN)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let channel = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(ch) =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                    .unwrap()
                    .connect()
                    .await
                && health_status(ch.clone(), pgstore::server::SERVICE_NAME).await
                    == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
            {
                break ch;
            }
            assert!(Instant::now() < deadline, "pgstore did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    for token in [TOKEN, "wrong-token-0123456789"] {
        let mut c = with_token(channel.clone(), token);
        let _ = c
            .append(append("secret", None, vec![json_event("E", "{}")]))
            .await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let log = std::fs::read_to_string(&out_path).unwrap();
    let _ = std::fs::remove_file(&out_path);
    assert!(log.contains("pgstore serving"), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_tokens_never_reach_the_logs() {
    let url = fresh_db().await;
    let role = unique("secret_role");
    let db = url.rsplit('/').next().unwrap().to_owned();
    shared()
        .sql(
            &db,
            &format!("CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PASSWORD}'"),
        )
        .await;
    // This role must really log in with its password (scram), whatever the rest of the cluster
    // trusts.
    let hba = shared().cluster.data.join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all {role} 127.0.0.1/32 scram-sha-256\n{rest}"),
    )
    .unwrap();
    shared().sql(&db, "SELECT pg_reload_conf()").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let wrong = url.replacen(
        "postgres://postgres@",
        &format!("postgres://{role}:wrong@"),
        1,
    );
    let mut config = test_config(&wrong);
    config.database.startup_permanent_failures = 1;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = pgstore::server::run(listener, config, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("password authentication failed"), "{err}");

    let with_password = url.replacen(
        "postgres://postgres@",
        &format!("postgres://{role}:{PASSWORD}@"),
        1,
    );

    // From a file: the command line holds only the file's name.
    let file = std::env::temp_dir().join(unique("pgstore-url"));
    std::fs::write(&file, format!("{with_password}\n")).unwrap();
    let log = run_and_capture(
        &["--database-url-file".into(), file.display().to_string()],
        &[],
    )
    .await;
    assert!(!log.contains(PASSWORD), "password in the logs");
    assert!(!log.contains(TOKEN), "token in the logs");

    // From PGPASSWORD, with a URL without one.
    let without = url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let log = run_and_capture(
        &[],
        &[
            ("PGSTORE_DATABASE_URL", without),
            ("PGPASSWORD", PASSWORD.into()),
        ],
    )
    .await;
    assert!(!log.contains(PASSWORD), "password in the logs");

    // On the command line it works, with a warning, and is still not logged.
    let log = run_and_capture(&["--database-url".into(), with_password], &[]).await;
    assert!(log.contains("process list"), "no warning: {log}");
    assert!(!log.contains(PASSWORD), "password in the logs");
    let _ = std::fs::remove_file(&file);
}
