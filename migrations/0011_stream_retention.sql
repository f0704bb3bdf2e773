-- Per-stream retention, set with SetStreamMetadata (KurrentDB's $maxCount, $maxAge and $tb).
-- Every read hides the events a row here expires; the scavenger deletes them later. A row may
-- exist before its stream does. Reads check this table only while it has rows at all, so a store
-- without retention pays nothing for it.
CREATE TABLE pgstore.stream_metadata (
    stream_id       text        PRIMARY KEY,
    -- Keep the newest max_count events (versions above version - max_count).
    max_count       bigint      CHECK (max_count >= 1),
    -- Hide events recorded longer ago than this.
    max_age         interval    CHECK (max_age > interval '0'),
    -- Hide events whose version is below this.
    truncate_before bigint      CHECK (truncate_before >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
