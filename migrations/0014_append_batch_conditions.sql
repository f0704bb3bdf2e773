-- append_batch with append conditions (Dynamic Consistency Boundaries), checked in the
-- one-statement commit under the same lock as everything else. A new signature: the previous
-- ones stay for instances of earlier releases during a rolling upgrade.
CREATE OR REPLACE FUNCTION pgstore.append_batch(
    check_head       bigint,
    check_streams    text[],
    check_versions   bigint[],
    seqs             bigint[],
    stream_ids       text[],
    versions         bigint[],
    event_ids        uuid[],
    event_types      text[],
    content_types    text[],
    datas            jsonb[],
    datas_bytes      bytea[],
    metadatas        jsonb[],
    created          timestamptz[],
    partition_keys   bigint[],
    tag_lists        text[],
    upsert_streams   text[],
    upsert_versions  bigint[],
    key_names        text[],
    key_streams      text[],
    key_versions     bigint[],
    key_firsts       bigint[],
    key_lasts        bigint[],
    new_head         bigint,
    channel          text,
    conditions       jsonb
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF check_head IS NOT NULL THEN
        -- Taking the global lock, proving the head and moving it are one statement. (A
        -- concurrent commit that moved the head makes the WHERE false once it is visible.)
        UPDATE pgstore.head SET seq = new_head WHERE seq = check_head;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'log head is not % any more', check_head
                USING ERRCODE = 'PGS01';
        END IF;
        -- An absent stream counts as version 0; only active streams are written.
        IF EXISTS (
            SELECT 1
            FROM unnest(check_streams, check_versions) AS x(stream_id, version)
            LEFT JOIN pgstore.streams s USING (stream_id)
            WHERE coalesce(s.version, 0) <> x.version OR coalesce(s.state, 1) <> 1
        ) THEN
            RAISE EXCEPTION 'stream versions moved' USING ERRCODE = 'PGS01';
        END IF;
        -- Append conditions, against the events before this batch (the writer checked the
        -- batch's own). A failure writes nothing; the writer commits the batch again the reading
        -- way, which fails the condition's append alone. A condition after a recent sequence
        -- reads the few events since then in sequence order (the tags test kept out of the GIN
        -- index, whose pending list may be long just after many appends); one after an old
        -- sequence goes through the GIN or type index.
        IF conditions IS NOT NULL AND EXISTS (
            SELECT 1
            FROM (SELECT c.after, q.types, q.tags
                  FROM jsonb_to_recordset(conditions) AS c(after bigint, items jsonb),
                       jsonb_to_recordset(c.items) AS q(types text[], tags text[])) i
            WHERE CASE WHEN i.after >= check_head - 10000 THEN EXISTS (
                    SELECT 1 FROM pgstore.events e
                    WHERE e.seq > i.after AND e.seq <= check_head
                      AND (e.tags || '{}'::text[]) @> i.tags
                      AND (cardinality(i.types) = 0 OR e.event_type = ANY(i.types)))
                  ELSE EXISTS (
                    SELECT 1 FROM pgstore.events e
                    WHERE e.seq > i.after AND e.seq <= check_head AND e.tags @> i.tags
                      AND (cardinality(i.types) = 0 OR e.event_type = ANY(i.types)))
                  END
        ) THEN
            RAISE EXCEPTION 'an append condition failed' USING ERRCODE = 'PGS02';
        END IF;
    END IF;
    -- unnest() in a select list walks the arrays in step without materialising them first.
    INSERT INTO pgstore.events
        (seq, stream_id, version, event_id, event_type, content_type, data, data_bytes, metadata,
         created_at, recorded_at, partition_key, tags)
    SELECT s, sid, v, eid, et, ct, d, b, m, coalesce(ts, now()), now(), pk,
           coalesce(string_to_array(tg, E'\x1f'), '{}')
    FROM (SELECT unnest(seqs) AS s, unnest(stream_ids) AS sid, unnest(versions) AS v,
                 unnest(event_ids) AS eid, unnest(event_types) AS et,
                 unnest(content_types) AS ct, unnest(datas) AS d, unnest(datas_bytes) AS b,
                 unnest(metadatas) AS m, unnest(created) AS ts, unnest(partition_keys) AS pk,
                 unnest(tag_lists) AS tg) t;
    INSERT INTO pgstore.streams (stream_id, version)
    SELECT * FROM unnest(upsert_streams, upsert_versions)
    ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, updated_at = now();
    IF check_head IS NULL THEN
        UPDATE pgstore.head SET seq = new_head;
    END IF;
    IF cardinality(key_names) > 0 THEN
        INSERT INTO pgstore.idempotency_keys (key, stream_id, version, first_seq, last_seq)
        SELECT * FROM unnest(key_names, key_streams, key_versions, key_firsts, key_lasts);
    END IF;
    PERFORM pg_notify(channel, new_head::text);
END
$$;
