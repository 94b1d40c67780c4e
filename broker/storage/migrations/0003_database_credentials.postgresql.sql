-- Dynamic database credentials, PostgreSQL flavour: connections (admin password sealed), roles,
-- leases and root-rotation recovery records. Timestamps are timestamptz; durations are integer seconds.

CREATE TABLE db_connections (
    name            TEXT    PRIMARY KEY,
    plugin          TEXT    NOT NULL CHECK (plugin IN ('postgresql', 'mysql')),
    dsn             TEXT    NOT NULL,
    sealed_password bytea   NOT NULL,
    kek_label       TEXT    NOT NULL,
    created_at      timestamptz NOT NULL,
    rotated_at      timestamptz
);

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
    created_at          timestamptz NOT NULL
);

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
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    max_expires_at  timestamptz NOT NULL,
    due_at          timestamptz NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    UNIQUE (connection, username)
);

CREATE INDEX db_leases_due ON db_leases (due_at) WHERE state <> 'irrevocable';

CREATE TABLE db_root_recovery (
    connection      TEXT    PRIMARY KEY,
    sealed_password bytea   NOT NULL,
    kek_label       TEXT    NOT NULL,
    started_at      timestamptz NOT NULL
);
