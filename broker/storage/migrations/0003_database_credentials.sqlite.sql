-- Dynamic database credentials, SQLite flavour: connections (admin password sealed), roles,
-- leases and root-rotation recovery records. Timestamps are INTEGER microseconds since the Unix
-- epoch (UTC); durations are INTEGER seconds.

CREATE TABLE db_connections (
    name            TEXT    PRIMARY KEY,
    plugin          TEXT    NOT NULL CHECK (plugin IN ('postgresql', 'mysql')),
    dsn             TEXT    NOT NULL,
    sealed_password BLOB    NOT NULL,
    kek_label       TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    rotated_at      INTEGER
) STRICT;

CREATE TABLE db_roles (
    name                TEXT    PRIMARY KEY,
    connection          TEXT    NOT NULL REFERENCES db_connections (name),
    owner               TEXT    NOT NULL,
    tenant              TEXT    NOT NULL,
    environment         TEXT    NOT NULL,
    creation            TEXT    NOT NULL,
    revocation          TEXT,
    rollback            TEXT,
    default_ttl         INTEGER NOT NULL,
    max_ttl             INTEGER NOT NULL,
    username_template   TEXT    NOT NULL,
    password_length     INTEGER NOT NULL,
    password_charset    TEXT    NOT NULL,
    created_at          INTEGER NOT NULL
) STRICT;

-- A lease carries everything needed to revoke its user, even after its role is removed.
CREATE TABLE db_leases (
    id              TEXT    PRIMARY KEY,
    role            TEXT    NOT NULL,
    connection      TEXT    NOT NULL,
    plugin          TEXT    NOT NULL,
    username        TEXT    NOT NULL,
    holder          TEXT    NOT NULL,
    state           TEXT    NOT NULL
                    CHECK (state IN ('pending', 'active', 'revoking', 'irrevocable')),
    revocation      TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    max_expires_at  INTEGER NOT NULL,
    due_at          INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    UNIQUE (connection, username)
) STRICT;

CREATE INDEX db_leases_due ON db_leases (due_at) WHERE state <> 'irrevocable';

CREATE TABLE db_root_recovery (
    connection      TEXT    PRIMARY KEY,
    sealed_password BLOB    NOT NULL,
    kek_label       TEXT    NOT NULL,
    started_at      INTEGER NOT NULL
) STRICT;
