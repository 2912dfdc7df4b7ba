-- fleetscan store, Postgres schema 1. Same meaning as migrations/sqlite/0001_initial.sql;
-- change both together, and never edit a migration once released: add the next file instead
-- (and list it in crates/fleetscan-store/src/migrations.rs).
--
-- Conventions:
-- * SHA-256 digests are stored as their 32 raw bytes (BYTEA), half the size of hex text; read
--   them as hex with `encode(sha256, 'hex')`.
-- * Times are milliseconds since the Unix epoch (BIGINT), durations microseconds. Unsigned
--   counters live in BIGINT; the store converts with checked conversions and rejects values
--   above i64::MAX rather than wrapping.
-- * Enumerations (verdict result, access kind, action, decided_by) are stored as the strings
--   of fleetscan-core's `as_str` and read back with its `parse`: an unknown string is an error
--   in the reader, so no CHECK lists them here (a new variant needs no migration).
-- * `tenant` is plain text for now; a later `tenants` table can reference it.

-- One scanner's verdict on one content. The key is the full scanner identity: a verdict is
-- reused only for the same content, scanner, engine and rule set. The primary key starts with
-- sha256, so its index also serves every look-up by content; no separate sha256 index is needed.
CREATE TABLE verdicts (
    sha256              BYTEA  NOT NULL CHECK (octet_length(sha256) = 32),
    scanner             TEXT   NOT NULL,
    engine              TEXT   NOT NULL,
    engine_version      TEXT   NOT NULL,
    ruleset_version     TEXT   NOT NULL,
    result              TEXT   NOT NULL,
    threat_name         TEXT,
    detail              TEXT,
    scanned_at_unix_ms  BIGINT NOT NULL,
    scan_micros         BIGINT NOT NULL CHECK (scan_micros >= 0),
    PRIMARY KEY (sha256, scanner, engine, engine_version, ruleset_version)
);

-- Recorded accesses (every denial; allowed ones are only counted per host). Ids come from the
-- sequence; the store allocates a batch's ids up front so it can return them in input order.
CREATE TABLE accesses (
    id          BIGSERIAL PRIMARY KEY,
    at_unix_ms  BIGINT NOT NULL,
    tenant      TEXT   NOT NULL,
    node        TEXT   NOT NULL,
    path        TEXT   NOT NULL,
    kind        TEXT   NOT NULL,
    action      TEXT   NOT NULL,
    reason      TEXT   NOT NULL,
    sha256      BYTEA  CHECK (sha256 IS NULL OR octet_length(sha256) = 32),
    threat_name TEXT,
    pid         BIGINT NOT NULL CHECK (pid BETWEEN 0 AND 4294967295),
    uid         BIGINT NOT NULL CHECK (uid BETWEEN 0 AND 4294967295),
    exe         TEXT   NOT NULL,
    decided_by  TEXT   NOT NULL
);

-- The admin API lists a tenant's accesses newest first, optionally for one node or one content.
CREATE INDEX accesses_tenant_id ON accesses (tenant, id);
CREATE INDEX accesses_tenant_node_id ON accesses (tenant, node, id);
CREATE INDEX accesses_sha256_id ON accesses (sha256, id);

-- Agents seen by the brokers, with their decision counters.
CREATE TABLE hosts (
    tenant              TEXT   NOT NULL,
    node                TEXT   NOT NULL,
    cluster             TEXT   NOT NULL,
    agent_version       TEXT   NOT NULL,
    first_seen_unix_ms  BIGINT NOT NULL,
    last_seen_unix_ms   BIGINT NOT NULL,
    allowed_count       BIGINT NOT NULL DEFAULT 0 CHECK (allowed_count >= 0),
    denied_count        BIGINT NOT NULL DEFAULT 0 CHECK (denied_count >= 0),
    PRIMARY KEY (tenant, node)
);
