//! `dcb`: Dynamic Consistency Boundary appends. Uncontended, each client appends one event
//! tagged with its own tag, without and then with a condition on that tag (after the sequence of
//! its previous append), alternating so that both see the same machine; the ratio is
//! conditional / unconditional. Contended, every client runs a whole decision on one shared tag
//! (Read, then an append conditioned on the answer): accepted and rejected decisions per second
//! and the latency of a decision.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use clap::Args;
use pgstore::proto;

use super::{Common, OpFuture, Target, bench_event, drive};

#[derive(Args, Clone)]
pub struct DcbArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent clients (each with its own connection).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Alternations of the unconditional and conditional measurements.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
}

fn event(tag: &str) -> proto::EventData {
    proto::EventData {
        tags: vec![tag.to_owned()],
        ..bench_event("Booked")
    }
}

fn on_tag(tag: &str) -> proto::Query {
    proto::Query {
        items: vec![proto::QueryItem {
            types: vec!["Booked".into()],
            tags: vec![tag.to_owned()],
        }],
    }
}

pub async fn dcb_scenario(a: DcbArgs) {
    println!(
        "dcb: clients={} duration={:?} rounds={}",
        a.clients, a.common.duration, a.rounds
    );
    let target = Target::new(&a.common);
    let clients = target.connect_many(a.clients).await;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    // Each client's last appended sequence: its next condition looks after it.
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..a.clients).map(|_| AtomicU64::new(0)).collect());
    let (mut plain, mut conditional) = (super::Stats::empty(), super::Stats::empty());
    for _ in 0..a.rounds {
        for conditioned in [false, true] {
            let op = |w: usize| -> Box<dyn FnMut() -> OpFuture + Send> {
                let client = clients[w].clone();
                let tag = format!("client:{run}:{w}");
                let stream = format!("dcb-{run}-{w}");
                let last = last.clone();
                Box::new(move || {
                    let mut client = client.clone();
                    let after = last[w].load(Ordering::Relaxed);
                    let req = proto::AppendRequest {
                        stream_id: stream.clone(),
                        events: vec![event(&tag)],
                        condition: conditioned.then(|| proto::AppendCondition {
                            fail_if_events_match: Some(on_tag(&tag)),
                            after_sequence: after,
                        }),
                        ..Default::default()
                    };
                    let last = last.clone();
                    Box::pin(async move {
                        let r = client.append(req).await.map_err(|e| e.to_string())?;
                        last[w].store(r.into_inner().last_sequence, Ordering::Relaxed);
                        Ok(())
                    })
                })
            };
            let label = if conditioned {
                "conditional"
            } else {
                "unconditional"
            };
            let s = drive(label, a.clients, &a.common, op).await;
            if conditioned {
                conditional.merge(s);
            } else {
                plain.merge(s);
            }
        }
    }
    println!(
        "{:<34} {:>12} {:>9} {:>9}",
        "", "appends/s", "p50 ms", "p99 ms"
    );
    for (label, s) in [
        ("unconditional, own tag", &plain),
        ("conditional, own tag", &conditional),
    ] {
        println!(
            "{label:<34} {:>12.0} {:>9.3} {:>9.3}",
            s.rate(),
            s.ms(0.5),
            s.ms(0.99)
        );
    }
    println!(
        "ratio conditional/unconditional: {:.2}x (errors: {} / {})",
        conditional.rate() / plain.rate(),
        plain.errors,
        conditional.errors
    );

    // Contended: every client decides on one tag.
    let hot = format!("seat:{run}");
    let (accepted, rejected) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let op = |w: usize| -> Box<dyn FnMut() -> OpFuture + Send> {
        let client = clients[w].clone();
        let (hot, accepted, rejected) = (hot.clone(), accepted.clone(), rejected.clone());
        Box::new(move || {
            let mut client = client.clone();
            let (hot, accepted, rejected) = (hot.clone(), accepted.clone(), rejected.clone());
            Box::pin(async move {
                let read = client
                    .read(proto::ReadRequest {
                        query: Some(on_tag(&hot)),
                        from_sequence: u64::MAX >> 1,
                        limit: 1,
                        min_sequence: 0,
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                let r = client
                    .append(proto::AppendRequest {
                        stream_id: format!("seat-{w}"),
                        events: vec![event(&hot)],
                        condition: Some(proto::AppendCondition {
                            fail_if_events_match: Some(on_tag(&hot)),
                            after_sequence: read.head,
                        }),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                        rejected.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => return Err(e.to_string()),
                };
                Ok(())
            })
        })
    };
    let before = (
        accepted.load(Ordering::Relaxed),
        rejected.load(Ordering::Relaxed),
    );
    let s = drive("contended", a.clients, &a.common, op).await;
    // The counters include the warm-up: scale them to the measured decisions.
    let (acc, rej) = (
        accepted.load(Ordering::Relaxed) - before.0,
        rejected.load(Ordering::Relaxed) - before.1,
    );
    let share = acc as f64 / (acc + rej).max(1) as f64;
    println!(
        "contended, one tag: {:.0} decisions/s ({:.0} accepted/s, {:.0} rejected/s), decision p50 {:.3} ms, p99 {:.3} ms",
        s.rate(),
        s.rate() * share,
        s.rate() * (1.0 - share),
        s.ms(0.5),
        s.ms(0.99)
    );
}
