-- pgstore: no-transaction
-- ReadFrom and Subscribe filtered by event type read the matching events in sequence order
-- from this index instead of every event of the scan window. Built without blocking appends.
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_type_seq ON pgstore.events (event_type, seq);
