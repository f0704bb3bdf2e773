//! Test harness: throwaway PostgreSQL clusters (initdb/pg_ctl from the machine's PostgreSQL; as
//! root they run as the `postgres` user), a fresh database per test, pgstore in-process on
//! 127.0.0.1:0 (or as a real process), and generated gRPC clients.

#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use pgstore::{
    config::Config,
    embedded::Cluster,
    proto::{self, event_store_client::EventStoreClient},
};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pgstore::proto::subscribe_response::Message;
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

pub type Client = EventStoreClient<Channel>;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name for this process.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings that make test clusters fast. Never used by benchmarks or defaults.
pub const FAST: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "400"),
    ("shared_buffers", "64MB"),
];

/// A PostgreSQL cluster of its own, stopped and removed on drop.
pub struct PgCluster {
    pub cluster: Cluster,
    pub root: PathBuf,
}

impl PgCluster {
    /// Creates and starts a cluster on a free port, listening on 127.0.0.1.
    pub fn start(settings: &[(&str, &str)]) -> PgCluster {
        let root = std::env::temp_dir().join(unique("pgstore-test"));
        let _ = std::fs::remove_dir_all(&root);
        let cluster = Cluster::in_dir(&root, free_port(), true).expect("PostgreSQL binaries");
        cluster.init().expect("initdb");
        cluster.start(settings).expect("pg_ctl start");
        PgCluster { cluster, root }
    }

    /// Creates and starts a streaming replica of this cluster (pg_basebackup -R).
    pub fn replica(&self, settings: &[(&str, &str)]) -> PgCluster {
        let root = std::env::temp_dir().join(unique("pgstore-replica"));
        let _ = std::fs::remove_dir_all(&root);
        let cluster = Cluster::in_dir(&root, free_port(), true).expect("PostgreSQL binaries");
        cluster
            .basebackup_from(&self.cluster)
            .expect("pg_basebackup");
        cluster.start(settings).expect("start replica");
        PgCluster { cluster, root }
    }

    /// Runs SQL on database `db` of this cluster.
    pub async fn sql(&self, db: &str, sql: &str) {
        pg_client(&self.cluster, db)
            .await
            .batch_execute(sql)
            .await
            .expect("sql");
    }

    /// A libpq URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        self.cluster.url(db)
    }

    /// Creates a fresh database and returns its URL.
    pub async fn create_db(&self) -> String {
        let db = unique("t");
        pg_client(&self.cluster, "postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
        self.url(&db)
    }

    pub fn stop(&self, mode: &str) {
        self.cluster.stop(mode).expect("pg_ctl stop");
    }

    pub fn restart(&self, settings: &[(&str, &str)]) {
        self.cluster.start(settings).expect("pg_ctl start");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.cluster.is_running() {
            let _ = self.cluster.stop("immediate");
        }
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.cluster.socket_dir);
    }
}

/// A superuser connection to database `db` of `cluster` (over its socket), driven on its own
/// task.
pub async fn pg_client(cluster: &Cluster, db: &str) -> tokio_postgres::Client {
    let (client, conn) = cluster
        .config(db)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(conn);
    client
}

/// An EventStore client on `channel` whose calls carry `authorization: Bearer <token>`.
pub fn with_token(
    channel: Channel,
    token: &'static str,
) -> EventStoreClient<
    tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>,
> {
    EventStoreClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        let value = format!("Bearer {token}").parse().expect("ascii token");
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    })
}

/// The cluster shared by the tests of one test binary (each test makes its own database). It is
/// stopped by a watchdog when the test process exits.
pub fn shared() -> &'static PgCluster {
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        let pg = PgCluster::start(FAST);
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop}; rm -rf {root}",
            pid = std::process::id(),
            stop = if pg.cluster.as_postgres {
                format!(
                    "runuser -u postgres -- {} -D {} -m immediate stop",
                    pg.cluster.bindir.join("pg_ctl").display(),
                    pg.cluster.data.display()
                )
            } else {
                format!(
                    "{} -D {} -m immediate stop",
                    pg.cluster.bindir.join("pg_ctl").display(),
                    pg.cluster.data.display()
                )
            },
            root = pg.root.display(),
        );
        // The watchdog must outlive this process: it is never waited for on purpose.
        #[allow(clippy::zombie_processes)]
        std::process::Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn watchdog");
        pg
    })
}

/// A fresh database on the shared cluster.
pub async fn fresh_db() -> String {
    shared().create_db().await
}

/// A configuration for tests: the given database, quick health checks and timeouts.
pub fn test_config(url: &str) -> Config {
    let mut c = Config {
        database_url: Some(url.to_owned()),
        ..Config::default()
    };
    c.server.health_interval = Duration::from_millis(200);
    c.server.shutdown_grace = Duration::from_secs(5);
    c.database.connect_timeout = Duration::from_secs(2);
    c.log.level = "warn".into();
    c
}

