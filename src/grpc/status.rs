//! The one mapping of [`Error`] to gRPC: a status code, the message, and machine-readable
//! details (`google.rpc.ErrorInfo` with a reason and the facts, or `google.rpc.BadRequest`).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// The `domain` of every `google.rpc.ErrorInfo` pgstore returns.
pub const ERROR_DOMAIN: &str = "pgstore.v1";

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        status(err, None)
    }
}

/// A MultiStreamAppend's error: a part's expected version failing is a precondition of the call
/// (as in KurrentDB's multi-stream append), where Append answers ABORTED; the details are the
/// same, and the code in them agrees with the call's.
pub fn multi_stream_append_status(err: Error) -> Status {
    let precondition = matches!(err, Error::WrongExpectedVersion { .. });
    status(err, precondition.then_some(Code::FailedPrecondition))
}

/// The status for `err`, with `code` instead of its usual one if given.
fn status(err: Error, code_override: Option<Code>) -> Status {
    {
        let message = err.to_string();
        let info = |meta: Vec<(&str, String)>| {
            let meta: HashMap<String, String> =
                meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            ErrorDetails::with_error_info(err.reason(), ERROR_DOMAIN, meta)
        };
        let (code, details) = match &err {
            Error::InvalidArgument { field, reason } => (
                Code::InvalidArgument,
                ErrorDetails::with_bad_request_violation(field.clone(), reason.clone()),
            ),
            Error::TooLarge {
                what,
                limit,
                actual,
            } => (
                Code::ResourceExhausted,
                info(vec![
                    ("what", what.clone()),
                    ("limit", limit.to_string()),
                    ("actual", actual.to_string()),
                ]),
            ),
            Error::WrongExpectedVersion {
                stream_id,
                expected,
                actual,
            } => (
                Code::Aborted,
                info(vec![
                    ("stream_id", stream_id.clone()),
                    ("expected_version", expected.to_string()),
                    ("actual_version", actual.to_string()),
                ]),
            ),
            Error::AppendConditionFailed {
                first_conflicting_sequence,
                after_sequence,
            } => (
                Code::FailedPrecondition,
                info(vec![
                    (
                        "first_conflicting_sequence",
                        first_conflicting_sequence.to_string(),
                    ),
                    ("after_sequence", after_sequence.to_string()),
                ]),
            ),
            Error::StreamNotFound { stream_id } => {
                (Code::NotFound, info(vec![("stream_id", stream_id.clone())]))
            }
            Error::StreamState {
                stream_id, state, ..
            } => (
                Code::FailedPrecondition,
                info(vec![
                    ("stream_id", stream_id.clone()),
                    ("state", state.to_string()),
                ]),
            ),
            Error::EventIdConflict {
                event_id,
                stream_id,
                version,
            } => (
                Code::AlreadyExists,
                info(vec![
                    ("event_id", event_id.to_string()),
                    ("stream_id", stream_id.clone()),
                    ("version", version.to_string()),
                ]),
            ),
            Error::IdempotencyKeyConflict { key, streams } => {
                let mut meta = vec![
                    ("idempotency_key", key.clone()),
                    ("stream_id", streams.first().cloned().unwrap_or_default()),
                ];
                if streams.len() > 1 {
                    meta.push(("stream_ids", serde_json::json!(streams).to_string()));
                }
                (Code::AlreadyExists, info(meta))
            }
            Error::SnapshotAhead {
                stream_id,
                snapshot_version,
                stream_version,
            } => (
                Code::FailedPrecondition,
                info(vec![
                    ("stream_id", stream_id.clone()),
                    ("snapshot_version", snapshot_version.to_string()),
                    ("stream_version", stream_version.to_string()),
                ]),
            ),
            Error::Unavailable(_) | Error::ShuttingDown => (Code::Unavailable, info(vec![])),
            Error::CommitOutcomeUnknown(_) => (Code::Unavailable, info(vec![])),
            Error::Conflict(_) => (Code::Aborted, info(vec![])),
            Error::Timeout(_) => (Code::DeadlineExceeded, info(vec![])),
            Error::LimitReached { setting, limit, .. } => (
                Code::ResourceExhausted,
                info(vec![
                    ("setting", setting.to_string()),
                    ("limit", limit.clone()),
                ]),
            ),
            Error::CheckpointAhead {
                consumer_id,
                sequence,
                head,
            } => (
                Code::FailedPrecondition,
                info(vec![
                    ("consumer_id", consumer_id.clone()),
                    ("sequence", sequence.to_string()),
                    ("head", head.to_string()),
                ]),
            ),
            Error::PermissionDenied(_) => (Code::PermissionDenied, info(vec![])),
            Error::Internal(_) => (Code::Internal, info(vec![])),
        };
        Status::with_error_details(code_override.unwrap_or(code), message, details)
    }
}
