-- Event ids that pgstore assigns itself (to events appended without one) no longer need an
-- index entry each. They are UUIDv8s made of a random 48-bit prefix of this store and the
-- event's global sequence: prefix (6 bytes), 0x80 0x00 (version 8), then the sequence in the
-- last 8 bytes under the RFC 4122 variant bits. Unique by construction, and an event found by
-- one is found through the primary key. The unique index keeps only the other ids (chosen by
-- clients, or assigned before this migration), so a client id still cannot be stored twice; a
-- client id inside this store's range is checked against the event at its sequence instead.
CREATE TABLE pgstore.store (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),
    id_prefix bigint  NOT NULL CHECK (id_prefix >= 0 AND id_prefix < 281474976710656)
);
INSERT INTO pgstore.store (id_prefix)
SELECT ('x' || substr(md5(gen_random_uuid()::text), 1, 12))::bit(48)::bigint;

-- Whether an id lies in this store's range. IMMUTABLE (the prefix never changes), so it can
-- define the partial index; a plain SQL function, so the planner inlines it.
DO $$
DECLARE
    p text := (SELECT lpad(to_hex(id_prefix), 12, '0') FROM pgstore.store);
BEGIN
    EXECUTE format(
        'CREATE FUNCTION pgstore.assigned_event_id(id uuid) RETURNS boolean '
        'LANGUAGE sql IMMUTABLE PARALLEL SAFE '
        'AS $f$ SELECT id BETWEEN %L::uuid AND %L::uuid $f$',
        p || '80008000000000000000', p || '8000bfffffffffffffff');
END
$$;

CREATE UNIQUE INDEX events_client_event_id ON pgstore.events (event_id)
    WHERE NOT pgstore.assigned_event_id(event_id);
DROP INDEX pgstore.events_event_id;