/// pgstore running in-process.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<pgstore::Result<()>>>,
}

impl Server {
    /// Starts pgstore on 127.0.0.1:0 with `config`; returns once it accepts calls.
    pub async fn start(config: Config) -> Server {
        let server = Server::spawn(config).await;
        server.wait_ready().await;
        server
    }

    /// Starts pgstore without waiting for it to answer (for servers a plaintext client cannot
    /// reach, e.g. with TLS).
    pub async fn spawn(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pgstore::server::run(listener, config, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts pgstore on a fresh database of the shared cluster.
    pub async fn fresh() -> Server {
        Server::start(test_config(&fresh_db().await)).await
    }

    /// Starts pgstore on the given database with the test configuration.
    pub async fn fresh_on(url: &str) -> Server {
        Server::start(test_config(url)).await
    }

    async fn wait_ready(&self) {
        for _ in 0..400 {
            // Health is open (no token needed) and turns SERVING once the store is open.
            if let Ok(channel) =
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
                    .unwrap()
                    .connect()
                    .await
                && health_status(channel, pgstore::server::SERVICE_NAME).await
                    == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("pgstore did not become ready on {}", self.addr);
    }

    async fn try_client(&self) -> Result<Client, tonic::transport::Error> {
        Ok(EventStoreClient::connect(format!("http://{}", self.addr))
            .await?
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024))
    }

    /// A new client (its own HTTP/2 connection).
    pub async fn client(&self) -> Client {
        self.try_client().await.expect("connect to pgstore")
    }

    /// A channel to the server, for the other services (health, reflection).
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Shuts down gracefully and returns what `run` returned.
    pub async fn shutdown(mut self) -> pgstore::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A JSON event.
pub fn json_event(event_type: &str, json: &str) -> proto::EventData {
    proto::EventData {
        event_type: event_type.into(),
        payload: Some(proto::event_data::Payload::Json(json.into())),
        ..Default::default()
    }
}

/// An append request.
pub fn append(
    stream: &str,
    expected: Option<proto::append_request::ExpectedVersion>,
    events: Vec<proto::EventData>,
) -> proto::AppendRequest {
    proto::AppendRequest {
        stream_id: stream.into(),
        expected_version: expected,
        events,
        idempotency_key: String::new(),
        condition: None,
    }
}

/// `exact(v)` expected version.
pub fn exact(v: u64) -> Option<proto::append_request::ExpectedVersion> {
    Some(proto::append_request::ExpectedVersion::Exact(v))
}

/// Reads the whole global log.
pub async fn read_all(client: &mut Client) -> Vec<proto::RecordedEvent> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = client
            .read_from(proto::ReadFromRequest {
                from_sequence: from,
                limit: 5000,
                ..Default::default()
            })
            .await
            .expect("read_from")
            .into_inner();
        out.extend(page.events);
        from = page.next_sequence;
        // Past the head: everything was read (an empty page below it is not the end).
        if from > page.head {
            return out;
        }
    }
}

/// The JSON text of a recorded event, parsed.
pub fn json_of(e: &proto::RecordedEvent) -> serde_json::Value {
    match &e.payload {
        Some(proto::recorded_event::Payload::Json(s)) => serde_json::from_str(s).unwrap(),
        other => panic!("not a JSON payload: {other:?}"),
    }
}

/// A pgstore process (the real binary), killed when dropped so a failing test leaves nothing
/// running.
pub struct Process {
    pub child: std::process::Child,
    pub port: u16,
}

impl Process {
    /// Starts `pgstore serve` on a free port with `args` and `env`; output goes nowhere.
    pub fn spawn(args: &[&str], env: &[(&str, String)]) -> Process {
        let port = free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgstore"));
        cmd.arg("serve")
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("PGSTORE_LOG__LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Process {
            child: cmd.spawn().expect("start pgstore"),
            port,
        }
    }

