-- fleetscan store, SQLite schema 1. Same meaning as migrations/postgres/0001_initial.sql;
-- change both together, and never edit a migration once released: add the next file instead
-- (and list it in crates/fleetscan-store/src/migrations.rs).
--
-- Conventions:
-- * SHA-256 digests are stored as their 32 raw bytes (BLOB), half the size of hex text; read
--   them as hex with `hex(sha256)`.
-- * Times are milliseconds since the Unix epoch (INTEGER), durations microseconds.
-- * Enumerations (verdict result, access kind, action, decided_by) are stored as the strings
--   of fleetscan-core's `as_str` and read back with its `parse`: an unknown string is an error
--   in the reader, so no CHECK lists them here (a new variant needs no migration).
-- * `tenant` is plain text for now; a later `tenants` table can reference it.
-- * STRICT tables: a value of the wrong type (e.g. an integer overflowed into REAL) is an
--   error, not a silent conversion.

-- One scanner's verdict on one content. The key is the full scanner identity: a verdict is
-- reused only for the same content, scanner, engine and rule set. The primary key starts with
-- sha256, so it also serves every look-up by content; no separate sha256 index is needed.
CREATE TABLE verdicts (
    sha256              BLOB    NOT NULL CHECK (length(sha256) = 32),
    scanner             TEXT    NOT NULL,
    engine              TEXT    NOT NULL,
    engine_version      TEXT    NOT NULL,
    ruleset_version     TEXT    NOT NULL,
    result              TEXT    NOT NULL,
    threat_name         TEXT,
    detail              TEXT,
    scanned_at_unix_ms  INTEGER NOT NULL,
    scan_micros         INTEGER NOT NULL CHECK (scan_micros >= 0),
    PRIMARY KEY (sha256, scanner, engine, engine_version, ruleset_version)
) STRICT, WITHOUT ROWID;

-- Recorded accesses (every denial; allowed ones are only counted per host). AUTOINCREMENT so
-- an id is never reused after deletions: ids are the paging cursor of the admin API.
CREATE TABLE accesses (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_unix_ms  INTEGER NOT NULL,
    tenant      TEXT    NOT NULL,
    node        TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    sha256      BLOB    CHECK (sha256 IS NULL OR length(sha256) = 32),
    threat_name TEXT,
    pid         INTEGER NOT NULL CHECK (pid BETWEEN 0 AND 4294967295),
    uid         INTEGER NOT NULL CHECK (uid BETWEEN 0 AND 4294967295),
    exe         TEXT    NOT NULL,
    decided_by  TEXT    NOT NULL
) STRICT;

-- The admin API lists a tenant's accesses newest first, optionally for one node or one content.
CREATE INDEX accesses_tenant_id ON accesses (tenant, id);
CREATE INDEX accesses_tenant_node_id ON accesses (tenant, node, id);
CREATE INDEX accesses_sha256_id ON accesses (sha256, id);

-- Agents seen by the brokers, with their decision counters.
CREATE TABLE hosts (
    tenant              TEXT    NOT NULL,
    node                TEXT    NOT NULL,
    cluster             TEXT    NOT NULL,
    agent_version       TEXT    NOT NULL,
    first_seen_unix_ms  INTEGER NOT NULL,
    last_seen_unix_ms   INTEGER NOT NULL,
    allowed_count       INTEGER NOT NULL DEFAULT 0 CHECK (allowed_count >= 0),
    denied_count        INTEGER NOT NULL DEFAULT 0 CHECK (denied_count >= 0),
    PRIMARY KEY (tenant, node)
) STRICT;
