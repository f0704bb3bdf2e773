//! The error type shared by the store, live delivery and configuration: what went wrong, with the
//! facts a caller needs to act on it. It knows nothing of the wire; [`crate::grpc::status`] maps it
//! to gRPC status codes, in one place.

use crate::domain::{ExpectedVersion, StreamState};

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

    /// A Dynamic Consistency Boundary condition failed: an event matching its query was
    /// committed after its sequence.
    #[error(
        "append condition failed: event {first_conflicting_sequence} matches the condition's query and was committed after sequence {after_sequence}"
    )]
    AppendConditionFailed {
        first_conflicting_sequence: u64,
        after_sequence: u64,
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

    /// An idempotency key was reused for an append to other streams.
    #[error("idempotency key {key:?} was already used for an append to {}", quoted(.streams))]
    IdempotencyKeyConflict { key: String, streams: Vec<String> },

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

impl From<crate::domain::UnknownStreamState> for Error {
    fn from(e: crate::domain::UnknownStreamState) -> Self {
        Error::Internal(e.to_string())
    }
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
            Error::AppendConditionFailed { .. } => "APPEND_CONDITION_FAILED",
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

/// Stream ids as a message names them: `"a"`, or `"a", "b"`.
fn quoted(streams: &[String]) -> String {
    streams
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
