-- Idempotency keys can be kept for a limited time (`writer.idempotency_key_retention`): pgstore
-- then deletes the oldest in small batches, found through this index.
CREATE INDEX idempotency_keys_created ON pgstore.idempotency_keys (created_at);
