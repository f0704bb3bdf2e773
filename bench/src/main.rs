//! `pgstore-bench`: drives a running pgstore through its gRPC API and, in the same run against the
//! same database, the raw-PostgreSQL equivalent of each scenario, and prints pgstore / raw ratios.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

mod dcb;
mod growth;
mod multi;

use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use pgstore::proto::{self, event_store_client::EventStoreClient};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

#[derive(Parser)]
#[command(
    name = "pgstore-bench",
    about = "Benchmarks pgstore against raw PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N clients append, each waiting for its answer before the next append.
    Append(AppendArgs),
    /// Catch-up of the whole log through ReadFrom paging and through Subscribe from 0.
    Read(ReadArgs),
    /// S live subscribers while appends arrive at a fixed rate: delivery latency.
    Live(LiveArgs),
    /// K idle subscriptions held open: server memory per subscriber.
    Idle(IdleArgs),
    /// Load events through the API until the log holds N.
    Fill(growth::FillArgs),
    /// Fill the log to each size in turn; at each, measure appends, catch-up reads and disk.
    Growth(growth::GrowthArgs),
    /// Conditional (Dynamic Consistency Boundary) appends against unconditional ones, and a
    /// contended decision on one tag.
    Dcb(dcb::DcbArgs),
    /// Appends of one event to each of K streams in one MultiStreamAppend, against the same
    /// events to one stream in one Append.
    Multi(multi::MultiArgs),
}

#[derive(Args, Clone)]
struct ReadArgs {
    #[command(flatten)]
    common: Common,
    /// Make sure the log holds at least this many events first (appending the rest).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Page size of ReadFrom / the raw keyset query.
    #[arg(long, default_value_t = 1000)]
    page: u32,
    /// Payload size per loaded event, in bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
}

#[derive(Args, Clone)]
struct LiveArgs {
    #[command(flatten)]
    common: Common,
    /// Live subscribers.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Appends per second (1 event each), spread over the writers.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Concurrent writers pacing the appends.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// The pgstore server's process id: its CPU time (from /proc) is reported per delivery.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Args, Clone)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Idle subscriptions to open.
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// The pgstore server's process id (its RSS is read from /proc).
    #[arg(long)]
    server_pid: u32,
    /// Subscriptions per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    per_connection: usize,
}

#[derive(Args, Clone)]
struct Common {
    /// pgstore's address (`https://...` for TLS).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// CA certificate (PEM) to verify pgstore's TLS certificate with.
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,
    /// Bearer token sent with every call.
    #[arg(long, env = "PGSTORE_BENCH_TOKEN")]
    token: Option<String>,
    /// The database pgstore uses, for the raw baselines (skipped without it).
    #[arg(long, env = "PGSTORE_DATABASE_URL")]
    database_url: Option<String>,
    /// How long each measurement runs.
    #[arg(long, default_value = "10s", value_parser = humantime_parse)]
    duration: Duration,
    /// Warm-up before each measurement (not counted).
    #[arg(long, default_value = "1s", value_parser = humantime_parse)]
    warmup: Duration,
}

#[derive(Args, Clone)]
struct AppendArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent clients (each with its own connection).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Events per append.
    #[arg(long, default_value_t = 1)]
    events_per_append: usize,
    /// Payload size per event, in bytes (a JSON string of that length).
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Streams shared by the clients (0 = one stream per client).
    #[arg(long, default_value_t = 0)]
    streams: usize,
    /// Split each measurement into this many slices and run the slices of pgstore, the gRPC
    /// floor and the raw baselines in turn, so that a drift of the machine during the run falls
    /// on all of them alike. Each slice has its own warm-up.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// One benchmark operation in flight.
type OpFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Makes worker `w`'s operation for one measurement (called again for every slice of it).
type OpFactory<'a> = Box<dyn FnMut(usize) -> Box<dyn FnMut() -> OpFuture + Send> + 'a>;

