-- pgstore: no-transaction
-- State 4, "deleting": DeleteStream marks the stream (refusing appends, hidden from reads) under
-- the global lock, removes its events in small batches without it, then drops the row. The
-- check is replaced without a table rewrite: added NOT VALID, validated without blocking writes.
ALTER TABLE pgstore.streams
    DROP CONSTRAINT IF EXISTS streams_state_check,
    ADD CONSTRAINT streams_state_check CHECK (state IN (1, 2, 3, 4)) NOT VALID;
ALTER TABLE pgstore.streams VALIDATE CONSTRAINT streams_state_check;
