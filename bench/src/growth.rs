//! `fill` and `growth`: how pgstore behaves as the log grows. `fill` loads events through the API
//! as fast as it takes them; `growth` fills the log to each size in turn and, at each, measures
//! appends, catch-up reads (Load, ReadFrom, Subscribe) and the disk the events take.

use std::time::{Duration, Instant};

use clap::Args;
use pgstore::proto;

use super::{Common, OpFuture, Target, drive, ensure_log, json_payload, raw_client};

#[derive(Args, Clone)]
pub struct FillArgs {
    #[command(flatten)]
    pub common: Common,
    /// Make sure the log holds at least this many events (appending the rest).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Payload size per event, in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
}

#[derive(Args, Clone)]
pub struct GrowthArgs {
    #[command(flatten)]
    pub common: Common,
    /// Log sizes to measure at, in increasing order (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    pub sizes: Vec<u64>,
    /// Payload size per event, in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Concurrent clients of the append measurement (1 event per append).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Events read by each catch-up measurement (the newest ones).
    #[arg(long, default_value_t = 1_000_000)]
    pub catch_up: u64,
}

pub async fn fill_scenario(a: FillArgs) {
    let target = Target::new(&a.common);
    let started = Instant::now();
    let head = ensure_log(&target, a.events, &json_payload(a.payload_bytes)).await;
    println!(
        "fill: the log holds {head} events ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
}

/// One size's measurements.
struct Row {
    size: u64,
    appends: f64,
    p99_ms: f64,
    load: f64,
    read_from: f64,
    subscribe: f64,
    bytes_per_event: f64,
    table_mb: f64,
    indexes: Vec<(String, f64)>,
}

pub async fn growth_scenario(a: GrowthArgs) {
    let Some(url) = a.common.database_url.clone() else {
        eprintln!("growth needs --database-url (for ANALYZE and the sizes on disk)");
        std::process::exit(2);
    };
    let target = Target::new(&a.common);
    let body = json_payload(a.payload_bytes);
    let raw = raw_client(&url).await;
    let mut rows = Vec::new();
    for &size in &a.sizes {
        let head = ensure_log(&target, size, &body).await;
        raw.batch_execute("ANALYZE pgstore.events")
            .await
            .expect("analyze");
        eprintln!("  measuring at {head} events ...");
        let appends = append_rate(&target, &a, &body).await;
        let catch_up = a.catch_up.min(head);
        let from = head - catch_up + 1;
        let mut c = target
            .connect()
            .await
            .max_decoding_message_size(256 * 1024 * 1024);
        let load = load_rate(&mut c).await;
        let read_from = read_from_rate(&mut c, from, head, 1000).await;
        let subscribe = subscribe_rate(&mut c, from).await;
        let sizes = raw
            .query_one(
                "SELECT pg_total_relation_size('pgstore.events')::float8, \
                        pg_relation_size('pgstore.events')::float8",
                &[],
            )
            .await
            .expect("sizes");
        let (total, table): (f64, f64) = (sizes.get(0), sizes.get(1));
        let indexes = raw
            .query(
                "SELECT c.relname::text, pg_relation_size(c.oid)::float8 FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE i.indrelid = 'pgstore.events'::regclass ORDER BY c.relname",
                &[],
            )
            .await
            .expect("index sizes")
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, f64>(1) / 1e6))
            .collect();
        rows.push(Row {
            size: head,
            appends: appends.0,
            p99_ms: appends.1,
            load,
            read_from,
            subscribe,
            bytes_per_event: total / head as f64,
            table_mb: table / 1e6,
            indexes,
        });
    }
    println!(
        "growth: {} clients x 1-event appends for {:?}; catch-up of the newest {} events; payload {}B",
        a.clients, a.common.duration, a.catch_up, a.payload_bytes
    );
    println!(
        "{:>12} {:>10} {:>8} {:>12} {:>12} {:>12} {:>11} {:>9}  indexes (MB)",
        "events",
        "appends/s",
        "p99 ms",
        "Load ev/s",
        "ReadFrom/s",
        "Subscribe/s",
        "bytes/event",
        "table MB"
    );
    for r in &rows {
        let indexes: Vec<String> = r
            .indexes
            .iter()
            .map(|(n, mb)| format!("{n} {mb:.0}"))
            .collect();
        println!(
            "{:>12} {:>10.0} {:>8.2} {:>12.0} {:>12.0} {:>12.0} {:>11.0} {:>9.0}  {}",
            r.size,
            r.appends,
            r.p99_ms,
            r.load,
            r.read_from,
            r.subscribe,
            r.bytes_per_event,
            r.table_mb,
            indexes.join(", ")
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last())
        && rows.len() > 1
    {
        println!(
            "appends at {} events: {:.2}x the rate at {}",
            last.size,
            last.appends / first.appends,
            first.size
        );
    }
}

/// Appends per second and p99 (ms), `clients` clients appending 1 event each to their own stream.
async fn append_rate(target: &Target, a: &GrowthArgs, body: &str) -> (f64, f64) {
    let clients = target.connect_many(a.clients).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let stats = drive("append", a.clients, &a.common, |w: usize| {
        let client = clients[w].clone();
        let stream = format!("growth-{}-{w}", &run[..8]);
        let body = body.to_owned();
        Box::new(move || -> OpFuture {
            let mut client = client.clone();
            let req = proto::AppendRequest {
                stream_id: stream.clone(),
                events: vec![proto::EventData {
                    event_type: "BenchEvent".into(),
                    payload: Some(proto::event_data::Payload::Json(body.clone())),
                    ..Default::default()
                }],
                ..Default::default()
            };
            Box::pin(async move {
                client
                    .append(req)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
    })
    .await;
    (stats.rate(), stats.ms(0.99))
}

/// Events per second loading one of the filled streams from its start, 1,000 a page.
async fn load_rate(c: &mut super::Client) -> f64 {
    let started = Instant::now();
    let (mut from, mut n) = (1, 0u64);
    loop {
        let page = c
            .load(proto::LoadRequest {
                stream_id: "load-0-0".into(),
                from_version: from,
                max_count: 1000,
                ..Default::default()
            })
            .await
            .expect("load")
            .into_inner();
        n += page.events.len() as u64;
        if page.end_of_stream || page.next_version == 0 {
            break;
        }
        from = page.next_version;
    }
    n as f64
        / started
            .elapsed()
            .max(Duration::from_micros(1))
            .as_secs_f64()
}

/// Events per second paging through `[from, head]` with ReadFrom, `page` events a page.
pub async fn read_from_rate(c: &mut super::Client, from: u64, head: u64, page: u32) -> f64 {
    let started = Instant::now();
    let (mut from, mut n) = (from, 0u64);
    while from <= head {
        let page = c
            .read_from(proto::ReadFromRequest {
                from_sequence: from,
                limit: page,
                ..Default::default()
            })
            .await
            .expect("read_from")
            .into_inner();
        n += page.events.len() as u64;
        from = page.next_sequence;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Events per second a subscription from `from` delivers until it reports caught-up.
pub async fn subscribe_rate(c: &mut super::Client, from: u64) -> f64 {
    let started = Instant::now();
    let mut sub = c
        .subscribe(proto::SubscribeRequest {
            start: Some(proto::subscribe_request::Start::FromSequence(from)),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut n = 0u64;
    while let Some(msg) = tokio_stream::StreamExt::next(&mut sub).await {
        match msg.expect("stream").message {
            Some(proto::subscribe_response::Message::Event(_)) => n += 1,
            Some(proto::subscribe_response::Message::CaughtUp(_)) => break,
            _ => {}
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}