/// A latency histogram in microseconds, up to a minute.
/// A JSON string of `bytes` bytes (quotes included): the payload of every benchmark event.
fn json_payload(bytes: usize) -> String {
    format!("\"{}\"", "x".repeat(bytes.saturating_sub(2)))
}

/// A 100-byte JSON event of type `event_type`.
fn bench_event(event_type: &str) -> proto::EventData {
    proto::EventData {
        event_type: event_type.into(),
        payload: Some(proto::event_data::Payload::Json(json_payload(100))),
        ..Default::default()
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// What one measurement produced.
struct Stats {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Stats {
    fn empty() -> Self {
        Stats {
            ops: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latency: histogram(),
        }
    }
    /// Adds another slice of the same measurement.
    fn merge(&mut self, other: Stats) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latency.add(&other.latency).unwrap();
    }
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Runs `workers` copies of `op` in a loop for warm-up + duration; counts and times each call
/// after the warm-up.
async fn drive<F, Fut>(label: &str, workers: usize, common: &Common, mut make: F) -> Stats
where
    F: FnMut(usize) -> Box<dyn FnMut() -> Fut + Send>,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut op = make(w);
        let (measuring, done, count) = (measuring.clone(), done.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            let mut last_error = None;
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = op().await;
                if measuring.load(Ordering::Relaxed) && !done.load(Ordering::Relaxed) {
                    match r {
                        Ok(()) => {
                            h.saturating_record(t.elapsed().as_micros() as u64);
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors += 1;
                            last_error = Some(e);
                        }
                    }
                }
            }
            (h, errors, last_error)
        }));
    }
    tokio::time::sleep(common.warmup).await;
    measuring.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let progress = {
        let (count, done) = (count.clone(), done.clone());
        let label = label.to_owned();
        let total = common.duration;
        tokio::spawn(async move {
            let mut last = 0;
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = count.load(Ordering::Relaxed);
                eprint!(
                    "\r  {label:<24} {:>5.1}s/{:.0}s  {:>9} ops/s   ",
                    start.elapsed().as_secs_f64(),
                    total.as_secs_f64(),
                    now - last
                );
                last = now;
            }
            eprint!("\r{:80}\r", "");
        })
    };
    tokio::time::sleep(common.duration).await;
    done.store(true, Ordering::SeqCst);
    let elapsed = start.elapsed();
    let mut latency = histogram();
    let mut errors = 0;
    for t in tasks {
        let (h, e, last) = t.await.unwrap();
        latency.add(&h).unwrap();
        errors += e;
        if let Some(last) = last {
            eprintln!("  {label}: error: {last}");
        }
    }
    let _ = progress.await;
    Stats {
        ops: latency.len(),
        errors,
        elapsed,
        latency,
    }
}

fn print_header() {
    println!(
        "{:<26} {:>11} {:>11} {:>9} {:>9} {:>9} {:>7}",
        "", "appends/s", "events/s", "p50 ms", "p99 ms", "p999 ms", "errors"
    );
}

fn print_row(label: &str, s: &Stats, events_per_op: usize) {
    println!(
        "{:<26} {:>11.0} {:>11.0} {:>9.3} {:>9.3} {:>9.3} {:>7}",
        label,
        s.rate(),
        s.rate() * events_per_op as f64,
        s.ms(0.5),
        s.ms(0.99),
        s.ms(0.999),
        s.errors
    );
}

async fn raw_client(url: &str) -> tokio_postgres::Client {
    let config = pgstore::config::parse_database_url(url).expect("database url");
    let (client, conn) = config.connect().await.expect("connect");
    tokio::spawn(conn);
    client
}

