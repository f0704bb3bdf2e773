#!/bin/bash
# A streaming replica of the primary: on first start, clone it with pg_basebackup (-R writes
# standby.signal and primary_conninfo), then run PostgreSQL as a hot standby.
set -euo pipefail
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "replica: cloning $PRIMARY_HOST with pg_basebackup"
  until pg_isready --host="$PRIMARY_HOST" --username=replicator --quiet; do sleep 1; done
  PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup --host="$PRIMARY_HOST" \
    --username=replicator --pgdata="$PGDATA" --wal-method=stream --write-recovery-conf \
    --checkpoint=fast --progress
fi
chmod 0700 "$PGDATA"
exec postgres -c hot_standby=on -c hot_standby_feedback=on
