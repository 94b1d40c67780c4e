-- Workload identity, SQLite flavour: join tokens (hashed), JWT attestors, registration entries
-- and the SVID denylist. Timestamps are INTEGER microseconds since the Unix epoch (UTC).

CREATE TABLE join_tokens (
    token_hash BLOB    PRIMARY KEY,
    spiffe_id  TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
) STRICT;

CREATE TABLE attestors (
    name       TEXT    PRIMARY KEY,
    issuer     TEXT    NOT NULL UNIQUE,
    audience   TEXT    NOT NULL,
    jwks       TEXT    NOT NULL,
    template   TEXT    NOT NULL,
    algorithms TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE registration_entries (
    id         TEXT    PRIMARY KEY,
    spiffe_id  TEXT    NOT NULL,
    parent_id  TEXT    NOT NULL,
    selectors  TEXT    NOT NULL,
    x509_ttl   INTEGER NOT NULL,
    jwt_ttl    INTEGER NOT NULL,
    dns_names  TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX registration_entries_parent ON registration_entries (parent_id);

CREATE TABLE svid_denylist (
    kind       TEXT    NOT NULL CHECK (kind IN ('spiffe_id', 'serial')),
    value      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
) STRICT;