const RAW_SCHEMA: &str = "
    CREATE SCHEMA IF NOT EXISTS pgstore_bench;
    DROP TABLE IF EXISTS pgstore_bench.events;
    DROP TABLE IF EXISTS pgstore_bench.head;
    CREATE TABLE pgstore_bench.events (
        seq bigserial PRIMARY KEY,
        stream_id text NOT NULL,
        version bigint NOT NULL,
        event_id uuid NOT NULL,
        event_type text NOT NULL,
        data jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (stream_id, version)
    );
    CREATE UNIQUE INDEX ON pgstore_bench.events (event_id);
    CREATE TABLE pgstore_bench.head (id boolean PRIMARY KEY, seq bigint NOT NULL);
    -- Raw (b) numbers its rows from here, clear of raw (a)'s bigserial.
    INSERT INTO pgstore_bench.head VALUES (true, 1000000000000);";

/// A raw connection with the append statements prepared on it.
struct RawConn {
    client: tokio_postgres::Client,
    insert: tokio_postgres::Statement,
    insert_seq: tokio_postgres::Statement,
    lock: tokio_postgres::Statement,
    bump_head: tokio_postgres::Statement,
}

impl RawConn {
    async fn new(url: &str) -> RawConn {
        let client = raw_client(url).await;
        let prepare = |sql: &'static str| {
            let client = &client;
            async move { client.prepare(sql).await.expect("prepare") }
        };
        RawConn {
            insert: prepare(RAW_INSERT).await,
            insert_seq: prepare(RAW_INSERT_SEQ).await,
            lock: prepare("SELECT pg_advisory_xact_lock(7)").await,
            bump_head: prepare("UPDATE pgstore_bench.head SET seq = seq + $1 RETURNING seq").await,
            client,
        }
    }
}

const RAW_INSERT: &str = "INSERT INTO pgstore_bench.events (stream_id, version, event_id, event_type, data) \
     SELECT $1, v, e, 'BenchEvent', d::jsonb FROM unnest($2::bigint[], $3::uuid[], $4::text[]) AS t(v, e, d)";
const RAW_INSERT_SEQ: &str = "INSERT INTO pgstore_bench.events (seq, stream_id, version, event_id, event_type, data) \
     SELECT s, $1, v, e, 'BenchEvent', d::jsonb FROM unnest($2::bigint[], $3::bigint[], $4::uuid[], $5::text[]) AS t(s, v, e, d)";

/// One raw append of `n` events to `stream` after version `v0`: a single INSERT, or with `locked`
/// the same in a transaction behind the global lock and the head row.
async fn raw_append(
    raw: Arc<RawConn>,
    stream: String,
    v0: u64,
    n: usize,
    payload: String,
    locked: bool,
) -> Result<(), String> {
    let vs: Vec<i64> = (1..=n as i64).map(|k| v0 as i64 + k).collect();
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
    let data: Vec<String> = vec![payload; n];
    let c = &raw.client;
    let r: Result<(), tokio_postgres::Error> = async {
        if !locked {
            // One statement = one implicit transaction: one round trip.
            c.execute(&raw.insert, &[&stream, &vs, &ids, &data]).await?;
            return Ok(());
        }
        c.batch_execute("BEGIN").await?;
        c.execute(&raw.lock, &[]).await?;
        let row = c.query_one(&raw.bump_head, &[&(n as i64)]).await?;
        let last: i64 = row.get(0);
        let seqs: Vec<i64> = (last - n as i64 + 1..=last).collect();
        c.execute(&raw.insert_seq, &[&stream, &seqs, &vs, &ids, &data])
            .await?;
        c.batch_execute("COMMIT").await
    }
    .await;
    if r.is_err() && locked {
        // Leave the connection usable for the next call.
        let _ = c.batch_execute("ROLLBACK").await;
    }
    r.map_err(|e| match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    })
}

