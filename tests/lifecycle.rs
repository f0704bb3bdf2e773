//! Stream lifecycle, snapshots and checkpoints.

mod common;

use common::*;
use pgstore::proto;
use tonic::Code;

async fn state_of(c: &mut Client, s: &str) -> Result<proto::GetStreamResponse, Code> {
    c.get_stream(proto::GetStreamRequest {
        stream_id: s.into(),
        min_sequence: 0,
    })
    .await
    .map(|r| r.into_inner())
    .map_err(|e| e.code())
}

#[tokio::test]
async fn the_lifecycle_state_machine() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    assert_eq!(state_of(&mut c, "s").await.unwrap_err(), Code::NotFound);
    c.append(append(
        "s",
        None,
        vec![json_event("E", "{}"), json_event("E", "{}")],
    ))
    .await
    .unwrap();
    let st = state_of(&mut c, "s").await.unwrap();
    assert_eq!(
        (st.version, st.state),
        (2, proto::StreamState::Active as i32)
    );

    // archive -> archived (idempotent), restore -> active (idempotent).
    for _ in 0..2 {
        c.archive_stream(proto::ArchiveStreamRequest {
            stream_id: "s".into(),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        state_of(&mut c, "s").await.unwrap().state,
        proto::StreamState::Archived as i32
    );
    // Archived streams stay readable.
    let page = c
        .load(proto::LoadRequest {
            stream_id: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 2);
    assert_eq!(page.state, proto::StreamState::Archived as i32);
    for _ in 0..2 {
        c.restore_stream(proto::RestoreStreamRequest {
            stream_id: "s".into(),
        })
        .await
        .unwrap();
    }
    c.append(append("s", exact(2), vec![json_event("E", "{}")]))
        .await
        .unwrap();

    // tombstone -> terminal.
    c.tombstone_stream(proto::TombstoneStreamRequest {
        stream_id: "s".into(),
        reason: "closed".into(),
    })
    .await
    .unwrap();
    let st = state_of(&mut c, "s").await.unwrap();
    assert_eq!(st.state, proto::StreamState::Tombstoned as i32);
    assert_eq!(st.tombstone_reason, "closed");
    assert_eq!(st.version, 3);
    for code in [
        c.restore_stream(proto::RestoreStreamRequest {
            stream_id: "s".into(),
        })
        .await
        .unwrap_err()
        .code(),
        c.archive_stream(proto::ArchiveStreamRequest {
            stream_id: "s".into(),
        })
        .await
        .unwrap_err()
        .code(),
    ] {
        assert_eq!(code, Code::FailedPrecondition);
    }
    // Tombstoning again is fine and keeps the first reason.
    c.tombstone_stream(proto::TombstoneStreamRequest {
        stream_id: "s".into(),
        reason: "other".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        state_of(&mut c, "s").await.unwrap().tombstone_reason,
        "closed"
    );
    // Its events are still readable.
    assert_eq!(read_all(&mut c).await.len(), 3);

    // Deleting a tombstoned stream removes the events and keeps the tombstone.
    let d = c
        .delete_stream(proto::DeleteStreamRequest {
            stream_id: "s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted_events, 3);
    assert_eq!(
        state_of(&mut c, "s").await.unwrap().state,
        proto::StreamState::Tombstoned as i32
    );
    assert_eq!(
        c.append(append("s", None, vec![json_event("E", "{}")]))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn tombstoning_an_unknown_stream_reserves_it() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    c.tombstone_stream(proto::TombstoneStreamRequest {
        stream_id: "never".into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        c.append(append("never", None, vec![json_event("E", "{}")]))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    for code in [
        c.archive_stream(proto::ArchiveStreamRequest {
            stream_id: "x".into(),
        })
        .await
        .unwrap_err()
        .code(),
        c.restore_stream(proto::RestoreStreamRequest {
            stream_id: "x".into(),
        })
        .await
        .unwrap_err()
        .code(),
        c.delete_stream(proto::DeleteStreamRequest {
            stream_id: "x".into(),
        })
        .await
        .unwrap_err()
        .code(),
    ] {
        assert_eq!(code, Code::NotFound);
    }
}

#[tokio::test]
async fn delete_removes_events_and_snapshot_and_never_reuses_sequences() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    c.append(append(
        "d",
        None,
        vec![json_event("E", "{}"), json_event("E", "{}")],
    ))
    .await
    .unwrap();
    c.save_snapshot(proto::SaveSnapshotRequest {
        snapshot: Some(proto::Snapshot {
            stream_id: "d".into(),
            stream_version: 2,
            state: b"s".to_vec().into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let d = c
        .delete_stream(proto::DeleteStreamRequest {
            stream_id: "d".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted_events, 2);
    assert_eq!(state_of(&mut c, "d").await.unwrap_err(), Code::NotFound);
    let snap = c
        .load_snapshot(proto::LoadSnapshotRequest {
            stream_id: "d".into(),
            min_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(snap.snapshot.is_none());
    // The id can be used again, from version 1, with fresh sequences.
    let r = c
        .append(append(
            "d",
            Some(proto::append_request::ExpectedVersion::NoStream(true)),
            vec![json_event("E", "{}")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.version, r.first_sequence), (1, 3));
}

#[tokio::test]
async fn snapshots_save_load_replace_and_invalidate() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let snap = |stream: &str, v: u64, state: &[u8]| proto::SaveSnapshotRequest {
        snapshot: Some(proto::Snapshot {
            stream_id: stream.into(),
            stream_version: v,
            schema_version: 7,
            content_type: "application/cbor".into(),
            state: state.to_vec().into(),
            created_at: None,
        }),
    };
    // Unknown stream.
    assert_eq!(
        c.save_snapshot(snap("x", 1, b"1"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    c.append(append(
        "x",
        None,
        vec![json_event("E", "{}"), json_event("E", "{}")],
    ))
    .await
    .unwrap();
    c.append(append("y", None, vec![json_event("E", "{}")]))
        .await
        .unwrap();
    // Ahead of the stream.
    assert_eq!(
        c.save_snapshot(snap("x", 3, b"3"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    c.save_snapshot(snap("x", 1, b"\x00one")).await.unwrap();
    c.save_snapshot(snap("x", 2, b"\x00two")).await.unwrap();
    c.save_snapshot(snap("y", 1, b"y")).await.unwrap();
    let got = c
        .load_snapshot(proto::LoadSnapshotRequest {
            stream_id: "x".into(),
            min_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got.stream_version, 2);
    assert_eq!(got.schema_version, 7);
    assert_eq!(got.content_type, "application/cbor");
    assert_eq!(got.state.as_ref(), b"\x00two");
    assert!(got.created_at.is_some());

    let n = c
        .invalidate_snapshot(proto::InvalidateSnapshotRequest {
            stream_id: "x".into(),
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.deleted, 1);
    c.save_snapshot(snap("x", 2, b"again")).await.unwrap();
    let n = c
        .invalidate_snapshot(proto::InvalidateSnapshotRequest {
            stream_id: String::new(),
            all: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.deleted, 2);
    for s in ["x", "y"] {
        let got = c
            .load_snapshot(proto::LoadSnapshotRequest {
                stream_id: s.into(),
                min_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.snapshot.is_none());
    }
}

#[tokio::test]
async fn checkpoints_save_and_load() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let load = |id: &str| proto::LoadCheckpointRequest {
        consumer_id: id.into(),
    };
    let none = c.load_checkpoint(load("proj")).await.unwrap().into_inner();
    assert_eq!((none.sequence, none.found), (0, false));
    let head = append_many(&mut c, 25, "cp", 3).await;
    assert_eq!(head, 25);
    for seq in [10, 25, 5] {
        c.save_checkpoint(proto::SaveCheckpointRequest {
            consumer_id: "proj".into(),
            sequence: seq,
        })
        .await
        .unwrap();
        let got = c.load_checkpoint(load("proj")).await.unwrap().into_inner();
        assert_eq!((got.sequence, got.found), (seq, true));
        assert!(got.updated_at.is_some());
    }
    let other = c.load_checkpoint(load("other")).await.unwrap().into_inner();
    assert!(!other.found);
}

#[tokio::test]
async fn a_checkpoint_beyond_the_head_is_refused_and_stores_nothing() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let head = append_many(&mut c, 3, "cp-ahead", 1).await;
    let save = |seq| proto::SaveCheckpointRequest {
        consumer_id: "proj".into(),
        sequence: seq,
    };
    c.save_checkpoint(save(head)).await.unwrap();
    let err = c.save_checkpoint(save(head + 1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("beyond the head"),
        "{}",
        err.message()
    );
    let err = c.save_checkpoint(save(1_000_000)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // The stored checkpoint is the last accepted one; a new consumer stores nothing.
    let got = c
        .load_checkpoint(proto::LoadCheckpointRequest {
            consumer_id: "proj".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.sequence, got.found), (head, true));
    let err = c
        .save_checkpoint(proto::SaveCheckpointRequest {
            consumer_id: "fresh".into(),
            sequence: head + 5,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let fresh = c
        .load_checkpoint(proto::LoadCheckpointRequest {
            consumer_id: "fresh".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!fresh.found);
}
