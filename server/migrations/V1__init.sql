-- edge-ota server state in PostgreSQL (storage.backend = "postgres").
--
-- Records the server only reads whole (releases, rollout records, members)
-- are JSON; what is queried or constrained has its own column. Counters are
-- sharded rows summed on read, so commits of thousands of devices do not
-- queue on one row lock.

CREATE TABLE devices (
    id              text PRIMARY KEY,
    device_type     text NOT NULL,
    tags            jsonb NOT NULL,
    -- Only the SHA-256 of a token is stored; a dump cannot impersonate.
    token_sha256    bytea NOT NULL UNIQUE,
    enrolled_at_ms  bigint NOT NULL,
    version         text,
    booted_slot     text,
    state           text,
    last_seen_ms    bigint NOT NULL DEFAULT 0
);
CREATE INDEX devices_by_type ON devices (device_type);

CREATE TABLE releases (
    device_type text NOT NULL,
    version     text NOT NULL,
    record      jsonb NOT NULL,
    PRIMARY KEY (device_type, version)
);

CREATE SEQUENCE rollout_ids;
CREATE TABLE rollouts (
    id            text PRIMARY KEY,
    device_type   text NOT NULL,
    state         text NOT NULL,
    created_at_ms bigint NOT NULL,
    record        jsonb NOT NULL
);
-- Two live rollouts racing for one fleet is how stampedes start: the
-- database refuses the second, whichever replica creates it.
CREATE UNIQUE INDEX one_live_rollout_per_type ON rollouts (device_type)
    WHERE state IN ('active', 'paused');

CREATE TABLE members (
    rollout text NOT NULL REFERENCES rollouts (id),
    device  text NOT NULL,
    wave    integer NOT NULL,
    phase   text NOT NULL,
    -- Fence of the download lease granted with the current attempt: writes
    -- that act on a lease name it, so a stalled replica cannot act on a
    -- lease given away since.
    fence   bigint NOT NULL DEFAULT 0,
    member  jsonb NOT NULL,
    PRIMARY KEY (rollout, device)
);
CREATE INDEX members_by_phase ON members (rollout, phase);
CREATE INDEX members_by_device ON members (device);

CREATE TABLE wave_counters (
    rollout      text NOT NULL REFERENCES rollouts (id),
    wave         integer NOT NULL,
    shard        integer NOT NULL,
    eligible     bigint NOT NULL DEFAULT 0,
    current      bigint NOT NULL DEFAULT 0,
    admitted     bigint NOT NULL DEFAULT 0,
    installed    bigint NOT NULL DEFAULT 0,
    committed    bigint NOT NULL DEFAULT 0,
    failed       bigint NOT NULL DEFAULT 0,
    rolled_back  bigint NOT NULL DEFAULT 0,
    bytes_served bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout, wave, shard)
);

-- Event ingestion is idempotent by (device, seq): the primary key is the
-- guarantee, whichever replica a retried batch reaches.
CREATE TABLE events (
    device         text NOT NULL,
    seq            bigint NOT NULL,
    update_id      text NOT NULL,
    kind           text NOT NULL,
    event          jsonb NOT NULL,
    received_at_ms bigint NOT NULL,
    PRIMARY KEY (device, seq)
);
