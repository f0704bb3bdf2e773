-- The event log, streams, the log head, checkpoints, snapshots and idempotency keys.

-- The head of the global log. Appenders lock this one row (SELECT ... FOR UPDATE), which
-- serialises commits so that global sequences become visible in order and without holes.
CREATE TABLE pgstore.head (
    id  boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq bigint  NOT NULL
);
INSERT INTO pgstore.head (id, seq) VALUES (true, 0);

-- One row per stream: its current version and lifecycle state (1 active, 2 archived, 3 tombstoned).
CREATE TABLE pgstore.streams (
    stream_id        text        PRIMARY KEY,
    version          bigint      NOT NULL,
    state            smallint    NOT NULL DEFAULT 1 CHECK (state IN (1, 2, 3)),
    tombstone_reason text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Every event. `seq` is the dense global sequence; JSON payloads live in `data` (jsonb, queryable),
-- any other content type byte for byte in `data_bytes`.
CREATE TABLE pgstore.events (
    seq           bigint      PRIMARY KEY,
    stream_id     text        NOT NULL,
    version       bigint      NOT NULL,
    event_id      uuid        NOT NULL,
    event_type    text        NOT NULL,
    content_type  text        NOT NULL,
    data          jsonb,
    data_bytes    bytea,
    metadata      jsonb,
    created_at    timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL,
    partition_key bigint      NOT NULL,
    CONSTRAINT events_stream_version UNIQUE (stream_id, version),
    CONSTRAINT events_one_payload CHECK ((data IS NULL) <> (data_bytes IS NULL))
);
CREATE UNIQUE INDEX events_event_id ON pgstore.events (event_id);

-- A consumer's last processed global sequence.
CREATE TABLE pgstore.checkpoints (
    consumer_id text        PRIMARY KEY,
    seq         bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The latest snapshot of a stream.
CREATE TABLE pgstore.snapshots (
    stream_id      text        PRIMARY KEY,
    stream_version bigint      NOT NULL,
    schema_version integer     NOT NULL,
    content_type   text        NOT NULL,
    state          bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Appends made with an idempotency key, and what they returned.
CREATE TABLE pgstore.idempotency_keys (
    key        text        PRIMARY KEY,
    stream_id  text        NOT NULL,
    version    bigint      NOT NULL,
    first_seq  bigint      NOT NULL,
    last_seq   bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
