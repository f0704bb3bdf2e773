//! Several pgstore instances on one database: appends from all of them keep the global
//! invariants, every instance's subscribers see the same log, a consumer group spans instances and
//! survives losing one.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use pgstore::proto::{self, subscribe_response::Message};
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_one_log_and_one_consumer_group() {
    let url = fresh_db().await;
    let env = [
        ("PGSTORE_GROUPS__PARTITIONS", GROUP_PARTITIONS.to_string()),
        ("PGSTORE_GROUPS__RENEW_INTERVAL", "200ms".to_string()),
        ("PGSTORE_GROUPS__LEASE_TIMEOUT", "1200ms".to_string()),
    ];
    let mut instances: Vec<Process> = (0..3)
        .map(|_| Process::spawn(&["--database-url", &url], &env))
        .collect();
    let mut clients = Vec::new();
    for p in &instances {
        clients.push(p.client().await);
    }

    // A subscriber on each instance, and a group member on each.
    let mut subs = Vec::new();
    for c in &clients {
        let mut c = c.clone();
        subs.push(tokio::spawn(async move {
            let mut s = c
                .subscribe(proto::SubscribeRequest::default())
                .await
                .unwrap()
                .into_inner();
            let mut got: Vec<(u64, String)> = Vec::new();
            while let Some(Ok(m)) = s.next().await {
                if let Some(Message::Event(e)) = m.message {
                    got.push((e.global_sequence, e.event_id));
                    if got.len() == 1200 {
                        break;
                    }
                }
            }
            got
        }));
    }
    let members: Vec<(Shared, tokio::task::JoinHandle<()>)> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| member(c.clone(), &format!("m{i}")))
        .collect();
    wait_for(
        "the group to cover all partitions",
        Duration::from_secs(15),
        || {
            let all: Vec<u32> = members.iter().flat_map(|(m, _)| owned(m)).collect();
            let distinct: BTreeSet<u32> = all.iter().copied().collect();
            all.len() == GROUP_PARTITIONS as usize
                && distinct.len() == GROUP_PARTITIONS as usize
                && members.iter().all(|(m, _)| !owned(m).is_empty())
        },
    )
    .await;

    // Writers on all three instances: 12 x 100 appends to overlapping streams.
    let mut writers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for w in 0..4 {
            let mut c = c.clone();
            writers.push(tokio::spawn(async move {
                for k in 0..100 {
                    c.append(append(
                        &format!("shared-{}", (i * 4 + w + k) % 9),
                        None,
                        vec![json_event("E", &format!("{k}"))],
                    ))
                    .await
                    .unwrap();
                }
            }));
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    // All three subscribers saw the same log: 1..=1200, once each, in order.
    let mut logs = Vec::new();
    for s in subs {
        logs.push(
            tokio::time::timeout(Duration::from_secs(30), s)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let mut c = clients[0].clone();
    let all = read_all(&mut c).await;
    let expected: Vec<(u64, String)> = all
        .iter()
        .map(|e| (e.global_sequence, e.event_id.clone()))
        .collect();
    assert_eq!(expected.len(), 1200);
    assert!(
        expected
            .iter()
            .enumerate()
            .all(|(i, (s, _))| *s == i as u64 + 1)
    );
    for log in &logs {
        assert!(
            log == &expected,
            "an instance's subscriber saw a different log"
        );
    }

    // Lose an instance: its member's partitions go to the others after the lease timeout.
    instances[2].kill();
    wait_for(
        "the two survivors to own every partition",
        Duration::from_secs(15),
        || {
            let mut u: Vec<u32> = owned(&members[0].0);
            u.extend(owned(&members[1].0));
            u.sort();
            u == (0..GROUP_PARTITIONS).collect::<Vec<_>>()
        },
    )
    .await;
    // More events: processed by the survivors.
    let mut c = clients[0].clone();
    let last = append_many(&mut c, 100, "shared", 9).await;
    wait_for(
        "every event processed at least once",
        Duration::from_secs(20),
        || processed(&members.iter().map(|(m, _)| m).collect::<Vec<_>>()).len() as u64 == last,
    )
    .await;
    for (_, t) in members {
        t.abort();
    }
}