async fn append_scenario(a: AppendArgs) {
    let payload = json_payload(a.payload_bytes);
    let n = a.events_per_append;
    println!(
        "append: clients={} events/append={} payload={}B streams={} duration={:?} rounds={}",
        a.clients,
        n,
        a.payload_bytes,
        if a.streams == 0 {
            "one per client".to_string()
        } else {
            a.streams.to_string()
        },
        a.common.duration,
        a.rounds
    );
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let stream_of = {
        let streams = a.streams;
        let run_id = run_id.clone();
        move |w: usize, i: u64| {
            if streams == 0 {
                format!("bench-{}-{w}", &run_id[..8])
            } else {
                format!("bench-{}-{}", &run_id[..8], (w as u64 + i) % streams as u64)
            }
        }
    };

    // pgstore.
    let target = Target::new(&a.common);
    let clients = target.connect_many(a.clients).await;
    let events: Vec<proto::EventData> = (0..n)
        .map(|_| proto::EventData {
            event_type: "BenchEvent".into(),
            payload: Some(proto::event_data::Payload::Json(payload.clone())),
            ..Default::default()
        })
        .collect();
    let pg_op = |w: usize| -> Box<dyn FnMut() -> OpFuture + Send> {
        let client = clients[w].clone();
        let events = events.clone();
        let stream_of = stream_of.clone();
        let mut i = 0u64;
        Box::new(move || {
            let mut client = client.clone();
            i += 1;
            let req = proto::AppendRequest {
                stream_id: stream_of(w, i),
                expected_version: None,
                events: events.clone(),
                idempotency_key: String::new(),
                condition: None,
            };
            Box::pin(async move {
                client
                    .append(req)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.message().to_owned())
            })
        })
    };

    // The floor under any append: one gRPC call to the same server that does no work (the
    // standard health check), with the same clients. An append costs this plus a commit.
    let mut health = Vec::new();
    for _ in 0..a.clients {
        health.push(target.health().await);
    }
    let floor_op = |w: usize| -> Box<dyn FnMut() -> OpFuture + Send> {
        let client = health[w].clone();
        Box::new(move || {
            let mut client = client.clone();
            Box::pin(async move {
                client
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.message().to_owned())
            })
        })
    };
    // The raw baselines, if there is a database to run them against. Each connection prepares
    // its statements once, as a client that cares about latency does.
    let raw = match a.common.database_url.clone() {
        None => None,
        Some(url) => {
            raw_client(&url)
                .await
                .batch_execute(RAW_SCHEMA)
                .await
                .expect("bench schema");
            let mut raws = Vec::new();
            for _ in 0..a.clients {
                raws.push(Arc::new(RawConn::new(&url).await));
            }
            Some((url, raws))
        }
    };
    // Raw (a): one INSERT transaction per append, no ordering guarantee. Raw (b): the same behind
    // one global lock and a head row (the naive gap-free log). Each has streams of its own.
    let make_raw = |locked: bool, raws: &[Arc<RawConn>]| -> OpFactory<'static> {
        let raws = raws.to_vec();
        let payload = payload.clone();
        let run = format!("{run_id}-{}", if locked { "b" } else { "a" });
        // A stream's last version, kept across the rounds (each slice makes its ops anew).
        let versions: Arc<Vec<AtomicU64>> =
            Arc::new(raws.iter().map(|_| AtomicU64::new(0)).collect());
        Box::new(move |w: usize| -> Box<dyn FnMut() -> OpFuture + Send> {
            let raw = raws[w].clone();
            let payload = payload.clone();
            let versions = versions.clone();
            let stream = format!("raw-{run}-{w}");
            Box::new(move || {
                let v0 = versions[w].fetch_add(n as u64, Ordering::Relaxed);
                Box::pin(raw_append(
                    raw.clone(),
                    stream.clone(),
                    v0,
                    n,
                    payload.clone(),
                    locked,
                ))
            })
        })
    };

    // Every measurement, in the order the slices of a round run.
    let mut phases: Vec<(&str, Stats, OpFactory<'_>)> = vec![
        ("pgstore", Stats::empty(), Box::new(pg_op)),
        ("gRPC floor (health)", Stats::empty(), Box::new(floor_op)),
    ];
    if let Some((_, raws)) = &raw {
        phases.push(("raw (a) unordered", Stats::empty(), make_raw(false, raws)));
        phases.push(("raw (b) global lock", Stats::empty(), make_raw(true, raws)));
    }
    let rounds = a.rounds;
    let slice = Common {
        duration: a.common.duration / rounds,
        ..a.common.clone()
    };
    for r in 0..rounds {
        for (name, stats, op) in &mut phases {
            let label = if rounds == 1 {
                name.to_string()
            } else {
                format!("{name} {}/{rounds}", r + 1)
            };
            stats.merge(drive(&label, a.clients, &slice, op).await);
        }
    }
    let mut results = phases.into_iter().map(|(_, stats, _)| stats);
    let (pg, floor) = (results.next().unwrap(), results.next().unwrap());

    print_header();
    print_row("pgstore", &pg, n);
    let (Some((url, _)), Some(raw_a), Some(raw_b)) = (raw, results.next(), results.next()) else {
        print_row("gRPC floor (health)", &floor, 0);
        println!("(raw baselines skipped: pass --database-url)");
        return;
    };
    print_row("raw (a) insert per tx", &raw_a, n);
    print_row("raw (b) + global lock", &raw_b, n);
    print_row("gRPC floor (health)", &floor, 0);
    println!(
        "ratio pgstore/raw(a): {:.2}x   pgstore/raw(b): {:.2}x   p50 delta vs raw(a): {:+.3} ms \
         (gRPC floor p50 {:.3} ms)",
        pg.rate() / raw_a.rate(),
        pg.rate() / raw_b.rate(),
        pg.ms(0.5) - raw_a.ms(0.5),
        floor.ms(0.5)
    );
    let _ = raw_client(&url)
        .await
        .batch_execute("DROP SCHEMA pgstore_bench CASCADE")
        .await;
}

