-- Initial schema, SQLite flavour. STRICT tables (SQLite >= 3.37) so a value of the wrong type is
-- refused instead of stored. Timestamps are INTEGER microseconds since 1970-01-01T00:00:00Z.

CREATE TABLE schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at INTEGER NOT NULL
) STRICT;

-- The CA journal: the root and each generation of the issuing CA.
CREATE TABLE authorities (
    id            TEXT    PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('root', 'issuing')),
    generation    INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('prepared', 'active', 'retired', 'expired')),
    key_label     TEXT    NOT NULL,
    cert_der      BLOB    NOT NULL,
    jwt_key_label TEXT,
    jwt_kid       TEXT,
    created_at    INTEGER NOT NULL,
    not_before    INTEGER NOT NULL,
    not_after     INTEGER NOT NULL,
    activated_at  INTEGER,
    retired_at    INTEGER,
    UNIQUE (kind, generation)
) STRICT;

-- Versioned policy documents ("ca" for the CA policy), append-only.
CREATE TABLE policies (
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL CHECK (version >= 1),
    document   TEXT    NOT NULL,
    author     TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) STRICT;

-- The tamper-evident audit ledger: a hash chain, one row per event, seq 1, 2, 3, ...
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 1),
    event      TEXT    NOT NULL,
    prev_hash  BLOB    NOT NULL,
    entry_hash BLOB    NOT NULL,
    mac        BLOB    NOT NULL
) STRICT;

-- Append-only: rows are never changed or removed through SQL (tampering by someone who can write
-- the file is caught by the hash chain and MACs; this stops accidents). A retention job, when it
-- comes, replaces these in a migration.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit ledger is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit ledger is append-only');
END;

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;

-- Named leader leases for background jobs (CA rotation, lease reaper, retention).
CREATE TABLE leases_lock (
    name       TEXT    PRIMARY KEY,
    owner      TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;
