-- pgstore: no-transaction
-- Tags (Dynamic Consistency Boundaries): a text[] on every event, empty by default (adding a
-- column with a constant default rewrites nothing), a GIN index for queries by tag, built
-- without blocking appends. Events written by instances of the previous release (rolling
-- upgrade) get no tags.
ALTER TABLE pgstore.events ADD COLUMN IF NOT EXISTS tags text[] NOT NULL DEFAULT '{}';
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_tags ON pgstore.events USING gin (tags);
