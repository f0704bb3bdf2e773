//! The domain error type, and its one mapping to gRPC status codes.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::{ExpectedVersion, StreamState};

/// The `domain` of every `google.rpc.ErrorInfo` pgstore returns.
pub const ERROR_DOMAIN: &str = "pgstore.v1";

/// Result with the domain error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, with the facts a caller needs to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request field is malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// A request is over a documented limit.
    #[error("{what} is {actual} bytes, over the limit of {limit}")]
    TooLarge {
        what: String,
        limit: usize,
        actual: usize,
    },

    /// Optimistic concurrency check failed.
    #[error(
        "wrong expected version for stream {stream_id:?}: expected {expected}, actual version {actual}"
    )]
    WrongExpectedVersion {
        stream_id: String,
        expected: ExpectedVersion,
        /// The stream's current version (0 when it has no events or does not exist).
        actual: u64,
    },

    /// The stream does not exist.
    #[error("stream {stream_id:?} not found")]
    StreamNotFound { stream_id: String },

    /// The stream is in a state that refuses the operation (tombstoned, archived, ...).
    #[error("stream {stream_id:?} is {state}: cannot {operation}")]
    StreamState {
        stream_id: String,
        state: StreamState,
        operation: &'static str,
    },

    /// A client-chosen event id is already stored somewhere that does not make this a retry.
    #[error("event id {event_id} is already stored in stream {stream_id:?} at version {version}")]
    EventIdConflict {
        event_id: uuid::Uuid,
        stream_id: String,
        version: u64,
    },

    /// An idempotency key was reused for a different stream.
    #[error("idempotency key {key:?} was already used for stream {stream_id:?}")]
    IdempotencyKeyConflict { key: String, stream_id: String },

    /// A snapshot is ahead of its stream.
    #[error(
        "snapshot version {snapshot_version} is ahead of stream {stream_id:?} at version {stream_version}"
    )]
    SnapshotAhead {
        stream_id: String,
        snapshot_version: u64,
        stream_version: u64,
    },

    /// PostgreSQL cannot be reached (or went away mid-request).
    #[error("database unavailable: {0}")]
    Unavailable(String),

    /// The connection was lost (or the commit timed out) after COMMIT was sent: the append may or
    /// may not have been stored.
    #[error(
        "commit outcome unknown ({0}); the append may have been stored: retry with the same event ids or idempotency key"
    )]
    CommitOutcomeUnknown(String),

    /// A transaction lost a race inside PostgreSQL (serialization failure, deadlock): retry.
    #[error("transaction conflict, retry: {0}")]
    Conflict(String),

    /// An operation ran out of time (`database.statement_timeout`, `server.request_timeout`).
    #[error("timed out: {0}")]
    Timeout(String),

    /// A configured limit was reached; the message names the setting.
    #[error("{message} (limit {setting} = {limit})")]
    LimitReached {
        /// The setting that bounds it.
        setting: &'static str,
        /// Its value.
        limit: String,
        /// What happened.
        message: String,
    },

    /// A checkpoint beyond the head of the log.
    #[error(
        "checkpoint {sequence} of consumer {consumer_id:?} is beyond the head of the log ({head}): resuming from it would skip the events written up to it"
    )]
    CheckpointAhead {
        consumer_id: String,
        sequence: u64,
        head: u64,
    },

    /// The caller's token does not allow the operation.
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,

    /// A bug or an unexpected database error.
    #[error("internal error: {0}")]
    Internal(String),
}

/// An error and its sources, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !out.ends_with(&next) {
            out.push_str(": ");
            out.push_str(&next);
        }
        source = s.source();
    }
    out
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The machine-readable reason carried in `google.rpc.ErrorInfo`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Error::TooLarge { .. } => "TOO_LARGE",
            Error::WrongExpectedVersion { .. } => "WRONG_EXPECTED_VERSION",
            Error::StreamNotFound { .. } => "STREAM_NOT_FOUND",
            Error::StreamState {
                state: StreamState::Tombstoned,
                ..
            } => "STREAM_TOMBSTONED",
            Error::StreamState {
                state: StreamState::Archived,
                ..
            } => "STREAM_ARCHIVED",
            Error::StreamState { .. } => "STREAM_STATE",
            Error::EventIdConflict { .. } => "EVENT_ID_CONFLICT",
            Error::IdempotencyKeyConflict { .. } => "IDEMPOTENCY_KEY_CONFLICT",
            Error::SnapshotAhead { .. } => "SNAPSHOT_AHEAD_OF_STREAM",
            Error::Unavailable(_) => "DATABASE_UNAVAILABLE",
            Error::CommitOutcomeUnknown(_) => "COMMIT_OUTCOME_UNKNOWN",
            Error::Conflict(_) => "TRANSACTION_CONFLICT",
            Error::Timeout(_) => "TIMEOUT",
            Error::LimitReached { .. } => "LIMIT_REACHED",
            Error::CheckpointAhead { .. } => "CHECKPOINT_AHEAD_OF_LOG",
            Error::PermissionDenied(_) => "PERMISSION_DENIED",
            Error::ShuttingDown => "SHUTTING_DOWN",
            Error::Internal(_) => "INTERNAL",
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
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
            Error::IdempotencyKeyConflict { key, stream_id } => (
                Code::AlreadyExists,
                info(vec![
                    ("idempotency_key", key.clone()),
                    ("stream_id", stream_id.clone()),
                ]),
            ),
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
        Status::with_error_details(code, message, details)
    }
}
