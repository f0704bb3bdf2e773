//! Consumer groups: partitions leased across members (and instances), reclaimed from a member
//! whose instance died, shared with a member that joins; at-least-once, per-stream order.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use common::*;
use pgstore::proto::{self, subscribe_response::Message};

const PARTITIONS: u32 = GROUP_PARTITIONS;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_share_partitions_survive_a_dead_instance_and_welcome_a_newcomer() {
    let url = fresh_db().await;
    let renew = Duration::from_millis(200);
    let lease = Duration::from_millis(1200);
    let mut config = test_config(&url);
    config.groups.partitions = PARTITIONS;
    config.groups.renew_interval = renew;
    config.groups.lease_timeout = lease;
    config.live.poll_interval = Duration::from_millis(500);
    let a = Server::start(config).await;

    // Member 3 lives on another pgstore process, which will be SIGKILLed.
    let mut b = Process::spawn(
        &["--database-url", &url],
        &[
            ("PGSTORE_GROUPS__PARTITIONS", PARTITIONS.to_string()),
            ("PGSTORE_GROUPS__RENEW_INTERVAL", "200ms".into()),
            ("PGSTORE_GROUPS__LEASE_TIMEOUT", "1200ms".into()),
        ],
    );
    let b_client = b.client().await;

    let (m1, t1) = member(a.client().await, "m1");
    let (m2, t2) = member(a.client().await, "m2");
    let (m3, t3) = member(b_client, "m3");
    let all3 = [m1.clone(), m2.clone(), m3.clone()];
    wait_for(
        "three members to split 8 partitions",
        Duration::from_secs(10),
        || {
            let sets: Vec<Vec<u32>> = all3.iter().map(owned).collect();
            let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
            let total: usize = sets.iter().map(Vec::len).sum();
            total == PARTITIONS as usize
                && union.len() == PARTITIONS as usize
                && sets.iter().all(|s| s.len() >= 2)
        },
    )
    .await;

    // Writers: 40 streams, appends in order per stream.
    let mut w = a.client().await;
    let writer = tokio::spawn(async move {
        let mut last = 0;
        for round in 0..60 {
            for s in 0..40 {
                last = w
                    .append(append(
                        &format!("acct-{s}"),
                        pgstore_exact(round),
                        vec![json_event("E", "{}")],
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .last_sequence;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        last
    });

    // Kill member 3's instance mid-stream: no release, its leases must time out.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let m3_had = owned(&m3);
    assert!(!m3_had.is_empty());
    b.kill();
    let took = wait_for(
        "m1 and m2 to take over all partitions",
        Duration::from_secs(10),
        || {
            let mut u: Vec<u32> = owned(&m1);
            u.extend(owned(&m2));
            u.sort();
            u == (0..PARTITIONS).collect::<Vec<_>>()
        },
    )
    .await;
    assert!(
        took >= lease / 3,
        "took over too early ({took:?}): leases must expire first"
    );

    // A newcomer gets its share within about one renew interval of the others letting go.
    let (m4, t4) = member(a.client().await, "m4");
    let joined = wait_for("m4 to get its share", Duration::from_secs(5), || {
        owned(&m4).len() >= 2
    })
    .await;
    assert!(joined < renew * 6, "m4 waited {joined:?}");

    let last = writer.await.unwrap();
    let everyone = [m1.clone(), m2.clone(), m3.clone(), m4.clone()];
    wait_for("every event processed", Duration::from_secs(20), || {
        processed(&everyone.iter().collect::<Vec<_>>()).len() as u64 == last
    })
    .await;

    // Per-stream order within each member's assignment epochs.
    for (name, m) in ["m1", "m2", "m3", "m4"].iter().zip(&everyone) {
        let l = m.lock().unwrap();
        let mut last_version: BTreeMap<(usize, &str), u64> = BTreeMap::new();
        for (epoch, stream, version, _) in &l.events {
            let prev = last_version.insert((*epoch, stream.as_str()), *version);
            if let Some(prev) = prev {
                assert!(
                    *version > prev,
                    "{name}: {stream} went from {prev} to {version}"
                );
            }
        }
    }
    // Partitions are disjoint at the end.
    let finals: Vec<Vec<u32>> = [&m1, &m2, &m4].iter().map(|m| owned(m)).collect();
    let union: BTreeSet<u32> = finals.iter().flatten().copied().collect();
    assert_eq!(
        finals.iter().map(Vec::len).sum::<usize>(),
        PARTITIONS as usize
    );
    assert_eq!(union.len(), PARTITIONS as usize);

    for t in [t1, t2, t3, t4] {
        t.abort();
    }
}

fn pgstore_exact(v: u64) -> Option<proto::append_request::ExpectedVersion> {
    exact(v)
}

#[tokio::test]
async fn a_member_name_cannot_be_used_twice_at_once() {
    let server = Server::fresh().await;
    // Joins as member "same" of group "g" on a connection of its own; the first message.
    let join = || async {
        let mut c = server.client().await;
        let mut s = c
            .subscribe(proto::SubscribeRequest {
                group: "g".into(),
                member: "same".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap();
        (s, first)
    };
    let (_s1, first) = join().await;
    // The first member's first message is its assignment.
    assert!(matches!(
        first.unwrap().message,
        Some(Message::Assignment(_))
    ));
    let (_s2, second) = join().await;
    let err = second.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
}
