-- append_batch with each event's tags (joined by U+001F, which tags cannot contain; NULL for
-- none). A new signature: the previous append_batch stays for instances of the previous release
-- during a rolling upgrade.
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
    channel          text
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
