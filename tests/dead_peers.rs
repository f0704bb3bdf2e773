//! Clients that vanish without closing their connection (a frozen process, a crashed host, a
//! pulled cable) do not keep what they held: HTTP/2 keepalive pings find them, and their locks
//! and subscriber slots are freed within the keepalive bound. Long-lived calls are capped per
//! instance (`server.max_subscribers`).

mod common;

use std::{
    io::BufRead,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use pgstore::proto::{self, lock_response::Message};
use tokio_stream::StreamExt;

const ADDR_VAR: &str = "PGSTORE_TEST_LOCK_HOLDER_ADDR";
const LOCKED_STREAM: &str = "held-by-a-frozen-client";

/// Not a test: the client process that the test below freezes. It takes the lock, says so on
/// stdout, and then holds it (run only by that test, which sets the address).
#[tokio::test]
#[ignore = "helper process of a_frozen_client_loses_its_lock_and_slot_within_the_keepalive_bound"]
async fn helper_lock_holder() {
    let Ok(addr) = std::env::var(ADDR_VAR) else {
        return;
    };
    let mut c = proto::event_store_client::EventStoreClient::connect(addr)
        .await
        .unwrap();
    let mut lock = c
        .lock(proto::LockRequest {
            stream_id: LOCKED_STREAM.into(),
            try_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    match lock.next().await {
        Some(Ok(proto::LockResponse {
            message: Some(Message::Granted(_)),
        })) => println!("GRANTED"),
        other => panic!("no grant: {other:?}"),
    }
    tokio::time::sleep(Duration::from_secs(600)).await;
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_client_loses_its_lock_and_slot_within_the_keepalive_bound() {
    let mut config = test_config(&fresh_db().await);
    config.server.keepalive_interval = Duration::from_secs(1);
    config.server.keepalive_timeout = Duration::from_secs(1);
    config.server.max_subscribers = 1;
    let server = Server::start(config).await;

    let mut child = Child(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "helper_lock_holder",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(ADDR_VAR, format!("http://{}", server.addr))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let granted = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("GRANTED"))
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(60), granted)
            .await
            .expect("the helper takes the lock")
            .unwrap(),
        "the helper got the lock"
    );

    // Its Lock call holds the instance's only slot: a Subscribe is refused, naming the limit.
    let mut c = server.client().await;
    let err = c
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("server.max_subscribers"),
        "{}",
        err.message()
    );

    // Freeze the client: its TCP connection stays open, but it answers nothing.
    signal(&[child.0.id()], "STOP");
    let frozen_at = Instant::now();
    let token = loop {
        assert!(
            frozen_at.elapsed() < Duration::from_secs(20),
            "the frozen client kept its lock and slot"
        );
        match c
            .lock(proto::LockRequest {
                stream_id: LOCKED_STREAM.into(),
                try_only: true,
            })
            .await
        {
            Ok(resp) => match resp.into_inner().next().await {
                Some(Ok(proto::LockResponse {
                    message: Some(Message::Granted(g)),
                })) => break g.fencing_token,
                Some(Err(s)) if s.code() == tonic::Code::Aborted => {}
                other => panic!("unexpected answer: {other:?}"),
            },
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {}
            Err(s) => panic!("unexpected error: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = frozen_at.elapsed();
    assert!(
        token >= 2,
        "a new grant, with a larger fencing token than the first (1)"
    );
    assert!(took < Duration::from_secs(10), "freed after {took:?}");
}
