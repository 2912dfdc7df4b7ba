-- fleetscan store, SQLite schema 3: verdicts of a tenant's own scanners.
-- Same meaning as migrations/postgres/0003_tenant_verdicts.sql; change both together.
--
-- A verdict made by a pool that belongs to one tenant (e.g. with its private YARA rules) is
-- reused only for that tenant: it is kept here, keyed by the tenant as well as by content and
-- scanner identity. `verdicts` keeps the fleet's verdicts (shared pools and the fleet
-- operator's), whose meaning is unchanged. Two tenants whose scanners happen to carry the same
-- identity never see each other's verdicts.
CREATE TABLE tenant_verdicts (
    tenant              TEXT    NOT NULL CHECK (tenant <> ''),
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
    PRIMARY KEY (tenant, sha256, scanner, engine, engine_version, ruleset_version)
) STRICT, WITHOUT ROWID;
