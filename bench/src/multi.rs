//! `multi`: appends to several streams at once. Each client appends K events, one to each of K
//! streams of its own, as one MultiStreamAppend, and, alternating with it so that both see the
//! same machine, the same K events to one stream as one Append. The ratio is events/s of the
//! multi-stream call over the one-stream call: what writing K streams atomically costs beyond
//! writing the same events to one.

use clap::Args;
use pgstore::proto;

use super::{Common, OpFuture, Stats, Target, bench_event, drive};

#[derive(Args, Clone)]
pub struct MultiArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent clients (each with its own connection).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Streams per call (one event each).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub streams_per_append: u32,
    /// Alternations of the two measurements.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
}

pub async fn multi_scenario(a: MultiArgs) {
    let k = a.streams_per_append as usize;
    println!(
        "multi: clients={} streams/append={k} duration={:?} rounds={}",
        a.clients, a.common.duration, a.rounds
    );
    let target = Target::new(&a.common);
    let clients = target.connect_many(a.clients).await;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let (mut one, mut many) = (Stats::empty(), Stats::empty());
    for _ in 0..a.rounds {
        for multi in [false, true] {
            let op = |w: usize| -> Box<dyn FnMut() -> OpFuture + Send> {
                let client = clients[w].clone();
                let streams: Vec<String> = (0..k).map(|s| format!("multi-{run}-{w}-{s}")).collect();
                Box::new(move || {
                    let mut client = client.clone();
                    if multi {
                        let req = proto::MultiStreamAppendRequest {
                            parts: streams
                                .iter()
                                .map(|s| proto::AppendPart {
                                    stream_id: s.clone(),
                                    expected_version: None,
                                    events: vec![bench_event("BenchEvent")],
                                })
                                .collect(),
                            ..Default::default()
                        };
                        Box::pin(async move {
                            client
                                .multi_stream_append(req)
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        })
                    } else {
                        let req = proto::AppendRequest {
                            stream_id: streams[0].clone(),
                            events: (0..k).map(|_| bench_event("BenchEvent")).collect(),
                            ..Default::default()
                        };
                        Box::pin(async move {
                            client
                                .append(req)
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        })
                    }
                })
            };
            let label = if multi { "MultiStreamAppend" } else { "Append" };
            let s = drive(label, a.clients, &a.common, op).await;
            if multi {
                many.merge(s);
            } else {
                one.merge(s);
            }
        }
    }
    println!(
        "{:<40} {:>10} {:>10} {:>9} {:>9}",
        "", "calls/s", "events/s", "p50 ms", "p99 ms"
    );
    for (label, s) in [
        (format!("Append, {k} events to 1 stream"), &one),
        (format!("MultiStreamAppend, 1 event to {k} streams"), &many),
    ] {
        println!(
            "{label:<40} {:>10.0} {:>10.0} {:>9.3} {:>9.3}",
            s.rate(),
            s.rate() * k as f64,
            s.ms(0.5),
            s.ms(0.99)
        );
    }
    println!(
        "ratio multi-stream/one-stream: {:.2}x (errors: {} / {})",
        many.rate() / one.rate(),
        one.errors,
        many.errors
    );
}
