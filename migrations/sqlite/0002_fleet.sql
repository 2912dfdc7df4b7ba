-- fleetscan store, SQLite schema 2: what brokers of one fleet share besides verdicts.
-- Same meaning as migrations/postgres/0002_fleet.sql; change both together.

-- The fleet's verdict generation: one number every broker hands to its agents. It changes
-- exactly when some pool's scanner identity changes, so an agent moving from one broker to
-- another keeps its cache, and a rule-set change anywhere flushes every agent. It starts at
-- the creation time in milliseconds so that a store made afresh never repeats the numbers of
-- an older one that agents may still hold.
CREATE TABLE fleet_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  INTEGER NOT NULL CHECK (generation > 0)
) STRICT;
INSERT INTO fleet_state (id, generation)
VALUES (1, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));

-- Every scanner identity a pool has ever had, with the time a broker first saw a worker
-- register it. An identity seen for the first time becomes the pool's current one; one seen
-- before does not (an old worker reconnecting during a rolling upgrade must not turn the pool
-- back).
CREATE TABLE pool_identities (
    tenant              TEXT    NOT NULL,
    pool                TEXT    NOT NULL,
    scanner             TEXT    NOT NULL,
    engine              TEXT    NOT NULL,
    engine_version      TEXT    NOT NULL,
    ruleset_version     TEXT    NOT NULL,
    first_seen_unix_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, pool, scanner, engine, engine_version, ruleset_version)
) STRICT, WITHOUT ROWID;

-- Each pool's current scanner identity: the one whose verdicts decide, on every broker.
CREATE TABLE pool_current (
    tenant           TEXT    NOT NULL,
    pool             TEXT    NOT NULL,
    scanner          TEXT    NOT NULL,
    engine           TEXT    NOT NULL,
    engine_version   TEXT    NOT NULL,
    ruleset_version  TEXT    NOT NULL,
    -- The fleet generation this identity became current at.
    generation       INTEGER NOT NULL,
    PRIMARY KEY (tenant, pool)
) STRICT, WITHOUT ROWID;

-- A broker's claim on scanning one content under one scanner identity, so that brokers asked
-- for the same new content at once cause one scan: the others wait for the verdict and take
-- the claim over once it expires (its owner died or hung). Expiry is on the database's clock.
CREATE TABLE scan_claims (
    sha256              BLOB    NOT NULL CHECK (length(sha256) = 32),
    scanner             TEXT    NOT NULL,
    engine              TEXT    NOT NULL,
    engine_version      TEXT    NOT NULL,
    ruleset_version     TEXT    NOT NULL,
    owner               TEXT    NOT NULL,
    expires_at_unix_ms  INTEGER NOT NULL,
    PRIMARY KEY (sha256, scanner, engine, engine_version, ruleset_version)
) STRICT, WITHOUT ROWID;
