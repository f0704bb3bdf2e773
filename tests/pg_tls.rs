//! TLS to PostgreSQL: a cluster that accepts TLS connections only (`hostssl`, a CA made here),
//! reached with libpq's `sslmode` semantics. `require` and `verify-full` work on every connection
//! pgstore makes (pool, writer, listener, health); a wrong CA, a host name the certificate does
//! not name, or no TLS at all stop startup with an error that names the server and the reason.

mod common;

use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use common::*;
use pgstore::{config::Config, embedded::Cluster, proto};

/// A cluster on 127.0.0.1 that takes TLS only, with a certificate for `localhost` signed by `ca`.
fn tls_only_cluster(ca: &TestCa) -> PgCluster {
    let root = std::env::temp_dir().join(unique("pgstore-pgtls"));
    let cluster = Cluster::in_dir(&root, free_port(), true).expect("PostgreSQL binaries");
    cluster.init().expect("initdb");
    let (cert, key) = ca.issue("localhost");
    std::fs::write(cluster.data.join("server.crt"), cert).unwrap();
    let key_path = cluster.data.join("server.key");
    std::fs::write(&key_path, key).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        cluster.data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    cluster.own(&cluster.data).unwrap();
    let mut settings = FAST.to_vec();
    settings.extend([
        ("ssl", "on"),
        ("ssl_cert_file", "server.crt"),
        ("ssl_key_file", "server.key"),
    ]);
    cluster.start(&settings).expect("start TLS cluster");
    PgCluster { cluster, root }
}

fn write_ca(ca: &TestCa) -> PathBuf {
    let path = std::env::temp_dir()
        .join(unique("pgstore-ca"))
        .with_extension("pem");
    std::fs::write(&path, ca.cert.pem()).unwrap();
    path
}

/// Runs pgstore with `url` until it gives up; returns its error (it must not start).
async fn refused(url: String) -> String {
    let mut config: Config = test_config(&url);
    config.database.startup_permanent_failures = 2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        pgstore::server::run(listener, config, std::future::pending()),
    )
    .await
    .expect("startup must give up, not retry forever");
    r.expect_err("pgstore must not start").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_postgres_with_require_and_verify_full() {
    let ca = TestCa::new("pgstore test PostgreSQL CA");
    let pg = tls_only_cluster(&ca);
    let ca_file = write_ca(&ca);
    let port = pg.cluster.port;
    let db = {
        let url = pg.create_db().await;
        url.rsplit('/').next().unwrap().to_owned()
    };

    for url in [
        format!("postgres://postgres@127.0.0.1:{port}/{db}?sslmode=require"),
        format!(
            "host=localhost port={port} user=postgres dbname={db} sslmode=verify-full sslrootcert={}",
            ca_file.display()
        ),
        // verify-ca checks the chain, not the name (the certificate names localhost only).
        format!(
            "postgres://postgres@127.0.0.1:{port}/{db}?sslmode=verify-ca&sslrootcert={}",
            ca_file.display()
        ),
    ] {
        let server = Server::fresh_on(&url).await;
        let mut c = server.client().await;
        let stream = unique("tls-pg");
        c.append(append(&stream, None, vec![json_event("E", "{}")]))
            .await
            .unwrap_or_else(|e| panic!("append over {url}: {e:?}"));
        let page = c
            .load(proto::LoadRequest {
                stream_id: stream,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.events.len(), 1);
        // Every connection pgstore holds is encrypted (the cluster would refuse others anyway).
        let admin = pg_client(&pg.cluster, "postgres").await;
        let row = admin
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'pgstore%' AND a.pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        let (all, tls): (i64, i64) = (row.get(0), row.get(1));
        assert!(all >= 3, "pool, writer, listener and health connect: {all}");
        assert_eq!(all, tls, "every pgstore connection uses TLS");
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_verification_names_the_server_and_the_reason() {
    let ca = TestCa::new("pgstore test PostgreSQL CA");
    let pg = tls_only_cluster(&ca);
    let port = pg.cluster.port;
    let db = {
        let url = pg.create_db().await;
        url.rsplit('/').next().unwrap().to_owned()
    };

    // A CA that did not sign the server's certificate.
    let stranger = write_ca(&TestCa::new("another CA"));
    let err = refused(format!(
        "postgres://postgres@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={}",
        stranger.display()
    ))
    .await;
    assert!(err.contains(&format!("localhost:{port}")), "{err}");
    assert!(err.contains("TLS"), "{err}");
    assert!(err.to_lowercase().contains("issuer"), "{err}");

    // The right CA, but a host name the certificate does not name.
    let ca_file = write_ca(&ca);
    let err = refused(format!(
        "postgres://postgres@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    ))
    .await;
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.to_lowercase().contains("not valid for name"), "{err}");

    // No TLS at all: pg_hba refuses the session, which is reported as such.
    let err = refused(format!(
        "postgres://postgres@127.0.0.1:{port}/{db}?sslmode=disable"
    ))
    .await;
    assert!(err.contains("authentication failed"), "{err}");
    assert!(err.contains("pg_hba.conf"), "{err}");
}