#[tokio::main]
async fn main() {
    match Cli::parse().scenario {
        Scenario::Append(a) => append_scenario(a).await,
        Scenario::Multi(a) => multi::multi_scenario(a).await,
        Scenario::Read(a) => read_scenario(a).await,
        Scenario::Live(a) => live_scenario(a).await,
        Scenario::Idle(a) => idle_scenario(a).await,
        Scenario::Fill(a) => growth::fill_scenario(a).await,
        Scenario::Growth(a) => growth::growth_scenario(a).await,
        Scenario::Dcb(a) => dcb::dcb_scenario(a).await,
    }
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone)]
struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

type Client = EventStoreClient<InterceptedService<Channel, BearerToken>>;

/// How to reach pgstore: its address, TLS and token.
#[derive(Clone)]
struct Target {
    endpoint: tonic::transport::Endpoint,
    token: BearerToken,
}

impl Target {
    fn new(common: &Common) -> Target {
        let mut endpoint =
            tonic::transport::Endpoint::from_shared(common.target.clone()).expect("--target");
        if common.target.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &common.ca_cert {
                let pem = std::fs::read(ca).expect("--ca-cert");
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).expect("TLS settings");
        }
        let token = common.token.as_ref().map(|t| {
            format!("Bearer {t}")
                .parse()
                .expect("--token: visible ASCII")
        });
        Target {
            endpoint,
            token: BearerToken(token),
        }
    }

    /// A new client on its own HTTP/2 connection.
    async fn connect(&self) -> Client {
        EventStoreClient::with_interceptor(self.channel().await, self.token.clone())
    }

    /// `n` clients, each on its own HTTP/2 connection.
    async fn connect_many(&self, n: usize) -> Vec<Client> {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(self.connect().await);
        }
        clients
    }

    /// A health client on its own HTTP/2 connection.
    async fn health(&self) -> HealthClient {
        tonic_health::pb::health_client::HealthClient::with_interceptor(
            self.channel().await,
            self.token.clone(),
        )
    }

    async fn channel(&self) -> Channel {
        self.endpoint.connect().await.expect("connect to pgstore")
    }
}

type HealthClient =
    tonic_health::pb::health_client::HealthClient<InterceptedService<Channel, BearerToken>>;

/// The log head.
async fn latest(target: &Target) -> u64 {
    target
        .connect()
        .await
        .latest_sequence(proto::LatestSequenceRequest::default())
        .await
        .expect("latest")
        .into_inner()
        .sequence
}

