-- Per-stream locks held by open Lock calls. A row outlives its holders so that the fencing token
-- keeps increasing across grants.
CREATE TABLE pgstore.locks (
    name          text        PRIMARY KEY,
    owner         uuid,
    fencing_token bigint      NOT NULL,
    lease_until   timestamptz
);