    /// A client, once the process answers.
    pub async fn client(&self) -> Client {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) =
                EventStoreClient::connect(format!("http://127.0.0.1:{}", self.port)).await
                && c.latest_sequence(proto::LatestSequenceRequest::default())
                    .await
                    .is_ok()
            {
                return c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pgstore did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Consumer group members

/// Partitions of the groups the tests make.
pub const GROUP_PARTITIONS: u32 = 8;

/// What one member saw, in order.
#[derive(Default, Debug)]
pub struct Log {
    /// (assignment epoch, stream, version, sequence)
    pub events: Vec<(usize, String, u64, u64)>,
    /// The partitions after each assignment message.
    pub assignments: Vec<Vec<u32>>,
}

pub type Shared = Arc<Mutex<Log>>;

/// Runs a member: records what it gets and checkpoints each partition after each event.
pub fn member(mut c: Client, name: &str) -> (Shared, tokio::task::JoinHandle<()>) {
    let log: Shared = Arc::default();
    let req = proto::SubscribeRequest {
        group: "billing".into(),
        member: name.into(),
        ..Default::default()
    };
    let task = {
        let log = log.clone();
        tokio::spawn(async move {
            let Ok(resp) = c.subscribe(req).await else {
                return;
            };
            let mut stream = resp.into_inner();
            while let Some(Ok(msg)) = stream.next().await {
                match msg.message {
                    Some(Message::Assignment(a)) => {
                        assert_eq!(a.partition_count, GROUP_PARTITIONS);
                        log.lock().unwrap().assignments.push(a.partitions);
                    }
                    Some(Message::Event(e)) => {
                        assert_eq!(e.partition, e.partition_key % GROUP_PARTITIONS);
                        {
                            let mut l = log.lock().unwrap();
                            let epoch = l.assignments.len();
                            assert!(
                                l.assignments
                                    .last()
                                    .is_some_and(|p| p.contains(&e.partition)),
                                "delivered an event of a partition not owned"
                            );
                            l.events.push((
                                epoch,
                                e.stream_id.clone(),
                                e.version,
                                e.global_sequence,
                            ));
                        }
                        if c.save_checkpoint(proto::SaveCheckpointRequest {
                            consumer_id: format!("billing/{}", e.partition),
                            sequence: e.global_sequence,
                        })
                        .await
                        .is_err()
                        {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        })
    };
    (log, task)
}

pub fn owned(log: &Shared) -> Vec<u32> {
    log.lock()
        .unwrap()
        .assignments
        .last()
        .cloned()
        .unwrap_or_default()
}

pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    started.elapsed()
}

/// The distinct global sequences the given members processed.
pub fn processed(members: &[&Shared]) -> std::collections::BTreeSet<u64> {
    members
        .iter()
        .flat_map(|m| {
            m.lock()
                .unwrap()
                .events
                .iter()
                .map(|e| e.3)
                .collect::<Vec<_>>()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// A metric's value from pgstore's `/metrics` on `port` (-1 when absent).
pub async fn metric(port: u16, name: &str) -> i64 {
    metrics_text(port)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map_or(-1, |v| v.trim().parse::<f64>().unwrap() as i64)
}

/// The whole `/metrics` exposition.
pub async fn metrics_text(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// Waits (up to 20 s) until a metric has a value.
pub async fn wait_metric(port: u16, name: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric(port, name).await;
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Appends `n` one-event appends, round robin over streams `{prefix}-0` .. `{prefix}-{streams-1}`;
/// returns the last global sequence written.
pub async fn append_many(c: &mut Client, n: usize, prefix: &str, streams: usize) -> u64 {
    let mut last = 0;
    for i in 0..n {
        last = c
            .append(append(
                &format!("{prefix}-{}", i % streams),
                None,
                vec![json_event("E", "{}")],
            ))
            .await
            .expect("append")
            .into_inner()
            .last_sequence;
    }
    last
}

// ---------------------------------------------------------------------------------------------
// Health

/// The health status of `service` ("" = the server), or None when the call fails.
pub async fn health_status(channel: Channel, service: &str) -> Option<i32> {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// Waits (up to 15 s) until `service` reports `want`.
pub async fn wait_health(
    channel: &Channel,
    service: &str,
    want: tonic_health::pb::health_check_response::ServingStatus,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = health_status(channel.clone(), service).await;
        if now == Some(want as i32) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health of {service:?} never became {want:?} (is {now:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen processes

/// The postmaster's pid and its children's (every backend and auxiliary process).
pub fn postgres_pids(pg: &PgCluster) -> Vec<u32> {
    let pidfile =
        std::fs::read_to_string(pg.cluster.data.join("postmaster.pid")).expect("postmaster.pid");
    let postmaster: u32 = pidfile.lines().next().unwrap().trim().parse().unwrap();
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

/// Sends `signal` (e.g. "STOP", "CONT") to the processes.
pub fn signal(pids: &[u32], signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(|p| p.to_string()))
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pids:?}");
}

/// Freezes a whole PostgreSQL cluster (SIGSTOP to every process) until dropped or thawed.
pub struct Frozen {
    pids: Vec<u32>,
}

impl Frozen {
    pub fn freeze(pg: &PgCluster) -> Frozen {
        let pids = postgres_pids(pg);
        signal(&pids, "STOP");
        Frozen { pids }
    }

    pub fn thaw(mut self) {
        signal(&self.pids, "CONT");
        self.pids.clear();
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.pids.is_empty() {
            let _ = std::process::Command::new("kill")
                .arg("-CONT")
                .args(self.pids.iter().map(|p| p.to_string()))
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A CA, and certificates it signs.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// (certificate PEM, key PEM) for `name`.
    pub fn issue(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}