/// Appends until the log holds `events` events (100-event appends from 8 clients).
async fn ensure_log(target: &Target, events: u64, payload: &str) -> u64 {
    let mut c = target.connect().await;
    let head = c
        .latest_sequence(proto::LatestSequenceRequest::default())
        .await
        .expect("latest")
        .into_inner()
        .sequence;
    if head >= events {
        return head;
    }
    let missing = events - head;
    eprintln!("  loading {missing} events ...");
    let started = Instant::now();
    let per_client = missing.div_ceil(8).div_ceil(100);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        let payload = payload.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                let events = (0..100)
                    .map(|_| proto::EventData {
                        event_type: "BenchEvent".into(),
                        payload: Some(proto::event_data::Payload::Json(payload.clone())),
                        ..Default::default()
                    })
                    .collect();
                c.append(proto::AppendRequest {
                    stream_id: format!("load-{w}-{}", i % 1000),
                    expected_version: None,
                    events,
                    idempotency_key: String::new(),
                    condition: None,
                })
                .await
                .expect("load append");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let head = c
        .latest_sequence(proto::LatestSequenceRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sequence;
    eprintln!(
        "  loaded in {:.1}s ({:.0} events/s)",
        started.elapsed().as_secs_f64(),
        missing as f64 / started.elapsed().as_secs_f64()
    );
    head
}

async fn read_scenario(a: ReadArgs) {
    let payload = json_payload(a.payload_bytes);
    let target = Target::new(&a.common);
    let before = latest(&target).await;
    let head = ensure_log(&target, a.events, &payload).await;
    if head > before
        && let Some(url) = &a.common.database_url
    {
        // Statistics for the table just filled, as autovacuum would gather within a minute:
        // until then the server's cached plans were made for a small table.
        raw_client(url)
            .await
            .batch_execute("ANALYZE pgstore.events")
            .await
            .expect("analyze");
    }
    println!("read: catch-up of {head} events, page {}", a.page);
    let mut c = target
        .connect()
        .await
        .max_decoding_message_size(256 * 1024 * 1024);

    let read_from = growth::read_from_rate(&mut c, 1, head, a.page).await;
    let subscribe = growth::subscribe_rate(&mut c, 1).await;

    println!("{:<30} {:>12}", "", "events/s");
    println!("{:<30} {:>12.0}", "pgstore ReadFrom paging", read_from);
    println!("{:<30} {:>12.0}", "pgstore Subscribe from 0", subscribe);
    let Some(url) = a.common.database_url.clone() else {
        println!("(raw baseline skipped: pass --database-url)");
        return;
    };
    let raw = raw_client(&url).await;
    let stmt = raw
        .prepare(
            "SELECT seq, stream_id, version, event_id, event_type, content_type, data, data_bytes, \
             metadata, created_at, recorded_at, partition_key \
             FROM pgstore.events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .await
        .expect("prepare");
    let started = Instant::now();
    let mut last = 0i64;
    let mut k = 0u64;
    loop {
        let rows = raw
            .query(&stmt, &[&last, &i64::from(a.page)])
            .await
            .expect("keyset");
        let Some(row) = rows.last() else { break };
        last = row.get(0);
        for r in &rows {
            // Decode every column, as any client that uses the events must.
            std::hint::black_box(pgstore::store::read::event_from_row(r, 0).expect("decode"));
        }
        k += rows.len() as u64;
    }
    let keyset = k as f64 / started.elapsed().as_secs_f64();
    println!("{:<30} {:>12.0}", "raw keyset SELECT", keyset);
    println!(
        "ratio ReadFrom/raw: {:.2}x   Subscribe/raw: {:.2}x",
        read_from / keyset,
        subscribe / keyset
    );
}

async fn live_scenario(a: LiveArgs) {
    println!(
        "live: subscribers={} rate={} appends/s duration={:?}",
        a.subscribers, a.rate, a.common.duration
    );
    let target = Target::new(&a.common);
    let origin = Instant::now();
    // When each sequence's append was acknowledged (microseconds since `origin`, 0 = not yet),
    // indexed from the head at the start: written once per append, read once per delivery,
    // without a lock (a shared map behind a mutex cost the client more than the server's work).
    let base = latest(&target).await + 1;
    let slots = (a.rate as f64 * (a.common.duration.as_secs_f64() + 60.0) * 2.0) as usize;
    let acks: Arc<Vec<AtomicU64>> = Arc::new((0..slots).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..a.subscribers.div_ceil(50) {
        channels.push(target.connect().await);
    }
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(a.subscribers);
    for i in 0..a.subscribers {
        let mut c = channels[i / 50].clone();
        let (acks, done, delivered, ready) = (
            acks.clone(),
            done.clone(),
            delivered.clone(),
            ready_tx.clone(),
        );
        subs.push(tokio::spawn(async move {
            let mut from_ack = histogram();
            let mut from_send = histogram();
            let mut stream = subscribe_from_end(&mut c).await;
            while let Some(Ok(msg)) = tokio_stream::StreamExt::next(&mut stream).await {
                match msg.message {
                    Some(proto::subscribe_response::Message::CaughtUp(_)) => {
                        let _ = ready.send(()).await;
                    }
                    Some(proto::subscribe_response::Message::Event(e))
                        if e.event_type == "Done" =>
                    {
                        // The wake-up append after the run: not a delivery to count.
                        break;
                    }
                    Some(proto::subscribe_response::Message::Event(e)) => {
                        let now = Instant::now();
                        let sent_us: u64 = match &e.payload {
                            Some(proto::recorded_event::Payload::Json(s)) => s.parse().unwrap_or(0),
                            _ => 0,
                        };
                        let sent = origin + Duration::from_micros(sent_us);
                        from_send.saturating_record(
                            now.saturating_duration_since(sent).as_micros() as u64,
                        );
                        let acked = e
                            .global_sequence
                            .checked_sub(base)
                            .and_then(|i| acks.get(i as usize))
                            .map_or(0, |t| t.load(Ordering::Relaxed));
                        // Delivered before the writer even saw its answer: 0.
                        let now_us = now.saturating_duration_since(origin).as_micros() as u64;
                        let lat = if acked == 0 {
                            0
                        } else {
                            now_us.saturating_sub(acked)
                        };
                        from_ack.saturating_record(lat.max(1));
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                if done.load(Ordering::Relaxed) {
                    break;
                }
            }
            (from_ack, from_send)
        }));
    }
    drop(ready_tx);
    for _ in 0..a.subscribers {
        ready_rx.recv().await.expect("subscriber ready");
    }
    eprintln!("  {} subscribers live", a.subscribers);
    let writers = a.writers as u64;
    let per_writer = Duration::from_secs_f64(writers as f64 / a.rate as f64);
    let end = Instant::now() + a.common.duration;
    let appended = Arc::new(AtomicU64::new(0));
    let mut wtasks = Vec::new();
    for w in 0..writers {
        let mut c = target.connect().await;
        let (acks, appended) = (acks.clone(), appended.clone());
        wtasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_writer);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut i = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                let sent = origin.elapsed().as_micros() as u64;
                let r = c
                    .append(proto::AppendRequest {
                        stream_id: format!("live-{w}-{}", i % 100),
                        expected_version: None,
                        events: vec![proto::EventData {
                            event_type: "Tick".into(),
                            payload: Some(proto::event_data::Payload::Json(sent.to_string())),
                            ..Default::default()
                        }],
                        idempotency_key: String::new(),
                        condition: None,
                    })
                    .await
                    .expect("append")
                    .into_inner();
                if let Some(slot) = r
                    .last_sequence
                    .checked_sub(base)
                    .and_then(|i| acks.get(i as usize))
                {
                    slot.store(
                        origin.elapsed().as_micros().max(1) as u64,
                        Ordering::Relaxed,
                    );
                }
                appended.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let started = Instant::now();
    let cpu_before = a.server_pid.map(cpu_seconds);
    for t in wtasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let want = appended.load(Ordering::Relaxed) * a.subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server_cpu = a
        .server_pid
        .zip(cpu_before)
        .map(|(pid, before)| cpu_seconds(pid) - before);
    done.store(true, Ordering::SeqCst);
    // One more append wakes every subscriber so it sees `done`.
    let mut c = target.connect().await;
    let _ = c
        .append(proto::AppendRequest {
            stream_id: "live-done".into(),
            expected_version: None,
            events: vec![proto::EventData {
                event_type: "Done".into(),
                payload: Some(proto::event_data::Payload::Json("0".into())),
                ..Default::default()
            }],
            idempotency_key: String::new(),
            condition: None,
        })
        .await;
    let mut from_ack = histogram();
    let mut from_send = histogram();
    for s in subs {
        if let Ok(Ok((h1, h2))) = tokio::time::timeout(Duration::from_secs(5), s).await {
            from_ack.add(&h1).unwrap();
            from_send.add(&h2).unwrap();
        }
    }
    let appended = appended.load(Ordering::Relaxed);
    let got = delivered.load(Ordering::Relaxed);
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "appended {appended} ({:.0}/s), delivered {got} of {want} ({:.0} deliveries/s)",
        appended as f64 / elapsed.as_secs_f64(),
        got as f64 / elapsed.as_secs_f64()
    );
    if let Some(cpu) = server_cpu {
        println!(
            "server CPU {cpu:.2} s = {:.2} us per delivery ({:.2} cores while appending)",
            cpu * 1e6 / got.max(1) as f64,
            cpu / elapsed.as_secs_f64()
        );
    }
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p99 ms", "p999 ms"
    );
    for (label, h) in [
        ("acknowledged -> delivered", &from_ack),
        ("sent -> delivered", &from_send),
    ] {
        println!(
            "{label:<34} {:>9.3} {:>9.3} {:>9.3}",
            q(h, 0.5),
            q(h, 0.99),
            q(h, 0.999)
        );
    }
}

/// A subscription that delivers only what is committed from now on.
async fn subscribe_from_end(c: &mut Client) -> tonic::Streaming<proto::SubscribeResponse> {
    c.subscribe(proto::SubscribeRequest {
        start: Some(proto::subscribe_request::Start::FromEnd(true)),
        ..Default::default()
    })
    .await
    .expect("subscribe")
    .into_inner()
}

/// A process's CPU time (user + system) so far, in seconds, from /proc (0 when unreadable).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at its closing ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // Clock ticks per second: 100 on Linux.
    ticks as f64 / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn idle_scenario(a: IdleArgs) {
    println!(
        "idle: {} subscriptions, {} per connection",
        a.subscribers, a.per_connection
    );
    let before = rss_kib(a.server_pid);
    let target = Target::new(&a.common);
    let mut channels = Vec::new();
    for _ in 0..a.subscribers.div_ceil(a.per_connection) {
        channels.push(target.connect().await);
    }
    let mut streams = Vec::with_capacity(a.subscribers);
    for i in 0..a.subscribers {
        let mut c = channels[i / a.per_connection].clone();
        let mut s = subscribe_from_end(&mut c).await;
        // Wait for the caught-up marker: the subscription is then idle.
        while let Some(Ok(m)) = tokio_stream::StreamExt::next(&mut s).await {
            if let Some(proto::subscribe_response::Message::CaughtUp(_)) = m.message {
                break;
            }
        }
        streams.push(s);
        if (i + 1) % 1000 == 0 {
            eprint!("\r  {} open   ", i + 1);
        }
    }
    eprintln!();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(a.server_pid);
    let per = (after.saturating_sub(before)) as f64 / a.subscribers as f64;
    println!(
        "server RSS {before} KiB -> {after} KiB: {per:.2} KiB per idle subscriber ({} connections)",
        channels.len()
    );
    drop(streams);
}
