-- Consumer groups: partition count per group, live members, partition leases.

CREATE TABLE pgstore.groups (
    group_name text    PRIMARY KEY,
    partitions integer NOT NULL CHECK (partitions > 0)
);

-- A member is live while `expires_at` is in the future; `token` identifies the Subscribe call that
-- holds the name, so a second live call with the same member name is refused.
CREATE TABLE pgstore.group_members (
    group_name text        NOT NULL,
    member     text        NOT NULL,
    token      uuid        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, member)
);

-- Partition leases: `owner` holds `partition` until `lease_until`.
CREATE TABLE pgstore.group_partitions (
    group_name  text        NOT NULL,
    partition   integer     NOT NULL,
    owner       text,
    lease_until timestamptz,
    PRIMARY KEY (group_name, partition)
);
